"""BM25 sparse retrieval (``bm25s``) with a tokenizer for Turkish and English.

Lower-casing is the part generic tokenizers get wrong for Turkish: ``"I".lower()`` is ``"i"``
in English but the Turkish lower case of ``I`` is dotless ``ı``, and ``"İ".lower()`` in Python
gives ``"i̇"`` (i + a combining dot) instead of ``"i"``. :func:`turkish_lower` maps ``İ -> i`` and
``I -> ı`` first. A text is cased the Turkish way when it is Turkish: ``language="tr"``, or in
``"auto"`` mode when it contains a Turkish letter English lacks (ğ ş ı İ ç ö ü), which also
decides the stemmer (PyStemmer's ``turkish`` or ``english``) when stemming is on.

Turkish attaches case suffixes to proper names after an apostrophe (``Ankara'da``); the
suffix is dropped so the name matches. The index is rebuilt lazily after deletes (bm25s indices
are static); rebuilding is a sparse-matrix build over stored token lists, milliseconds for
thousands of chunks.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

LANGUAGES = ("auto", "tr", "en")
# Letters of the Turkish alphabet that English lacks. ç ö ü also occur in German or French,
# but this tokenizer serves Turkish and English, where they mark Turkish.
_TURKISH_ONLY = re.compile(r"[ğĞşŞıİçÇöÖüÜ]")
# A word, optionally followed by an apostrophe suffix (Ankara'da, don't); digits are words too.
_WORD = re.compile(r"(\w+)(?:['’]\w+)?")


def turkish_lower(text: str) -> str:
    """Lower-case by Turkish rules: ``İ -> i``, ``I -> ı``, everything else as ``str.lower``."""
    return text.replace("İ", "i").replace("I", "ı").lower()


def detect_casing(text: str) -> str:
    """``"tr"`` if ``text`` contains a Turkish letter English lacks, else ``"en"``."""
    return "tr" if _TURKISH_ONLY.search(text) else "en"


@lru_cache(maxsize=4)
def _stemmer(language: str):
    import Stemmer

    return Stemmer.Stemmer("turkish" if language == "tr" else "english")


@lru_cache(maxsize=1)
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN, STOPWORDS_TURKISH

    return frozenset(STOPWORDS_EN) | frozenset(turkish_lower(w) for w in STOPWORDS_TURKISH)


@dataclass(frozen=True)
class TokenizerConfig:
    """How text becomes BM25 terms. Stored with an index so queries match its documents."""

    language: str = "auto"
    stem: bool = True
    stopwords: bool = True

    def __post_init__(self) -> None:
        if self.language not in LANGUAGES:
            raise ValueError(f"language must be one of {LANGUAGES}, got '{self.language}'")

    def to_dict(self) -> dict[str, Any]:
        return {"language": self.language, "stem": self.stem, "stopwords": self.stopwords}


def tokenize(text: str, config: TokenizerConfig | None = None) -> list[str]:
    """BM25 terms of ``text``: NFC, language-aware lower case, words, stop words and
    apostrophe suffixes dropped, optionally stemmed."""
    cfg = config or TokenizerConfig()
    text = unicodedata.normalize("NFC", text)
    lang = cfg.language if cfg.language != "auto" else detect_casing(text)
    lowered = turkish_lower(text) if lang == "tr" else text.lower()
    # str.lower() of a stray İ in English mode leaves a combining dot; drop it.
    lowered = lowered.replace("\u0307", "")
    words = [m.group(1) for m in _WORD.finditer(lowered)]
    if cfg.stopwords:
        stop = _stopwords()
        words = [w for w in words if w not in stop]
    words = [w for w in words if len(w) > 1 or w.isdigit()]
    if cfg.stem and words:
        words = _stemmer(lang).stemWords(words)
    return words


class BM25Index:
    """BM25 over documents keyed by int ids; add / remove / search."""

    def __init__(
        self, config: TokenizerConfig | None = None, k1: float = 1.5, b: float = 0.75
    ) -> None:
        self.config = config or TokenizerConfig()
        self.k1 = k1
        self.b = b
        self._tokens: dict[int, list[str]] = {}
        self._order: list[int] = []
        self._order_arr = np.empty(0, dtype=np.int64)
        self._bm25 = None
        self._stale = True

    def __len__(self) -> int:
        return len(self._tokens)

    def add(self, ids: Sequence[int], texts: Sequence[str]) -> None:
        """Index ``texts`` under ``ids``; an existing id is replaced."""
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
        for i, t in zip(ids, texts, strict=True):
            self._tokens[int(i)] = tokenize(t, self.config)
        self._stale = True

    def add_tokens(self, ids: Sequence[int], tokens: Sequence[list[str]]) -> None:
        """Index pre-tokenised documents (used when loading a snapshot)."""
        for i, t in zip(ids, tokens, strict=True):
            self._tokens[int(i)] = list(t)
        self._stale = True

    def tokens(self, id_: int) -> list[str]:
        return self._tokens[int(id_)]

    def remove(self, ids: Iterable[int]) -> int:
        n = 0
        for i in ids:
            if self._tokens.pop(int(i), None) is not None:
                n += 1
        if n:
            self._stale = True
        return n

    def search(
        self, query: str, k: int, allowed_ids: Iterable[int] | None = None
    ) -> list[tuple[int, float]]:
        """Up to ``k`` ``(id, score)`` pairs with a positive score, best first."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        q = tokenize(query, self.config)
        if not q or not self._tokens:
            return []
        self._ensure()
        if self._bm25 is None:  # every document tokenised to nothing: nothing can match
            return []
        scores = self._bm25.get_scores(q)
        order = self._order_arr
        if allowed_ids is not None:
            allowed = {int(i) for i in allowed_ids}
            mask = np.fromiter((i in allowed for i in self._order), dtype=bool,
                               count=len(self._order))
            scores = np.where(mask, scores, 0.0)
        positive = np.flatnonzero(scores > 0)
        if not len(positive):
            return []
        kk = min(k, len(positive))
        top = positive[np.argpartition(-scores[positive], kk - 1)[:kk]]
        # ties broken by id so results are deterministic
        top = sorted(top, key=lambda r: (-float(scores[r]), int(order[r])))
        return [(int(order[r]), float(scores[r])) for r in top]

    def _ensure(self) -> None:
        if not self._stale:
            return
        import bm25s

        self._order = sorted(self._tokens)
        self._order_arr = np.asarray(self._order, dtype=np.int64)  # not per query: O(n)
        self._stale = False
        if not any(self._tokens.values()):
            # bm25s cannot index an empty vocabulary (documents of stop words or symbols).
            self._bm25 = None
            return
        bm25 = bm25s.BM25(k1=self.k1, b=self.b, method="lucene")
        bm25.index([self._tokens[i] for i in self._order], show_progress=False)
        self._bm25 = bm25
