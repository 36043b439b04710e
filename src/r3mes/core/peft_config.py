"""The PEFT DoRA adapter format: one reader and one validator for every part of r3mes.

A PEFT DoRA adapter is a directory with

* ``adapter_config.json``: ``peft_type: "LORA"``, ``use_dora: true``, ``r``, ``lora_alpha``,
  ``target_modules``, ``use_rslora``, optionally ``rank_pattern`` / ``alpha_pattern``
  (per-module rank and alpha, matched as PEFT matches them: :func:`pattern_key`);
* ``adapter_model.safetensors``: for each adapted module path P (named as the model names
  it, e.g. ``model.layers.0.self_attn.q_proj``) the tensors
  ``base_model.model.P.lora_A.weight`` [r_P, in], ``base_model.model.P.lora_B.weight``
  [out, r_P] and ``base_model.model.P.lora_magnitude_vector`` [out].

:func:`read_dora_config` / :class:`DoraConfig` check the config; :func:`validate_adapter`
checks the whole directory at one of two depths: ``"header"`` (the config, the safetensors
header, key names, dtypes, shapes against each other, the per-module rank and
``target_modules``; no tensor data is read, which is what the adapter store needs) or
``"full"`` (the same, then every value is read and must be finite; what the model loader
needs). The adapter store (:mod:`r3mes.cache.adapter_store`) and the loader
(:mod:`r3mes.core.adapter_io`) share it, so a file the store accepts is a file the model
loads. Every error names the file and the key. No torch import unless ``depth="full"``:
the store and the CLI read adapters without loading a model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from r3mes.errors import R3mesError
from r3mes.utils.safetensors_io import FLOAT_DTYPES, SafetensorsFormatError, read_header

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "CONFIG_NAME",
    "KEY_PREFIX",
    "WEIGHTS_NAME",
    "AdapterFormatError",
    "AdapterInfo",
    "DoraConfig",
    "pattern_key",
    "peft_key",
    "read_dora_config",
    "validate_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
PARTS = ("lora_A", "lora_B", "lora_magnitude_vector")
_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_magnitude_vector": "lora_magnitude_vector",
    # Older PEFT releases kept the ".weight" of the magnitude's DoraLayer.
    ".lora_magnitude_vector.weight": "lora_magnitude_vector",
}


class AdapterFormatError(R3mesError, ValueError):
    """An adapter directory that cannot be used; the message names the file and the key."""


def read_dora_config(path: str | Path, error: type[ValueError] = AdapterFormatError
                     ) -> dict[str, Any]:
    """Parse and check ``<path>/adapter_config.json``: a PEFT LoRA config with
    ``use_dora: true`` and only the features r3mes implements. Raises ``error``."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise error(f"{file}: missing (an adapter directory needs {CONFIG_NAME})")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise error(f"{file}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise error(f"{file}: key 'peft_type' is {config.get('peft_type')!r}, expected 'LORA'")
    if config.get("use_dora") is not True:
        raise error(f"{file}: key 'use_dora' is {config.get('use_dora')!r}; use_dora must be "
                    "true (this is a plain LoRA adapter, r3mes experts are DoRA adapters)")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise error(f"{file}: key 'r' must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise error(f"{file}: key 'lora_alpha' must be a number, got {alpha!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise error(f"{file}: key 'use_rslora' must be true or false")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise error(f"{file}: key 'target_modules' must be a non-empty list of module names")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise error(f"{file}: key {key!r} must be an object")
    # Features whose tensors or semantics r3mes does not implement: refuse, never ignore.
    if config.get("fan_in_fan_out"):
        raise error(f"{file}: key 'fan_in_fan_out' = true is not supported")
    if config.get("bias", "none") != "none":
        raise error(f"{file}: key 'bias' = {config.get('bias')!r} is not supported (only 'none')")
    if config.get("modules_to_save"):
        raise error(f"{file}: key 'modules_to_save' is not supported (the base model stays frozen)")
    return config


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The ``rank_pattern`` / ``alpha_pattern`` key that applies to ``module``, or None.

    PEFT's rule (``peft.utils.other.get_pattern_key``): keys are tried in order and the
    first ``key`` with ``re.match(rf"(.*\\.)?({key})$", module)`` wins, so a key is a module
    name, a path suffix after a dot, or a regular expression over either.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def peft_key(module: str, part: str) -> str:
    """The safetensors key PEFT writes for ``part`` (one of :data:`PARTS`) of ``module``."""
    return KEY_PREFIX + module + (f".{part}.weight" if part != "lora_magnitude_vector" else
                                  ".lora_magnitude_vector")


@dataclass(frozen=True)
class DoraConfig:
    """A checked ``adapter_config.json`` (``raw`` keeps every key as read)."""

    file: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    #: a list of module names (exact or dotted suffix) or, as a string, one regex (fullmatch)
    target_modules: tuple[str, ...] | str
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def read(cls, path: str | Path, error: type[ValueError] = AdapterFormatError) -> DoraConfig:
        """Read and check ``<path>/adapter_config.json``; raises ``error`` naming the key."""
        raw = read_dora_config(path, error)
        file = Path(path) / CONFIG_NAME
        for key, value in (raw.get("rank_pattern") or {}).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise error(f"{file}: key 'rank_pattern' gives {key!r} the rank {value!r}; "
                            "expected a positive integer")
        for key, value in (raw.get("alpha_pattern") or {}).items():
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value)):
                raise error(f"{file}: key 'alpha_pattern' gives {key!r} the alpha {value!r}; "
                            "expected a number")
        for key in [*(raw.get("rank_pattern") or {}), *(raw.get("alpha_pattern") or {})]:
            try:
                re.compile(key)
            except re.error as exc:
                raise error(f"{file}: pattern {key!r} is not a valid regular expression "
                            f"({exc})") from None
        targets = raw["target_modules"]
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as exc:
                raise error(f"{file}: key 'target_modules' {targets!r} is not a valid regular "
                            f"expression ({exc})") from None
        base = raw.get("base_model_name_or_path")
        return cls(
            file=file, r=int(raw["r"]), lora_alpha=float(raw["lora_alpha"]),
            use_rslora=bool(raw.get("use_rslora", False)),
            target_modules=targets if isinstance(targets, str) else tuple(targets),
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern={k: float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
            base_model=base if isinstance(base, str) else None, raw=raw)

    def rank_for(self, module: str) -> int:
        """The rank of ``module``: its ``rank_pattern`` entry, else ``r``."""
        key = pattern_key(self.rank_pattern, module)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module: str) -> float:
        """The alpha of ``module``: its ``alpha_pattern`` entry, else ``lora_alpha``."""
        key = pattern_key(self.alpha_pattern, module)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scaling_for(self, module: str) -> float:
        """PEFT's scaling of ``module``: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
        rank = self.rank_for(module)
        return self.alpha_for(module) / (math.sqrt(rank) if self.use_rslora else rank)

    def covers(self, module: str) -> bool:
        """Whether ``target_modules`` selects ``module``, as PEFT decides it: a string is a
        regex the whole path must match; a list entry equals the path or a dotted suffix."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module) is not None
        return any(module == t or module.endswith("." + t) for t in self.target_modules)


