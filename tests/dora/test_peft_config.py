"""The PEFT adapter format module: PEFT's pattern semantics, and one validator at two depths."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from r3mes.core.peft_config import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterFormatError,
    DoraConfig,
    pattern_key,
    validate_adapter,
)

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
DOWN = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize(("patterns", "module", "want"), [
    ({"q_proj": 8}, Q, "q_proj"),                                # a leaf name
    ({"self_attn.q_proj": 8}, Q, "self_attn.q_proj"),            # a dotted suffix
    ({Q: 8}, Q, Q),                                              # the full path
    ({"proj": 8}, Q, None),                                      # not a part of a name
    ({"layers.0.self_attn.q": 8}, Q, None),                      # not a prefix
    ({r"layers\.\d+\.mlp\.down_proj": 8}, DOWN, r"layers\.\d+\.mlp\.down_proj"),  # a regex
    ({"q_proj|k_proj": 8}, K, "q_proj|k_proj"),                  # alternation is grouped
    ({"q_proj": 8, "self_attn.q_proj": 16}, Q, "q_proj"),        # the first match wins
])
def test_pattern_keys_match_as_peft_matches_them(patterns, module, want):
    assert pattern_key(patterns, module) == want


def _config(tmp_path, **overrides):
    config = {"peft_type": "LORA", "use_dora": True, "r": 4, "lora_alpha": 8,
              "target_modules": ["q_proj", "k_proj", "down_proj"]}
    config.update(overrides)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    return DoraConfig.read(tmp_path)


def test_rank_and_alpha_patterns_give_each_module_its_scaling(tmp_path):
    config = _config(tmp_path, rank_pattern={"q_proj": 8}, alpha_pattern={"down_proj": 2},
                     use_rslora=False)
    assert (config.rank_for(Q), config.rank_for(K), config.rank_for(DOWN)) == (8, 4, 4)
    assert (config.alpha_for(Q), config.alpha_for(DOWN)) == (8.0, 2.0)
    assert (config.scaling_for(Q), config.scaling_for(K), config.scaling_for(DOWN)) == (
        1.0, 2.0, 0.5)


def test_a_string_target_modules_is_a_full_match_regex(tmp_path):
    config = _config(tmp_path, target_modules=r".*\.self_attn\.(q|k)_proj")
    assert config.covers(Q) and config.covers(K) and not config.covers(DOWN)
    assert not config.covers(Q + ".extra")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"rank_pattern": {"q_proj": 0}}, "'rank_pattern' gives 'q_proj' the rank 0"),
    ({"alpha_pattern": {"q_proj": "big"}}, "'alpha_pattern' gives 'q_proj' the alpha 'big'"),
    ({"rank_pattern": {"q_proj(": 8}}, r"pattern 'q_proj\(' is not a valid regular expression"),
    ({"target_modules": "q_proj("}, "'target_modules' 'q_proj\\(' is not a valid regular"),
])
def test_bad_patterns_are_refused_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(AdapterFormatError, match=message) as info:
        _config(tmp_path, **overrides)
    assert CONFIG_NAME in str(info.value)


def _adapter(tmp_path, *, ranks=None, value=0.5, dtype=torch.float32, **config):
    ranks = ranks or {}
    tensors = {}
    for module in (Q, DOWN):
        r = ranks.get(module, 4)
        p = f"base_model.model.{module}"
        tensors[f"{p}.lora_A.weight"] = torch.full((r, 16), value, dtype=dtype)
        tensors[f"{p}.lora_B.weight"] = torch.full((24, r), value, dtype=dtype)
        tensors[f"{p}.lora_magnitude_vector"] = torch.ones(24, dtype=dtype)
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    _config(tmp_path, **config)
    return tmp_path


def test_header_depth_describes_the_adapter_without_reading_values(tmp_path):
    path = _adapter(tmp_path, ranks={Q: 8}, value=float("nan"), rank_pattern={"q_proj": 8})
    info = validate_adapter(path, "header")  # NaN values are a full-depth finding
    assert info.module_shapes == {Q: (24, 16), DOWN: (24, 16)}
    assert info.module_ranks == {Q: 8, DOWN: 4} and info.rank == 4 and info.tensors == {}
    assert info.num_parameters == 8 * 40 + 24 + 4 * 40 + 24
    assert info.tensor_bytes == 4 * info.num_parameters and info.dtypes == ("F32",)
    with pytest.raises(AdapterFormatError, match=r"q_proj\.lora_A\.weight' contains NaN"):
        validate_adapter(path, "full")


def test_full_depth_returns_float32_tensors(tmp_path):
    path = _adapter(tmp_path, dtype=torch.bfloat16)
    info = validate_adapter(path, "full")
    assert {t.dtype for t in info.tensors.values()} == {torch.float32}
    assert len(info.tensors) == 6 and info.dtypes == ("BF16",)


def test_integer_tensors_are_refused_at_header_depth(tmp_path):
    path = _adapter(tmp_path, dtype=torch.int32)
    with pytest.raises(AdapterFormatError, match="has dtype I32, expected a float dtype"):
        validate_adapter(path, "header")


def test_padded_weights_file_is_refused(tmp_path):
    path = _adapter(tmp_path)
    with open(path / WEIGHTS_NAME, "ab") as handle:
        handle.write(b"\0" * 8)
    with pytest.raises(AdapterFormatError, match="not a readable safetensors file .*padded"):
        validate_adapter(path, "header")


def test_an_unknown_depth_is_refused(tmp_path):
    with pytest.raises(ValueError, match="depth"):
        validate_adapter(_adapter(tmp_path), "deep")  # type: ignore[arg-type]
