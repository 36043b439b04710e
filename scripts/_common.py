"""Helpers shared by the asset-building scripts: corpus reading, tokenizer loading, seeding.

Not part of the installed package: the scripts in this folder build what ships in
``src/r3mes/assets/`` from corpora given as paths (``scripts/corpora.json``), never copied.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from r3mes.utils.jsonl import jsonl_records

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPORA = Path(__file__).resolve().parent / "corpora.json"
SPECIAL_TOKENS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}


@dataclass
class Corpus:
    """One training corpus: a text file, a directory of ``*.txt``/``*.md``, or a JSONL file."""

    name: str
    path: Path
    format: str = "text"
    field: str = "text"
    lang: str = "en"
    weight: float | None = None

    def exists(self) -> bool:
        return self.path.exists()

    def documents(self) -> Iterator[str]:
        """The corpus's documents in a fixed (sorted) order, so every run sees the same text."""
        files = sorted(self.path.rglob("*")) if self.path.is_dir() else [self.path]
        for f in files:
            if not f.is_file():
                continue
            if self.format == "jsonl" and f.suffix == ".jsonl":
                with f.open(encoding="utf-8") as fh:
                    for _, obj in jsonl_records(f, fh):
                        text = obj.get(self.field)
                        if isinstance(text, str) and text.strip():
                            yield text
            elif self.format == "text" and f.suffix in (".txt", ".md"):
                yield f.read_text(encoding="utf-8")


def resolve(path: str | Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def load_corpora(config: str | Path = DEFAULT_CORPORA, names: list[str] | None = None,
                 extra_paths: list[str] | None = None) -> list[Corpus]:
    """Read the corpus list; missing corpora are skipped with a warning on stderr."""
    cfg_path = resolve(config)
    try:
        entries = json.loads(cfg_path.read_text(encoding="utf-8"))["corpora"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{cfg_path}: cannot read the corpus list ({exc})") from exc
    out = []
    for e in entries:
        if names and e["name"] not in names:
            continue
        c = Corpus(name=e["name"], path=resolve(e["path"]), format=e.get("format", "text"),
                   field=e.get("field", "text"), lang=e.get("lang", "en"),
                   weight=e.get("weight"))
        if c.format not in ("text", "jsonl"):
            raise ValueError(f"{cfg_path}: corpus {c.name}: unknown format {c.format!r}")
        if not c.exists():
            print(f"warning: corpus {c.name} not found at {c.path}, skipped", file=sys.stderr)
            continue
        out.append(c)
    for i, p in enumerate(extra_paths or []):
        rp = resolve(p)
        fmt = "jsonl" if rp.suffix == ".jsonl" else "text"
        out.append(Corpus(name=f"extra{i}_{rp.stem}", path=rp, format=fmt))
    if not out:
        raise ValueError(f"{cfg_path}: none of the corpora exist")
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
