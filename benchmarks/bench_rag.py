"""RAG benchmarks: embedding throughput, index build time, query latency (dense / sparse /
hybrid) at a few thousand real chunks, and recall@10 of HNSW and IVF-PQ against exact search.

Run:  python -m pytest benchmarks/bench_rag.py -s --benchmark-columns=min,median,max,rounds
Corpus: the Turkish LibreOffice help (/work/shared/data/turkish-software-help/help_tr.jsonl),
chunked at 200 tokens; ``R3MES_BENCH_CHUNKS`` caps the number of chunks (default 3000).
Skipped when the shared data folder is absent. A summary table is printed at the end.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from r3mes.rag import Chunker, RagStore, Retriever, load_documents
from r3mes.rag.embedder import Embedder
from r3mes.rag.faiss_store import FaissStore, recall_at_k
from r3mes.rag.indices import IndexConfig

HELP = Path("/work/shared/data/turkish-software-help/help_tr.jsonl")
N_CHUNKS = int(os.environ.get("R3MES_BENCH_CHUNKS", "3000"))
QUERIES = [
    "hücreleri birleştirmek", "sayfa numarası eklemek", "özet tablo oluşturma",
    "yazdırma aralığı belirlemek", "formül kopyalamak", "metni döndürmek",
    "how to insert a chart", "kaynakça oluşturmak", "otomatik düzeltmeyi kapatmak",
    "tarih farkı hesaplamak",
]
RESULTS: list[tuple[str, str]] = []

pytestmark = pytest.mark.skipif(not HELP.is_file(), reason="shared data folder is absent")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    chunker = Chunker(200, 30)
    docs = load_documents(HELP)
    texts: list[str] = []
    for d in docs:
        texts.extend(c.text for c in chunker.chunk(d))
        if len(texts) >= N_CHUNKS:
            break
    texts = texts[:N_CHUNKS]
    embedder = Embedder(cache_dir=tmp_path_factory.mktemp("bench-cache"))
    t0 = time.perf_counter()
    vecs = embedder.embed(texts)
    dt = time.perf_counter() - t0
    RESULTS.append(("embed corpus (cold cache)", f"{len(texts)} chunks in {dt:.1f} s = "
                                                 f"{len(texts) / dt:.0f} chunks/s"))
    return docs, texts, vecs, embedder


def test_embedding_throughput(benchmark, corpus):
    _, texts, _, embedder = corpus
    batch = texts[:256]
    benchmark.pedantic(embedder._encode, args=(batch,), rounds=3, iterations=1)
    rate = len(batch) / benchmark.stats.stats.median
    benchmark.extra_info["chunks_per_s"] = rate
    RESULTS.append(("embedding throughput", f"{rate:.0f} chunks/s (batch 64, 256 chunks)"))


def test_embedding_cache_hit(benchmark, corpus):
    _, texts, _, embedder = corpus
    benchmark.pedantic(embedder.embed, args=(texts,), rounds=3, iterations=1)
    RESULTS.append(("re-embed unchanged corpus", f"{benchmark.stats.stats.median * 1e3:.0f} ms "
                                                 f"for {len(texts)} chunks (cache)"))


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_index_build(benchmark, corpus, kind):
    _, _, vecs, _ = corpus
    ids = np.arange(len(vecs))

    def build():
        s = FaissStore(vecs.shape[1], kind, ivf_min_train=1000)
        s.add(ids, vecs)
        s._ensure_index()
        return s

    benchmark.pedantic(build, rounds=2, iterations=1)
    RESULTS.append((f"build {kind}", f"{benchmark.stats.stats.median * 1e3:.0f} ms "
                                     f"({len(vecs)} x {vecs.shape[1]})"))


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_recall_against_exact(benchmark, corpus, kind):
    _, _, vecs, embedder = corpus
    s = FaissStore(vecs.shape[1], kind, ivf_min_train=1000)
    s.add(np.arange(len(vecs)), vecs)
    queries = embedder.embed(QUERIES)
    recall = recall_at_k(s, queries, 10)
    q = queries[:1]
    benchmark(s.search, q, 10)
    benchmark.extra_info["recall_at_10"] = recall
    us = benchmark.stats.stats.median * 1e6
    RESULTS.append((f"{kind} recall@10 vs exact", f"{recall:.3f} (search {us:.0f} us)"))


@pytest.fixture(scope="module")
def retriever(corpus, tmp_path_factory):
    docs, texts, _, embedder = corpus
    store = RagStore(tmp_path_factory.mktemp("bench-home"), embedder=embedder,
                     configs={"general": IndexConfig(max_tokens=200, overlap=30)})
    ix = store.index("general")
    added = 0
    for d in docs:  # the same documents the corpus fixture chunked (embeddings cached)
        if added >= len(texts):
            break
        added += ix.add_documents([d])["chunks"]
    return Retriever(store)


@pytest.mark.parametrize("mode", ["dense", "sparse", "hybrid"])
def test_query_latency(benchmark, retriever, mode):
    it = iter(range(10**9))

    def one():
        return retriever.search(QUERIES[next(it) % len(QUERIES)], top_k=5, mode=mode)

    one()  # warm BM25 build and the model
    benchmark.pedantic(one, rounds=50, iterations=1)
    st = benchmark.stats.stats
    n = len(retriever.store.index("general"))
    RESULTS.append((f"query {mode}", f"median {st.median * 1e3:.1f} ms, max {st.max * 1e3:.1f} ms "
                                     f"({n} chunks)"))


def teardown_module(module):
    if RESULTS:
        width = max(len(k) for k, _ in RESULTS)
        print("\n\nRAG benchmark summary")
        for k, v in RESULTS:
            print(f"  {k.ljust(width)}  {v}")
