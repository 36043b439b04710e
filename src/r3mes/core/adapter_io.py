"""DoRA adapters in HF PEFT's directory format: read, validate, load into a model, save.

A PEFT DoRA adapter is a directory with

* ``adapter_config.json``: ``peft_type: "LORA"``, ``use_dora: true``, ``r``, ``lora_alpha``,
  ``target_modules``, ``use_rslora`` (optionally ``rank_pattern`` / ``alpha_pattern``);
* ``adapter_model.safetensors``: for each adapted module path P (named as the model names
  it, e.g. ``model.layers.0.self_attn.q_proj``) the tensors
  ``base_model.model.P.lora_A.weight`` [r, in], ``base_model.model.P.lora_B.weight`` [out, r]
  and ``base_model.model.P.lora_magnitude_vector`` [out].

Everything is validated before anything is applied, and every error
(:class:`AdapterFormatError`, a ValueError) names the file and the key. Pickle files
(``adapter_model.bin``) are refused: safetensors only.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from r3mes.core.dora import dora_modules
from r3mes.core.peft_config import CONFIG_NAME, AdapterFormatError, read_dora_config
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

WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_magnitude_vector": "lora_magnitude_vector",
    # Older PEFT releases kept the ".weight" of the magnitude's DoraLayer.
    ".lora_magnitude_vector.weight": "lora_magnitude_vector",
}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class AdapterInfo:
    """What :func:`load_peft_adapter` loaded."""

    name: str
    path: Path
    rank: int
    alpha: float
    use_rslora: bool
    modules: tuple[str, ...]
    num_parameters: int
    config: dict[str, Any]


@dataclass(frozen=True)
class _ModuleAdapter:
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    magnitude: torch.Tensor
    rank: int
    alpha: float
    scaling: float
    keys: dict[str, str]


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches the module path or a suffix."""
    for key, value in pattern.items():
        if module == key or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _read_config(path: Path) -> dict[str, Any]:
    return read_dora_config(path)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    file = path / WEIGHTS_NAME
    if not file.is_file():
        if (path / "adapter_model.bin").exists():
            raise AdapterFormatError(
                f"{path / 'adapter_model.bin'}: pickle weights are refused; save the adapter "
                "with safetensors (PEFT: save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterFormatError(f"{file}: missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{file}: not a readable safetensors file ({exc})") from None


def read_peft_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and fully validate a PEFT DoRA adapter directory.

    Returns ``(config, tensors)``; tensors keep PEFT's keys and are float32. Checks: the
    config is a LoRA config with ``use_dora: true`` and supported options; the weights
    file is complete safetensors (no pickle); every key is a known DoRA key; every module
    has exactly lora_A, lora_B and a magnitude; shapes agree with each other and with the
    configured rank (``r`` / ``rank_pattern``); all values are finite. Raises
    :class:`AdapterFormatError` naming the file and key.
    """
    config, modules = _read_and_group(Path(path))
    tensors: dict[str, torch.Tensor] = {}
    for mod in modules.values():
        tensors[mod.keys["lora_A"]] = mod.lora_A
        tensors[mod.keys["lora_B"]] = mod.lora_B
        tensors[mod.keys["lora_magnitude_vector"]] = mod.magnitude
    return config, tensors


def _read_and_group(path: Path) -> tuple[dict[str, Any], dict[str, _ModuleAdapter]]:
    if not path.is_dir():
        raise AdapterFormatError(f"{path}: not a directory (expected a PEFT adapter directory)")
    config = _read_config(path)
    raw = _read_tensors(path)
    file = path / WEIGHTS_NAME
    grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in raw.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if not key.startswith(_PREFIX) or suffix is None:
            raise AdapterFormatError(
                f"{file}: unexpected key {key!r} (expected base_model.model.<module>"
                ".lora_A.weight / .lora_B.weight / .lora_magnitude_vector)"
            )
        module = key[len(_PREFIX) : -len(suffix)]
        part = _SUFFIXES[suffix]
        slot = grouped.setdefault(module, {})
        if part in slot:
            raise AdapterFormatError(f"{file}: key {key!r} duplicates {slot[part][0]!r}")
        slot[part] = (key, tensor)
    if not grouped:
        raise AdapterFormatError(f"{file}: holds no adapter tensors")

    use_rslora = bool(config.get("use_rslora", False))
    modules: dict[str, _ModuleAdapter] = {}
    for module, slot in sorted(grouped.items()):
        for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
            if part not in slot:
                want = _PREFIX + module + (".lora_magnitude_vector" if part ==
                                           "lora_magnitude_vector" else f".{part}.weight")
                raise AdapterFormatError(f"{file}: missing key {want!r}")
        checked = {}
        for part, (key, t) in slot.items():
            if t.dtype not in _FLOAT_DTYPES:
                raise AdapterFormatError(f"{file}: key {key!r} has dtype {t.dtype}, expected float")
            want_dim = 1 if part == "lora_magnitude_vector" else 2
            if t.dim() != want_dim:
                raise AdapterFormatError(
                    f"{file}: key {key!r} has shape {tuple(t.shape)}, expected {want_dim}-D"
                )
            t = t.to(torch.float32)
            if not torch.isfinite(t).all():
                raise AdapterFormatError(f"{file}: key {key!r} contains NaN or Inf")
            checked[part] = (key, t.contiguous())
        (ka, a), (kb, b), (km, m) = (checked["lora_A"], checked["lora_B"],
                                     checked["lora_magnitude_vector"])
        rank = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module,
                                     config["lora_alpha"]))
        if a.shape[0] != rank:
            raise AdapterFormatError(
                f"{file}: key {ka!r} has rank {a.shape[0]} but the config says r={rank}"
            )
        if b.shape[1] != rank:
            raise AdapterFormatError(
                f"{file}: key {kb!r} has shape {tuple(b.shape)}, expected [out, r={rank}]"
            )
        if m.shape[0] != b.shape[0]:
            raise AdapterFormatError(
                f"{file}: key {km!r} has length {m.shape[0]} but lora_B has "
                f"{b.shape[0]} rows (out_features)"
            )
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        modules[module] = _ModuleAdapter(
            a, b, m, rank, alpha, scaling,
            {"lora_A": ka, "lora_B": kb, "lora_magnitude_vector": km},
        )
    return config, modules


def load_peft_adapter(model: torch.nn.Module, path: str | Path, name: str) -> AdapterInfo:
    """Load a PEFT DoRA adapter directory into ``model``'s BitLinearDoRA modules as ``name``.

    Modules are matched by path (the PEFT key without ``base_model.model.`` and the
    suffix). All checks (format, module exists and is a BitLinearDoRA, shapes against the
    base layer, name free) pass before any module changes, so a bad adapter leaves the
    model as it was. Raises :class:`AdapterFormatError`.
    """
    path = Path(path)
    config, modules = _read_and_group(path)
    file = path / WEIGHTS_NAME
    targets = dora_modules(model)
    for module, mod in modules.items():
        layer = targets.get(module)
        if layer is None:
            try:
                found = type(model.get_submodule(module)).__name__
            except AttributeError:
                found = None
            what = "no such module" if found is None else f"it is a {found}, not a BitLinearDoRA"
            raise AdapterFormatError(
                f"{file}: key {mod.keys['lora_A']!r} targets module {module!r}: {what}"
            )
        if mod.lora_A.shape[1] != layer.in_features:
            raise AdapterFormatError(
                f"{file}: key {mod.keys['lora_A']!r} has shape {tuple(mod.lora_A.shape)}, "
                f"but {module} has in_features={layer.in_features}"
            )
        if mod.lora_B.shape[0] != layer.out_features:
            raise AdapterFormatError(
                f"{file}: key {mod.keys['lora_B']!r} has shape {tuple(mod.lora_B.shape)}, "
                f"but {module} has out_features={layer.out_features}"
            )
        if name in layer.adapter_names:
            raise AdapterFormatError(
                f"{path}: module {module} already holds an adapter named {name!r}"
            )
    use_rslora = bool(config.get("use_rslora", False))
    loaded: list[str] = []
    try:
        for module, mod in modules.items():
            targets[module].load_adapter(name, mod.lora_A, mod.lora_B, mod.magnitude,
                                         mod.scaling, alpha=mod.alpha, use_rslora=use_rslora)
            loaded.append(module)
    except Exception:
        for module in loaded:  # all or nothing
            targets[module].remove_adapter(name)
        raise
    n_params = sum(m.lora_A.numel() + m.lora_B.numel() + m.magnitude.numel()
                   for m in modules.values())
    return AdapterInfo(name, path, int(config["r"]), float(config["lora_alpha"]), use_rslora,
                       tuple(modules), n_params, config)


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
        tensors[f"{_PREFIX}{p}.lora_A.weight"] = t["lora_A"].contiguous()
        tensors[f"{_PREFIX}{p}.lora_B.weight"] = t["lora_B"].contiguous()
        tensors[f"{_PREFIX}{p}.lora_magnitude_vector"] = t["lora_magnitude_vector"].contiguous()
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

