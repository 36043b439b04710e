"""RAG at scale: indexing throughput, and search latency (p50 / p99) with memory use at
100 000 chunks (hybrid: dense + BM25) and 1 000 000 vectors (dense only), flat vs HNSW vs
IVF-PQ.

Run (prints a Markdown table at the end; ``--table-out FILE`` also writes it)::

    python -m pytest benchmarks/bench_rag_scale.py -s -p no:cacheprovider \
        --benchmark-disable-gc --benchmark-columns=median,max,rounds

What is real and what is synthetic:

- Indexing throughput is measured end to end (chunk, embed with the real MiniLM on CPU,
  FAISS add, BM25 tokenise) on ``R3MES_SCALE_EMBED_SAMPLE`` real chunks (default 256) of the
  Turkish help corpus, with a cold embedding cache; the time to index 100k / 1M chunks is
  that rate *extrapolated* (the table says so). The FAISS and BM25 build times at full size
  are measured separately on the synthetic data.
- Dense vectors at scale are synthetic: clustered, unit-norm 384-d vectors (like sentence
  embeddings; uniform random vectors would be a needlessly hard case for the approximate
  indices). Queries are perturbed data points.
- BM25 text at 100k is sampled: each chunk is 150 words drawn from the word frequencies of
  the shared corpora (Turkish help + English novels), so posting lists have realistic lengths;
  queries are 4 words drawn the same way. Without the shared data, a Zipf vocabulary is used.
- Retriever latency is measured through ``Retriever.search`` (top_k=5, 50 candidates a list,
  RRF) with the query vector precomputed, i.e. *excluding* the query embedding; the embedding
  time and the total are reported separately.

Environment variables (defaults keep the run to a few minutes on 2 CPU cores):

- ``R3MES_SCALE_N`` (100000): chunks in the hybrid index.
- ``R3MES_SCALE_BIG_N`` (1000000): vectors in the dense-only test; 0 skips it.
- ``R3MES_SCALE_BIG_KINDS`` (``flat,ivfpq``): kinds built at the big size; add ``hnsw`` to
  include HNSW (its build takes many minutes on 2 cores).
- ``R3MES_SCALE_BIG_NLIST`` (1024): IVF lists at the big size (automatic would be 4000, whose
  k-means alone takes minutes on 2 cores); 0 means automatic.
- ``R3MES_SCALE_ROUNDS`` (200) / ``R3MES_SCALE_BIG_ROUNDS`` (40): queries timed per row.
- ``R3MES_SCALE_EMBED_SAMPLE`` (256): real chunks embedded for the throughput figure.
- ``R3MES_SCALE_THREADS`` (1): torch and FAISS threads; 0 keeps the libraries' defaults. One
  thread is the default because on a shared machine a parallel region for a single query waits
  for its slowest thread, and a descheduled thread costs a whole scheduler time slice (measured
  here: MiniLM query embedding p50 387 ms with 2 threads vs 12 ms with 1 under load).
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from r3mes.rag import Chunker, RagStore, Retriever, load_documents
from r3mes.rag.embedder import Embedder
from r3mes.rag.faiss_store import FaissStore, recall_at_k
from r3mes.rag.indices import ChunkRecord, IndexConfig, NamedIndex
from r3mes.rag.sparse import tokenize

DIM = 384
N = int(os.environ.get("R3MES_SCALE_N", "100000"))
BIG_N = int(os.environ.get("R3MES_SCALE_BIG_N", "1000000"))
BIG_KINDS = [k for k in os.environ.get("R3MES_SCALE_BIG_KINDS", "flat,ivfpq").split(",") if k]
BIG_NLIST = int(os.environ.get("R3MES_SCALE_BIG_NLIST", "1024"))
ROUNDS = int(os.environ.get("R3MES_SCALE_ROUNDS", "200"))
BIG_ROUNDS = int(os.environ.get("R3MES_SCALE_BIG_ROUNDS", "40"))
EMBED_SAMPLE = int(os.environ.get("R3MES_SCALE_EMBED_SAMPLE", "256"))
THREADS = int(os.environ.get("R3MES_SCALE_THREADS", "1"))
N_QUERIES = 100
WORDS_PER_CHUNK = 150
DATA = Path("/work/shared/data")
HELP = DATA / "turkish-software-help" / "help_tr.jsonl"
NOVELS = sorted((DATA / "english-novels").glob("*.txt"))


# -- helpers ---------------------------------------------------------------------------------


def _rss_mib() -> float:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def _percentiles_ms(benchmark) -> tuple[float, float]:
    data = np.asarray(benchmark.stats.stats.data) * 1e3
    return float(np.percentile(data, 50)), float(np.percentile(data, 99))


def _clustered_unit(n: int, rng: np.random.Generator, centres: np.ndarray,
                    noise: float = 0.35, block: int = 100_000) -> np.ndarray:
    """``n`` unit vectors around ``centres``, generated in blocks to bound temporaries."""
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, block):
        m = min(block, n - start)
        v = centres[rng.integers(0, len(centres), m)]
        v = v + noise * rng.standard_normal((m, DIM), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        out[start:start + m] = v
    return out


def _queries_near(vecs: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    q = vecs[rng.choice(len(vecs), n, replace=False)] + \
        0.1 * rng.standard_normal((n, DIM), dtype=np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def _vocabulary() -> tuple[list[str], np.ndarray, str]:
    """Surface words and their probabilities, from the shared corpora when present."""
    texts: list[str] = []
    if HELP.is_file():
        texts += [d.text for d in load_documents(HELP)]
    texts += [p.read_text(encoding="utf-8", errors="replace") for p in NOVELS]
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(w for w in t.split() if w.isalpha())
    if counts:
        words, freq = zip(*counts.most_common(200_000), strict=True)
        source = f"word frequencies of {len(texts)} shared texts ({len(words)} words)"
    else:  # Zipf over pseudo-words
        words = tuple(f"w{r}" for r in range(50_000))
        freq = tuple(1.0 / (r + 1) for r in range(50_000))
        source = "Zipf vocabulary of 50 000 pseudo-words"
    p = np.asarray(freq, dtype=np.float64)
    return list(words), p / p.sum(), source


def _row(record_row, **cols) -> None:
    record_row({"bench": "rag_scale", **cols})


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def threads():
    import faiss
    import torch

    if THREADS > 0:
        torch.set_num_threads(THREADS)
        faiss.omp_set_num_threads(THREADS)
    return faiss.omp_get_max_threads()


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(cache_dir=None, show_progress=False)


@pytest.fixture(scope="module")
def corpus():
    """Synthetic vectors, sampled BM25 terms and query texts for the ``N``-chunk index."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((max(16, N // 100), DIM), dtype=np.float32)
    vecs = _clustered_unit(N, rng, centres)
    qvecs = _queries_near(vecs, rng, N_QUERIES)
    words, p, source = _vocabulary()
    t0 = time.perf_counter()
    stems = [tokenize(w) for w in words]  # a word's terms (none for a stop word)
    sample = rng.choice(len(words), size=(N, WORDS_PER_CHUNK), p=p)
    terms = [[t for w in row for t in stems[w]] for row in sample.tolist()]
    texts = [" ".join(words[w] for w in row[:30]) for row in sample[:, :30].tolist()]
    useful = [i for i, s in enumerate(stems) if s]
    q_rows = rng.choice(useful, size=(N_QUERIES, 4), p=p[useful] / p[useful].sum())
    qtexts = [" ".join(words[w] for w in row) for row in q_rows.tolist()]
    gen_s = time.perf_counter() - t0
    return {"vecs": vecs, "qvecs": qvecs, "terms": terms, "texts": texts, "qtexts": qtexts,
            "source": source, "gen_s": gen_s,
            "mean_terms": float(np.mean([len(t) for t in terms]))}


