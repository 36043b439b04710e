"""Package the demo assets into ``src/r3mes/assets/`` with a content manifest.

    python scripts/build_assets.py model   --base .train/base/hf --out .train/demo_model
    python scripts/build_assets.py all     [--model .train/demo_model] [--experts .train/experts]
                                           [--knowledge data/knowledge] [--dest src/r3mes/assets]

``model``: converts the trained HF float directory into the r3mes packed format
(:func:`r3mes.core.checkpoint.convert`, int8 LM head), storing the token embeddings as
float16 to halve their size (the demo's largest tensor).

``all``: replaces ``DEST/demo_model``, ``DEST/experts/<id>/`` (PEFT directories),
``DEST/knowledge/docs/*.jsonl`` (the knowledge base's source documents) and
``DEST/knowledge/rag/`` (an r3mes RAG data directory: ``snapshots/`` + ``refs/``, built with
:class:`r3mes.rag.RagStore` from the documents, one named index per file: ``general``,
``medical``, ``legal``, ``code``), then writes ``DEST/MANIFEST.json`` with the sha256 and
size of every file. The snapshot's clock is fixed (``--epoch``) so a rebuild from the same
inputs gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import resolve  # noqa: E402

from r3mes.core.checkpoint import convert  # noqa: E402
from r3mes.utils.atomic import atomic_write_json  # noqa: E402
from r3mes.utils.hashing import file_sha256  # noqa: E402

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 1
# Knowledge-base file stem -> RAG index (r3mes.rag.INDEX_NAMES).
INDEX_OF_FILE = {"general": "general", "medical": "medical", "legal": "legal", "code": "code"}
DEFAULT_EPOCH = 1767225600.0  # 2026-01-01T00:00:00Z: the snapshots' fixed creation time


def build_model(base_hf: Path, out: Path) -> dict:
    """HF float dir -> r3mes packed dir (embeddings float16, int8 head)."""
    with tempfile.TemporaryDirectory(prefix="r3mes-demo-") as tmp:
        src = Path(tmp) / base_hf.name
        shutil.copytree(base_hf, src)
        sd = load_file(str(src / "model.safetensors"))
        sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"].to(torch.float16)
        save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
        if out.exists():
            shutil.rmtree(out)
        manifest = convert(src, out, head="int8")
    return manifest


def build_knowledge(docs_dir: Path, dest: Path, epoch: float) -> dict:
    """Index every ``<stem>.jsonl`` of ``docs_dir`` into ``dest/rag`` (a RAG data dir)."""
    from r3mes.rag import RagStore, load_documents

    files = sorted(docs_dir.glob("*.jsonl"))
    if not files:
        raise ValueError(f"{docs_dir}: no .jsonl documents")
    counts = {}
    with tempfile.TemporaryDirectory(prefix="r3mes-kb-") as home:
        store = RagStore(home, clock=lambda: epoch)
        for f in files:
            index = INDEX_OF_FILE.get(f.stem)
            if index is None:
                raise ValueError(f"{f}: no RAG index for file stem {f.stem!r} "
                                 f"(known: {sorted(INDEX_OF_FILE)})")
            docs = load_documents(f)
            for d in docs:  # keep the bundled path out of the metadata, only the file name
                d.metadata["source"] = f"r3mes-knowledge/{f.name}"
            store.index(index).add_documents(docs, now=epoch)
            counts[index] = counts.get(index, 0) + len(docs)
        for index in sorted(counts):
            store.save(index)
        (dest / "docs").mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dest / "docs" / f.name)
        for part in ("snapshots", "refs"):
            shutil.copytree(Path(home) / "rag" / part, dest / "rag" / part)
    return counts


def write_manifest(dest: Path, info: dict) -> dict:
    files = {}
    for p in sorted(dest.rglob("*")):
        if p.is_file() and p.name != MANIFEST and "__pycache__" not in p.parts \
                and p.suffix != ".py":
            rel = p.relative_to(dest).as_posix()
            files[rel] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
    manifest = {"format": MANIFEST_FORMAT, "total_bytes": sum(f["bytes"] for f in files.values()),
                "files": files, **info}
    atomic_write_json(dest / MANIFEST, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model", help="convert the trained base into the packed demo model")
    m.add_argument("--base", default=".train/base/hf")
    m.add_argument("--out", default=".train/demo_model")
    a = sub.add_parser("all", help="copy model, experts, knowledge into the package")
    a.add_argument("--model", default=".train/demo_model")
    a.add_argument("--experts", default=".train/experts")
    a.add_argument("--knowledge", default="data/knowledge")
    a.add_argument("--dest", default="src/r3mes/assets")
    a.add_argument("--epoch", type=float, default=DEFAULT_EPOCH)
    args = ap.parse_args(argv)

    if args.cmd == "model":
        manifest = build_model(resolve(args.base), resolve(args.out))
        print(json.dumps({"out": str(resolve(args.out)), "weights_bytes":
                          manifest["weights_bytes"], "sha256": manifest["weights_sha256"]}))
        return 0

    dest = resolve(args.dest)
    model_src, experts_src = resolve(args.model), resolve(args.experts)
    if not (model_src / "r3mes_model.json").is_file():
        raise SystemExit(f"{model_src}: not an r3mes packed model (run `build_assets.py model`)")
    dest.mkdir(parents=True, exist_ok=True)
    for part in ("demo_model", "experts", "knowledge"):
        if (dest / part).exists():
            shutil.rmtree(dest / part)
    shutil.copytree(model_src, dest / "demo_model")
    training = {}
    tj = resolve(".train/base/hf/training.json")
    if tj.is_file():
        t = json.loads(tj.read_text())
        training["base"] = {k: t[k] for k in ("steps", "tokens_seen", "train_seconds",
                                              "heldout_perplexity", "corpora") if k in t}
    experts = []
    for d in sorted(p for p in experts_src.iterdir() if p.is_dir()):
        adapter = d / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            continue
        (dest / "experts" / d.name).mkdir(parents=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(adapter / f, dest / "experts" / d.name / f)
        experts.append(d.name)
    results = experts_src / "results.json"
    if results.is_file():
        training["experts"] = json.loads(results.read_text())
    counts = build_knowledge(resolve(args.knowledge), dest / "knowledge", args.epoch)
    manifest = write_manifest(dest, {"experts": experts, "knowledge_indices": counts,
                                     "training": training})
    print(json.dumps({"dest": str(dest), "files": len(manifest["files"]),
                      "total_bytes": manifest["total_bytes"], "experts": experts,
                      "knowledge": counts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
