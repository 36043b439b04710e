"""nDCG@10 and recall@100 of BM25, dense and hybrid retrieval on a BEIR-format corpus.

    python benchmarks/bench_rag_beir.py                       # builds the set below, runs it
    python benchmarks/bench_rag_beir.py --beir DIR            # any BEIR folder

A BEIR folder holds ``corpus.jsonl`` (``_id, title, text``), ``queries.jsonl`` (``_id,
text``) and ``qrels/test.tsv`` (``query-id, corpus-id, score`` with a header). No judged IR
set ships offline here, so ``--build`` (the default without ``--beir``) writes one from the
shared Turkish LibreOffice help pages (``../shared/data/turkish-software-help``): a known-item
set where each query is a page's title and the page (with its title line removed from the
text, so the answer is not a copy of the question) is the one relevant document; ``--docs``
pages, every ``--every``-th page a query.

Documents are indexed as ``r3mes index add`` indexes them (chunked, int8 MiniLM by default)
and ranked at document level (a document's rank is its best chunk's), which is what a user
sees now that one document is one source.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from r3mes.rag import Document, RagStore, Retriever
from r3mes.rag.embedder import Embedder

ROOT = Path(__file__).resolve().parent.parent
HELP = ROOT.parent / "shared" / "data" / "turkish-software-help" / "help_tr.jsonl"


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


def ndcg_at(ranked: list[str], relevant: dict[str, int], k: int) -> float:
    dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def evaluate(retriever: Retriever, queries: dict[str, str], qrels: dict[str, dict[str, int]],
             mode: str, depth: int) -> dict[str, float]:
    ndcg = recall = 0.0
    start = time.perf_counter()
    for qid, text in queries.items():
        hits = retriever.search(text, top_k=depth, mode=mode)
        ranked = list(dict.fromkeys(h.doc_id for h in hits))  # document level
        relevant = {d: g for d, g in qrels[qid].items() if g > 0}
        ndcg += ndcg_at(ranked, relevant, 10)
        recall += len(set(ranked[:100]) & set(relevant)) / len(relevant)
    n = len(queries)
    return {"ndcg@10": ndcg / n, "recall@100": recall / n,
            "ms_per_query": (time.perf_counter() - start) * 1e3 / n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beir", type=Path, help="a BEIR folder (default: build the help set)")
    parser.add_argument("--docs", type=int, default=600)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--runtime", default=None, help="embedding runtime (default: auto)")
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
        store = RagStore(Path(tmp) / "home",
                         embedder=Embedder(runtime=args.runtime, show_progress=False))
        start = time.perf_counter()
        store.index("general").add_documents(docs)
        took = time.perf_counter() - start
        chunks = len(store.index("general"))
        retriever = Retriever(store, candidates=300)
        print(f"{folder.name}: {len(docs)} documents ({chunks} chunks, indexed in {took:.0f} s, "
              f"{store.embedder.runtime}), {len(queries)} queries")
        print(f"{'mode':<8} {'nDCG@10':>8} {'recall@100':>11} {'ms/query':>9}")
        for mode in ("sparse", "dense", "hybrid"):
            r = evaluate(retriever, queries, qrels, mode, depth=300)
            print(f"{mode:<8} {r['ndcg@10']:8.4f} {r['recall@100']:11.4f} "
                  f"{r['ms_per_query']:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
