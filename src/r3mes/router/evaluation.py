"""Measuring a router on labelled questions: domain top-1 / top-3 and language top-3.

The labelled file (``tests/data/router_realstyle.yaml`` is the project's) maps
``split -> gold expert -> language -> [questions]`` with an optional top-level
``accept: {question: [other experts that are also right]}``. A question is right at top-1
when the router's first expert is the gold one (or accepted), right at top-3 when one of
them is among the first three; its language is right when the language expert of its
language (if the registry has one: English has none) is among the first three.

"First three" is what the router would run with three experts allowed: the gated experts
(``top_k=3``) followed by the rest of the ranking.

Convention for questions with no topic (gold: the fallback expert): the router puts the
language expert of a clearly non-English question first (the seed's rule: with one expert
allowed, "answer in German" is the informative choice), so for those questions the
language expert also counts at top-1. ``domain_top1_strict`` is the figure without it.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class LabelledQuestion:
    """One question with its gold expert, its language and the other accepted experts."""

    text: str
    gold: str
    language: str
    accept: tuple[str, ...] = ()
    split: str = "test"

    @property
    def right(self) -> frozenset[str]:
        return frozenset((self.gold, *self.accept))


def load_labelled(
    path: str | Path, splits: Iterable[str] = ("train", "test")
) -> list[LabelledQuestion]:
    """The questions of ``splits`` from a labelled file (layout in the module docstring)."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of splits")
    accept = {str(q): tuple(v) for q, v in (data.get("accept") or {}).items()}
    out: list[LabelledQuestion] = []
    for split in splits:
        for gold, by_language in (data.get(split) or {}).items():
            for language, questions in by_language.items():
                for q in questions:
                    q = str(q)
                    out.append(LabelledQuestion(q, gold, language, accept.get(q, ()), split))
    return out


@dataclass
class RouterScore:
    """Accuracy of a router on a set of questions (fractions in [0, 1])."""

    n: int
    domain_top1: float
    domain_top1_strict: float
    domain_top3: float
    language_top3: float
    language_n: int
    general_rate: float
    misses: list[dict[str, Any]] = field(default_factory=list)
    by_language: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "domain_top1": round(self.domain_top1, 4),
            "domain_top1_strict": round(self.domain_top1_strict, 4),
            "domain_top3": round(self.domain_top3, 4),
            "language_top3": round(self.language_top3, 4),
            "language_n": self.language_n,
            "general_rate": round(self.general_rate, 4),
            "by_language": self.by_language,
        }


def ranked_order(router: Any, text: str, strategy: str = "hybrid") -> list[str]:
    """Experts in the order the router would run them with three allowed, then the rest."""
    decision = router.route_decision(text, top_k=3, strategy=strategy)
    chosen = [e for e, _ in decision.experts]
    return chosen + [e for e, _ in decision.scores if e not in chosen]


def score_router(
    router: Any, questions: Sequence[LabelledQuestion], strategy: str = "hybrid"
) -> RouterScore:
    """Domain top-1/top-3 and language top-3 of ``router`` on ``questions``."""
    languages = router.registry.full().languages()
    fallback = router.registry.fallback.id
    rows: list[tuple[LabelledQuestion, bool, bool, bool | None, bool, bool]] = []
    misses: list[dict[str, Any]] = []
    for item in questions:
        order = ranked_order(router, item.text, strategy)
        strict = order[0] in item.right
        top1 = strict or (item.gold == fallback and order[0] == languages.get(item.language))
        top3 = bool(item.right & set(order[:3]))
        expert = languages.get(item.language)
        language_ok = None if expert is None else expert in order[:3]
        rows.append((item, top1, top3, language_ok, order[0] == fallback, strict))
        if not top1 or not top3 or language_ok is False:
            misses.append({"q": item.text, "gold": item.gold, "lang": item.language,
                           "got": order[:3]})
    lang_rows = [r[3] for r in rows if r[3] is not None]
    by_language: dict[str, dict[str, float]] = {}
    for code in sorted({r[0].language for r in rows}):
        sel = [r for r in rows if r[0].language == code]
        by_language[code] = {
            "n": len(sel),
            "domain_top1": round(statistics.fmean(r[1] for r in sel), 4),
            "domain_top3": round(statistics.fmean(r[2] for r in sel), 4),
        }
    return RouterScore(
        n=len(rows),
        domain_top1=statistics.fmean(r[1] for r in rows) if rows else 0.0,
        domain_top1_strict=statistics.fmean(r[5] for r in rows) if rows else 0.0,
        domain_top3=statistics.fmean(r[2] for r in rows) if rows else 0.0,
        language_top3=statistics.fmean(lang_rows) if lang_rows else 1.0,
        language_n=len(lang_rows),
        general_rate=statistics.fmean(r[4] for r in rows) if rows else 0.0,
        misses=misses,
        by_language=by_language,
    )
