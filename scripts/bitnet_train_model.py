"""A trainable BitNet b1.58 causal LM with HF ``BitNetForCausalLM``'s module names.

``r3mes.core.model.BitNetForCausalLM`` is the inference model (frozen, packed, no autograd);
this is its training twin: every projection is a :class:`r3mes.core.bitlinear.BitLinear` in
its trainable (straight-through estimator) form, norms and embeddings are parameters, and
the forward is the same block::

    h = h + o_proj(attn_sub_norm(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))))
    h = h + down_proj(ffn_sub_norm(relu²(gate_proj(m)) * up_proj(m)))

``state_dict()`` keys are HF's (``model.layers.0.self_attn.q_proj.weight`` ...), and
:func:`hf_config` gives the matching ``config.json``, so the saved directory is a float
HF BitNet checkpoint (weights quantised on the fly, ``quantization_mode: online``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from r3mes.core.bitlinear import BitLinear
from r3mes.kernels import reference


@dataclass
class TrainConfig:
    """Architecture of the demo model (HF ``BitNetConfig`` names)."""

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def hf_config(cfg: TrainConfig) -> dict:
    """``config.json`` for HF transformers' BitNet (float weights, quantised online)."""
    return {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "relu2",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "use_cache": True,
        "torch_dtype": "float32",
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "online"},
    }


class _QuantActSTE(torch.autograd.Function):
    """Per-token absmax int8 fake-quantisation, gradient passed straight through.

    Numerically what ``BitLinear``'s ``_ste_quantize_activations`` computes (same ops, same
    order), done in place in one autograd node: on a shared 2-core CPU the elementwise
    passes of ``x + (q - x).detach()`` cost more than the matmuls.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=reference.ACT_EPS)
        scale = scale.reciprocal_().mul_(127.0)
        return (x * scale).round_().clamp_(-128, 127).div_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class _QuantWeightSTE(torch.autograd.Function):
    """Per-tensor absmean ternary fake-quantisation, gradient passed straight through."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        scale = reference.weight_scale(w)
        return (w * scale).round_().clamp_(-1, 1).div_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class QATBitLinear(BitLinear):
    """:class:`BitLinear` (trainable form) with the STE quantisers fused into one node each.

    Same parameters, same state-dict keys and the same forward values as ``BitLinear``;
    only the autograd graph is smaller (the tests check the outputs agree).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ternary is not None:
            return super().forward(x)
        return F.linear(_QuantActSTE.apply(x), _QuantWeightSTE.apply(self.weight), self.bias)


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = QATBitLinear(h, self.nh * hd)
        self.k_proj = QATBitLinear(h, self.nkv * hd)
        self.v_proj = QATBitLinear(h, self.nkv * hd)
        self.o_proj = QATBitLinear(self.nh * hd, h)
        self.attn_sub_norm = RMSNorm(self.nh * hd, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = self.nh // self.nkv
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = o.transpose(1, 2).reshape(b, t, self.nh * self.hd)
        return self.o_proj(self.attn_sub_norm(o))


class MLP(nn.Module):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.gate_proj = QATBitLinear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = QATBitLinear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = QATBitLinear(cfg.intermediate_size, cfg.hidden_size)
        self.ffn_sub_norm = RMSNorm(cfg.intermediate_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.square(F.relu(self.gate_proj(x))) * self.up_proj(x)
        return self.down_proj(self.ffn_sub_norm(h))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TrainableBitNet(nn.Module):
    """BitNet b1.58 for causal LM training (QAT); ``forward(ids) -> logits [B, T, V]``."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        hd = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (
            torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, BitLinear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        freqs = torch.arange(t, dtype=torch.int64).float()[:, None] * self.inv_freq[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        return self.lm_head(self.model.norm(h))

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over ``ids`` [B, T+1]."""
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
