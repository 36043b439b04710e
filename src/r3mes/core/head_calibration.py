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

__all__ = ["final_hidden_states", "hidden_importance"]


class _HiddenStates(torch.nn.Module):
    """Stands in for the head: the model's forward then returns what the head would see."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@torch.no_grad()
def final_hidden_states(model: BitNetForCausalLM, input_ids: torch.Tensor,
                        batch: int = 8) -> torch.Tensor:
    """The normed final hidden states [B, T, hidden] the LM head sees for ``input_ids``
    [B, T], ``batch`` rows at a time."""
    head, model.lm_head = model.lm_head, _HiddenStates()
    try:
        return torch.cat([model(input_ids[i:i + batch]) for i in range(0, len(input_ids), batch)])
    finally:
        model.lm_head = head


@torch.no_grad()
def hidden_importance(model: BitNetForCausalLM, token_ids: Sequence[int],
                      window: int = 256) -> torch.Tensor:
    """Mean square [hidden_size] of the normed final hidden states over ``token_ids``, run
    through the model in windows of ``window`` tokens."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError("calibration: need at least 2 tokens of text")
    total = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    for start in range(0, ids.numel(), window):
        h = final_hidden_states(model, ids[start:start + window][None])
        total += h.reshape(-1, model.config.hidden_size).double().pow(2).sum(0)
    return (total / ids.numel()).float()
