"""RAG benchmarks: embedding throughput, index build time, query latency (dense / sparse /
hybrid) at a few thousand real chunks, recall@10 of HNSW and IVF-PQ against exact search, and
retrieval quality on BEIR SciFact when it is present.

Run:  python -m pytest benchmarks/bench_rag.py -s --benchmark-columns=min,median,max,rounds
Corpus: the Turkish LibreOffice help (/work/shared/data/turkish-software-help/help_tr.jsonl),
chunked at 200 tokens; ``R3MES_BENCH_CHUNKS`` caps the number of chunks (default 3000).
Skipped when the shared data folder is absent. A summary table is printed at the end.

SciFact (``test_scifact_quality``): nDCG@10 and recall@100 of dense, BM25 and hybrid (RRF) on
the BEIR SciFact test queries, when ``../shared/data/scifact/`` (beside the repository; or
``R3MES_SCIFACT_DIR``) holds ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/test.tsv`` (the
BEIR layout; one nested ``scifact/`` folder is also accepted). Skipped cleanly otherwise.
Documents are ``title + text``, chunked as the index does; a document's rank is that of its
best chunk. Published on this set: BM25 0.665-0.679, all-MiniLM-L6-v2 0.645, hybrid target
>= 0.70 and above both parts. The rows land in the end-of-run table (``--table-out FILE``).
``R3MES_SCIFACT_CACHE`` keeps the embedding cache between runs (the corpus embeds once).
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



@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if not HELP.is_file():
        pytest.skip("shared data folder is absent")
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


# -- BEIR SciFact: nDCG@10 and recall@100 ------------------------------------------------------

SCIFACT = Path(os.environ.get("R3MES_SCIFACT_DIR") or
               Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scifact")


def _scifact_dir() -> Path | None:
    for d in (SCIFACT, SCIFACT / "scifact"):
        if (d / "corpus.jsonl").is_file() and (d / "queries.jsonl").is_file() \
                and (d / "qrels" / "test.tsv").is_file():
            return d
    return None


def _read_jsonl(path: Path) -> list[dict]:
    import json

    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            parts = line.rstrip("\n").split("\t")
            if n == 0 and not parts[-1].lstrip("-").isdigit():
                continue  # header: query-id corpus-id score
            if len(parts) >= 3 and int(parts[2]) > 0:
                qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return qrels


def ndcg_at_k(ranked: list[str], relevant: dict[str, int], k: int = 10) -> float:
    """nDCG@k with graded gains ``rel / log2(rank + 1)`` (the BEIR / pytrec_eval definition)."""
    dcg = sum(relevant.get(d, 0) / np.log2(r + 2) for r, d in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(g / np.log2(r + 2) for r, g in enumerate(ideal))
    return float(dcg / idcg) if idcg > 0 else 0.0


def recall_at(ranked: list[str], relevant: dict[str, int], k: int = 100) -> float:
    return len(set(ranked[:k]) & set(relevant)) / len(relevant) if relevant else 0.0


def test_scifact_quality(tmp_path_factory, record_row):
    data = _scifact_dir()
    if data is None:
        pytest.skip(f"BEIR SciFact is not at {SCIFACT} (corpus.jsonl, queries.jsonl, "
                    "qrels/test.tsv)")
    from r3mes.rag import Document

    corpus_rows = _read_jsonl(data / "corpus.jsonl")
    queries = {str(q["_id"]): q["text"] for q in _read_jsonl(data / "queries.jsonl")}
    qrels = {q: r for q, r in _read_qrels(data / "qrels" / "test.tsv").items() if q in queries}
    docs = [Document(str(d["_id"]), f"{d.get('title', '')}\n\n{d['text']}".strip(),
                     {"title": d.get("title", "")})
            for d in corpus_rows if (d.get("title") or d.get("text", "")).strip()]
    cache = os.environ.get("R3MES_SCIFACT_CACHE") or tmp_path_factory.mktemp("scifact-cache")
    embedder = Embedder(cache_dir=cache)
    store = RagStore(tmp_path_factory.mktemp("scifact-home"), embedder=embedder)
    t0 = time.perf_counter()
    store.index("general").add_documents(docs)
    build_s = time.perf_counter() - t0
    n_chunks = len(store.index("general"))
    retriever = Retriever(store, candidates=300)
    for mode in ("dense", "sparse", "hybrid"):
        ndcg, recall = [], []
        for qid, rel in qrels.items():
            hits = retriever.search(queries[qid], top_k=300, mode=mode, indices=["general"])
            ranked = list(dict.fromkeys(h.doc_id for h in hits))  # best chunk per document
            ndcg.append(ndcg_at_k(ranked, rel, 10))
            recall.append(recall_at(ranked, rel, 100))
        name = {"dense": "dense (all-MiniLM-L6-v2)", "sparse": "BM25",
                "hybrid": "hybrid (RRF k=60)"}[mode]
        RESULTS.append((f"SciFact {name}", f"nDCG@10 {np.mean(ndcg):.4f}, recall@100 "
                                           f"{np.mean(recall):.4f}"))
        record_row({"bench": "rag_scifact", "mode": name, "queries": len(qrels),
                    "ndcg_at_10": f"{np.mean(ndcg):.4f}", "recall_at_100": f"{np.mean(recall):.4f}",
                    "notes": f"{len(docs)} docs, {n_chunks} chunks, indexed in {build_s:.0f} s"})


def teardown_module(module):
    if RESULTS:
        width = max(len(k) for k, _ in RESULTS)
        print("\n\nRAG benchmark summary")
        for k, v in RESULTS:
            print(f"  {k.ljust(width)}  {v}")
