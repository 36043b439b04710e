"""Tiny models for the DoRA tests, with HF BitNet module paths."""

from __future__ import annotations

import torch
from torch import nn

from r3mes.core.bitlinear import BitLinear

HIDDEN, FFN = 40, 72  # odd sizes on purpose: not multiples of 16 or 256


class Attn(nn.Module):
    def __init__(self, make) -> None:
        super().__init__()
        self.q_proj = make(HIDDEN, HIDDEN)
        self.v_proj = make(HIDDEN, HIDDEN)


class Mlp(nn.Module):
    def __init__(self, make) -> None:
        super().__init__()
        self.up_proj = make(HIDDEN, FFN)
        self.down_proj = make(FFN, HIDDEN)


class Layer(nn.Module):
    def __init__(self, make) -> None:
        super().__init__()
        self.self_attn = Attn(make)
        self.mlp = Mlp(make)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn.q_proj(x) + self.self_attn.v_proj(x)
        return h + self.mlp.down_proj(torch.relu(self.mlp.up_proj(h)))


class Inner(nn.Module):
    def __init__(self, make, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(make) for _ in range(n_layers))


class TinyStack(nn.Module):
    """``model.layers.N.self_attn.{q,v}_proj`` and ``model.layers.N.mlp.{up,down}_proj``."""

    def __init__(self, make, n_layers: int = 2) -> None:
        super().__init__()
        self.model = Inner(make, n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.model.layers:
            x = layer(x)
        return x


def frozen_bitlinear(i: int, o: int) -> BitLinear:
    return BitLinear(i, o).freeze()


def linear_like(bitnet: TinyStack) -> TinyStack:
    """A float twin: nn.Linear modules holding exactly the dequantised ternary weights."""
    weights = {n: m.dequantized_weight() for n, m in bitnet.named_modules()
               if isinstance(m, BitLinear)}
    twin = TinyStack(lambda i, o: nn.Linear(i, o, bias=False), len(bitnet.model.layers))
    with torch.no_grad():
        for n, m in twin.named_modules():
            if isinstance(m, nn.Linear):
                key = n if n in weights else n + ".base"
                m.weight.copy_(weights[key])
    return twin


# The seven projections of a BitNet decoder layer, PEFT's target_modules for "all of them".
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class QLinear(nn.Linear):
    """BitNet's projection as an nn.Linear (so PEFT wraps it): y = W0 . actquant(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
        return nn.functional.linear((x * s).round().clamp(-128, 127) / s, self.weight)
