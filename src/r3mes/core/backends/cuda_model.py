"""A :class:`~r3mes.core.model.BitNetForCausalLM` on an NVIDIA GPU, on the r3mes CUDA kernels.

Everything that moves a model to a GPU or runs it there lives here; the model, DoRA and
BitLinear modules only route CUDA tensors to it:

* :func:`resolve_device` - ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` to a device,
  with a clear error when CUDA is asked for and cannot run.
* :func:`move_model_to_cuda` - every ternary weight becomes a
  :class:`~r3mes.kernels.cuda.CudaTernaryWeight` (GPU layout; the CPU copy is dropped),
  norms, embedding, rotary tables and KV caches live on the device, the LM head becomes a
  :class:`DeviceLMHead`, loaded experts get CUDA kernel copies.
* :func:`prepare_cuda_adapters` - the device copies
  (:class:`~r3mes.kernels.cuda.CudaDoRAAdapter`, fp16 or fp32) of loaded DoRA adapters,
  made from the CPU-prepared adapters and cached next to them
  (:func:`r3mes.core.dora.cuda_adapter`, re-exported here). What
  :class:`~r3mes.core.dora.BitLinearDoRA` runs for a CUDA input,
  :func:`r3mes.core.dora.dora_forward_cuda` (the fused CUDA DoRA kernel, the mix kept on
  the device), lives beside the module.
* :class:`StaticDecoder` - one decode step with static shapes and no host synchronisation
  (ids, position and padding are device tensors, attention covers the whole cache under a
  mask), run eagerly or replayed from a CUDA graph captured once per cache.

The LM head on the GPU: the int8 head stays int8 (a quarter of an fp32 head's bytes, half
of bf16) and runs as ``torch._int_mm`` (cuBLASLt int8, exact int32 accumulation) after the
same per-token activation quantisation as the CPU, with the CPU kernel's float epilogue
``acc / (s_x * s_w[n])``: its logits equal the CPU backend's bit for bit for the same
input. A float head stays float32 (``F.linear``).
"""

from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from r3mes import kernels
from r3mes.core.dora import cuda_adapter, dora_forward_cuda, dora_modules
from r3mes.core.model import (
    BitNetForCausalLM,
    KVCache,
    LMHead,
    RMSNorm,
    grouped_query_attention,
)
from r3mes.kernels import cuda

__all__ = [
    "DeviceLMHead",
    "StaticDecoder",
    "cuda_adapter",
    "dora_forward_cuda",
    "model_device",
    "move_model_to_cuda",
    "prepare_cuda_adapters",
    "resolve_device",
]

log = logging.getLogger(__name__)

_CUDA_SPEC = re.compile(r"^cuda(:\d+)?$")
# torch._int_mm on CUDA takes more than 16 rows; N and K must be multiples of 8.
_INT_MM_MIN_ROWS = 17
_INT_MM_ALIGN = 8


# ---- devices ------------------------------------------------------------------------------