@dataclass(frozen=True)
class AdapterInfo:
    """What :func:`validate_adapter` learned about an adapter directory.

    ``module_shapes`` maps each adapted module path (without ``base_model.model.``) to
    (out_features, in_features) and ``module_ranks`` to its rank; ``tensor_bytes`` is the
    size of the tensor data. At ``depth="full"`` ``tensors`` holds the checked float32
    tensors under their PEFT keys (empty otherwise). ``name`` is set once a model holds
    the adapter under that name.
    """

    path: Path
    config: DoraConfig
    module_shapes: dict[str, tuple[int, int]]
    module_ranks: dict[str, int]
    tensor_bytes: int
    dtypes: tuple[str, ...]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    name: str | None = None

    @property
    def rank(self) -> int:
        """The config's default rank ``r`` (modules may differ: :attr:`module_ranks`)."""
        return self.config.r

    @property
    def lora_alpha(self) -> float:
        return self.config.lora_alpha

    alpha = lora_alpha

    @property
    def use_rslora(self) -> bool:
        return self.config.use_rslora

    @property
    def base_model(self) -> str | None:
        return self.config.base_model

    @property
    def target_modules(self) -> tuple[str, ...]:
        """``target_modules`` as a tuple (a regex string becomes its only entry)."""
        targets = self.config.target_modules
        return (targets,) if isinstance(targets, str) else targets

    @property
    def modules(self) -> tuple[str, ...]:
        """The adapted module paths, sorted."""
        return tuple(sorted(self.module_shapes))

    @property
    def scaling(self) -> float:
        """The PEFT scaling for the default rank and alpha (``alpha / r``, or
        ``alpha / sqrt(r)`` with rsLoRA); :meth:`DoraConfig.scaling_for` gives a module's."""
        return self.lora_alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def num_parameters(self) -> int:
        """Parameters of all tensors: r·in + out·r + out per module."""
        return sum(self.module_ranks[m] * (o + i) + o for m, (o, i) in self.module_shapes.items())


