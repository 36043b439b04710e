"""PEFT-format adapter files: round trip, and every malformed file refused with a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from dora_testmodels import TinyStack, frozen_bitlinear
from safetensors.torch import load_file, save_file

from r3mes.core.adapter_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterFormatError,
    load_peft_adapter,
    read_peft_adapter,
    save_peft_adapter,
)
from r3mes.core.dora import apply_dora, dora_modules, set_adapter_mix

KEY = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def model(seeded):
    m = TinyStack(frozen_bitlinear)
    apply_dora(m)
    return m


@pytest.fixture
def saved(model, tmp_path):
    """A valid adapter (rank 4 everywhere, rank 8 on one module) saved by r3mes."""
    g = torch.Generator().manual_seed(0)
    for path, layer in dora_modules(model).items():
        rank = 8 if path.endswith("layers.1.mlp.up_proj") else 4
        layer.add_adapter("e", rank, 8.0)
        with torch.no_grad():
            layer.lora_B["e"].copy_(torch.randn(layer.lora_B["e"].shape, generator=g) * 0.1)
    out = save_peft_adapter(model, "e", tmp_path / "adapter")
    return model, out


def _fresh() -> TinyStack:
    torch.manual_seed(1234)
    m = TinyStack(frozen_bitlinear)
    apply_dora(m)
    return m


def test_saved_adapter_reloads_with_identical_output(saved):
    model, path = saved
    config, tensors = read_peft_adapter(path)
    assert config["use_dora"] is True and config["r"] == 4
    assert config["rank_pattern"] == {"model.layers.1.mlp.up_proj": 8}
    assert len(tensors) == 3 * 8
    info = load_peft_adapter(model, path, "copy")
    assert info.rank == 4 and len(info.modules) == 8
    x = torch.randn(2, 3, 40)
    with torch.no_grad():
        set_adapter_mix(model, [("e", 1.0)])
        a = model(x)
        set_adapter_mix(model, [("copy", 1.0)])
        b = model(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _rewrite_tensors(path, fn) -> None:
    tensors = load_file(str(path / WEIGHTS_NAME))
    fn(tensors)
    save_file(tensors, str(path / WEIGHTS_NAME))


def _rewrite_config(path, fn) -> None:
    cfg = json.loads((path / CONFIG_NAME).read_text())
    fn(cfg)
    (path / CONFIG_NAME).write_text(json.dumps(cfg))


def _refused(path, match) -> None:
    with pytest.raises(AdapterFormatError, match=match):
        read_peft_adapter(path)
    model = _fresh()
    with pytest.raises(AdapterFormatError, match=match):
        load_peft_adapter(model, path, "bad")
    assert all(m.adapter_names == [] for m in dora_modules(model).values())  # nothing loaded


def test_missing_key_is_refused(saved):
    _, path = saved
    _rewrite_tensors(path, lambda t: t.pop(KEY + ".lora_magnitude_vector"))
    _refused(path, r"adapter_model\.safetensors: missing key .*q_proj\.lora_magnitude_vector")


def test_extra_key_is_refused(saved):
    _, path = saved
    _rewrite_tensors(path, lambda t: t.__setitem__(KEY + ".lora_C.weight", torch.zeros(2)))
    _refused(path, r"unexpected key .*lora_C")


def test_rank_mismatch_with_config_is_refused(saved):
    _, path = saved
    _rewrite_config(path, lambda c: c.__setitem__("r", 5))
    _refused(path, r"lora_A\.weight' has rank 4 but the config says r=5")


def test_lora_b_shape_mismatch_is_refused(saved):
    _, path = saved
    _rewrite_tensors(path, lambda t: t.__setitem__(KEY + ".lora_B.weight", torch.zeros(40, 3)))
    _refused(path, r"q_proj\.lora_B\.weight' has shape \(40, 3\)")


def test_shape_mismatch_against_the_base_model_is_refused(saved):
    _, path = saved

    def widen(t):
        t[KEY + ".lora_A.weight"] = torch.zeros(4, 41)

    _rewrite_tensors(path, widen)
    with pytest.raises(AdapterFormatError, match=r"in_features=40"):
        load_peft_adapter(_fresh(), path, "bad")


def test_non_finite_values_are_refused(saved):
    _, path = saved

    def poison(t):
        t[KEY + ".lora_B.weight"][0, 0] = float("nan")

    _rewrite_tensors(path, poison)
    _refused(path, r"q_proj\.lora_B\.weight' contains NaN or Inf")


def test_plain_lora_config_is_refused(saved):
    _, path = saved
    _rewrite_config(path, lambda c: c.__setitem__("use_dora", False))
    _refused(path, r"adapter_config\.json: key 'use_dora'")


def test_non_lora_peft_type_is_refused(saved):
    _, path = saved
    _rewrite_config(path, lambda c: c.__setitem__("peft_type", "IA3"))
    _refused(path, r"'peft_type' is 'IA3'")


def test_invalid_json_config_is_refused(saved):
    _, path = saved
    (path / CONFIG_NAME).write_text("{not json")
    _refused(path, r"adapter_config\.json: not valid JSON")


def test_truncated_adapter_is_refused(saved):
    _, path = saved
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    _refused(path, r"adapter_model\.safetensors: not a readable safetensors file")


def test_pickle_weights_are_refused(saved):
    _, path = saved
    (path / WEIGHTS_NAME).rename(path / "adapter_model.bin")
    _refused(path, r"pickle weights are refused")


def test_missing_directory_or_config_is_refused(tmp_path):
    _refused(tmp_path / "nope", "not a directory")
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", r"adapter_config\.json: missing")


def test_adapter_for_unknown_module_is_refused(saved):
    _, path = saved

    def rename(t):
        for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"):
            t[KEY.replace("layers.0", "layers.7") + suffix] = t.pop(KEY + suffix)

    _rewrite_tensors(path, rename)
    with pytest.raises(AdapterFormatError, match=r"layers\.7\.self_attn\.q_proj': no such module"):
        load_peft_adapter(_fresh(), path, "bad")


def test_loading_twice_under_one_name_is_refused_and_keeps_the_first(saved):
    model, path = saved
    load_peft_adapter(model, path, "twice")
    with pytest.raises(AdapterFormatError, match="already holds"):
        load_peft_adapter(model, path, "twice")
    assert all("twice" in m.adapter_names for m in dora_modules(model).values())


def test_an_adapter_r3mes_saves_with_a_rank_pattern_enters_the_store(saved, tmp_path):
    # The store and the loader share one validator: what save_peft_adapter writes (here a
    # rank_pattern and leaf-name target_modules) the store accepts, with the same ranks.
    from r3mes.cache.adapter_store import AdapterStore, inspect_adapter_dir

    _, path = saved
    store = AdapterStore(tmp_path / "home")
    record = store.add(path, "e")
    info = inspect_adapter_dir(store.objects / record.digest)
    assert info.module_ranks["model.layers.1.mlp.up_proj"] == 8
    assert {r for m, r in info.module_ranks.items() if not m.endswith("layers.1.mlp.up_proj")} \
        == {4}
    loaded = load_peft_adapter(_fresh(), store.objects / record.digest, "stored")
    assert loaded.module_ranks == info.module_ranks and loaded.name == "stored"
