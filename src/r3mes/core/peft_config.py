"""``adapter_config.json`` of a PEFT DoRA adapter: the one validator the adapter loader
(:mod:`r3mes.core.adapter_io`) and the adapter store (:mod:`r3mes.cache.adapter_store`)
share, so a file the store accepts is a file the model loads. No torch import: the store
and the CLI read configs without loading a model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

CONFIG_NAME = "adapter_config.json"


class AdapterFormatError(ValueError):
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