class _PrecomputedQueries:
    """Stands in for the embedder inside the retriever: returns each query's vector from a
    table, so a timing covers retrieval only (the embedding is timed on its own)."""

    def __init__(self, embedder: Embedder, table: dict[str, np.ndarray]) -> None:
        self.dim, self.fingerprint, self.max_tokens = embedder.dim, embedder.fingerprint, \
            embedder.max_tokens
        self.table = table

    def embed_query(self, text: str) -> np.ndarray:
        return self.table[text]


_BUILT: dict[str, tuple[NamedIndex, dict]] = {}


def _hybrid_index(kind: str, corpus, embedder) -> tuple[NamedIndex, dict]:
    """A ``general`` index of ``N`` chunks over the synthetic corpus, built once per kind
    (the FAISS and BM25 structures are built eagerly and timed)."""
    if kind in _BUILT:
        return _BUILT[kind]
    before = _rss_mib()
    ix = NamedIndex("general", embedder, IndexConfig(kind=kind))
    ids = np.arange(N, dtype=np.int64)
    for i, text in enumerate(corpus["texts"]):
        rec = ChunkRecord(i, f"doc{i // 4}", i % 4, text, {}, 0.0)
        ix.records[i] = rec
        ix.docs.setdefault(rec.doc_id, []).append(i)
    ix.next_id = N
    t0 = time.perf_counter()
    ix.dense.add(ids, corpus["vecs"])
    ix.dense._ensure_index()  # build (and for IVF-PQ train) now, not on the first query
    dense_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ix.sparse.add_tokens(ids.tolist(), corpus["terms"])
    ix.sparse._ensure()
    bm25_s = time.perf_counter() - t0
    info = {"dense_build_s": dense_s, "bm25_build_s": bm25_s, "rss_mib": _rss_mib() - before,
            "active": ix.dense.active_kind}
    _BUILT[kind] = (ix, info)
    return ix, info


