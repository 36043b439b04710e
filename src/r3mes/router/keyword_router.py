"""Stage 1 of routing: keyword patterns and language detection, well under a millisecond.

Text is *folded* before matching so that Turkish casing and spelling variants meet:
``İ``, ``I``, ``ı`` and ``i`` all become ``i`` (so "İNSÜLİN", "insulin" and "ınsülın" are one
word, and the English "I" needs no special case), the text is case-folded, and accents are
removed ("ş" -> "s", "ü" -> "u", "é" -> "e"), which also catches queries typed on a keyboard
without Turkish letters ("nasil yazilir"). Stems in the registry are folded the same way and
match at the start of a word with any suffix, which is how Turkish inflection is handled
("hasta" matches "hastalarında").

Confidence of an expert is ``1 - prod(1 - w)`` over the distinct stems and patterns it
matched (``w`` = 0.7 strong, 0.4 weak, 0.7 pattern): one strong hit gives 0.7, two give 0.91.

The language of the query comes from ``py3langid`` (a maintained n-gram classifier) limited
to the registry's languages plus English. It was chosen over ``lingua-language-detector``
because it is already a dependency and is as fast (about 14 µs against lingua's 15-30 µs a
query on this machine; see ``benchmarks/bench_router.py``). A language expert's score is
``language_weight × probability`` when the probability clears ``min_language_probability``.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from r3mes.router.registry import ExpertRegistry, RegistryError, resolve_registry

STRONG_WEIGHT = 0.7
WEAK_WEIGHT = 0.4
PATTERN_WEIGHT = 0.7

_I_FOLD = str.maketrans({"İ": "i", "I": "i", "ı": "i"})
# Scripts without spaces between words: a stem there matches anywhere, not at a word start.
_WORD = re.compile(r"\w+")
_PLAIN_WORD = re.compile(r"[a-z0-9]+")
_NO_WORD_BOUNDARY = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\u0600-\u06ff]")


def fold(text: str) -> str:
    """Fold ``text`` for matching: Turkish-aware lower case, dotted/dotless i merged, no accents.

    ``fold("İSTANBUL'da DİYABET") == "istanbul'da diyabet"``; ``fold("ılık") == "ilik"``.
    """
    folded = text.translate(_I_FOLD).casefold()
    if folded.isascii():
        return folded
    decomposed = unicodedata.normalize("NFKD", folded)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def clean_query(query: str) -> str:
    """Make ``query`` safe for every stage: lone surrogates (undecodable bytes that reached
    a ``str`` through ``surrogateescape``) become U+FFFD, NUL and other control characters
    become spaces. Raises :class:`TypeError` for non-strings.
    """
    if not isinstance(query, str):
        raise TypeError(f"query must be str, got {type(query).__name__} (decode bytes first)")
    try:
        query.encode("utf-8")
    except UnicodeEncodeError:
        query = query.encode("utf-8", "replace").decode("utf-8", "replace")
    if not query.isprintable():
        query = "".join(ch if ch.isprintable() or ch in "\n\t" else " " for ch in query)
    return query


def _stem_regex(stem: str) -> str:
    folded = fold(stem).strip()
    body = re.escape(folded).replace(r"\ ", r"\s+")
    if _NO_WORD_BOUNDARY.match(folded):
        return body
    return r"(?<!\w)" + body


@dataclass(frozen=True)
class LanguageGuess:
    """The detected language of a query: ISO code and the detector's probability.

    ``language`` is ``None`` when the detector is unsure; ``candidate`` is its best guess
    all the same (``None`` only when the text had too few letters to try).
    """

    language: str | None
    probability: float
    candidate: str | None = None


_detector_lock = threading.Lock()
_detectors: dict[tuple[str, ...], Any] = {}


def language_detector(languages: Sequence[str]) -> Any:
    """A py3langid identifier limited to ``languages``; built once per language set.

    Raises :class:`RegistryError` when a code is not one py3langid knows.
    """
    key = tuple(sorted(set(languages)))
    with _detector_lock:
        detector = _detectors.get(key)
        if detector is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            # The model is py3langid's own packaged data, not a user file.
            detector = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
            unknown = [code for code in key if code not in detector.nb_classes]
            if unknown:
                raise RegistryError(
                    f"language code(s) {', '.join(unknown)} are not supported by the "
                    f"language detector (py3langid knows {len(detector.nb_classes)} codes)"
                )
            detector.set_languages(list(key))
            _detectors[key] = detector
    return detector


class KeywordRouter:
    """Scores experts from compiled keyword patterns and the detected language.

    ``score(query)`` returns ``[(expert_id, confidence)]`` sorted by confidence, only
    experts with a non-zero confidence. ``registry`` is an :class:`ExpertRegistry`, a path
    or ``None`` (packaged); ``expert_ids`` restricts it.
    """

    def __init__(
        self,
        registry: ExpertRegistry | str | None = None,
        *,
        expert_ids: Sequence[str] | None = None,
        language_weight: float = 0.6,
        min_language_probability: float = 0.6,
        min_language_letters: int = 3,
    ) -> None:
        self.registry = resolve_registry(registry, expert_ids)
        self.language_weight = language_weight
        self.min_language_probability = min_language_probability
        self.min_language_letters = min_language_letters
        self._ids = self.registry.ids
        self._index = {eid: i for i, eid in enumerate(self._ids)}
        self._topical = [e.kind in ("domain", "task", "fallback") for e in self.registry]
        # Stems made of plain words are looked up word by word in a dict (a regex alternation
        # over hundreds of stems costs milliseconds; the dict walk costs microseconds). Stems
        # with punctuation ("c++", "tl;dr") or from scripts without spaces go into one small
        # regex instead.
        stem_owners: dict[str, list[tuple[int, float]]] = {}
        for i, expert in enumerate(self.registry):
            for weight, stems in ((STRONG_WEIGHT, expert.strong), (WEAK_WEIGHT, expert.weak)):
                for stem in stems:
                    key = " ".join(fold(stem).split())
                    if key:
                        stem_owners.setdefault(key, []).append((i, weight))
        self._stems = list(stem_owners)
        self._stem_owners = [stem_owners[s] for s in self._stems]
        # first word -> [(following words, stem index)]; the last word matches as a prefix
        self._word_stems: dict[str, list[tuple[tuple[str, ...], int]]] = {}
        self._single_stems: dict[str, int] = {}
        odd: list[int] = []
        for index, stem in enumerate(self._stems):
            words = stem.split(" ")
            if not all(_PLAIN_WORD.fullmatch(w) for w in words):
                odd.append(index)
            elif len(words) == 1:
                self._single_stems[stem] = index
            else:
                self._word_stems.setdefault(words[0], []).append((tuple(words[1:]), index))
        self._stem_lengths = sorted({len(s) for s in self._single_stems})
        self._odd_stems = odd
        source = "|".join(f"({_stem_regex(self._stems[i])})" for i in odd)
        self._odd_re = re.compile(source) if source else None
        self._patterns: list[tuple[int, re.Pattern[str]]] = []
        for i, expert in enumerate(self.registry):
            for pattern in expert.patterns:
                try:
                    self._patterns.append((i, re.compile(pattern)))
                except re.error as exc:  # registries built in code skip load_registry checks
                    raise RegistryError(
                        f"{self.registry.source}: expert '{expert.id}': pattern {pattern!r} "
                        f"does not compile: {exc}"
                    ) from None
        self._language_expert = {
            lang: self._index[eid] for lang, eid in self.registry.languages().items()
        }
        # Detect among every registry language (not only installed ones, so that restricting
        # experts never changes what language a query is said to be in) plus English.
        self._detector_languages = tuple(sorted(set(self.registry.all_languages()) | {"en"}))
        self._detector: Any = None

    @property
    def detector_languages(self) -> tuple[str, ...]:
        return self._detector_languages

    def detect_language(self, query: str) -> LanguageGuess:
        """The query's language among the registry languages and English, or ``None`` when
        the text is too short or the detector is unsure."""
        letters = sum(1 for ch in query[:512] if ch.isalpha())
        if letters < self.min_language_letters:
            return LanguageGuess(None, 0.0)
        if self._detector is None:
            self._detector = language_detector(self._detector_languages)
        # The classifier is linear in the text; the head is plenty to identify a language.
        language, probability = self._detector.classify(query[:2000])
        probability = float(probability)
        if probability < self.min_language_probability:
            return LanguageGuess(None, probability, language)
        return LanguageGuess(language, probability, language)

    def topical_scores(self, folded: str) -> list[float]:
        """Per-expert keyword confidence (registry order) for already-folded text."""
        hits: list[dict[int, float]] = [{} for _ in self._ids]
        found: set[int] = set()
        words = _WORD.findall(folded)
        singles, multi, lengths = self._single_stems, self._word_stems, self._stem_lengths
        for position, word in enumerate(words):
            size = len(word)
            for length in lengths:
                if length > size:
                    break
                index = singles.get(word[:length])
                if index is not None:
                    found.add(index)
            for rest, index in multi.get(word, ()):
                tail = words[position + 1 : position + 1 + len(rest)]
                if (
                    len(tail) == len(rest)
                    and tail[:-1] == list(rest[:-1])
                    and tail[-1].startswith(rest[-1])
                ):
                    found.add(index)
        if self._odd_re is not None:
            for match in self._odd_re.finditer(folded):
                if match.lastindex:
                    found.add(self._odd_stems[match.lastindex - 1])
        for stem_index in found:
            for expert_index, weight in self._stem_owners[stem_index]:
                hits[expert_index][stem_index] = weight
        offset = len(self._stems)  # pattern keys follow the stem keys
        for j, (expert_index, pattern) in enumerate(self._patterns):
            if pattern.search(folded):
                hits[expert_index][offset + j] = PATTERN_WEIGHT
        scores = []
        for expert_hits in hits:
            miss = 1.0
            for weight in expert_hits.values():
                miss *= 1.0 - weight
            scores.append(1.0 - miss)
        return scores

    def evidence(self, query: str) -> tuple[list[float], LanguageGuess]:
        """Per-expert stem and pattern confidence (registry order, language experts
        included, detector not applied) and the detected language of ``query``."""
        query = clean_query(query)
        return self.topical_scores(fold(query)), self.detect_language(query)

    def analyse(self, query: str) -> tuple[list[tuple[str, float]], float, LanguageGuess]:
        """``(scores, keyword_confidence, language)`` for ``query``.

        ``scores`` includes language experts (from their patterns and the detector);
        ``keyword_confidence`` is the best score among domain, task and fallback experts
        only, the number the hybrid router's fast path tests: the language of a query says
        nothing about its topic.
        """
        scores, guess = self.evidence(query)
        confidence = self.topical_confidence(scores)
        scores = self.with_language(scores, guess)
        ranked = sorted(
            ((eid, round(s, 6)) for eid, s in zip(self._ids, scores, strict=True) if s > 0.0),
            key=lambda item: (-item[1], item[0]),
        )
        return ranked, confidence, guess

    def topical_confidence(self, scores: list[float]) -> float:
        """The best score among domain, task and fallback experts (the fast path's test)."""
        return max((s for s, t in zip(scores, self._topical, strict=True) if t), default=0.0)

    def with_language(self, scores: list[float], guess: LanguageGuess) -> list[float]:
        """``scores`` with the detected language's expert raised to
        ``language_weight × probability`` (a new list)."""
        scores = list(scores)
        if guess.language is not None and guess.language in self._language_expert:
            i = self._language_expert[guess.language]
            scores[i] = max(scores[i], self.language_weight * guess.probability)
        return scores

    def score(self, query: str) -> list[tuple[str, float]]:
        """``[(expert_id, confidence)]``, best first; experts with no evidence are omitted."""
        return self.analyse(query)[0]