def _cuda_device(spec: str) -> torch.device:
    if not cuda.compiled():
        raise RuntimeError(
            f"device={spec!r}: the r3mes CUDA kernels are not built (r3mes._native_cuda is "
            "missing: reinstall r3mes with nvcc on the PATH)"
        )
    if not cuda.available():
        raise RuntimeError(
            f"device={spec!r}: no CUDA device is available (torch {torch.__version__} "
            f"built with CUDA {torch.version.cuda}, torch.cuda.is_available() is "
            f"{torch.cuda.is_available()}, the r3mes CUDA module sees "
            f"{cuda.info()['device_count']} devices)"
        )
    dev = torch.device(spec)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device={spec!r}: there are only {torch.cuda.device_count()} CUDA devices"
        )
    return dev


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` (CUDA when the r3mes CUDA kernels can
    run here, else CPU) or a ``torch.device`` -> a concrete device (CUDA with its index).

    Raises ValueError for anything else, RuntimeError when CUDA is asked for explicitly and
    the kernels are not built or no GPU is visible.
    """
    if isinstance(device, torch.device):
        spec = str(device)
    elif isinstance(device, str):
        spec = device.strip().lower()
    else:
        raise TypeError(f"device: expected a string or torch.device, got {type(device).__name__}")
    if spec == "auto":
        return _cuda_device("cuda") if cuda.available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if _CUDA_SPEC.match(spec):
        return _cuda_device(spec)
    raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")


def model_device(model: BitNetForCausalLM) -> torch.device:
    """The device a model runs on (its rotary buffer moves with it)."""
    return model.inv_freq.device


# ---- the LM head ----------------------------------------------------------------------------


class DeviceLMHead(LMHead):
    """An :class:`~r3mes.core.model.LMHead` on a torch device, without the CPU kernels.

    ``"int8"``: the per-row int8 weight stays int8 on the device; activations are
    quantised per token by :func:`r3mes.kernels.quantize_activations` (the CPU and CUDA
    quantisers agree bit for bit), the exact int32 products come from ``torch._int_mm`` and
    the epilogue is the CPU kernel's ``float(acc) / (s_x * s_w[n])``, so the logits equal
    :class:`LMHead`'s on the CPU bit for bit. ``"float"``: float32 and ``F.linear``.

    Rows are zero-padded to a multiple of 8 on the device (``torch._int_mm``'s rule);
    ``int8.data`` is a view of the unpadded rows.
    """

    def __init__(self, head: LMHead, device: torch.device | str) -> None:
        dev = torch.device(device)
        v, h = head.vocab_size, head.hidden_size
        if head.kind == "int4":
            raise ValueError("lm_head: the 4-bit head has CPU kernels only; convert the model "
                             "with `r3mes convert --head int8` to run it on CUDA")
        if head.kind == "float":
            super().__init__("float", v, h, weight=head.weight.detach().float().to(dev))
            self._rows = None
            return
        w = head.int8
        if w.data.shape[1] % _INT_MM_ALIGN:
            raise ValueError(f"lm_head: int8 rows of {w.data.shape[1]} bytes are not padded "
                             f"to a multiple of {_INT_MM_ALIGN}")
        rows_padded = -(-v // _INT_MM_ALIGN) * _INT_MM_ALIGN
        rows = torch.zeros((rows_padded, w.data.shape[1]), dtype=torch.int8, device=dev)
        rows[:v].copy_(w.data)
        int8 = kernels.Int8Weight(rows[:v], w.scale.detach().float().to(dev).contiguous(),
                                  w.row_sums.to(dev), v, h)
        super().__init__("int8", v, h, int8=int8)
        self._rows = rows

    def nbytes(self) -> int:
        if self._rows is None:
            return super().nbytes()
        return self._rows.numel() + self.int8.scale.numel() * 4 + self.int8.row_sums.numel() * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.hidden_size).float().contiguous()
        if self.kind == "float":
            return F.linear(x2, self.weight).reshape(*lead, self.vocab_size)
        q, s_x = kernels.quantize_activations(x2)
        m = q.shape[0]
        qp = torch.zeros((max(m, _INT_MM_MIN_ROWS), self._rows.shape[1]), dtype=torch.int8,
                         device=q.device)
        qp[:m, : self.hidden_size] = q
        acc = torch._int_mm(qp, self._rows.t())[:m, : self.vocab_size]
        # The CPU kernel's epilogue, operation for operation (csrc/ternary/int8_gemm.h).
        y = acc.float() / (s_x[:, None] * self.int8.scale[None, :])
        return y.reshape(*lead, self.vocab_size)


# ---- adapters ---------------------------------------------------------------------------------


def prepare_cuda_adapters(model: BitNetForCausalLM, names: list[str] | None = None) -> int:
    """Make the CUDA copies of the loaded (inference) adapters ``names`` (None: all) of
    every module now, so no decode step pays for them; returns how many were made."""
    dev = model_device(model)
    count = 0
    for module in dora_modules(model).values():
        for name in module.adapter_names:
            if (names is None or name in names) and not module._meta[name].trainable:
                cuda_adapter(module, name, dev)
                count += 1
    return count


# ---- moving a model -------------------------------------------------------------------------


def move_model_to_cuda(model: BitNetForCausalLM,
                       device: torch.device | str = "cuda") -> torch.device:
    """Move a loaded (frozen) model to a GPU, in place; returns the device.

    Every BitLinear's packed weight is repacked into the GPU layout and copied
    (:meth:`CudaTernaryWeight.from_cpu`); the CPU :class:`~r3mes.kernels.TernaryWeight` is
    dropped once copied (one layer at a time, so the host never holds a second copy of the
    model). Norms, the embedding (in its dtype), the rotary tables and the LM head
    (:class:`DeviceLMHead`) move to the device; :meth:`BitNetForCausalLM.new_cache` then
    allocates KV caches there. Loaded inference adapters get their CUDA copies. The native
    CPU decode layers are dropped: they never run on a GPU model.

    Raises RuntimeError (no CUDA), ValueError (a float, unfrozen base; a model already on
    another device).
    """
    dev = resolve_device(device)
    if dev.type != "cuda":
        raise ValueError(f"device: expected a CUDA device, got {dev}")
    current = model_device(model)
    if current == dev:
        return dev
    if current.type != "cpu":
        raise ValueError(f"the model is already on {current}")
    bases = model.base_linears()
    for path, lin in bases.items():
        if lin.ternary is None:
            raise ValueError(f"{path}: the base is not frozen (a float BitLinear cannot run on "
                             "the CUDA kernels)")
    model.decode_hook = None  # the native CPU decoder never runs on a GPU model
    for lin in bases.values():
        lin.ternary = cuda.CudaTernaryWeight.from_cpu(lin.ternary, dev)
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.detach().float().to(dev), requires_grad=False)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.to(dev)
    emb = model.model.embed_tokens
    emb.weight = emb.weight.detach().to(dev)
    model.inv_freq = model.inv_freq.to(dev)
    model._rope_len, model._cos, model._sin = 0, torch.empty(0), torch.empty(0)
    model.lm_head = DeviceLMHead(model.lm_head, dev)
    if model.lm_head.kind == "int8":
        try:  # a clear error now rather than at the first token
            model.lm_head(torch.zeros(1, model.config.hidden_size, device=dev))
        except Exception as exc:
            raise RuntimeError(f"int8 LM head on {dev}: torch._int_mm failed ({exc}); load the "
                               "model with head='float'") from exc
    prepare_cuda_adapters(model)
    return dev


# ---- decoding with static shapes --------------------------------------------------------------


@dataclass
class _Session:
    """The static buffers of one cache: what a captured graph reads and writes. The cache
    is held weakly: once a generation drops it, its memory is freed and the session (and
    its graph, which is only replayed for that very cache) is never used again."""

    cache_ref: weakref.ReferenceType[KVCache]
    k_ptr: int
    ids: torch.Tensor  # [B] long
    pos: torch.Tensor  # [1] long: the position written this step (cache.length)
    pad: torch.Tensor  # [B] long
    key_pos: torch.Tensor  # [S] long
    cos: torch.Tensor  # rotary tables covering S positions
    sin: torch.Tensor
    graph: Any = None  # torch.cuda.CUDAGraph
    logits: torch.Tensor | None = None  # the graph's output buffer
    state: Any = None  # the mix state the graph was captured with


class StaticDecoder:
    """Decode steps (one token per row) with static shapes, eager or from a CUDA graph.

    A step reads its token ids, position and left padding from device tensors and attends
    over the whole cache under a mask (positions not yet written or padding get the
    float32 minimum), so it never synchronises with the host and every step of a
    generation runs the same kernels on the same shapes. With ``cuda_graphs`` the step is
    captured once per cache (batch size and cache length fixed with it) and replayed per
    token; eager and graph runs compute the same operations, so their logits agree bit for
    bit. A capture that fails is logged and decoding stays eager (:attr:`graph_error`).

    The graph reads the experts' device copies and mixes as they were at capture; a changed
    mix (``mix_serial``) or an in-place update of a mixed adapter recaptures.
    Eager mode also runs on a CPU model (that is how the CPU tests check the step).
    """

    def __init__(self, model: BitNetForCausalLM, cuda_graphs: bool = False) -> None:
        self.model = model
        self.cuda_graphs = bool(cuda_graphs)
        self.graph_error: str | None = None
        self.captures = 0
        self._session: _Session | None = None
        self._modules = list(dora_modules(model).values())
        self._serials: tuple[int, ...] | None = None
        self._watched: list[torch.Tensor] = []

    def reset(self) -> None:
        """Drop the static buffers and any captured graph."""
        self._session = None

    def _session_for(self, cache: KVCache) -> _Session:
        s = self._session
        if (s is not None and s.cache_ref() is cache and s.k_ptr == cache.k.data_ptr()
                and s.ids.shape[0] == cache.batch_size):
            return s
        dev = cache.k.device
        self.model.rope(torch.tensor([cache.max_len - 1]))  # tables cover the cache
        s = _Session(
            cache_ref=weakref.ref(cache), k_ptr=cache.k.data_ptr(),
            ids=torch.zeros(cache.batch_size, dtype=torch.long, device=dev),
            pos=torch.zeros(1, dtype=torch.long, device=dev),
            pad=cache.pad.to(dev),
            key_pos=torch.arange(cache.max_len, device=dev),
            cos=self.model._cos, sin=self.model._sin,
        )
        self._session = s
        return s

    def _mix_state(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        serials = tuple(m.mix_serial for m in self._modules)
        if serials != self._serials:
            self._serials = serials
            self._watched = [p for m in self._modules for p in m.mix_parameters()]
        return serials, tuple(p._version for p in self._watched)

    def step(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits float32 [B, 1, V] on the cache's device for ``input_ids`` [B, 1]; writes
        keys and values at ``cache.length`` and advances it."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() != 2 or ids.shape[1] != 1:
            raise ValueError(f"input_ids: expected [batch, 1], got {tuple(ids.shape)}")
        if ids.shape[0] != cache.batch_size:
            raise ValueError(f"cache holds {cache.batch_size} rows, input has {ids.shape[0]}")
        if cache.length >= cache.max_len:
            raise ValueError(f"sequence of {cache.length + 1} tokens exceeds the cache "
                             f"({cache.max_len})")
        ids_cpu = ids.detach().cpu()
        vocab = self.model.config.vocab_size
        if int(ids_cpu.min()) < 0 or int(ids_cpu.max()) >= vocab:
            raise ValueError(f"input_ids: token ids must be in [0, {vocab})")
        s = self._session_for(cache)
        s.ids.copy_(ids_cpu.view(-1))
        s.pos.fill_(cache.length)
        graphed = self.cuda_graphs and self.graph_error is None and s.ids.is_cuda
        if graphed:
            state = self._mix_state()
            if s.graph is None or s.state != state:
                self._capture(s)
                s.state = state
        with torch.no_grad():
            if graphed and s.graph is not None:
                s.graph.replay()
                logits = s.logits.clone()
            else:
                logits = self._run(s)
        cache.length += 1
        return logits

    def _capture(self, s: _Session) -> None:
        dev = s.ids.device
        s.graph, s.logits = None, None
        try:
            # Warm-up on a side stream (torch's rule before a capture): it runs the real
            # step, builds every lazily made buffer (expert copies, device mixes, cuBLAS
            # workspaces) and its cache writes are the ones the replay repeats.
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side), torch.no_grad():
                self._run(s)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (a server's) do not break the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"), torch.no_grad():
                logits = self._run(s)
        except Exception as exc:  # any capture failure: decode eagerly instead
            self.graph_error = f"{type(exc).__name__}: {exc}"
            log.warning("CUDA graph capture of the decode step failed; decoding eagerly: %s",
                        self.graph_error)
            return
        s.graph, s.logits = graph, logits
        self.captures += 1

    def _run(self, s: _Session) -> torch.Tensor:
        """One decode step on the session's buffers: no host synchronisation."""
        model = self.model
        positions = (s.pos - s.pad).clamp(min=0)  # [B]
        cos = s.cos[positions][:, None, None]  # [B, 1, 1, hd]
        sin = s.sin[positions][:, None, None]
        allowed = (s.key_pos[None, :] >= s.pad[:, None]) & (s.key_pos[None, :] <= s.pos)
        mask = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
        h = model.model(s.ids[:, None], cos, sin, _StaticKV(s.cache_ref(), s.pos),
                        mask[:, None, None])  # mask [B, 1, 1, S]
        return model.lm_head(h)


class _StaticKV:
    """The cache as the static step's KV store: the new key/value go to position ``pos``
    (a device tensor, so no host synchronisation) and attention covers the whole cache,
    the positions not written yet masked."""

    def __init__(self, cache: KVCache, pos: torch.Tensor) -> None:
        self.cache, self.pos = cache, pos

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        k_cache.index_copy_(2, self.pos, k)
        v_cache.index_copy_(2, self.pos, v)
        return grouped_query_attention(q, k_cache, v_cache, mask, scaling)
