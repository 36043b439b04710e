"""A request's generation options, checked: what the sampler may be given."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from r3mes.core.generation import GenerationConfig
from r3mes.serving.errors import InvalidRequestError
from r3mes.serving.pipeline_config import PipelineConfig

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what the sampler's 64-bit generator accepts
MIN_SAMPLING_TEMPERATURE = 1e-4  # below it sampling is greedy decoding (and would overflow)
GENERATION_OPTIONS = frozenset({"max_new_tokens", "max_tokens", "temperature", "top_k", "top_p",
                                "repetition_penalty", "stop", "seed"})


@dataclass(frozen=True)
class Sampling:
    """A request's checked generation options: the sampler's config and the stop strings."""

    params: GenerationConfig
    stop: list[str]


def check_sampling(overrides: Mapping[str, Any], defaults: PipelineConfig) -> Sampling:
    """A request's generation options (``overrides``, ``None`` meaning "the default")
    checked and completed from ``defaults``. Raises :class:`InvalidRequestError` naming
    what is wrong (an unknown option, a value out of range)."""
    cfg = defaults
    unknown = set(overrides) - GENERATION_OPTIONS
    if unknown:
        raise InvalidRequestError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    o = {k: v for k, v in overrides.items() if v is not None}
    if "max_tokens" in o:
        o.setdefault("max_new_tokens", o.pop("max_tokens"))
    try:
        max_new_tokens = int(o.get("max_new_tokens", cfg.max_new_tokens))
        temperature = float(o.get("temperature", cfg.temperature))
        top_k = int(o.get("top_k", cfg.top_k))
        top_p = float(o.get("top_p", cfg.top_p))
        repetition_penalty = float(o.get("repetition_penalty", cfg.repetition_penalty))
        seed = None if o.get("seed", cfg.seed) is None else int(o.get("seed", cfg.seed))
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"bad generation option: {exc}") from exc
    if max_new_tokens < 1:
        raise InvalidRequestError("max_new_tokens must be at least 1")
    if 0 < temperature < MIN_SAMPLING_TEMPERATURE:
        # Dividing the logits by 1e-240 overflows to inf (NaN probabilities); a
        # temperature this small samples the top token anyway: decode greedily.
        temperature = 0.0
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        raise InvalidRequestError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}] "
                                  "(a 64-bit seed)")
    # repetition_penalty divides or multiplies logits: outside [0.01, 100] they overflow.
    if not (0 <= temperature <= 10) or not (0 < top_p <= 1) or top_k < 0 \
            or not (0.01 <= repetition_penalty <= 100):
        raise InvalidRequestError(
            "generation options out of range: temperature in [0, 10], top_p in (0, 1], "
            "top_k >= 0, repetition_penalty in [0.01, 100]")
    params = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed)
    stop = o.get("stop", cfg.stop)
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequestError("stop must be a string or a list of strings")
    return Sampling(params, [s for s in stop if s])
