"""The calibrated fusion: fitting, the general threshold, and the stored model file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from r3mes.router.calibration import (
    FUSION_FEATURES,
    fit_fusion,
    fit_general_threshold,
    load_fusion,
    save_fusion,
)

IDS = ["a_dora", "b_dora", "general_dora"]


def _toy(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Questions whose gold expert has a higher value in feature 2 (``max``) only."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.8, 0.02, size=(n, len(IDS), len(FUSION_FEATURES)))
    y = rng.integers(0, len(IDS), size=n)
    x[np.arange(n), y, 1] += 0.05
    return x, y


def test_fit_learns_which_feature_carries_the_signal() -> None:
    x, y = _toy()
    model = fit_fusion(x, y, IDS, encoder="toy")
    weights = np.abs(model.weights)
    assert int(weights.argmax()) == 1
    xt, yt = _toy(seed=1)
    predicted = [int(model.probabilities(row, IDS).argmax()) for row in xt]
    assert np.mean(np.array(predicted) == yt) > 0.9


def test_probabilities_sum_to_one_and_unknown_experts_get_no_bias() -> None:
    x, y = _toy()
    model = fit_fusion(x, y, IDS, encoder="toy")
    p = model.probabilities(x[0], ["a_dora", "new_dora", "general_dora"])
    assert p.sum() == pytest.approx(1.0)
    assert model.logits(x[0][1:2], ["new_dora"])[0] == pytest.approx(
        float(((x[0][1] - np.array(model.mean)) / np.array(model.std)) @ model.weights))


def test_general_threshold_is_zero_when_the_specialists_are_right() -> None:
    p = np.array([[0.4, 0.3, 0.3], [0.35, 0.33, 0.32], [0.9, 0.05, 0.05]])
    assert fit_general_threshold(p, np.array([0, 0, 0]), general_index=2) == 0.0


def test_general_threshold_covers_the_unsure_wrong_specialists() -> None:
    p = np.array([[0.4, 0.3, 0.3], [0.35, 0.33, 0.32], [0.9, 0.05, 0.05], [0.8, 0.1, 0.1]])
    gold = np.array([1, 1, 0, 0])  # both unsure answers are wrong, both sure ones right
    threshold = fit_general_threshold(p, gold, general_index=2)
    assert 0.4 < threshold <= 0.8


def test_model_round_trips_and_a_bad_file_is_named(tmp_path: Path) -> None:
    x, y = _toy()
    model = fit_fusion(x, y, IDS, encoder="toy")
    path = save_fusion(model, tmp_path)
    loaded = load_fusion("toy", tmp_path)
    assert loaded is not None
    assert np.allclose(loaded.weights, model.weights, atol=1e-5)
    assert load_fusion("missing", tmp_path) is None
    data = json.loads(path.read_text())
    data["weights"] = data["weights"][:2]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=str(path.name)):
        load_fusion("toy", tmp_path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        load_fusion("toy", tmp_path)
