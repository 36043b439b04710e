"""Calibrated fusion of keyword and semantic evidence, and the explicit "general" decision.

For every topical expert (domain, task and the fallback) the router has five numbers: its
keyword confidence and four semantic features (:data:`FEATURE_NAMES`). The fusion is a
conditional logit: ``logit_e = w · standardise(x_e) + b_e`` and
``p(e | query) = softmax_e(logit_e)`` over the topical experts, so ``p`` is a probability
that the expert is the question's topic, learnt rather than hand-set. ``w`` (one weight a
feature, shared by every expert, so it carries over to experts added later) and the
per-expert biases ``b_e`` (unknown experts get 0) are fitted by maximum likelihood with a
small L2 penalty on the ``train`` split of the labelled real-style questions
(``benchmarks/fit_router_fusion.py``); the ``test`` split is only reported.

When the best topical probability is below ``general_threshold`` (also fitted on the train
split: the threshold that minimises a cost where a wrong specialist costs 1 and the
fallback in place of the right specialist 0.5) the router says so: the fallback expert
goes first instead of a specialist it is unsure of, and the specialist stays behind it.

The fitted model is a small JSON file per encoder, ``fusion-<encoder>.json`` next to the
expert embeddings; without one (a custom encoder nobody fitted) the router keeps the
hand-set softmax fusion of ``HybridConfig``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from r3mes.router.semantic_router import FEATURE_NAMES, PACKAGED_DIR
from r3mes.utils.atomic import atomic_write_json

#: per-expert columns the fusion reads: the keyword confidence, then the semantic features
FUSION_FEATURES = ("keyword", *FEATURE_NAMES)
FUSION_FORMAT = 1


def fusion_path(directory: str | Path, encoder_slug: str) -> Path:
    """Where the fitted fusion for ``encoder_slug`` lives in ``directory``."""
    return Path(directory) / f"fusion-{encoder_slug}.json"


@dataclass(frozen=True)
class FusionModel:
    """A fitted conditional logit over topical experts (see the module docstring)."""

    weights: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bias: dict[str, float]
    general_threshold: float
    encoder: str
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(FUSION_FEATURES)
        if not (len(self.weights) == len(self.mean) == len(self.std) == n):
            raise ValueError(f"fusion model: expected {n} weights, means and stds")
        if not all(np.isfinite(self.weights)) or not all(s > 0 for s in self.std):
            raise ValueError("fusion model: weights must be finite and stds positive")
        if not 0.0 <= self.general_threshold < 1.0:
            raise ValueError("fusion model: general_threshold must be in [0, 1)")

    def logits(self, features: np.ndarray, expert_ids: Sequence[str]) -> np.ndarray:
        """``(n_experts,)`` logits for a ``(n_experts, len(FUSION_FEATURES))`` matrix."""
        z = (features - np.asarray(self.mean)) / np.asarray(self.std)
        bias = np.array([self.bias.get(e, 0.0) for e in expert_ids])
        return z @ np.asarray(self.weights) + bias

    def probabilities(self, features: np.ndarray, expert_ids: Sequence[str]) -> np.ndarray:
        """``p(expert | query)`` over the given topical experts (sums to 1)."""
        logits = self.logits(features, expert_ids)
        exp = np.exp(logits - logits.max())
        return exp / exp.sum()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FUSION_FORMAT,
            "features": list(FUSION_FEATURES),
            "encoder": self.encoder,
            "weights": [round(w, 6) for w in self.weights],
            "mean": [round(m, 6) for m in self.mean],
            "std": [round(s, 6) for s in self.std],
            "bias": {k: round(v, 6) for k, v in sorted(self.bias.items())},
            "general_threshold": round(self.general_threshold, 4),
            "fitted_on": self.fitted_on,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str) -> FusionModel:
        """Validate parsed JSON; :class:`ValueError` naming ``source`` when it is not one."""
        try:
            if data.get("format") != FUSION_FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            if list(data["features"]) != list(FUSION_FEATURES):
                raise ValueError(f"features {data['features']} are not {list(FUSION_FEATURES)}")
            return cls(
                weights=tuple(float(w) for w in data["weights"]),
                mean=tuple(float(m) for m in data["mean"]),
                std=tuple(float(s) for s in data["std"]),
                bias={str(k): float(v) for k, v in data["bias"].items()},
                general_threshold=float(data["general_threshold"]),
                encoder=str(data["encoder"]),
                fitted_on=dict(data.get("fitted_on") or {}),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: not a valid fusion model ({exc})") from None


def save_fusion(model: FusionModel, directory: str | Path) -> Path:
    """Write ``fusion-<encoder>.json`` atomically; returns its path."""
    path = fusion_path(directory, model.encoder)
    atomic_write_json(path, model.to_dict())
    return path


def load_fusion(encoder_slug: str, directory: str | Path | None = None) -> FusionModel | None:
    """The fitted fusion for ``encoder_slug`` (packaged by default), or ``None`` when there is
    none. A file that exists but is invalid raises :class:`ValueError` naming it."""
    path = fusion_path(directory if directory is not None else PACKAGED_DIR, encoder_slug)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable fusion model ({exc})") from None
    return FusionModel.from_dict(data, str(path))


def fit_fusion(
    features: np.ndarray,
    gold: np.ndarray,
    expert_ids: Sequence[str],
    *,
    encoder: str,
    l2: float = 1e-3,
    iterations: int = 3000,
    learning_rate: float = 0.5,
) -> FusionModel:
    """Fit the conditional logit by gradient descent on the mean negative log-likelihood.

    ``features`` is ``(n_questions, n_experts, len(FUSION_FEATURES))``, ``gold`` the index
    of each question's gold expert in ``expert_ids``. The problem is convex (a softmax of
    linear functions), so plain full-batch gradient descent on standardised features
    converges; the L2 term keeps the weights finite on separable data.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(gold, dtype=np.intp)
    n, experts, width = x.shape
    if width != len(FUSION_FEATURES) or experts != len(expert_ids) or len(y) != n:
        raise ValueError("fit_fusion: features, gold and expert_ids do not agree in shape")
    flat = x.reshape(-1, width)
    mean = flat.mean(axis=0)
    std = flat.std(axis=0)
    std = np.where(std > 1e-9, std, 1.0)
    z = (x - mean) / std
    w = np.zeros(width)
    b = np.zeros(experts)
    rows = np.arange(n)
    for _ in range(iterations):
        logits = z @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        p[rows, y] -= 1.0  # d(-log p_gold)/d logits
        w -= learning_rate * (np.einsum("ne,nef->f", p, z) / n + l2 * w)
        b -= learning_rate * (p.mean(axis=0) + l2 * b)
    return FusionModel(
        weights=tuple(float(v) for v in w),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        bias={e: float(v) for e, v in zip(expert_ids, b, strict=True)},
        general_threshold=0.0,
        encoder=encoder,
    )


def fit_general_threshold(
    probabilities: np.ndarray, gold: np.ndarray, general_index: int,
    *, general_cost: float = 0.5,
    grid: Sequence[float] = tuple(np.round(np.arange(0.0, 0.71, 0.02), 2)),
) -> float:
    """The threshold under which answering with the fallback costs least on the given
    (training) questions.

    A right expert costs 0, a wrong specialist 1, the fallback when it is not the gold
    expert ``general_cost`` (0.5: the general adapter answers passably where a wrong
    specialist answers in the wrong register). The smallest threshold wins ties, so the
    fallback takes over only where it demonstrably helps.
    """
    p = np.asarray(probabilities)
    top = p.argmax(axis=1)
    confidence = p.max(axis=1)
    best, best_cost = 0.0, float("inf")
    for threshold in grid:
        chosen = np.where(confidence < threshold, general_index, top)
        cost = np.where(chosen == gold, 0.0, np.where(chosen == general_index, general_cost, 1.0))
        if float(cost.mean()) < best_cost - 1e-12:
            best, best_cost = float(threshold), float(cost.mean())
    return best
