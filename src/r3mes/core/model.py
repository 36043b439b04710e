"""The BitNet b1.58 transformer, module for module as HF transformers' ``BitNetForCausalLM``.

Block (one decoder layer)::

    h = h + o_proj(attn_sub_norm(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))))
        where n = input_layernorm(h)
    h = h + down_proj(ffn_sub_norm(act(gate_proj(m)) * up_proj(m)))
        where m = post_attention_layernorm(h)

``act`` is relu² for BitNet (``silu`` for the Llama-shaped Falcon3-1.58bit checkpoints,
which also have no sub-norms). Every projection is a ternary :class:`BitLinear` wrapped in
``BitLinearDoRA`` so that experts apply everywhere; module paths are HF's
(``model.layers.3.self_attn.q_proj`` ...) so PEFT adapter keys map one to one.

All activations are float32. The LM head is not ternary (BitNet keeps it in bf16); it is
held either in float32 (``LMHead.kind == "float"``) or, for speed, as int8 with one scale
per vocabulary row (``"int8"``), see :class:`LMHead`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from r3mes import kernels
from r3mes.core.bitlinear import BitLinear
from r3mes.core.dora import BitLinearDoRA

if TYPE_CHECKING:
    from r3mes.core.kv_blocks import KVBlockPool

__all__ = [
    "BitNetConfig",
    "BitNetForCausalLM",
    "KVCache",
    "LMHead",
    "LINEAR_NAMES",
    "bitlinear_from_packed",
]

# Projection names inside a decoder layer, as HF names them.
LINEAR_NAMES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass
class BitNetConfig:
    """The architecture hyper-parameters (the subset of HF's ``BitNetConfig`` r3mes uses)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "relu2"
    sub_norms: bool = True
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim <= 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"config: {name} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("config: num_attention_heads must be a multiple of "
                             "num_key_value_heads")
        if self.head_dim % 2:
            raise ValueError("config: head_dim must be even (rotary embedding)")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"config: hidden_act {self.hidden_act!r} is not supported "
                             f"(supported: {sorted(_ACTIVATIONS)})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BitNetConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


_ACTIVATIONS = {"relu2": _relu2, "silu": F.silu}


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x²) + eps)``, computed in float32 like HF's BitNetRMSNorm."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op instead of five: decode runs four norms a layer on one token.
        return F.rms_norm(x, self.weight.shape, self.weight, self.variance_epsilon)


