"""One-token decode steps with every decoder layer in native code (``csrc/model/``), on the CPU.

The CPU counterpart of :class:`~r3mes.core.backends.cuda_model.StaticDecoder`: a
:class:`NativeDecoder` plugs into a :class:`~r3mes.core.model.BitNetForCausalLM` as its
``decode_hook`` (:meth:`NativeDecoder.attach`; the native backend does it), and the model's
generation entry points (a one-token ``forward`` with a cache, ``decode_paged``) then hand
each step to it. The model itself stays the architecture and its torch reference.

One ``_native.DecodeLayer`` per decoder layer is built at the first step around the model's
own packed weights and norms (nothing is copied). A layer runs norms, projections, DoRA
mixes, rotary, attention over the KV cache (contiguous or paged) and the MLP in one call.
The layers hold the experts' mixes as native objects; they are handed over again only when
a mix changed: a module's ``mix_serial`` moved (set_mix, load/remove adapter,
``load_state_dict``), the batch size changed, or a mixed trainable adapter was updated in
place (its parameters' ``_version``).

A step that the native layers cannot run returns None and touches nothing, and the model
runs its torch layers instead: the native kernels are off (``R3MES_BACKEND=torch``), the
cache is not on the CPU, or a projection does not qualify (a float base, a bias, the float
base path of PEFT-parity mode). A model found not to qualify stays on the torch path until
:meth:`NativeDecoder.reset`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from r3mes import kernels
from r3mes.core.dora import BitLinearDoRA
from r3mes.core.model import LINEAR_NAMES, BitNetForCausalLM, KVCache, RMSNorm

if TYPE_CHECKING:
    from r3mes.core.kv_blocks import KVBlockPool

__all__ = ["NativeDecoder"]


class NativeDecoder:
    """The native decode layers of one model (see the module docstring).

    Args:
        model: the model whose steps it runs; :meth:`attach` also installs it there.
    """

    def __init__(self, model: BitNetForCausalLM) -> None:
        self.model = model
        #: True once the model was found unable to run natively (until :meth:`reset`).
        self.unavailable = False
        self._layers: list[Any] | None = None
        self._modules: list[list[BitLinearDoRA]] = []
        # The mix each native layer holds, per projection: (natives, matrix, base weights).
        self._mixes: list[list[object]] = []
        # What the layers' mixes were built from: batch size, every projection's mix_serial
        # and the versions of the trainable parameters the mixes read.
        self._mix_state: tuple[int, list[int], list[int]] | None = None
        self._watched: list[torch.Tensor] = []

    @classmethod
    def attach(cls, model: BitNetForCausalLM) -> NativeDecoder:
        """The model's native decoder, installed as its ``decode_hook`` if it has none yet."""
        hook = model.decode_hook
        if isinstance(hook, cls) and hook.model is model:
            return hook
        hook = cls(model)
        model.decode_hook = hook
        return hook

    @property
    def running(self) -> bool:
        """Whether the native layers are built and in use."""
        return self._layers is not None and not self.unavailable

    def reset(self) -> None:
        """Forget the built layers (and a past refusal): the next step builds them again."""
        self.unavailable = False
        self._layers = None
        self._modules, self._mixes, self._watched = [], [], []
        self._mix_state = None

    def layers(self) -> list[Any] | None:
        """One ``_native.DecodeLayer`` per layer (built at the first call), or None when a
        layer needs the torch path."""
        if self._layers is None and not self.unavailable:
            self._layers = self._build()
            self.unavailable = self._layers is None
        return None if self.unavailable else self._layers

    # ---- the model's decode entry points (r3mes.core.model.DecodeHook) ------------------
    def decode(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """Logits [B, 1, V] of ``input_ids`` [B, 1] appended to the left-padded ``cache``
        (advancing ``cache.length``), or None when the step cannot run natively."""
        if not kernels.use_native() or cache.k.device.type != "cpu" or self.layers() is None:
            return None
        bsz = input_ids.shape[0]
        start = cache.length
        # The contiguous cache is a pool of one block a row, max_len positions long.
        table = torch.arange(bsz, dtype=torch.int32)[:, None]
        pos = torch.full((bsz,), start, dtype=torch.long)
        logits = self._step(input_ids[:, 0], cache.k, cache.v, table, cache.pad, pos,
                            (start - cache.pad).clamp(min=0))
        if logits is not None:
            cache.length = start + 1
        return logits

    def decode_paged(self, tokens: torch.Tensor, pool: KVBlockPool, table: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor | None:
        """Logits [B, V] of one token a row of ``pool`` (see
        :meth:`~r3mes.core.model.BitNetForCausalLM.decode_paged`), or None."""
        if not kernels.use_native() or self.layers() is None:
            return None
        logits = self._step(tokens, pool.k, pool.v, table,
                            torch.zeros(tokens.shape[0], dtype=torch.long), positions, positions)
        return None if logits is None else logits[:, 0]

    # ---- the step ----------------------------------------------------------------------
    def _step(self, tokens: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              table: torch.Tensor, start: torch.Tensor, pos: torch.Tensor,
              rope_pos: torch.Tensor) -> torch.Tensor | None:
        """Runs the native layers on one token a row: row b writes cache position pos[b]
        (its blocks: ``table[b]``), attends [start[b], pos[b]] and is rotated for position
        rope_pos[b]. Logits [B, 1, V], or None when the layers can no longer run."""
        model = self.model
        bsz = tokens.shape[0]
        state = (bsz, [m.mix_serial for layer in self._modules for m in layer],
                 [p._version for p in self._watched])
        if state != self._mix_state:
            try:
                for li, native in enumerate(self._layers):
                    self._sync_mix(li, native, bsz)
            except RuntimeError:
                self.unavailable = True
                return None
            self._watched = [p for layer in self._modules for m in layer
                             for p in m.mix_parameters()]
            self._mix_state = (bsz, state[1], [p._version for p in self._watched])
        cos, sin = model.rope(rope_pos)
        cos_np, sin_np = cos.contiguous().numpy(), sin.contiguous().numpy()
        table_np = table.to(torch.int32).contiguous().numpy()
        start_np = start.to(torch.long).contiguous().numpy()
        pos_np = pos.to(torch.long).contiguous().numpy()
        k_np, v_np = k.numpy(), v.numpy()
        h = model.model.embed_tokens.weight[tokens].float().contiguous()
        h_np = h.numpy()
        for li, native in enumerate(self._layers):
            native.step(h_np, k_np, v_np, li, table_np, start_np, pos_np, cos_np, sin_np)
        return model.lm_head(model.model.norm(h.view(bsz, 1, -1)))

    def _build(self) -> list[Any] | None:
        from r3mes.kernels import _native

        cfg = self.model.config
        built, all_modules = [], []
        for layer in self.model.model.layers:
            modules = [getattr(getattr(layer, part), proj)
                       for part, proj in (n.split(".") for n in LINEAR_NAMES)]
            projections = []
            for m in modules:
                if not isinstance(m, BitLinearDoRA) or not m.runs_in_native_decode():
                    return None
                tw = m.base.ternary
                projections.append((tw._packed_np, tw.in_features, tw.scale))

            def vec(norm: RMSNorm | None) -> np.ndarray | None:
                return None if norm is None else norm.weight.detach().float().contiguous().numpy()

            attn, mlp = layer.self_attn, layer.mlp
            built.append(_native.DecodeLayer(
                cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                cfg.num_key_value_heads, cfg.head_dim, float(cfg.rms_norm_eps),
                float(attn.scaling), cfg.hidden_act, vec(layer.input_layernorm),
                vec(layer.post_attention_layernorm), vec(attn.attn_sub_norm),
                vec(mlp.ffn_sub_norm), projections))
            all_modules.append(modules)
        self._modules = all_modules
        self._mixes = [[None] * len(LINEAR_NAMES) for _ in built]
        self._mix_state = None  # fresh layers hold no mix yet
        return built

    def _sync_mix(self, li: int, native: Any, bsz: int) -> None:
        """Hands layer ``li``'s current DoRA mixes to its native twin where they changed."""
        applied = self._mixes[li]
        for j, module in enumerate(self._modules[li]):
            spec = module.decode_kernel_mix(bsz)
            old = applied[j]
            if spec is None:
                if old is not None:
                    native.set_mix(j, [], None, None)
                    applied[j] = None
                continue
            natives, mat, base_w = spec
            if (old is not None and old[1] is mat and old[2] is base_w
                    and len(old[0]) == len(natives)
                    and all(a is b for a, b in zip(old[0], natives, strict=True))):
                continue
            native.set_mix(j, list(natives), mat.numpy(),
                           None if base_w is None else base_w.numpy())
            applied[j] = spec
