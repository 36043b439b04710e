"""Shared benchmark fixtures: the machine's memory read bandwidth, measured in the same run,
and a table of every result printed (and optionally written as Markdown) at the end."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import pytest
import torch

_ROWS: list[dict] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--table-out", default=None, help="write the results table (Markdown) here")


def _best_seconds(fn, repeat: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.fixture(scope="session")
def read_bandwidth() -> dict[int, float]:
    """Memory read bandwidth in GB/s by thread count: sum of a 1 GiB float32 array (larger
    than any cache here), numpy for one thread, torch for two."""
    array = np.ones(256 * 1024 * 1024, dtype=np.float32)
    tensor = torch.from_numpy(array)
    result = {1: array.nbytes / _best_seconds(array.sum) / 1e9}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    result[2] = array.nbytes / _best_seconds(tensor.sum) / 1e9
    torch.set_num_threads(before)
    return result


@pytest.fixture(scope="session")
def bandwidth_probe():
    """A callable ``probe(threads) -> GB/s``: the median of three sums of a 1 GiB array
    (numpy for one thread, torch for two), for measuring right next to a benchmark. The VM
    shares its memory bus: the bandwidth drifts by 20-30% over minutes, so a ratio is only
    honest between figures measured side by side."""
    array = np.ones(256 * 1024 * 1024, dtype=np.float32)
    tensor = torch.from_numpy(array)

    def probe(threads: int) -> float:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        fn = array.sum if threads == 1 else tensor.sum
        fn()
        rates = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            rates.append(array.nbytes / (time.perf_counter() - start) / 1e9)
        torch.set_num_threads(before)
        # Idle OpenMP workers spin for a few ms after a parallel op; let them go to sleep
        # before the benchmark that follows needs the cores.
        time.sleep(0.05)
        return float(np.median(rates))

    return probe


@pytest.fixture(scope="session")
def device_bandwidth() -> float:
    """GPU device-to-device copy bandwidth in GB/s (bytes read + bytes written), 1 GiB buffers."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best.append(start.elapsed_time(end) / 1000.0)
    return 2 * n / float(np.median(best)) / 1e9


@pytest.fixture(scope="session")
def record_row():
    """Adds a row to the end-of-run table."""
    return _ROWS.append


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    if not _ROWS:
        return
    columns = list(dict.fromkeys(k for row in _ROWS for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in _ROWS:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    header = (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}")
    text = header + "\n\n" + "\n".join(lines) + "\n"
    terminalreporter.write_sep("=", "r3mes benchmark table")
    terminalreporter.write(text)
    out = config.getoption("--table-out")
    if out:
        Path(out).write_text(text)
