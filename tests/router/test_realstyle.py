"""Routing real-style short questions (issue 25): the held-out split of
``tests/data/router_realstyle.yaml`` (325 questions, TR/EN/DE/FR/ES).

Measured with the defaults (multilingual-e5-small, calibrated fusion):

    domain top-1 0.914 (strict 0.855)   domain top-3 0.982   language top-3 1.000

The floors are the issue's targets (top-1 >= 0.80, top-3 >= 0.90, language top-3 >= 0.97),
all below the measured figures. ``python benchmarks/fit_router_fusion.py --report-only``
prints the full report.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from r3mes.router import HybridConfig, HybridRouter
from r3mes.router.calibration import load_fusion
from r3mes.router.evaluation import LabelledQuestion, load_labelled, score_router
from r3mes.router.keyword_router import language_detector
from r3mes.router.registry import load_registry

REALSTYLE = Path(__file__).parent.parent / "data" / "router_realstyle.yaml"
LANGUAGES = {"tr", "en", "de", "fr", "es"}


@pytest.fixture(scope="module")
def held_out() -> list[LabelledQuestion]:
    return load_labelled(REALSTYLE, ["test"])


def test_held_out_set_is_large_multilingual_and_outside_the_registry(
    held_out: list[LabelledQuestion],
) -> None:
    registry = load_registry()
    train = load_labelled(REALSTYLE, ["train"])
    assert len(held_out) >= 300
    assert {q.language for q in held_out} == LANGUAGES
    assert {q.gold for q in held_out} == {e.id for e in registry if e.kind != "language"}
    examples = {q.casefold() for e in registry for q in e.queries}
    assert not [q.text for q in held_out + train if q.text.casefold() in examples]
    assert not {q.text for q in held_out} & {q.text for q in train}
    # The language labels are the languages the questions are written in.
    detector = language_detector(sorted(LANGUAGES))
    wrong = [q.text for q in held_out if detector.classify(q.text)[0] != q.language]
    assert len(wrong) <= 0.1 * len(held_out), wrong  # a few very short ones are ambiguous


def test_held_out_accuracy_meets_the_issue_targets(
    router: HybridRouter, held_out: list[LabelledQuestion]
) -> None:
    score = score_router(router, held_out)
    print("\n", score.to_dict())
    assert score.domain_top1 >= 0.80
    assert score.domain_top3 >= 0.90
    assert score.language_top3 >= 0.97


def test_every_language_is_served_not_only_english(
    router: HybridRouter, held_out: list[LabelledQuestion]
) -> None:
    score = score_router(router, held_out)
    for language, figures in score.by_language.items():
        assert figures["domain_top3"] >= 0.85, (language, figures)


def test_the_issue_examples_reach_their_domain_and_no_wrong_specialist_leads(
    router: HybridRouter,
) -> None:
    cases = {  # the misses the issue reported (creative, legal, qa and chinese before)
        "can you write a Makefile?": "coding_dora",
        "build a GraphQL resolver": "coding_dora",
        "what is a US dollar": "finance_dora",
        "what is a wavelength": "science_dora",
    }
    for question, expert in cases.items():
        chosen = [e for e, _ in router.route_decision(question, top_k=3).experts]
        assert expert in chosen, (question, chosen)
        assert chosen[0] in (expert, "general_dora"), (question, chosen)


def test_the_packaged_fusion_was_fitted_on_the_packaged_registry(router: HybridRouter) -> None:
    """A registry edit without re-running benchmarks/fit_router_fusion.py fails here."""
    fusion = load_fusion(router.semantic.encoder_slug)
    assert fusion is not None and router.fusion is not None
    assert fusion.fitted_on["registry_sha256"] == load_registry().digest


def test_an_unsure_specialist_gives_way_to_the_general_expert(router: HybridRouter) -> None:
    question = "what is a wavelength"
    normal = router.route_decision(question, 24.0)
    assert not normal.general_decision and normal.experts[0][0] == "science_dora"
    assert normal.topic_confidence is not None
    # The same evidence with a threshold above its confidence: the fallback goes first and
    # the specialist stays right behind it.
    unsure = HybridRouter(
        config=HybridConfig(general_threshold=min(0.99, normal.topic_confidence + 0.01)),
        semantic=router.semantic,
    ).route_decision(question, 24.0)
    assert unsure.general_decision
    assert [e for e, _ in unsure.experts[:2]] == ["general_dora", "science_dora"]


def test_small_talk_in_a_language_leads_with_its_language_expert(router: HybridRouter) -> None:
    decision = router.route_decision("hallo wie geht's", 24.0)
    assert [e for e, _ in decision.experts[:2]] == ["german_dora", "general_dora"]
