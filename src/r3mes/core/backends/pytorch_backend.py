"""``PyTorchBackend``: every forward pass on the torch reference kernels.

This is the reference the native backend is tested against: the ternary GEMMs run as
plain torch integer matmuls (:mod:`r3mes.kernels.reference`) and the int8 head as an exact
float64 matmul, so its integer results equal the native ones and only float rounding may
differ.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from r3mes import kernels
from r3mes.core.backends.base import InferenceBackend
from r3mes.core.model import KVCache

__all__ = ["PyTorchBackend", "torch_reference_kernels"]


def torch_reference_kernels() -> AbstractContextManager[None]:
    """Route :mod:`r3mes.kernels` to the torch reference for the duration:
    :func:`r3mes.kernels.use_reference`, local to the calling thread, so a native backend
    running in another thread at the same time keeps its native kernels."""
    return kernels.use_reference()


class PyTorchBackend(InferenceBackend):
    """Plain torch: the reference implementation (slow, exact integer arithmetic)."""

    name = "pytorch"

    @contextmanager
    def _kernel_context(self) -> Iterator[None]:
        with torch_reference_kernels():
            yield

    def _forward(self, input_ids: torch.Tensor, cache: KVCache, last_only: bool) -> torch.Tensor:
        model = self._require_model()
        with self._kernel_context():
            return model(input_ids, cache, last_only=last_only)

    def get_capabilities(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": "cpu",
            "kernels": "torch-reference",
            "precision": {"weights": "ternary (int8 unpacked at run time)",
                          "activations": "int8 per token", "accumulate": "int64/float64",
                          "float": "float32"},
            "threads": torch.get_num_threads(),
            "deterministic": True,
            "features": ["generate", "stream", "dora", "dora_mix", "batch",
                         "heterogeneous_batch", "continuous_batching", "chat_template",
                         "kv_cache"],
            **self._model_capabilities(),
        }
