"""The BitNet b1.58 transformer, module for module as HF transformers' ``BitNetForCausalLM``.

Read top to bottom: the config, the norm, the LM head, the KV cache, then the blocks from
the inside out (attention, MLP, decoder layer, the stack, the causal LM). Each block is a
``forward``; one decoder layer is::

    h = h + o_proj(attn_sub_norm(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))))
        where n = input_layernorm(h)
    h = h + down_proj(ffn_sub_norm(act(gate_proj(m)) * up_proj(m)))
        where m = post_attention_layernorm(h)

``act`` is relu² for BitNet (``silu`` for the Llama-shaped Falcon3-1.58bit checkpoints,
which also have no sub-norms). Every projection is a ternary :class:`BitLinear` wrapped in
``BitLinearDoRA`` so that experts apply everywhere; module paths are HF's
(``model.layers.3.self_attn.q_proj`` ...) so PEFT adapter keys map one to one.
:meth:`BitNetForCausalLM.for_training` builds the same model in float, trainable form
(quantisation-aware training with straight-through estimators, HF state-dict keys).

All activations are float32. The LM head is not ternary (BitNet keeps it in bf16); it is
held in float32 (``LMHead.kind == "float"``), as int8 with one scale per vocabulary row
(``"int8"``) or as group-wise int4 (``"int4"``), see :class:`LMHead`.

Attention reads and writes keys and values through a *KV store*: :class:`KVCache` (the
contiguous, left-padded cache generation uses), the paged view of a
:class:`~r3mes.core.kv_blocks.KVBlockPool` (:meth:`BitNetForCausalLM.decode_paged`'s
reference), or the CUDA decoder's static cache. Everything here is the architecture and
its torch reference; faster one-token decoders (the native CPU one in
:mod:`r3mes.core.backends.native_decode`) plug in through :attr:`BitNetForCausalLM.decode_hook`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

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
    "DecodeHook",
    "KVCache",
    "KVStore",
    "LMHead",
    "LINEAR_NAMES",
    "bitlinear_from_packed",
    "grouped_query_attention",
    "linear_shapes",
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

    def to_hf_config(self) -> dict[str, Any]:
        """``config.json`` of HF transformers' BitNet with float weights quantised online
        (``quantization_mode: online``): what a model trained from
        :meth:`BitNetForCausalLM.for_training` is saved with. BitNet-shaped configs only
        (relu², sub-norms): ValueError otherwise."""
        if self.hidden_act != "relu2" or not self.sub_norms:
            raise ValueError("to_hf_config: only the BitNet shape (relu2, sub-norms) has an "
                             "HF BitNet config")
        eos = self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
        return {
            "architectures": ["BitNetForCausalLM"],
            "model_type": "bitnet",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
            "torch_dtype": "float32",
            "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                    "quantization_mode": "online"},
        }


def linear_shapes(config: BitNetConfig) -> dict[str, tuple[int, int]]:
    """``{"self_attn.q_proj": (out_features, in_features), ...}`` of one decoder layer."""
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    return {
        "self_attn.q_proj": (q_out, config.hidden_size),
        "self_attn.k_proj": (kv_out, config.hidden_size),
        "self_attn.v_proj": (kv_out, config.hidden_size),
        "self_attn.o_proj": (config.hidden_size, q_out),
        "mlp.gate_proj": (config.intermediate_size, config.hidden_size),
        "mlp.up_proj": (config.intermediate_size, config.hidden_size),
        "mlp.down_proj": (config.hidden_size, config.intermediate_size),
    }


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
        # A generator: each float32 chunk is freed once quantised.
        chunks = (weight[r0:r0 + chunk_rows].detach().float() for r0 in range(0, v, chunk_rows))
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
class KVStore(Protocol):
    """Where attention keeps keys and values: it stores a layer's new ones and attends over
    every position a row has so far."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Stores k, v [B, kv_heads, T, head_dim] of ``layer`` and returns the attention
        output [B, T, heads * head_dim] of q [B, heads, T, head_dim]."""
        ...


def grouped_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                            mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention of q [B, heads, T, hd] over keys/values [B, kv_heads, S, hd] with an
    additive mask [B, 1, T, S]; returns [B, T, heads * hd].

    Grouped-query attention without materialising repeated keys/values: the rep query
    heads that share a kv head (HF's repeat_kv order: head = kv*rep + r) become rows of one
    matmul against that kv head.
    """
    bsz, nh, seq, hd = q.shape
    nkv, end = keys.shape[1], keys.shape[2]
    rep = nh // nkv
    qg = q.reshape(bsz, nkv, rep * seq, hd)
    scores = torch.matmul(qg, keys.transpose(2, 3)).view(bsz, nkv, rep, seq, end)
    scores = scores * scaling + mask[:, :, None]
    probs = torch.softmax(scores, dim=-1).view(bsz, nkv, rep * seq, end)
    o = torch.matmul(probs, values).view(bsz, nh, seq, hd)
    return o.transpose(1, 2).reshape(bsz, seq, nh * hd)


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

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Writes k, v at positions ``[length, length + T)`` (``length`` moves on once every
        layer ran: :meth:`BitNetForCausalLM.forward`) and attends over positions
        ``[0, length + T)``. ``mask`` None: one new token a row, attended by the native
        decode-attention kernel over the layer's cache (padding masked by ``pad``)."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        if mask is None:
            bsz, nh, _, hd = q.shape
            o = kernels.decode_attention(q.reshape(bsz, nh, hd), self.k[layer], self.v[layer],
                                         self.pad, end, scaling)
            return o.view(bsz, 1, nh * hd)
        return grouped_query_attention(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end],
                                       mask, scaling)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the rows ``index`` (e.g. drop finished sequences)."""
        self.k = self.k[:, index.to(self.k.device)].contiguous()
        self.v = self.v[:, index.to(self.v.device)].contiguous()
        self.pad = self.pad[index.cpu()]
        self.batch_size = int(index.numel())


class _PagedRows:
    """A batch of one-token rows of a :class:`~r3mes.core.kv_blocks.KVBlockPool`, as a KV
    store: row b writes its new key/value at ``positions[b]`` in its blocks ``table[b]`` and
    attends over its own positions ``[0, positions[b]]`` (the torch reference of
    :meth:`BitNetForCausalLM.decode_paged`)."""

    def __init__(self, pool: KVBlockPool, table: torch.Tensor, positions: torch.Tensor) -> None:
        self.pool = pool
        self.blocks = [[int(b) for b in row] for row in table]
        self.positions = [int(p) for p in positions]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        pool, bs = self.pool, self.pool.block_size
        outs = []
        for b, p in enumerate(self.positions):
            pool.k[layer, self.blocks[b][p // bs], :, p % bs] = k[b, :, 0]
            pool.v[layer, self.blocks[b][p // bs], :, p % bs] = v[b, :, 0]
            keys, values = pool.gather(layer, self.blocks[b], p + 1)
            outs.append(kernels.decode_attention(
                q[b:b + 1, :, 0], keys[None], values[None],
                torch.zeros(1, dtype=torch.long), p + 1, scaling))
        bsz, nh, _, hd = q.shape
        return torch.cat(outs).view(bsz, 1, nh * hd)


class _PackedPrompts:
    """Several prompts run as one batch of one-token rows (every token a row, so each can
    carry its own sequence's expert mix), as a KV store: each sequence's keys and values go
    to its own cache, and its queries attend over its own positions with the causal mask,
    shaped exactly as when the prompt runs alone (the prefill of
    :meth:`BitNetForCausalLM.prefill_paged_many`)."""

    def __init__(self, model: BitNetForCausalLM, lengths: Sequence[int]) -> None:
        self.bounds = []
        start = 0
        for n in lengths:
            self.bounds.append((start, start + n))
            start += n
        self.caches = [model.new_cache(1, n) for n in lengths]
        zero = torch.zeros(1, dtype=torch.long)
        self.masks = [model._attention_mask(zero, 0, n) for n in lengths]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        outs = []
        for (s, e), cache, seq_mask in zip(self.bounds, self.caches, self.masks, strict=True):
            outs.append(cache.attend(layer, q[s:e, :, 0].transpose(0, 1)[None],
                                     k[s:e, :, 0].transpose(0, 1)[None],
                                     v[s:e, :, 0].transpose(0, 1)[None], seq_mask, scaling))
        return torch.cat(outs, dim=1).transpose(0, 1).contiguous()


# --------------------------------------------------------------------------- the blocks
class BitNetAttention(nn.Module):
    """Rotary grouped-query attention: q/k/v projections, RoPE, softmax attention through a
    KV store, ``attn_sub_norm``, o_proj."""

    def __init__(self, config: BitNetConfig, linears: dict[str, nn.Module],
                 layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: KVStore | None, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, hidden] (normed) -> [B, T, hidden]. ``cos``/``sin`` [B, 1, T, head_dim]:
        the rotary tables of the tokens' positions. ``kv``: the store keys and values go
        through; None attends over these T tokens alone (training, no cache)."""
        q, k, v = self.qkv(x, cos, sin)
        if kv is None:
            o = grouped_query_attention(q, k, v, mask, self.scaling)
        else:
            o = kv.attend(self.layer_idx, q, k, v, mask, self.scaling)
        if self.attn_sub_norm is not None:
            o = self.attn_sub_norm(o)
        return self.o_proj(o)


class BitNetMLP(nn.Module):
    """``down_proj(ffn_sub_norm(act(gate_proj(x)) * up_proj(x)))``."""

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
    """Pre-norm attention and MLP, each added to the residual stream."""

    def __init__(self, config: BitNetConfig, linears: dict[str, nn.Module],
                 layer_idx: int) -> None:
        super().__init__()
        self.self_attn = BitNetAttention(config, linears, layer_idx)
        self.mlp = BitNetMLP(config, linears)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: KVStore | None, mask: torch.Tensor | None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class BitNetModel(nn.Module):
    """Token embedding, the decoder layers and the final norm."""

    def __init__(self, config: BitNetConfig, embed_weight: torch.Tensor,
                 layer_linears: list[dict[str, nn.Module]]) -> None:
        super().__init__()
        self.embed_tokens = nn.Module()
        # Kept in the checkpoint's dtype (often a memory map): a lookup touches only its rows.
        self.embed_tokens.weight = embed_weight
        self.layers = nn.ModuleList(BitNetDecoderLayer(config, lin, i)
                                    for i, lin in enumerate(layer_linears))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: KVStore | None, mask: torch.Tensor | None,
                last_only: bool = False) -> torch.Tensor:
        """Final hidden states [B, T (1 with ``last_only``), hidden] of ``input_ids`` [B, T]."""
        # F.embedding, not indexing: the same rows, and its backward (training) sums the
        # gradients of repeated tokens in a fixed order where indexing's adds race.
        h = F.embedding(input_ids, self.embed_tokens.weight).float()
        for layer in self.layers:
            h = layer(h, cos, sin, kv, mask)
        if last_only:
            h = h[:, -1:]
        return self.norm(h)


