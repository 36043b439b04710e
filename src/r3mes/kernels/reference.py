"""The PyTorch reference for every native kernel: plain torch, the numerical contract.

These functions *define* the results the native kernels must reproduce (see DESIGN.md,
"Numerical contract" and "DoRA contract"); they are kept simple rather than fast. The op
modules register them (wrapped for their arguments) as each op's ``"reference"`` entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from r3mes.kernels._checks import check_base_weight, check_mix

if TYPE_CHECKING:  # the op modules import this one
    from r3mes.kernels.dora import DoRAKernelAdapter
    from r3mes.kernels.ternary import TernaryWeight

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


# ---- DoRA (csrc/dora/dora.h): the storages' values, the norms, the unfused mix --------------


def pow2_scale(t: torch.Tensor) -> float:
    """Smallest power of two above max|t| (1 for zeros): t / scale is exact, in (-1, 1)."""
    mx = float(t.abs().max()) if t.numel() else 0.0
    if mx == 0.0:
        return 1.0
    return float(2.0 ** int(torch.frexp(torch.tensor(mx, dtype=torch.float32)).exponent))


def fp16_storage_values(t: torch.Tensor) -> torch.Tensor:
    """The values the fp16 adapter storage represents: t scaled by a power of two into
    (-1, 1), rounded to fp16, scaled back."""
    scale = pow2_scale(t)
    return (t / scale).half().float() * scale


def int8_storage_scale(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The int8 storage's symmetric absmax scale along ``dim``: max|t| / 127, 1 for zeros."""
    amax = t.abs().amax(dim=dim, keepdim=True)
    return torch.where(amax == 0, torch.ones_like(amax), amax / 127.0)


def int8_storage_values(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Symmetric absmax int8 along ``dim``, round half to even, dequantised: the values the
    int8 adapter storage represents."""
    scale = int8_storage_scale(t, dim)
    return torch.clamp(torch.round(t / scale), -127, 127) * scale


def _int16_grid(t: torch.Tensor, qmax: float, floor: float = 0.0) -> torch.Tensor:
    """Each row of t on a grid of max|row| / qmax (round half to even), dequantised; a row
    whose max|row| is below ``floor`` becomes 0."""
    amax = t.abs().amax(dim=1, keepdim=True)
    amax = torch.where(amax < floor, torch.zeros_like(amax), amax)
    inv = torch.where(amax == 0, torch.zeros_like(amax), qmax / amax)
    return torch.clamp(torch.round(t * inv), -qmax, qmax) * (amax / qmax)


def int8_low_rank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  lora_b: torch.Tensor) -> torch.Tensor:
    """B (A x) as the int8 kernels compute it: x on an int16 grid per token, then
    z = sb * (A x) (sb: B's per-column int8 scale) on an int16 grid per token and adapter,
    multiplied by B's int8 values. ``a``, ``b``: the storage's values; ``lora_b``: the
    float B they came from (its scale)."""
    rank = a.shape[0]
    rank2 = rank + rank % 2
    qmax = float(min(32767, (2**31 - 1) // (127 * rank2)))
    sb = int8_storage_scale(lora_b, dim=0)[0]
    z = (_int16_grid(x, 32767.0, floor=1e-30).double() @ a.t().double()) * sb.double()
    return ((_int16_grid(z, qmax, floor=1e-30) / sb.double()) @ b.t().double()).to(x.dtype)


def ternary_float_matmul(w0: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """W0 . a^T for the dequantised weight W0 [out, in] and float a [R, in]: [out, R]."""
    return (w0 @ a.t()).contiguous()


def dora_row_norms(w0: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                   scaling: float) -> torch.Tensor:
    """||W0 + s B A||_row as float64 [out], forming the matrix (the definition the factored
    native computation must meet)."""
    return torch.linalg.vector_norm(
        w0.double() + float(scaling) * (lora_B.double() @ lora_A.double()), dim=1)


def dora_mix_factor(gains: torch.Tensor, mix: torch.Tensor,
                    base_weight: torch.Tensor | None) -> torch.Tensor:
    """A prepared mix's factor on the base output [rows, out]: ``base_weight + sum_e w_e g_e``
    for gains [E, out] and mix [rows, E]; 1 for a row with no adapter."""
    factor = mix @ gains + (0.0 if base_weight is None else base_weight.unsqueeze(1))
    factor[(mix == 0).all(dim=1)] = 1.0
    return factor


def dora_linear_reference(
    x: torch.Tensor,
    weight: TernaryWeight,
    adapters: list[DoRAKernelAdapter],
    mix: torch.Tensor,
    bias: torch.Tensor | None = None,
    base_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unfused plain-torch definition of :func:`r3mes.kernels.dora_linear` (x [M, in] ->
    [M, out]): each adapter's DoRA output ``g_e * (base + s_e B_e A_e x)`` separately, with
    the values its storage represents, then the mix."""
    x2 = x.detach().to(torch.float32).reshape(-1, weight.in_features)
    base = ternary_linear(x2, weight.unpack(), weight.scale)
    mixm = check_mix(mix, x2.shape[0], len(adapters)).expand(x2.shape[0], len(adapters))
    y = torch.zeros_like(base)
    for e, ad in enumerate(adapters):
        a, g_b = ad.effective()
        if ad.storage == "int8":
            update = int8_low_rank(x2, a, g_b, ad.folded_B)
        else:
            update = (x2 @ a.t()) @ g_b.t()
        # g (base + s B A x) with the gain folded into B, as the kernel stores it
        dora_e = ad.g * base + ad.scaling * update
        y = y + mixm[:, e : e + 1] * dora_e
    bw = check_base_weight(base_weight, x2.shape[0])
    if bw is not None:
        y = y + bw.reshape(-1, 1) * base
    no_expert = (mixm != 0).sum(dim=1, keepdim=True) == 0
    y = torch.where(no_expert, base, y)
    if bias is not None:
        y = y + bias
    return y
