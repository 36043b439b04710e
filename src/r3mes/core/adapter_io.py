"""DoRA adapters in HF PEFT's directory format: load into a model, save from one.

The format and its validation live in :mod:`r3mes.core.peft_config` (shared with the
adapter store); this module moves validated tensors into and out of a model's
BitLinearDoRA modules. Every error (:class:`AdapterFormatError`, a ValueError) names the
file and the key. Pickle files (``adapter_model.bin``) are refused: safetensors only.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from r3mes.core.dora import dora_modules
from r3mes.core.peft_config import (
    CONFIG_NAME,
    PARTS,
    WEIGHTS_NAME,
    AdapterFormatError,
    AdapterInfo,
    peft_key,
    validate_adapter,
)
from r3mes.utils.atomic import atomic_write_bytes, atomic_write_json

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AdapterFormatError",
    "AdapterInfo",
    "load_peft_adapter",
    "read_peft_adapter",
    "save_peft_adapter",
]


def read_peft_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and fully validate a PEFT DoRA adapter directory
    (:func:`~r3mes.core.peft_config.validate_adapter` at ``depth="full"``).

    Returns ``(config, tensors)``: the config as read, the tensors under PEFT's keys as
    float32. Raises :class:`AdapterFormatError` naming the file and key.
    """
    info = validate_adapter(path, "full")
    return info.config.raw, info.tensors


def load_peft_adapter(model: torch.nn.Module, path: str | Path, name: str) -> AdapterInfo:
    """Load a PEFT DoRA adapter directory into ``model``'s BitLinearDoRA modules as ``name``.

    Modules are matched by path (the PEFT key without ``base_model.model.`` and the
    suffix). All checks (format, module exists and is a BitLinearDoRA, shapes against the
    base layer, name free) pass before any module changes, so a bad adapter leaves the
    model as it was. Raises :class:`AdapterFormatError`.
    """
    path = Path(path)
    info = validate_adapter(path, "full")
    file = path / WEIGHTS_NAME
    targets = dora_modules(model)
    for module, (out_features, in_features) in info.module_shapes.items():
        layer = targets.get(module)
        if layer is None:
            try:
                found = type(model.get_submodule(module)).__name__
            except AttributeError:
                found = None
            what = "no such module" if found is None else f"it is a {found}, not a BitLinearDoRA"
            raise AdapterFormatError(
                f"{file}: key {peft_key(module, 'lora_A')!r} targets module {module!r}: {what}"
            )
        rank = info.module_ranks[module]
        if in_features != layer.in_features:
            raise AdapterFormatError(
                f"{file}: key {peft_key(module, 'lora_A')!r} has shape {(rank, in_features)}, "
                f"but {module} has in_features={layer.in_features}"
            )
        if out_features != layer.out_features:
            raise AdapterFormatError(
                f"{file}: key {peft_key(module, 'lora_B')!r} has shape {(out_features, rank)}, "
                f"but {module} has out_features={layer.out_features}"
            )
        if name in layer.adapter_names:
            raise AdapterFormatError(
                f"{path}: module {module} already holds an adapter named {name!r}"
            )
    config = info.config
    loaded: list[str] = []
    try:
        for module in info.modules:
            a, b, m = (info.tensors[peft_key(module, part)] for part in PARTS)
            targets[module].load_adapter(name, a, b, m, config.scaling_for(module),
                                         alpha=config.alpha_for(module),
                                         use_rslora=config.use_rslora)
            loaded.append(module)
    except BaseException:
        for module in loaded:  # all or nothing
            targets[module].remove_adapter(name)
        raise
    return replace(info, tensors={}, name=name)


def _target_modules(model: torch.nn.Module, paths: list[str]) -> list[str] | str:
    """PEFT target_modules: leaf names when they select exactly ``paths`` among the model's
    BitLinearDoRA modules, else a regex matching exactly those paths."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    selected = {p for p in dora_modules(model) if p.rsplit(".", 1)[-1] in leaves}
    if selected == set(paths):
        return leaves
    return "^(" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"


def save_peft_adapter(model: torch.nn.Module, name: str, path: str | Path) -> Path:
    """Save adapter ``name`` of every BitLinearDoRA in ``model`` as a PEFT directory.

    Writes ``adapter_model.safetensors`` then ``adapter_config.json``, each atomically
    (temp file + rename). Per-module ranks/alphas that differ from the most common one go
    to ``rank_pattern``/``alpha_pattern``. Returns the directory.
    """
    path = Path(path)
    holders = {p: m for p, m in dora_modules(model).items() if name in m.adapter_names}
    if not holders:
        raise KeyError(f"no BitLinearDoRA module in the model holds an adapter named {name!r}")
    metas = {p: m.adapter_config(name) for p, m in holders.items()}
    rslora = {bool(c["use_rslora"]) for c in metas.values()}
    if len(rslora) != 1:
        raise ValueError(f"adapter {name!r}: modules disagree on use_rslora")
    r = Counter(int(c["rank"]) for c in metas.values()).most_common(1)[0][0]
    alpha = Counter(float(c["alpha"]) for c in metas.values()).most_common(1)[0][0]
    rank_pattern = {p: int(c["rank"]) for p, c in metas.items() if int(c["rank"]) != r}
    alpha_pattern = {p: float(c["alpha"]) for p, c in metas.items() if float(c["alpha"]) != alpha}
    tensors: dict[str, torch.Tensor] = {}
    for p, m in holders.items():
        t = m.adapter_tensors(name)
        for part in PARTS:
            tensors[peft_key(p, part)] = t[part].contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": _target_modules(model, list(holders)),
        "use_dora": True,
        "use_rslora": rslora.pop(),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": None,
    }
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    atomic_write_json(path / CONFIG_NAME, config)
    return path


def module_adapters(model: torch.nn.Module) -> dict[str, list[str]]:
    """Adapter names held by each BitLinearDoRA module path (for inspection/CLI)."""
    return {p: m.adapter_names for p, m in dora_modules(model).items()}

