"""Core model pieces: BitLinear, DoRA, the BitNet transformer, checkpoints."""

from __future__ import annotations

from typing import Any

__all__ = ["fingerprint"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import r3mes.core.cli` (every `r3mes` command) does not pay for torch.
    if name == "fingerprint":
        from r3mes.core.logit_fingerprint import fingerprint

        return fingerprint
    raise AttributeError(f"module 'r3mes.core' has no attribute {name!r}")
