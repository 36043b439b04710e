"""``BitNetCppBackend``: the native r3mes kernels (CPU today; CUDA when its kernels land).

Determinism: the ternary and int8-head dot products are exact integers whatever the
thread count; the float parts (norms, rotary, attention, softmax) run in torch pinned to
one thread so their reduction order never changes. Same input, same logits, bit for bit,
on every run and every ``num_threads``; :func:`r3mes.core.logit_fingerprint` checks it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from r3mes import kernels
from r3mes.core.backends.base import InferenceBackend
from r3mes.core.model import KVCache

__all__ = ["BitNetCppBackend"]


class BitNetCppBackend(InferenceBackend):
    """The native ternary kernels.

    Args:
        num_threads: kernel threads (None: all cores); results do not depend on it.
        adapter_storage: ``"int8"`` (default: a quarter of the fp32 adapter bytes read per
            token; absmax int8 per row of A / column of B), ``"fp16"`` (half) or ``"fp32"``
            (matches the reference to float rounding). Measured on the bundled experts'
            held-out text, int8 moves perplexity by at most 0.03% against fp32 (fp16: 0.01%).
    """

    name = "bitnet_cpp"

    def __init__(self, num_threads: int | None = None, adapter_storage: str = "int8") -> None:
        if not kernels.available():
            raise RuntimeError("BitNetCppBackend needs the r3mes native module "
                               f"({kernels.info().get('native')})")
        super().__init__()
        if adapter_storage not in kernels.ADAPTER_STORAGES:
            raise ValueError(f"adapter_storage: expected one of {kernels.ADAPTER_STORAGES}, "
                             f"got {adapter_storage!r}")
        self.adapter_storage = adapter_storage
        if num_threads is not None:
            self.set_num_threads(num_threads)

    @staticmethod
    def set_num_threads(n: int) -> None:
        """Threads for the native kernels (n <= 0: all cores). Results do not depend on it."""
        kernels.set_num_threads(n)

    def _forward(self, input_ids: torch.Tensor, cache: KVCache, last_only: bool) -> torch.Tensor:
        model = self._require_model()
        if os.environ.get("R3MES_BACKEND", "").lower() == "torch":
            raise RuntimeError("R3MES_BACKEND=torch disables the native kernels; use "
                               "PyTorchBackend instead")
        previous = torch.get_num_threads()
        torch.set_num_threads(1)  # fixed float reduction order: bit-identical results
        try:
            return model(input_ids, cache, last_only=last_only)
        finally:
            torch.set_num_threads(previous)

    def get_capabilities(self) -> dict[str, Any]:
        info = kernels.info()
        return {
            "backend": self.name,
            "device": "cpu",
            "kernels": {"simd": info.get("simd_level"), "layout": info.get("weight_layout"),
                        "cpu_features": info.get("cpu_features")},
            "precision": {"weights": "ternary 2-bit packed", "activations": "int8 per token",
                          "accumulate": "int32 exact", "float": "float32",
                          "lm_head": "int8 per row (native int8 x int8 kernel)"},
            "threads": info.get("num_threads"),
            "deterministic": True,
            "features": ["generate", "stream", "dora", "dora_mix", "batch",
                         "heterogeneous_batch", "chat_template", "kv_cache", "native_kernels",
                         "fingerprint"],
            **self._model_capabilities(),
        }
