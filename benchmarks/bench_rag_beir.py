"""nDCG@10 and recall@100 of BM25, dense and hybrid retrieval on a BEIR-format corpus, per
embedding model, with hybrid fusion weights fitted on a dev split and measured on a test split.

    python benchmarks/bench_rag_beir.py                       # builds the set below, runs it
    python benchmarks/bench_rag_beir.py --beir DIR            # any BEIR folder
    python benchmarks/bench_rag_beir.py --fit                 # also fit the fusion on dev

A BEIR folder holds ``corpus.jsonl`` (``_id, title, text``), ``queries.jsonl`` (``_id,
text``) and ``qrels/test.tsv`` (``query-id, corpus-id, score`` with a header). No judged IR
set ships offline here, so ``--build`` (the default without ``--beir``) writes one from the
shared Turkish LibreOffice help pages (``../shared/data/turkish-software-help``): a known-item
set where each query is a page's title and the page (with its title line removed from the
text, so the answer is not a copy of the question) is the one relevant document; ``--docs``
pages, every ``--every``-th page a query.

Queries are split in two by a hash of their id (``split_of``): **dev** and **test**. The
hybrid fusion (weighted RRF: the dense list weighted ``w``, BM25 ``1 - w``, rank offset
``k``) is only ever fitted on dev (``--fit``: a grid over ``w`` and ``k``, best nDCG@10,
then recall@100); every figure in the table is on test. The defaults r3mes ships
(``r3mes.rag.retriever.DEFAULT_FUSION``) came from this fit; ``--fit`` shows whether they
still match it.

Documents are indexed as ``r3mes index add`` indexes them (chunked, then embedded by each
``--models`` model: MiniLM int8 and multilingual-e5-small 4-bit by default) and ranked at
document level (a document's rank is its best chunk's), which is what a user sees now that
one document is one source. ``--cache DIR`` keeps the embedding cache between runs.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from r3mes.rag import Document, RagStore, Retriever, rrf_fuse
from r3mes.rag.embedder import E5_MODEL, MINILM_MODEL, Embedder
from r3mes.rag.retriever import DEFAULT_FUSION, Fusion

ROOT = Path(__file__).resolve().parent.parent
HELP = ROOT.parent / "shared" / "data" / "turkish-software-help" / "help_tr.jsonl"
DEPTH = 300  # how deep each ranking is read (and fused)
GRID_WEIGHTS = [round(0.05 * i, 2) for i in range(21)]
GRID_K = (5, 10, 20, 30, 60, 100)


def build_help_set(out: Path, docs: int, every: int) -> Path:
    """Write the known-item BEIR set described in the module docstring into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "qrels").mkdir(exist_ok=True)
    pages = []
    with open(HELP, encoding="utf-8") as fh:
        for line in fh:
            page = json.loads(line)
            title, text = page["title"].strip(), page["text"].strip()
            body = text[len(title):].strip() if text.startswith(title) else text
            if len(title) >= 12 and len(body) >= 200:
                pages.append((page["id"], title, body))
    pages = pages[:docs]
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for pid, _, body in pages:
            fh.write(json.dumps({"_id": pid, "title": "", "text": body}, ensure_ascii=False) + "\n")
    chosen = pages[::every]
    with open(out / "queries.jsonl", "w", encoding="utf-8") as fh:
        for n, (_, title, _) in enumerate(chosen):
            fh.write(json.dumps({"_id": f"q{n}", "text": title}, ensure_ascii=False) + "\n")
    with open(out / "qrels" / "test.tsv", "w", encoding="utf-8") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for n, (pid, _, _) in enumerate(chosen):
            fh.write(f"q{n}\t{pid}\t1\n")
    return out