def _retriever(ix: NamedIndex, corpus, embedder, tmp_path_factory, precomputed: bool):
    table = dict(zip(corpus["qtexts"], corpus["qvecs"], strict=True))
    store = RagStore(tmp_path_factory.mktemp("scale-home"),
                     embedder=_PrecomputedQueries(embedder, table) if precomputed else embedder)
    store._loaded["general"] = ix  # an index built in memory, not loaded from a snapshot
    return Retriever(store)


# -- indexing throughput (real embeddings) ---------------------------------------------------


@pytest.mark.skipif(not HELP.is_file(), reason="shared data folder is absent")
def test_indexing_throughput_with_real_embeddings(benchmark, embedder, record_row):
    chunker = Chunker(embedder.max_tokens, 50)
    docs, n_chunks = [], 0
    for d in load_documents(HELP):
        docs.append(d)
        n_chunks += len(chunker.chunk(d))
        if n_chunks >= EMBED_SAMPLE:
            break

    def index_sample():
        ix = NamedIndex("general", Embedder(cache_dir=None, show_progress=False))
        ix.add_documents(docs)
        return ix

    ix = benchmark.pedantic(index_sample, rounds=1, iterations=1, warmup_rounds=0)
    rate = len(ix) / benchmark.stats.stats.min
    mean_tokens = np.mean([chunker.count_tokens(r.text) for r in ix.records.values()])
    _row(record_row, scale=f"{len(ix)} real chunks", index="-", measure="indexing throughput",
         value=f"{rate:.1f} chunks/s",
         notes=f"chunk+embed (MiniLM, CPU, cold cache)+FAISS+BM25; {mean_tokens:.0f} tokens/chunk")
    for n in (N, BIG_N):
        if n:
            _row(record_row, scale=f"{n} chunks", index="-", measure="indexing time",
                 value=f"{n / rate / 60:.0f} min", notes=f"EXTRAPOLATED from {len(ix)} chunks")


def test_query_embedding_latency(benchmark, embedder, corpus, record_row):
    it = iter(range(10**9))
    qs = corpus["qtexts"]
    benchmark.pedantic(lambda: embedder.embed_query(qs[next(it) % len(qs)]), rounds=ROUNDS,
                       iterations=1, warmup_rounds=3)
    p50, p99 = _percentiles_ms(benchmark)
    _row(record_row, scale="1 query", index="-", measure="query embedding (MiniLM, CPU)",
         p50_ms=f"{p50:.2f}", p99_ms=f"{p99:.2f}")


# -- N chunks: dense store alone, then the retriever (dense, sparse, hybrid) ------------------


@pytest.mark.parametrize(("kind", "ef_search"), [
    ("flat", None), ("hnsw", None), ("hnsw", 256), ("ivfpq", None)])
def test_dense_search_at_n(benchmark, kind, ef_search, corpus, embedder, record_row):
    ix, info = _hybrid_index(kind, corpus, embedder)
    default_ef = ix.dense.params["ef_search"]
    if ef_search is not None:  # the same graph searched wider: recall for latency
        ix.dense.params["ef_search"] = ef_search
        ix.dense._apply_search_params()
    q = corpus["qvecs"]
    try:
        recall = recall_at_k(ix.dense, q, 10)
        it = iter(range(10**9))
        benchmark.pedantic(lambda: ix.dense.search(q[next(it) % len(q)], 10), rounds=ROUNDS,
                           iterations=1, warmup_rounds=3)
    finally:
        ix.dense.params["ef_search"] = default_ef
        ix.dense._apply_search_params()
    p50, p99 = _percentiles_ms(benchmark)
    notes = f"index+vectors+records+BM25 RSS {info['rss_mib']:.0f} MiB"
    if kind == "hnsw":
        notes += f"; M {ix.dense.params['hnsw_m']}, efSearch {ef_search or default_ef}"
    _row(record_row, scale=f"{N} x {DIM}", index=info["active"], measure="dense search k=10",
         p50_ms=f"{p50:.2f}", p99_ms=f"{p99:.2f}", recall_at_10=f"{recall:.3f}",
         build_s=f"{info['dense_build_s']:.1f}", notes=notes)


@pytest.mark.parametrize(("kind", "mode"), [
    ("flat", "dense"), ("flat", "sparse"), ("flat", "hybrid"), ("hnsw", "hybrid"),
    ("ivfpq", "hybrid")])
