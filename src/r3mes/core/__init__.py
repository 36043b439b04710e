"""Core model pieces: BitLinear, DoRA, the BitNet transformer, checkpoints."""

from r3mes.core.fingerprint import fingerprint

__all__ = ["fingerprint"]
