"""``BitNetCppBackend``: the native r3mes kernels, on the CPU or on an NVIDIA GPU.

Determinism (CPU): the ternary and int8-head dot products are exact integers whatever the
thread count; the float parts (norms, rotary, attention, softmax) run in torch pinned to
one thread so their reduction order never changes. Decode steps run every decoder layer in
native code (:class:`~r3mes.core.backends.native_decode.NativeDecoder`, attached to the
model as its ``decode_hook``). Same input, same logits, bit for bit,
on every run and every ``num_threads``; :func:`r3mes.core.logit_fingerprint` checks it.

GPU (``device="cuda"``): the model moves to the device after loading
(:mod:`r3mes.core.backends.cuda_model`): ternary weights in the CUDA kernels' layout, KV
cache, norms, embedding and the int8 LM head on the device, experts as CUDA copies (fp16 by
default). Prefill runs the model's torch attention with the CUDA GEMM; each decode step runs
:class:`~r3mes.core.backends.cuda_model.StaticDecoder`, replayed from a CUDA graph with
``cuda_graphs=True``. Logits come back to the CPU (the sampler runs there).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from r3mes import kernels
from r3mes.core.backends.base import InferenceBackend
from r3mes.core.backends.native_decode import NativeDecoder
from r3mes.core.checkpoint import LoadInfo
from r3mes.core.model import KVCache

__all__ = ["BitNetCppBackend"]


class BitNetCppBackend(InferenceBackend):
    """The native ternary kernels.

    Args:
        num_threads: CPU kernel threads (None: all cores); results do not depend on it.
        adapter_storage: ``"int8"`` (the CPU default: a quarter of the fp32 adapter bytes
            read per token; absmax int8 per row of A / column of B), ``"fp16"`` (half; the
            GPU default) or ``"fp32"`` (matches the reference to float rounding). Measured on
            the bundled experts' held-out text, int8 moves perplexity by at most 0.03%
            against fp32 (fp16: 0.01%). The CUDA kernels take fp16 or fp32 only.
        device: ``"cpu"`` (default), ``"cuda"`` / ``"cuda:N"`` (RuntimeError when the CUDA
            kernels are not built or no GPU is visible) or ``"auto"`` (CUDA when it can
            run here, else CPU).
        cuda_graphs: on a GPU, replay each decode step from a CUDA graph captured once per
            generation (falls back to eager decoding, logged, when a capture fails).
            Ignored when ``"auto"`` resolves to the CPU; an error with ``device="cpu"``.
    """

    name = "bitnet_cpp"

    def __init__(self, num_threads: int | None = None, adapter_storage: str | None = None,
                 *, device: str | torch.device = "cpu", cuda_graphs: bool = False) -> None:
        if not kernels.available():
            raise RuntimeError("BitNetCppBackend needs the r3mes native module "
                               f"({kernels.info().get('native')})")
        from r3mes.core.backends.cuda_model import resolve_device

        wants_cpu = isinstance(device, str) and device.strip().lower() == "cpu"
        if cuda_graphs and wants_cpu:
            raise ValueError("cuda_graphs=True needs device='cuda' (or 'auto' on a GPU)")
        self.device = resolve_device(device)
        on_gpu = self.device.type == "cuda"
        super().__init__()
        if adapter_storage is None:
            adapter_storage = "fp16" if on_gpu else "int8"
        allowed = ("fp16", "fp32") if on_gpu else kernels.ADAPTER_STORAGES
        if adapter_storage not in allowed:
            raise ValueError(f"adapter_storage: expected one of {allowed} on {self.device}, "
                             f"got {adapter_storage!r}")
        self.adapter_storage = adapter_storage
        self.cuda_graphs = bool(cuda_graphs) and on_gpu
        self._decoder: Any = None  # StaticDecoder of the loaded model (GPU only)
        if num_threads is not None:
            self.set_num_threads(num_threads)

    # ---- loading (moves to the GPU when the backend runs there) -------------------------
    def load_base_model(self, path: str | os.PathLike[str], *, head: str = "int8",
                        verify: bool = False) -> LoadInfo:
        info = super().load_base_model(path, head=head, verify=verify)
        if self.device.type != "cuda":
            return info
        from r3mes.core.backends.cuda_model import StaticDecoder, move_model_to_cuda

        with self._lock:
            try:
                move_model_to_cuda(self.model, self.device)
            except Exception:
                self.model, self.tokenizer, self.load_info = None, None, None
                raise
            self._decoder = StaticDecoder(self.model, cuda_graphs=self.cuda_graphs)
        return info

    def load_dora_adapter(self, adapter_id: str, path: str | os.PathLike[str]) -> None:
        super().load_dora_adapter(adapter_id, path)
        if self.device.type != "cuda":
            return
        from r3mes.core.backends.cuda_model import prepare_cuda_adapters

        with self._lock:
            try:
                prepare_cuda_adapters(self._require_model(), [adapter_id])
            except Exception:
                self.unload_dora_adapter(adapter_id)
                raise

    @staticmethod
    def set_num_threads(n: int) -> None:
        """Threads for the native kernels (n <= 0: all cores). Results do not depend on it."""
        kernels.set_num_threads(n)

    @contextmanager
    def _kernel_context(self) -> Iterator[None]:
        if self.device.type == "cuda":
            raise RuntimeError("paged (continuous-batching) decode runs on the CPU backend; "
                               "on a GPU the engine batches statically")
        if not kernels.use_native():
            raise RuntimeError("the native kernels are off here (R3MES_BACKEND=torch or inside "
                               "kernels.use_reference()); use PyTorchBackend instead")
        if self.model is not None:
            # Decode steps run every layer natively (r3mes.core.backends.native_decode).
            NativeDecoder.attach(self.model)
        previous = torch.get_num_threads()
        torch.set_num_threads(1)  # fixed float reduction order: bit-identical results
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def _forward(self, input_ids: torch.Tensor, cache: KVCache, last_only: bool) -> torch.Tensor:
        model = self._require_model()
        if self.device.type == "cuda":
            return self._forward_cuda(model, input_ids, cache, last_only)
        with self._kernel_context():
            return model(input_ids, cache, last_only=last_only)

    def _forward_cuda(self, model: Any, input_ids: torch.Tensor, cache: KVCache,
                      last_only: bool) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        with torch.cuda.device(self.device):
            if ids.dim() == 2 and ids.shape[1] == 1 and cache.k.device == self.device:
                logits = self._decoder.step(ids, cache)
            else:
                logits = model(ids.to(self.device), cache, last_only=last_only)
        return logits.float().cpu()

    def get_capabilities(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            return self._cuda_capabilities()
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
                         "heterogeneous_batch", "continuous_batching", "packed_prefill",
                         "chat_template",
                         "kv_cache", "native_kernels", "fingerprint"],
            **self._model_capabilities(),
        }

    def _cuda_capabilities(self) -> dict[str, Any]:
        from r3mes.kernels import cuda

        props = torch.cuda.get_device_properties(self.device)
        head = None if self.model is None else self.model.lm_head.kind
        decoder = self._decoder
        return {
            "backend": self.name,
            "device": f"cuda:{self.device.index}",
            "gpu": {"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                    "memory_total_bytes": int(props.total_memory),
                    "memory_allocated_bytes": int(torch.cuda.memory_allocated(self.device)),
                    "memory_reserved_bytes": int(torch.cuda.memory_reserved(self.device)),
                    "torch_cuda": torch.version.cuda},
            "kernels": {"module": "r3mes._native_cuda",
                        "architectures": cuda.compiled_architectures(),
                        "layout": "r3mes-cuda-2bit-c64",
                        "ternary": "dp4a GEMV (decode), mma.sync int8 GEMM (prefill)",
                        "dora": "fused multi-expert epilogue",
                        "lm_head": "torch._int_mm (cuBLASLt int8)" if head == "int8"
                        else "torch F.linear float32",
                        "attention": "torch"},
            "precision": {"weights": "ternary 2-bit packed", "activations": "int8 per token",
                          "accumulate": "int32 exact", "float": "float32",
                          "adapters": self.adapter_storage,
                          "lm_head": "int8 per row (exact int32, the CPU kernel's epilogue)"
                          if head == "int8" else "float32"},
            "cuda_graphs": {"enabled": self.cuda_graphs,
                            "captures": 0 if decoder is None else decoder.captures,
                            "error": None if decoder is None else decoder.graph_error},
            # Not yet checked on a GPU: same-input bit-reproducibility of the torch float
            # parts (attention, norms) across runs.
            "deterministic": False,
            "features": ["generate", "stream", "dora", "dora_mix", "batch",
                         "heterogeneous_batch", "chat_template", "kv_cache", "native_kernels",
                         "cuda"] + (["cuda_graphs"] if self.cuda_graphs else []),
            **self._model_capabilities(),
        }