class DecodeHook(Protocol):
    """A faster runner of one-token decode steps, plugged in as
    :attr:`BitNetForCausalLM.decode_hook` (the native CPU decoder:
    :class:`r3mes.core.backends.native_decode.NativeDecoder`). Each method returns None,
    having touched nothing, when it cannot run the step; the model then runs its layers."""

    def decode(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """Logits [B, 1, V] of ``input_ids`` [B, 1] appended to ``cache`` (advancing it)."""
        ...

    def decode_paged(self, tokens: torch.Tensor, pool: KVBlockPool, table: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor | None:
        """Logits [B, V], as :meth:`BitNetForCausalLM.decode_paged` computes them."""
        ...


class BitNetForCausalLM(nn.Module):
    """The BitNet causal LM. Build it with :func:`r3mes.core.checkpoint.load_model` (frozen,
    packed, for inference) or :meth:`for_training` (float, trainable).

    Args:
        config: the architecture.
        embed_weight: token embeddings [V, H] (any float dtype; read row by row).
        layer_linears: per layer, a dict ``{"q_proj": BitLinear, ...}`` (7 projections).
        lm_head: the output projection.
        dora: wrap every projection in ``BitLinearDoRA`` (so experts attach by module path);
            False keeps the bare BitLinears (base training: HF state-dict keys).
    """

    def __init__(self, config: BitNetConfig, embed_weight: torch.Tensor,
                 layer_linears: list[dict[str, BitLinear]], lm_head: LMHead, *,
                 dora: bool = True) -> None:
        super().__init__()
        if len(layer_linears) != config.num_hidden_layers:
            raise ValueError("layer_linears: one dict per layer expected")
        if dora:
            layer_linears = [{k: BitLinearDoRA(v) for k, v in lin.items()}
                             for lin in layer_linears]
        self.config = config
        self.model = BitNetModel(config, embed_weight, layer_linears)
        self.lm_head = lm_head
        inv_freq = 1.0 / (config.rope_theta ** (
            torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._rope_len = 0
        self._cos = torch.empty(0)
        self._sin = torch.empty(0)
        #: Runs one-token decode steps when set (see :class:`DecodeHook`); None: the layers
        #: below run them. The native CPU backend sets it.
        self.decode_hook: DecodeHook | None = None
        self.eval()

    @classmethod
    def for_training(cls, config: BitNetConfig, *, init_std: float = 0.02) -> BitNetForCausalLM:
        """A model to train from scratch (quantisation-aware, as BitNet b1.58 trains): every
        projection a float :class:`BitLinear` (ternary weights and int8 activations in the
        forward, straight-through gradients), embeddings, norms and a float LM head as
        trainable parameters; weights drawn from N(0, ``init_std``) with torch's global
        generator. ``state_dict()`` keys are HF's, so with :meth:`BitNetConfig.to_hf_config`
        it saves as an HF float BitNet checkpoint that :func:`~r3mes.core.checkpoint.load_model`
        reads."""
        v, h = config.vocab_size, config.hidden_size
        layers = []
        for _ in range(config.num_hidden_layers):
            linears = {}
            for name, (out_features, in_features) in linear_shapes(config).items():
                layer = BitLinear(in_features, out_features)
                nn.init.normal_(layer.weight, mean=0.0, std=init_std)
                linears[name.split(".")[1]] = layer
            layers.append(linears)
        embed = nn.Parameter(torch.empty(v, h).normal_(0.0, init_std))
        head = LMHead("float", v, h, weight=nn.Parameter(torch.empty(v, h).normal_(0.0, init_std)))
        model = cls(config, embed, layers, head, dora=False)
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.requires_grad_(True)
        return model.train()

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

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables (cos, sin) [*positions.shape, head_dim] of integer positions."""
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

    def _check_token_ids(self, ids: torch.Tensor) -> None:
        vocab = self.config.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"input_ids: token ids must be in [0, {vocab})")

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

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits float32 [B, T, V] (or [B, 1, V] with ``last_only``) for ``input_ids`` [B, T].

        With a cache (generation) the tokens are appended after ``cache.length`` positions
        (left-padding positions, ``cache.pad``, are masked) without autograd. Without one
        and with grad enabled it is differentiable: how models and adapters train.
        """
        if cache is not None:
            with torch.no_grad():
                return self._forward(input_ids, cache, last_only)
        return self._forward(input_ids, cache, last_only)

    def _forward(self, input_ids: torch.Tensor, cache: KVCache | None,
                 last_only: bool) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [batch, seq], got {tuple(input_ids.shape)}")
        bsz, seq = input_ids.shape
        # Training (grad enabled, no cache): keys and values are attended directly, since
        # writing them into a shared cache tensor in place would invalidate what autograd
        # saved for earlier layers. Nothing in a frozen model requires grad, so inference
        # outside no_grad records no graph either.
        if cache is None and not torch.is_grad_enabled():
            cache = self.new_cache(bsz, seq)
        start = 0 if cache is None else cache.length
        end = start + seq
        if cache is not None:
            if cache.batch_size != bsz:
                raise ValueError(f"cache holds {cache.batch_size} rows, input has {bsz}")
            if end > cache.max_len:
                raise ValueError(f"sequence of {end} tokens exceeds the cache ({cache.max_len})")
        self._check_token_ids(input_ids)
        if seq == 1 and cache is not None and self.decode_hook is not None:
            logits = self.decode_hook.decode(input_ids, cache)
            if logits is not None:
                return logits

        pad = torch.zeros(bsz, dtype=torch.long) if cache is None else cache.pad
        positions = (torch.arange(start, end)[None, :] - pad[:, None]).clamp(min=0)
        cos, sin = self.rope(positions)  # [B, T, hd]
        # One new token a row on the CPU: attention is one native kernel pass per head over
        # the cache instead of a dozen framework ops (the mask is implicit there).
        one_token = (seq == 1 and cache is not None and kernels.use_native()
                     and cache.k.device.type == "cpu")
        mask = None
        if not one_token:
            mask = self._attention_mask(pad, start, end).to(self.inv_freq.device)
        h = self.model(input_ids, cos[:, None], sin[:, None], cache, mask, last_only)
        if cache is not None:
            cache.length = end
        return self.lm_head(h)

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
    def prefill_paged_many(self, prompts: Sequence[Sequence[int]], pool: KVBlockPool,
                           blocks: Sequence[list[int]]) -> torch.Tensor:
        """:meth:`prefill_paged` for several sequences in one pass: the projections run once
        over every prompt's tokens (a token per row: each row takes its own sequence's
        expert mix, set per row by the caller), attention runs per sequence. Each result,
        logits and cache, is the one the prompt gets alone, bit for bit. Every prompt needs
        at least 2 tokens (one token alone runs the decode path). Returns logits [n, V] of
        each prompt's last position."""
        lengths = [len(p) for p in prompts]
        if len(blocks) != len(lengths):
            raise ValueError(f"{len(blocks)} block lists for {len(lengths)} prompts")
        if any(n < 2 for n in lengths):
            raise ValueError("every prompt of a packed prefill needs at least 2 tokens")
        ids = torch.as_tensor([t for p in prompts for t in p], dtype=torch.long)
        self._check_token_ids(ids)
        positions = torch.cat([torch.arange(n) for n in lengths])
        cos, sin = self.rope(positions[:, None])  # [tokens, 1, hd]
        store = _PackedPrompts(self, lengths)
        h = F.embedding(ids[:, None], self.model.embed_tokens.weight).float()
        for layer in self.model.layers:
            h = layer(h, cos[:, None], sin[:, None], store, None)
        last = torch.tensor([e - 1 for _, e in store.bounds])
        logits = self.lm_head(self.model.norm(h[last]))
        for cache, seq_blocks in zip(store.caches, blocks, strict=True):
            pool.write(seq_blocks, cache.k[:, 0], cache.v[:, 0])
        return logits[:, 0]

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
        if self.decode_hook is not None:
            logits = self.decode_hook.decode_paged(tokens, pool, table, positions)
            if logits is not None:
                return logits
        # The reference: the layers in torch, each row's cache gathered from its blocks.
        cos, sin = self.rope(positions[:, None])  # [B, 1, hd]
        h = self.model(tokens[:, None], cos[:, None], sin[:, None],
                       _PagedRows(pool, table, positions), None)
        return self.lm_head(h)[:, 0]

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
