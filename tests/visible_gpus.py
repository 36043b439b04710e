"""How many CUDA devices a process on this machine should see, told without r3mes's module."""

from __future__ import annotations

from pathlib import Path

import torch


def expected_cuda_devices() -> int | None:
    """torch's count when torch is a CUDA build; 0 when the machine has no NVIDIA device
    node at all; None when it cannot be told (a CPU torch beside a GPU, or a device mask)."""
    if torch.version.cuda is not None:
        return torch.cuda.device_count()
    if not any(Path("/dev").glob("nvidia[0-9]*")):
        return 0
    return None