def test_retriever_latency_at_n_excluding_embedding(benchmark, kind, mode, corpus, embedder,
                                                    tmp_path_factory, record_row):
    ix, info = _hybrid_index(kind, corpus, embedder)
    retriever = _retriever(ix, corpus, embedder, tmp_path_factory, precomputed=True)
    qs = corpus["qtexts"]
    it = iter(range(10**9))
    benchmark.pedantic(lambda: retriever.search(qs[next(it) % len(qs)], top_k=5, mode=mode),
                       rounds=ROUNDS, iterations=1, warmup_rounds=3)
    p50, p99 = _percentiles_ms(benchmark)
    notes = "excl. query embedding; top_k=5, 50 candidates/list"
    if mode == "sparse":
        notes += (f"; BM25 build {info['bm25_build_s']:.1f} s, {corpus['mean_terms']:.0f} "
                  f"terms/chunk sampled from the {corpus['source']}")
    _row(record_row, scale=f"{N} chunks", index=kind if mode != "sparse" else "bm25",
         measure=f"retriever {mode}", p50_ms=f"{p50:.2f}", p99_ms=f"{p99:.2f}", notes=notes)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_hybrid_total_latency_at_n_including_embedding(benchmark, kind, corpus, embedder,
                                                       tmp_path_factory, record_row):
    ix, _ = _hybrid_index(kind, corpus, embedder)
    retriever = _retriever(ix, corpus, embedder, tmp_path_factory, precomputed=False)
    qs = corpus["qtexts"]
    it = iter(range(10**9))
    benchmark.pedantic(lambda: retriever.search(qs[next(it) % len(qs)], top_k=5),
                       rounds=ROUNDS, iterations=1, warmup_rounds=3)
    p50, p99 = _percentiles_ms(benchmark)
    _row(record_row, scale=f"{N} chunks", index=kind, measure="retriever hybrid TOTAL",
         p50_ms=f"{p50:.2f}", p99_ms=f"{p99:.2f}", notes="incl. MiniLM query embedding")


# -- BIG_N vectors, dense only -----------------------------------------------------------------


@pytest.fixture(scope="module")
def big():
    if BIG_N <= 0:
        pytest.skip("R3MES_SCALE_BIG_N=0")
    _BUILT.clear()  # free the N-chunk indices first
    gc.collect()
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((max(16, BIG_N // 100), DIM), dtype=np.float32)
    vecs = _clustered_unit(BIG_N, rng, centres)
    return vecs, _queries_near(vecs, rng, N_QUERIES)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_dense_search_at_big_n(benchmark, kind, big, record_row):
    if kind not in BIG_KINDS:
        pytest.skip(f"{kind} at {BIG_N} is not in R3MES_SCALE_BIG_KINDS")
    vecs, q = big
    before = _rss_mib()
    params = {"nlist": BIG_NLIST or None} if kind == "ivfpq" else {}
    t0 = time.perf_counter()
    store = FaissStore(DIM, kind, **params)
    store.add(np.arange(BIG_N, dtype=np.int64), vecs)
    store._ensure_index()
    build_s = time.perf_counter() - t0
    rss = _rss_mib() - before
    # exact ground truth in small batches: (queries x BIG_N) scores would not fit otherwise
    recall = float(np.mean([recall_at_k(store, q[i:i + 10], 10) for i in range(0, 50, 10)]))
    it = iter(range(10**9))
    benchmark.pedantic(lambda: store.search(q[next(it) % len(q)], 10), rounds=BIG_ROUNDS,
                       iterations=1, warmup_rounds=2)
    p50, p99 = _percentiles_ms(benchmark)
    notes = f"store+index RSS {rss:.0f} MiB"
    if kind == "hnsw":
        notes += f"; M {store.params['hnsw_m']}, efSearch {store.params['ef_search']}"
    if kind == "ivfpq":
        inner = store._index
        notes += f"; nlist {inner.nlist}, nprobe {inner.nprobe}, refine x{store.params['refine']}"
    _row(record_row, scale=f"{BIG_N} x {DIM}", index=kind, measure="dense search k=10",
         p50_ms=f"{p50:.2f}", p99_ms=f"{p99:.2f}", recall_at_10=f"{recall:.3f}",
         build_s=f"{build_s:.1f}", notes=notes)


def test_machine(record_row):
    import faiss
    import torch

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    _row(record_row, scale="-", index="-", measure="machine",
         value=f"{os.cpu_count()} CPUs, faiss {faiss.__version__}, threads: faiss "
               f"{faiss.omp_get_max_threads()}, torch {torch.get_num_threads()}",
         notes=f"python {sys.version.split()[0]}; load average at the end {load}")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s", "-p", "no:cacheprovider", *sys.argv[1:]]))