def bitlinear_from_packed(weight: kernels.TernaryWeight) -> BitLinear:
    """A frozen :class:`BitLinear` around an already packed weight (no repacking, no copy)."""
    layer = BitLinear.__new__(BitLinear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = weight.in_features, weight.out_features
    layer.weight = None  # type: ignore[assignment]
    layer.bias = None
    layer.ternary = weight
    return layer


def _wrap_linear(base: BitLinear) -> nn.Module:
    """Every projection is a ``BitLinearDoRA`` so adapters attach by module path."""
    return BitLinearDoRA(base)


def _base_of(module: nn.Module) -> BitLinear:
    return module if isinstance(module, BitLinear) else module.base


# --------------------------------------------------------------------------- LM head
class LMHead(nn.Module):
    """The output projection [V, H]; BitNet keeps it out of the ternary quantisation.

    ``kind == "int8"``: per-row absmax int8 (:class:`r3mes.kernels.Int8Weight`,
    ``W ~= qweight / weight_scale[:, None]``) on the native int8 x int8 kernel; the
    activations are quantised per token as BitLinear does and the integer dot products are
    exact, so the logits ``acc / (s_x * weight_scale)`` are bit-identical on every backend
    and thread count. It reads a quarter of the bytes of an fp32 head, half of bf16.
    ``kind == "int4"``: group-wise int4 with integer group scales
    (:class:`r3mes.kernels.Int4Weight`), int8 activations, exact integer sums as int8:
    half the bytes of the int8 head, at a cost in quality measured in MODEL_CARD.md.
    ``kind == "float"``: a float32 weight and ``F.linear``.
    """

    KINDS = ("float", "int8", "int4")

    def __init__(self, kind: str, vocab_size: int, hidden_size: int,
                 weight: torch.Tensor | None = None,
                 int8: kernels.Int8Weight | None = None,
                 int4: kernels.Int4Weight | None = None) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"head kind must be one of {self.KINDS}, got {kind!r}")
        given = {"float": weight is not None, "int8": int8 is not None, "int4": int4 is not None}
        if not given[kind] or sum(given.values()) != 1:
            raise ValueError(f"a {kind} head needs exactly its "
                             f"{'weight' if kind == 'float' else kind} argument")
        self.kind = kind
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.weight = weight
        self.int8 = int8
        self.int4 = int4

    @classmethod
    def from_float(cls, weight: torch.Tensor, kind: str = "int8", chunk_rows: int = 16384,
                   group: int = 64, importance: torch.Tensor | None = None) -> LMHead:
        """Build from a float weight [V, H] (any float dtype, e.g. a memory-mapped bf16),
        converting ``chunk_rows`` rows at a time so a float32 copy never exists whole.
        ``group``: values per scale of an int4 head (64 or 128); ``importance`` [H]: how
        much each hidden feature's rounding error counts when an int4 head picks its
        scales (see :func:`r3mes.kernels.quantize_int4_weight`)."""
        v, h = weight.shape
        if kind not in cls.KINDS:
            raise ValueError(f"head kind must be one of {cls.KINDS}, got {kind!r}")
        if kind == "float":
            return cls("float", v, h, weight=weight.detach().float().contiguous())
        chunks = [weight[r0:r0 + chunk_rows].detach().float() for r0 in range(0, v, chunk_rows)]
        if kind == "int4":
            parts4 = [kernels.quantize_int4_weight(c, group, importance) for c in chunks]
            int4 = kernels.Int4Weight(
                *(torch.cat([getattr(p, f) for p in parts4])
                  for f in ("packed", "group_scales", "scale", "offsets")), v, h, group)
            return cls("int4", v, h, int4=int4)
        parts = [kernels.quantize_int8_weight(c) for c in chunks]
        int8 = kernels.Int8Weight(
            torch.cat([p.data for p in parts]), torch.cat([p.scale for p in parts]),
            torch.cat([p.row_sums for p in parts]), v, h)
        return cls("int8", v, h, int8=int8)

    def dequantized_weight(self) -> torch.Tensor:
        if self.kind == "float":
            return self.weight
        return (self.int8 or self.int4).dequantize()

    def nbytes(self) -> int:
        if self.kind == "float":
            return self.weight.numel() * 4
        if self.kind == "int4":
            return self.int4.nbytes()
        return self.int8.data.numel() + self.int8.scale.numel() * 4 + self.int8.row_sums.numel() * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.hidden_size).float().contiguous()
        if self.kind == "float":
            return F.linear(x2, self.weight).reshape(*lead, self.vocab_size)
        if x2.requires_grad and torch.is_grad_enabled():
            # Training an adapter: the frozen head passes gradients to x through its
            # dequantised weight (the kernel path is integer and not differentiable).
            return F.linear(x2, self.dequantized_weight()).reshape(*lead, self.vocab_size)
        if self.kind == "int4":
            return kernels.int4_linear(x2, self.int4).reshape(*lead, self.vocab_size)
        return kernels.int8_linear(x2, self.int8).reshape(*lead, self.vocab_size)


# --------------------------------------------------------------------------- KV cache
class KVCache:
    """Preallocated keys/values [layers, B, kv_heads, max_len, head_dim] for left-padded rows.

    ``pad[b]`` is the number of left-padding positions of row b (masked everywhere);
    ``length`` is the number of positions written so far (the same for every row).
    Keys and values live on ``device`` (the model's); ``pad`` always stays on the CPU.
    """

    def __init__(self, config: BitNetConfig, batch_size: int, max_len: int,
                 pad: Sequence[int] | torch.Tensor | None = None,
                 device: torch.device | str = "cpu") -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len,
                 config.head_dim)
        self.k = torch.zeros(shape, dtype=torch.float32, device=device)
        self.v = torch.zeros(shape, dtype=torch.float32, device=device)
        self.max_len = max_len
        self.batch_size = batch_size
        self.length = 0
        self.pad = (torch.zeros(batch_size, dtype=torch.long) if pad is None
                    else torch.as_tensor(pad, dtype=torch.long).cpu())
        if self.pad.shape != (batch_size,):
            raise ValueError(f"pad: expected {batch_size} entries, got {tuple(self.pad.shape)}")

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the rows ``index`` (e.g. drop finished sequences)."""
        self.k = self.k[:, index.to(self.k.device)].contiguous()
        self.v = self.v[:, index.to(self.v.device)].contiguous()
        self.pad = self.pad[index.cpu()]
        self.batch_size = int(index.numel())


# --------------------------------------------------------------------------- the model
class BitNetAttention(nn.Module):
    def __init__(self, config: BitNetConfig, linears: dict[str, nn.Module]) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.q_proj = linears["q_proj"]
        self.k_proj = linears["k_proj"]
        self.v_proj = linears["v_proj"]
        self.o_proj = linears["o_proj"]
        self.attn_sub_norm = (RMSNorm(config.num_attention_heads * config.head_dim,
                                      config.rms_norm_eps) if config.sub_norms else None)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries and keys rotated for their positions, and values, each
        [B, heads, T, head_dim], of the normed hidden states x [B, T, hidden]."""
        bsz, seq = x.shape[:2]
        q = self.q_proj(x).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq, self.num_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, self.num_kv, self.head_dim).transpose(1, 2)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


