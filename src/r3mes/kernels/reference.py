"""The PyTorch reference for every native kernel: plain torch, the numerical contract.

These functions *define* the results the native kernels must reproduce (see DESIGN.md,
"Numerical contract"); they are kept simple rather than fast.
"""

from __future__ import annotations

import torch

ACT_EPS = 1e-5
WEIGHT_EPS = 1e-5


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8: returns (q int8 [..., K], scale float32 [...])."""
    x = x.float()
    # reciprocal() * 127 is what torch (and HF BitNet's `127 / absmax`) computes.
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_EPS).reciprocal() * 127.0
    q = (x * scale).round().clamp(-128, 127).to(torch.int8)
    return q, scale.squeeze(-1)


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-tensor absmean scale s_w = 1 / max(mean|W|, 1e-5), float32 scalar tensor."""
    return w.float().abs().mean().clamp(min=WEIGHT_EPS).reciprocal()


def quantize_weight(w: torch.Tensor, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """Ternary values T = clamp(round(W * s_w), -1, 1) as int8."""
    s = weight_scale(w) if scale is None else torch.as_tensor(scale, dtype=torch.float32)
    return (w.float() * s).round().clamp(-1, 1).to(torch.int8)


def ternary_matmul_int(q: torch.Tensor, ternary: torch.Tensor) -> torch.Tensor:
    """Exact int32 q [M, K] x T[N, K]^T (computed in int64 to rule out overflow)."""
    return (q.to(torch.int64) @ ternary.to(torch.int64).t()).to(torch.int32)


def ternary_linear(
    x: torch.Tensor,
    ternary: torch.Tensor,
    w_scale: float | torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = (q . T^T) / (s_x * s_w) (+ bias), float32, for x [..., K]."""
    lead = x.shape[:-1]
    q, s_x = quantize_activations(x.reshape(-1, x.shape[-1]))
    acc = ternary_matmul_int(q, ternary).float()
    y = acc / (s_x.unsqueeze(-1) * torch.as_tensor(w_scale, dtype=torch.float32))
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, ternary.shape[0])


def quantize_int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 weights (the 8-bit LM head): returns (int8 [N, K], scale [N])."""
    w = w.float()
    scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_EPS).reciprocal() * 127.0
    return (w * scale).round().clamp(-128, 127).to(torch.int8), scale.squeeze(-1)


def int8_linear(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """y = (q . W8^T) / (s_x * s_w[n]), float32, for x [..., K]."""
    lead = x.shape[:-1]
    q, s_x = quantize_activations(x.reshape(-1, x.shape[-1]))
    acc = (q.to(torch.int64) @ w_int8.to(torch.int64).t()).float()
    y = acc / (s_x.unsqueeze(-1) * w_scale.unsqueeze(0))
    return y.reshape(*lead, w_int8.shape[0])


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The int4 values int8 [N, K] of the 4-bit head's layout (``csrc/head/int4_gemm.h``):
    each 64-byte block holds 128 values, byte j value j (low nibble) and 64 + j (high),
    stored as value + 8."""
    n, row_bytes = packed.shape
    blocks = packed.reshape(n, row_bytes // 64, 64).to(torch.int16)
    values = torch.cat([blocks & 15, blocks >> 4], dim=2)
    return (values.reshape(n, row_bytes * 2)[:, :in_features] - 8).to(torch.int8)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, group_scales: torch.Tensor,
                w_scale: torch.Tensor, in_features: int, group: int) -> torch.Tensor:
    """y = (sum_g sub[n, g] * q_g . W4_g^T) / (s_x * s_w[n]), float32, for x [..., K]: the
    4-bit head's integer sums computed group by group in int64."""
    lead = x.shape[:-1]
    q, s_x = quantize_activations(x.reshape(-1, x.shape[-1]))
    w4 = unpack_int4(packed, packed.shape[1] * 2).to(torch.int64)
    kp = w4.shape[1]
    qp = torch.zeros((q.shape[0], kp), dtype=torch.int64)
    qp[:, :in_features] = q.to(torch.int64)
    groups = kp // group
    per_group = torch.einsum("mgk,ngk->mng", qp.reshape(-1, groups, group),
                             w4.reshape(-1, groups, group))
    acc = (per_group * group_scales.to(torch.int64).unsqueeze(0)).sum(-1).float()
    y = acc / (s_x.unsqueeze(-1) * w_scale.unsqueeze(0))
    return y.reshape(*lead, packed.shape[0])


def unpack_ternary(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Ternary int8 [N, K] from the kernels' ``r3mes-2bit-g256`` layout, in plain torch.

    Each 32-byte block holds 128 weights: byte j carries codes of weights j, 32+j, 64+j,
    96+j at bits 0, 2, 4, 6 (``csrc/ternary/ternary.h``); code c is weight c - 1.
    """
    n, row_bytes = packed.shape
    blocks = packed.reshape(n, row_bytes // 32, 1, 32).to(torch.int16)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int16).reshape(1, 1, 4, 1)
    codes = (blocks >> shifts) & 3
    return (codes.reshape(n, row_bytes * 4)[:, :in_features] - 1).to(torch.int8)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     pad: torch.Tensor, length: int, scaling: float) -> torch.Tensor:
    """Single-token GQA attention: q [B, H, D] over cache rows [pad_b, length) of
    k/v [B, KV, S_max, D]; query head h reads kv head h // (H // KV). Returns [B, H, D]
    (zeros for a row with nothing to attend)."""
    bsz, heads, dim = q.shape
    kv = k_cache.shape[1]
    rep = heads // kv
    keys = k_cache[:, :, :length].repeat_interleave(rep, dim=1)
    values = v_cache[:, :, :length].repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), keys.float()) * scaling
    valid = torch.arange(length)[None, :] >= pad[:, None]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhs,bhsd->bhd", probs, values.float())
