"""A factory for small but real PEFT-format DoRA adapter directories (safetensors + config)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

BASE_MODEL = "microsoft/bitnet-b1.58-2B-4T"
DEFAULT_MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")


def write_adapter(
    path: Path,
    *,
    rank: int = 4,
    ranks: Mapping[str, int] | None = None,
    features: int = 64,
    modules: Sequence[str] = DEFAULT_MODULES,
    target_modules: Sequence[str] | None = None,
    base_model: str = BASE_MODEL,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    config_overrides: dict | None = None,
) -> Path:
    """Write a PEFT-format DoRA adapter: every module is [out=features, in=features], of
    rank ``ranks.get(module, rank)`` (the config's ``rank_pattern`` is left to the caller)."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in modules:
        prefix = f"base_model.model.{module}"
        r = (ranks or {}).get(module, rank)
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, features, generator=gen).to(dtype)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(features, r, generator=gen).to(dtype)
        tensors[f"{prefix}.lora_magnitude_vector"] = torch.rand(features, generator=gen).to(dtype)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "use_dora": True,
        "r": rank,
        "lora_alpha": 2 * rank,
        "use_rslora": False,
        "target_modules": list(target_modules or sorted({m.rsplit(".", 1)[-1] for m in modules})),
        "base_model_name_or_path": base_model,
        "task_type": "CAUSAL_LM",
    }
    config.update(config_overrides or {})
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def tensor_bytes(*, rank: int = 4, features: int = 64, modules: int = 2, itemsize: int = 2) -> int:
    """Bytes of the tensors :func:`write_adapter` writes (what the cache counts)."""
    return modules * (2 * rank * features + features) * itemsize
