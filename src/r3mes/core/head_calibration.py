"""Which hidden features matter to the LM head, measured on text: the weights of the int4
head's error when it picks its group scales (:func:`r3mes.kernels.quantize_int4_weight`).

A feature the model drives hard on real text multiplies every weight in its column by a
large activation, so its rounding error moves the logits more; weighting each group's
squared error by the mean square activation of its features (as llama.cpp's imatrix and
AWQ do) spends the 4 bits where the logits feel them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from r3mes.core.model import BitNetForCausalLM

__all__ = ["hidden_importance"]


class _HiddenStates(torch.nn.Module):
    """Stands in for the head: the model's forward then returns what the head would see."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@torch.no_grad()
def hidden_importance(model: BitNetForCausalLM, token_ids: Sequence[int],
                      window: int = 256) -> torch.Tensor:
    """Mean square [hidden_size] of the normed final hidden states over ``token_ids``, run
    through the model in windows of ``window`` tokens."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError("calibration: need at least 2 tokens of text")
    head, model.lm_head = model.lm_head, _HiddenStates()
    try:
        total = torch.zeros(model.config.hidden_size, dtype=torch.float64)
        for start in range(0, ids.numel(), window):
            h = model(ids[start:start + window][None]).reshape(-1, model.config.hidden_size)
            total += h.double().pow(2).sum(0)
    finally:
        model.lm_head = head
    return (total / ids.numel()).float()