def validate_adapter(path: str | Path, depth: Literal["header", "full"] = "header",
                     error: type[ValueError] = AdapterFormatError) -> AdapterInfo:
    """Validate a PEFT DoRA adapter directory and describe it.

    ``depth="header"`` reads the config and the safetensors header only: the header is
    well-formed and the file complete (no bytes missing or extra); every key is
    ``base_model.model.<module>.`` + ``lora_A.weight`` / ``lora_B.weight`` /
    ``lora_magnitude_vector``; each module has all three, in a float dtype, shaped
    A [r, in], B [out, r], magnitude [out] with ``r`` the module's rank (``rank_pattern``,
    else ``r``); ``target_modules`` covers the module. ``depth="full"`` then loads every
    tensor (``safetensors`` library, as float32) and requires finite values. Pickle weights
    (``adapter_model.bin``) are refused. Raises ``error`` naming the file and the key.
    """
    if depth not in ("header", "full"):
        raise ValueError(f"depth must be 'header' or 'full', not {depth!r}")
    root = Path(path)
    if not root.is_dir():
        raise error(f"{root}: not a directory (expected a PEFT adapter directory)")
    config = DoraConfig.read(root, error)
    weights = root / WEIGHTS_NAME
    if not weights.is_file():
        if (root / "adapter_model.bin").exists():
            raise error(f"{root / 'adapter_model.bin'}: pickle weights are refused; save the "
                        "adapter with safetensors (PEFT: save_pretrained(..., "
                        "safe_serialization=True))")
        raise error(f"{weights}: missing (an adapter needs {WEIGHTS_NAME})")
    try:
        header = read_header(weights)
    except SafetensorsFormatError as exc:
        detail = str(exc).removeprefix(f"{weights}: ")
        raise error(f"{weights}: not a readable safetensors file ({detail})") from None
    grouped: dict[str, dict[str, str]] = {}
    for key in header.tensors:
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        module = key[len(KEY_PREFIX):-len(suffix)] if suffix else ""
        if not key.startswith(KEY_PREFIX) or not module:
            raise error(f"{weights}: unexpected key {key!r} (expected base_model.model.<module>"
                        ".lora_A.weight / .lora_B.weight / .lora_magnitude_vector)")
        slot = grouped.setdefault(module, {})
        part = _SUFFIXES[suffix]
        if part in slot:
            raise error(f"{weights}: key {key!r} duplicates {slot[part]!r}")
        slot[part] = key
    if not grouped:
        raise error(f"{weights}: contains no adapter tensors")
    shapes: dict[str, tuple[int, int]] = {}
    ranks: dict[str, int] = {}
    for module, slot in sorted(grouped.items()):
        for part in PARTS:
            if part not in slot:
                raise error(f"{weights}: missing key {peft_key(module, part)!r}: module "
                            f"{module!r} lacks {part} (each adapted module needs lora_A, "
                            "lora_B and lora_magnitude_vector)")
        for part, key in slot.items():
            spec = header.tensors[key]
            if spec.dtype not in FLOAT_DTYPES:
                raise error(f"{weights}: key {key!r} has dtype {spec.dtype}, expected a float "
                            "dtype (F32, F16, BF16, F64)")
            want_dim = 1 if part == "lora_magnitude_vector" else 2
            if len(spec.shape) != want_dim:
                raise error(f"{weights}: key {key!r} has shape {spec.shape}, expected "
                            f"{want_dim}-D")
        ka, kb, km = (slot[p] for p in PARTS)
        a, b, m = (header.tensors[k].shape for k in (ka, kb, km))
        rank = config.rank_for(module)
        if a[0] != rank:
            raise error(f"{weights}: key {ka!r} has rank {a[0]} but the config says r={rank}"
                        + (" (rank_pattern)" if rank != config.r else ""))
        if b[1] != rank:
            raise error(f"{weights}: key {kb!r} has shape {b}, expected [out, r={rank}]")
        if m[0] != b[0]:
            raise error(f"{weights}: key {km!r} has length {m[0]} but lora_B has {b[0]} rows "
                        "(out_features)")
        if not config.covers(module):
            raise error(f"{weights}: module {module!r} is not covered by target_modules "
                        f"{config.target_modules!r}")
        shapes[module] = (b[0], a[1])
        ranks[module] = rank
    tensors = _load_finite(weights, error) if depth == "full" else {}
    return AdapterInfo(root, config, shapes, ranks, header.data_bytes,
                       tuple(sorted({t.dtype for t in header.tensors.values()})), tensors)


def _load_finite(weights: Path, error: type[ValueError]) -> dict[str, torch.Tensor]:
    """Every tensor of a header-checked file as contiguous float32, all values finite."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise error(f"{weights}: not a readable safetensors file ({exc})") from None
    tensors: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        t = t.to(torch.float32).contiguous()
        if not torch.isfinite(t).all():
            raise error(f"{weights}: key {key!r} contains NaN or Inf")
        tensors[key] = t
    return tensors
