"""Warm-up shared by the benchmarks (importable both under pytest and as scripts)."""

from __future__ import annotations

import time
from collections.abc import Callable

WARM_UP_SECONDS = 0.5


def warm_up(fn: Callable[[], object], seconds: float = WARM_UP_SECONDS,
            max_calls: int | None = None) -> int:
    """Run fn for ``seconds`` (or ``max_calls`` calls) before it is timed; returns the calls.

    After an idle moment (a sleep, a bandwidth probe, building the next case) this VM runs
    memory-bound loops 2-4x slower for ~0.1-0.3 s; a warm-up of a few calls times inside
    that window."""
    calls = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end and (max_calls is None or calls < max_calls):
        fn()
        calls += 1
    return calls