class BitNetMLP(nn.Module):
    def __init__(self, config: BitNetConfig, linears: dict[str, nn.Module]) -> None:
        super().__init__()
        self.gate_proj = linears["gate_proj"]
        self.up_proj = linears["up_proj"]
        self.down_proj = linears["down_proj"]
        self.act_fn = _ACTIVATIONS[config.hidden_act]
        self.ffn_sub_norm = (RMSNorm(config.intermediate_size, config.rms_norm_eps)
                             if config.sub_norms else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        if self.ffn_sub_norm is not None:
            h = self.ffn_sub_norm(h)
        return self.down_proj(h)


class BitNetDecoderLayer(nn.Module):
    def __init__(self, config: BitNetConfig, linears: dict[str, nn.Module]) -> None:
        super().__init__()
        self.self_attn = BitNetAttention(config, linears)
        self.mlp = BitNetMLP(config, linears)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class BitNetModel(nn.Module):
    def __init__(self, config: BitNetConfig, embed_weight: torch.Tensor,
                 layer_linears: list[dict[str, nn.Module]]) -> None:
        super().__init__()
        self.embed_tokens = nn.Module()
        # Kept in the checkpoint's dtype (often a memory map): a lookup touches only its rows.
        self.embed_tokens.weight = embed_weight
        self.layers = nn.ModuleList(BitNetDecoderLayer(config, lin) for lin in layer_linears)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class BitNetForCausalLM(nn.Module):
    """The inference model. Build it with :func:`r3mes.core.checkpoint.load_model`.

    Args:
        config: the architecture.
        embed_weight: token embeddings [V, H] (any float dtype; read row by row).
        layer_linears: per layer, a dict ``{"q_proj": BitLinear, ...}`` (7 projections).
        lm_head: the output projection.
    """

    def __init__(self, config: BitNetConfig, embed_weight: torch.Tensor,
                 layer_linears: list[dict[str, BitLinear]], lm_head: LMHead) -> None:
        super().__init__()
        if len(layer_linears) != config.num_hidden_layers:
            raise ValueError("layer_linears: one dict per layer expected")
        wrapped = [{k: _wrap_linear(v) for k, v in lin.items()} for lin in layer_linears]
        self.config = config
        self.model = BitNetModel(config, embed_weight, wrapped)
        self.lm_head = lm_head
        inv_freq = 1.0 / (config.rope_theta ** (
            torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._rope_len = 0
        self._cos = torch.empty(0)
        self._sin = torch.empty(0)
        # Native decode layers (csrc/model/), built at the first decode step; False when
        # this model cannot use them (then decode runs the layer ops below in torch).
        self._native_layers: list[Any] | bool | None = None
        self._native_modules: list[list[BitLinearDoRA]] = []
        self._native_mixes: list[list[object]] = []
        # What the native layers' mixes were built from: batch size, every layer's
        # mix_serial and the versions of the parameters the mixes read.
        self._native_mix_state: tuple[int, list[int], list[int]] | None = None
        self._native_watched: list[torch.Tensor] = []
        self.eval()

    # ---------------------------------------------------------------- helpers
    def linear_modules(self) -> dict[str, nn.Module]:
        """``{"model.layers.0.self_attn.q_proj": module, ...}`` for every projection."""
        out = {}
        for i, layer in enumerate(self.model.layers):
            for name in LINEAR_NAMES:
                part, proj = name.split(".")
                out[f"model.layers.{i}.{name}"] = getattr(getattr(layer, part), proj)
        return out

    def base_linears(self) -> dict[str, BitLinear]:
        return {k: _base_of(m) for k, m in self.linear_modules().items()}

    def new_cache(self, batch_size: int, max_len: int,
                  pad: Sequence[int] | torch.Tensor | None = None) -> KVCache:
        # On the model's device (inv_freq moves with it: r3mes.core.backends.cuda_model).
        return KVCache(self.config, batch_size, max_len, pad, device=self.inv_freq.device)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        needed = int(positions.max()) + 1 if positions.numel() else 1
        if needed > self._rope_len:
            n = max(needed, 2 * self._rope_len, 256)
            # Exactly HF's arithmetic: float positions times float32 inv_freq, cat, cos/sin.
            # Computed on the CPU whatever the model's device, so every device gets the same
            # tables bit for bit.
            freqs = (torch.arange(n, dtype=torch.int64).float()[:, None]
                     * self.inv_freq.cpu()[None])
            emb = torch.cat((freqs, freqs), dim=-1)
            device = self.inv_freq.device
            self._cos, self._sin = emb.cos().to(device), emb.sin().to(device)
            self._rope_len = n
        positions = positions.to(self._cos.device)
        return self._cos[positions], self._sin[positions]

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits float32 [B, T, V] (or [B, 1, V] with ``last_only``) for ``input_ids`` [B, T].

        With a cache (generation) this runs without autograd; without one and with grad
        enabled it is differentiable, which is how adapters train through the model.
        """
        if cache is not None:
            with torch.no_grad():
                return self._forward(input_ids, cache, last_only)
        return self._forward(input_ids, cache, last_only)

    def _forward(self, input_ids: torch.Tensor, cache: KVCache | None,
                 last_only: bool) -> torch.Tensor:
        # With a cache the tokens are appended after ``cache.length`` positions; left-padding
        # positions (``cache.pad``) are masked. Without one, a fresh cache is used.
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [batch, seq], got {tuple(input_ids.shape)}")
        bsz, seq = input_ids.shape
        cfg = self.config
        # Training an adapter through the model (grad enabled, no cache): keys and values
        # are used directly, since writing them into a shared cache tensor in place would
        # invalidate what autograd saved for earlier layers. Nothing in the frozen model
        # requires grad, so inference outside no_grad records no graph either.
        direct_kv = cache is None and torch.is_grad_enabled()
        if cache is None:
            cache = self.new_cache(bsz, 0 if direct_kv else seq)
            cache.max_len = max(cache.max_len, seq)
        if cache.batch_size != bsz:
            raise ValueError(f"cache holds {cache.batch_size} rows, input has {bsz}")
        start = cache.length
        end = start + seq
        if end > cache.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the cache ({cache.max_len})")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size:
            raise ValueError(f"input_ids: token ids must be in [0, {cfg.vocab_size})")

        # Decode on the native backend: attention runs as one kernel over the cache, and
        # the whole layer runs natively where the model allows it.
        # (CPU only: a model on a GPU runs the torch attention below on its device.)
        on_cpu = cache.k.device.type == "cpu"
        fused_decode = seq == 1 and not direct_kv and kernels.use_native() and on_cpu
        if fused_decode and self._native_decode_layers():
            logits = self._decode_native(input_ids, cache)
            if logits is not None:
                return logits
        positions = (torch.arange(start, end)[None, :] - cache.pad[:, None]).clamp(min=0)
        cos, sin = self._rope(positions)  # [B, T, hd]
        cos, sin = cos[:, None], sin[:, None]
        mask = None if fused_decode else self._attention_mask(cache.pad, start, end)
        if not on_cpu:
            mask = mask.to(cache.k.device)

        h = self.model.embed_tokens.weight[input_ids].float()
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        rep = nh // nkv
        for li, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            q, k, v = attn.qkv(layer.input_layernorm(h), cos, sin)
            if direct_kv:
                keys, values = k, v
            else:
                cache.k[li, :, :, start:end] = k
                cache.v[li, :, :, start:end] = v
                keys = cache.k[li, :, :, :end]
                values = cache.v[li, :, :, :end]
            if fused_decode:
                # One native pass per head instead of a dozen framework ops per layer.
                o = kernels.decode_attention(q.reshape(bsz, nh, hd), cache.k[li], cache.v[li],
                                             cache.pad, end, attn.scaling)
                h = self._finish_layer(layer, h, o.view(bsz, 1, nh * hd))
                continue
            # Grouped-query attention without materialising repeated keys/values: the
            # rep query heads that share a kv head (HF's repeat_kv order: head = kv*rep + r)
            # become rows of one matmul against that kv head.
            qg = q.reshape(bsz, nkv, rep * seq, hd)
            scores = torch.matmul(qg, keys.transpose(2, 3)).view(bsz, nkv, rep, seq, end)
            scores = scores * attn.scaling + mask[:, :, None]
            probs = torch.softmax(scores, dim=-1).view(bsz, nkv, rep * seq, end)
            o = torch.matmul(probs, values).view(bsz, nh, seq, hd)
            o = o.transpose(1, 2).reshape(bsz, seq, nh * hd)
            h = self._finish_layer(layer, h, o)
        if not direct_kv:
            cache.length = end
        if last_only:
            h = h[:, -1:]
        return self.lm_head(self.model.norm(h))

    def _native_decode_layers(self) -> list[Any] | None:
        """One ``_native.DecodeLayer`` per layer, or None when a layer needs the torch path
        (a float base, a bias, an unfrozen base: adapters training through the model)."""
        if self._native_layers is None:
            self._native_layers = self._build_native_layers() or False
        return self._native_layers or None

    def _build_native_layers(self) -> list[Any] | None:
        from r3mes.kernels import _native

        cfg = self.config
        built, all_modules = [], []
        for layer in self.model.layers:
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
        self._native_modules = all_modules
        self._native_mixes = [[None] * len(LINEAR_NAMES) for _ in built]
        self._native_mix_state = None  # fresh layers hold no mix yet
        return built

    def _decode_native(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """One decode step with every layer in native code; logits [B, 1, V]. None (nothing
        touched) when a projection has stopped qualifying since the layers were built."""
        bsz = input_ids.shape[0]
        start = cache.length
        # The contiguous cache is a pool of one block a row, max_len positions long.
        table = torch.arange(bsz, dtype=torch.int32)[:, None]
        pos = torch.full((bsz,), start, dtype=torch.long)
        logits = self._native_step(input_ids[:, 0], cache.k, cache.v, table, cache.pad, pos,
                                   (start - cache.pad).clamp(min=0))
        if logits is not None:
            cache.length = start + 1
        return logits

    def _native_step(self, tokens: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     table: torch.Tensor, start: torch.Tensor, pos: torch.Tensor,
                     rope_pos: torch.Tensor) -> torch.Tensor | None:
        """Runs the native layers on one token a row: row b writes cache position pos[b]
        (its blocks: ``table[b]``), attends [start[b], pos[b]] and is rotated for position
        rope_pos[b]. Logits [B, 1, V], or None when the layers can no longer run."""
        bsz = tokens.shape[0]
        state = (bsz, [m.mix_serial for layer in self._native_modules for m in layer],
                 [p._version for p in self._native_watched])
        if state != self._native_mix_state:
            try:
                for li, native in enumerate(self._native_layers):
                    self._sync_native_mix(li, native, bsz)
            except RuntimeError:
                self._native_layers = False
                return None
            self._native_watched = [p for layer in self._native_modules for m in layer
                                    for p in m.mix_parameters()]
            self._native_mix_state = (bsz, state[1],
                                      [p._version for p in self._native_watched])
        cos, sin = self._rope(rope_pos)
        cos_np, sin_np = cos.contiguous().numpy(), sin.contiguous().numpy()
        table_np = table.to(torch.int32).contiguous().numpy()
        start_np = start.to(torch.long).contiguous().numpy()
        pos_np = pos.to(torch.long).contiguous().numpy()
        k_np, v_np = k.numpy(), v.numpy()
        h = self.model.embed_tokens.weight[tokens].float().contiguous()
        h_np = h.numpy()
        for li, native in enumerate(self._native_layers):
            native.step(h_np, k_np, v_np, li, table_np, start_np, pos_np, cos_np, sin_np)
        return self.lm_head(self.model.norm(h.view(bsz, 1, -1)))

    # ---------------------------------------------------------------- paged decode
    def prefill_paged(self, prompt: Sequence[int], pool: KVBlockPool,
                      blocks: list[int]) -> torch.Tensor:
        """Runs one sequence's prompt and stores its keys/values in ``blocks`` of ``pool``;
        returns the logits [V] of its last position (the first generated token's)."""
        ids = torch.as_tensor(list(prompt), dtype=torch.long)[None]
        cache = self.new_cache(1, ids.shape[1])
        logits = self(ids, cache, last_only=True)
        pool.write(blocks, cache.k[:, 0], cache.v[:, 0])
        return logits[0, -1]

    @torch.no_grad()
    def decode_paged(self, tokens: torch.Tensor, pool: KVBlockPool, table: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
        """One new token for each of B sequences of a block pool, each at its own position.

        Args:
            tokens: long [B], row b's input token (its last generated one).
            pool: the block pool holding every row's earlier keys and values.
            table: int32 [B, max_blocks], row b's blocks in position order.
            positions: long [B], the position row b's token takes (its length so far).
        Returns logits float32 [B, V]. A row's logits do not depend on the other rows
        (bit for bit on the native path: one row alone or in any batch).
        """
        bsz = tokens.shape[0]
        if kernels.use_native() and self._native_decode_layers():
            logits = self._native_step(tokens, pool.k, pool.v, table,
                                       torch.zeros(bsz, dtype=torch.long), positions, positions)
            if logits is not None:
                return logits[:, 0]
        return self._decode_paged_torch(tokens, pool, table, positions)

    def _decode_paged_torch(self, tokens: torch.Tensor, pool: KVBlockPool, table: torch.Tensor,
                            positions: torch.Tensor) -> torch.Tensor:
        """The reference of :meth:`decode_paged`: the model's layer ops in torch, each row's
        cache gathered from its blocks."""
        cfg = self.config
        bsz = tokens.shape[0]
        nh, hd = cfg.num_attention_heads, cfg.head_dim
        cos, sin = self._rope(positions[:, None])  # [B, 1, hd]
        cos, sin = cos[:, None], sin[:, None]
        bs = pool.block_size
        blocks = [[int(b) for b in row] for row in table]
        h = self.model.embed_tokens.weight[tokens[:, None]].float()
        for li, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            q, k, v = attn.qkv(layer.input_layernorm(h), cos, sin)
            outs = []
            for b in range(bsz):
                p = int(positions[b])
                pool.k[li, blocks[b][p // bs], :, p % bs] = k[b, :, 0]
                pool.v[li, blocks[b][p // bs], :, p % bs] = v[b, :, 0]
                keys, values = pool.gather(li, blocks[b], p + 1)
                outs.append(kernels.decode_attention(
                    q[b:b + 1, :, 0], keys[None], values[None],
                    torch.zeros(1, dtype=torch.long), p + 1, attn.scaling))
            o = torch.cat(outs).view(bsz, 1, nh * hd)
            h = self._finish_layer(layer, h, o)
        return self.lm_head(self.model.norm(h))[:, 0]

    def _sync_native_mix(self, li: int, native: Any, bsz: int) -> None:
        """Hands the layer's current DoRA mixes to its native twin when they changed."""
        applied = self._native_mixes[li]
        for j, module in enumerate(self._native_modules[li]):
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

    @staticmethod
    def _attention_mask(pad: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Additive mask [B, 1, T, S]: causal, and left padding masked."""
        key_pos = torch.arange(end)
        allowed = (key_pos[None, None, :] >= pad[:, None, None]) & (
            key_pos[None, None, :] <= torch.arange(start, end)[None, :, None])
        # finfo.min, not -inf: a fully masked (padding) query row stays finite.
        mask = torch.zeros(allowed.shape, dtype=torch.float32)
        mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
        return mask[:, None]

    @staticmethod
    def _finish_layer(layer: nn.Module, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The rest of a decoder layer after attention: sub-norm, o_proj, residual, MLP."""
        attn = layer.self_attn
        if attn.attn_sub_norm is not None:
            o = attn.attn_sub_norm(o)
        h = h + attn.o_proj(o)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def num_parameters_bytes(self) -> dict[str, int]:
        """Bytes held by each part (ternary packed, head, embedding)."""
        tern = sum(b.ternary.packed.numel() for b in self.base_linears().values())
        head = self.lm_head
        head_bytes = head.nbytes()
        emb = self.model.embed_tokens.weight
        return {"ternary": tern, "lm_head": head_bytes,
                "embed_tokens": emb.numel() * emb.element_size()}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
