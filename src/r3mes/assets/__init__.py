"""The bundled demo assets: a small BitNet b1.58 model, DoRA experts and a knowledge base.

Layout (see ``MODEL_CARD.md`` at the repository root and ``scripts/build_assets.py``)::

    demo_model/            r3mes packed model (r3mes_model.json, model.r3mes.safetensors,
                           tokenizer.json, ...), loadable with r3mes.core.checkpoint.load_model
    experts/<id>/          PEFT DoRA adapter directories (adapter_config.json,
                           adapter_model.safetensors), one per expert id of the router registry
    knowledge/docs/*.jsonl the knowledge base's documents (written for the package)
    knowledge/rag/         an r3mes RAG data directory (snapshots/ + refs/) built from them
    MANIFEST.json          sha256 and size of every file above

:func:`verify_assets` checks every file against the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from r3mes.errors import R3mesError
from r3mes.utils.hashing import file_sha256

__all__ = ["ASSETS_DIR", "MANIFEST_NAME", "AssetsError", "read_manifest", "verify_assets"]

ASSETS_DIR = Path(__file__).resolve().parent
MANIFEST_NAME = "MANIFEST.json"


class AssetsError(R3mesError, ValueError):
    """The bundled assets are missing, altered or inconsistent; the message names the file."""


def read_manifest(root: str | Path | None = None) -> dict[str, Any]:
    """The parsed ``MANIFEST.json`` of ``root`` (default: the installed assets)."""
    path = Path(root or ASSETS_DIR) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AssetsError(f"{path}: missing (the demo assets are not installed)") from None
    except (OSError, ValueError) as exc:
        raise AssetsError(f"{path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise AssetsError(f"{path}: no 'files' table")
    return manifest


def verify_assets(root: str | Path | None = None) -> dict[str, Any]:
    """Check that every file in the manifest exists with its recorded size and sha256.

    Returns the manifest. Raises :class:`AssetsError` naming the first file that is
    missing, has another size, or another digest.
    """
    base = Path(root or ASSETS_DIR)
    manifest = read_manifest(base)
    for rel, entry in manifest["files"].items():
        path = base / rel
        if not path.is_file():
            raise AssetsError(f"{path}: listed in {MANIFEST_NAME} but missing")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise AssetsError(f"{path}: {size} bytes, {MANIFEST_NAME} says {entry.get('bytes')}")
        if file_sha256(path) != entry.get("sha256"):
            raise AssetsError(f"{path}: sha256 differs from {MANIFEST_NAME}")
    return manifest