def load_beir(folder: Path) -> tuple[list[Document], dict[str, str], dict[str, dict[str, int]]]:
    docs = []
    with open(folder / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            text = (row.get("title", "") + "\n" + row["text"]).strip()
            docs.append(Document(str(row["_id"]), text, {"title": row.get("title", "")}))
    queries = {}
    with open(folder / "queries.jsonl", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            queries[str(row["_id"])] = row["text"]
    qrels: dict[str, dict[str, int]] = {}
    with open(folder / "qrels" / "test.tsv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    return docs, {q: t for q, t in queries.items() if q in qrels}, qrels


def split_of(qid: str) -> str:
    """``dev`` or ``test``: half the queries each, by a hash of the id (stable, unrelated to
    the order or content of the set)."""
    return "dev" if int(hashlib.sha256(qid.encode()).hexdigest()[:8], 16) % 2 == 0 else "test"


def ndcg_at(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def scores(ranked_docs: dict[str, list[str]], qrels: dict[str, dict[str, int]]
           ) -> tuple[float, float]:
    """Mean nDCG@10 and recall@100 over the queries of ``ranked_docs`` (document ids)."""
    ndcg = recall = 0.0
    for qid, ranked in ranked_docs.items():
        relevant = {d: g for d, g in qrels[qid].items() if g > 0}
        ndcg += ndcg_at(ranked, relevant, 10)
        recall += len(set(ranked[:100]) & set(relevant)) / len(relevant)
    n = max(1, len(ranked_docs))
    return ndcg / n, recall / n


def search_all(retriever: Retriever, queries: dict[str, str], mode: str
               ) -> tuple[dict[str, list[str]], dict[str, list[str]], float]:
    """Per query: the chunk ids and the document ids (best chunk first), as ``mode`` ranks
    them; and milliseconds a query."""
    chunks, docs = {}, {}
    start = time.perf_counter()
    for qid, text in queries.items():
        hits = retriever.search(text, top_k=DEPTH, mode=mode)
        chunks[qid] = [h.chunk_id for h in hits]
        docs[qid] = list(dict.fromkeys(h.doc_id for h in hits))
    return chunks, docs, (time.perf_counter() - start) * 1e3 / max(1, len(queries))


def fuse_docs(dense: dict[str, list[str]], sparse: dict[str, list[str]], qids: list[str],
              fusion: Fusion) -> dict[str, list[str]]:
    """The document ranking hybrid search gives with ``fusion`` (the Retriever's own
    arithmetic on one index, from the two chunk rankings: the fit needs no new searches)."""
    out = {}
    for qid in qids:
        fused = rrf_fuse([dense[qid], sparse[qid]], fusion.k,
                         [fusion.dense_weight, 1.0 - fusion.dense_weight])[:DEPTH]
        out[qid] = list(dict.fromkeys(str(c).rsplit("#", 1)[0] for c, _ in fused))
    return out


def fit(dense: dict[str, list[str]], sparse: dict[str, list[str]], dev: list[str],
        qrels: dict[str, dict[str, int]]) -> tuple[Fusion, tuple[float, float]]:
    """The grid point with the best dev nDCG@10 (ties: recall@100, then the grid order)."""
    best: tuple[tuple[float, float], Fusion] | None = None
    for k in GRID_K:
        for w in GRID_WEIGHTS:
            fusion = Fusion(w, k)
            result = scores(fuse_docs(dense, sparse, dev, fusion), qrels)
            if best is None or result > best[0]:
                best = (result, fusion)
    assert best is not None
    return best[1], best[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beir", type=Path, help="a BEIR folder (default: build the help set)")
    parser.add_argument("--docs", type=int, default=2000, help="pages in the built set "
                        "(default: all that qualify, 1 048)")
    parser.add_argument("--every", type=int, default=1, help="every N-th page is a query")
    parser.add_argument("--models", nargs="+", default=[MINILM_MODEL, E5_MODEL])
    parser.add_argument("--fit", action="store_true", help="fit the fusion on the dev split")
    parser.add_argument("--cache", type=Path, help="embedding cache directory to keep")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.beir is None:
            if not HELP.is_file():
                print(f"{HELP} is absent; pass --beir DIR", file=sys.stderr)
                return 1
            folder = build_help_set(Path(tmp) / "help-tr-beir", args.docs, args.every)
        else:
            folder = args.beir
        docs, queries, qrels = load_beir(folder)
        parts = {p: [q for q in queries if split_of(q) == p] for p in ("dev", "test")}
        print(f"{folder.name}: {len(docs)} documents, {len(queries)} queries "
              f"(dev {len(parts['dev'])}, test {len(parts['test'])}); figures on test")
        rows: list[tuple[str, tuple[float, float], tuple[float, float], float]] = []

        def row(label: str, ranked: dict[str, list[str]], ms: float = float("nan")) -> None:
            got = [scores({q: ranked[q] for q in parts[p]}, qrels) for p in ("dev", "test")]
            rows.append((label, got[0], got[1], ms))
            print(f"  {label:<44} test nDCG@10 {got[1][0]:.4f}  R@100 {got[1][1]:.4f}  "
                  f"(dev {got[0][0]:.4f} / {got[0][1]:.4f})  {ms:6.1f} ms/query", flush=True)

        sparse_chunks: dict[str, list[str]] | None = None
        for n, model in enumerate(args.models):
            cache = args.cache if args.cache is not None else Path(tmp) / "cache"
            embedder = Embedder(model, cache_dir=cache, show_progress=False)
            store = RagStore(Path(tmp) / f"home-{n}", embedder=embedder)
            start = time.perf_counter()
            store.index("general").add_documents(docs)
            took = time.perf_counter() - start
            print(f"{embedder.name} ({embedder.runtime}): {len(store.index('general'))} "
                  f"chunks, {embedder.texts_encoded} embedded in {took:.0f} s "
                  f"({embedder.cache_hits} from the cache)", flush=True)
            retriever = Retriever(store, candidates=DEPTH)
            if sparse_chunks is None:  # chunks and BM25 do not depend on the model
                sparse_chunks, sparse_docs, ms = search_all(retriever, queries, "sparse")
                row("BM25", sparse_docs, ms)
            dense_chunks, dense_docs, ms = search_all(retriever, queries, "dense")
            row(f"dense, {embedder.name}", dense_docs, ms)
            equal = Fusion(0.5, 60)
            row(f"hybrid, {embedder.name}, equal RRF (k 60)",
                fuse_docs(dense_chunks, sparse_chunks, list(queries), equal))
            shipped = DEFAULT_FUSION.get(embedder.name, Fusion())
            retriever = Retriever(store, candidates=DEPTH)  # the shipped default, end to end
            _, hybrid_docs, ms = search_all(retriever, queries, "hybrid")
            offline = fuse_docs(dense_chunks, sparse_chunks, list(queries), shipped)
            assert offline == hybrid_docs, "the fit's arithmetic is not the Retriever's"
            row(f"hybrid, {embedder.name}, default (w {shipped.dense_weight}, "
                f"k {shipped.k})", hybrid_docs, ms)
            if args.fit:
                fitted, dev = fit(dense_chunks, sparse_chunks, parts["dev"], qrels)
                print(f"  fitted on dev: w {fitted.dense_weight}, k {fitted.k} (dev nDCG@10 "
                      f"{dev[0]:.4f}, R@100 {dev[1]:.4f}); shipped default: "
                      f"w {shipped.dense_weight}, k {shipped.k}"
                      f"{'' if fitted == shipped else '  <- differs'}")
                if fitted != shipped:
                    row(f"hybrid, {embedder.name}, fitted (w {fitted.dense_weight}, "
                        f"k {fitted.k})",
                        fuse_docs(dense_chunks, sparse_chunks, list(queries), fitted))
        print("\n| mode | nDCG@10 | recall@100 | dev nDCG@10 | dev recall@100 |")
        print("|---|---|---|---|---|")
        for label, dev_scores, test_scores, _ in rows:
            print(f"| {label} | {test_scores[0]:.3f} | {test_scores[1]:.3f} | "
                  f"{dev_scores[0]:.3f} | {dev_scores[1]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
