"""Loading HF BitNet checkpoints (packed and float), the r3mes format, and bad files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from r3mes.core.checkpoint import (
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS_FILE,
    CheckpointError,
    convert,
    describe_model,
    load_model,
)
from r3mes.core.generation import GenerationConfig, generate

PROMPT = torch.tensor([[0, 17, 42, 99, 5, 250, 31, 8, 77, 140, 3, 19]])


def hf_logits(model, ids=PROMPT):
    with torch.no_grad():
        return model(ids).logits.float()


def test_packed_checkpoint_matches_transformers_logits(hf_dirs):
    model, info = load_model(hf_dirs["packed"], head="float")
    assert info.format == "hf-packed"
    ref = hf_logits(hf_dirs["hf_packed_model"])
    torch.testing.assert_close(model(PROMPT), ref, rtol=1e-4, atol=1e-4)


def test_float_checkpoint_matches_transformers_online_quantisation(hf_dirs):
    # transformers' AutoBitLinear (online) quantises the float weights in every forward:
    # the same absmean/absmax contract r3mes applies once at load.
    model, info = load_model(hf_dirs["float"], head="float")
    assert info.format == "hf-float"
    ref = hf_logits(hf_dirs["hf_online_model"])
    torch.testing.assert_close(model(PROMPT), ref, rtol=1e-4, atol=1e-4)


def test_greedy_continuation_matches_transformers(hf_dirs):
    hf = hf_dirs["hf_packed_model"]
    with torch.no_grad():
        ref = hf.generate(PROMPT, max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=2)[0, PROMPT.shape[1]:].tolist()
    model, _ = load_model(hf_dirs["packed"], head="float")
    out = generate(model, [PROMPT[0].tolist()], GenerationConfig(max_new_tokens=12,
                                                                stop_token_ids=()))
    assert out[0].tokens == ref


def test_int8_head_stays_close_to_the_float_head(hf_dirs):
    exact, _ = load_model(hf_dirs["packed"], head="float")
    compact, info = load_model(hf_dirs["packed"], head="int8")
    assert info.head == "int8-rowwise"
    a, b = exact(PROMPT), compact(PROMPT)
    rel = float((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt())
    assert rel < 0.02
    # Where the int8 head picks another top token, it was a near-tie in the exact logits.
    err = float((a - b).abs().max())
    picked = a.gather(-1, b.argmax(-1, keepdim=True)).squeeze(-1)
    assert bool((picked >= a.amax(-1) - 2 * err).all())


def test_sharded_checkpoint_loads_like_the_single_file(hf_dirs):
    assert (hf_dirs["sharded"] / "model.safetensors.index.json").exists()
    a, _ = load_model(hf_dirs["float"], head="float")
    b, _ = load_model(hf_dirs["sharded"], head="float")
    assert torch.equal(a(PROMPT), b(PROMPT))


def test_r3mes_format_gives_bit_identical_logits(hf_dirs, r3mes_dir):
    hf, _ = load_model(hf_dirs["packed"], head="int8")
    packed, info = load_model(r3mes_dir)
    assert info.format == "r3mes" and info.weights_sha256
    assert torch.equal(hf(PROMPT), packed(PROMPT))


def test_r3mes_manifest_is_versioned_and_hashed(r3mes_dir):
    manifest = json.loads((r3mes_dir / MANIFEST).read_text())
    assert manifest["format"] == "r3mes-bitnet"
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["weights_bytes"] == (r3mes_dir / WEIGHTS_FILE).stat().st_size
    assert len(manifest["weights_sha256"]) == 64
    assert (r3mes_dir / "tokenizer.json").exists()


def test_r3mes_tensors_can_stay_memory_mapped(r3mes_dir):
    from r3mes.core.checkpoint import SafetensorsFile

    model, _ = load_model(r3mes_dir, weights="mmap")
    sf = SafetensorsFile(r3mes_dir / WEIGHTS_FILE)
    linears = model.base_linears()
    a = linears["model.layers.0.self_attn.q_proj"].ternary.packed
    b = linears["model.layers.1.mlp.down_proj"].ternary.packed
    # Both are views into one map of the file: their distance is their distance on disk.
    on_disk = (sf.entries["model.layers.1.mlp.down_proj.packed"][2]
               - sf.entries["model.layers.0.self_attn.q_proj.packed"][2])
    assert b.data_ptr() - a.data_ptr() == on_disk


def test_r3mes_weights_load_into_weight_memory_by_default(r3mes_dir):
    from r3mes.core.checkpoint import SafetensorsFile

    model, _ = load_model(r3mes_dir)
    mapped, _ = load_model(r3mes_dir, weights="mmap")
    for name, lin in model.base_linears().items():
        assert torch.equal(lin.ternary.packed, mapped.base_linears()[name].ternary.packed)
    assert torch.equal(model.lm_head.int8.data, mapped.lm_head.int8.data)
    # Copies, not views of one map of the file: their distance is not the on-disk one.
    sf = SafetensorsFile(r3mes_dir / WEIGHTS_FILE)
    a = model.base_linears()["model.layers.0.self_attn.q_proj"].ternary.packed
    b = model.base_linears()["model.layers.1.mlp.down_proj"].ternary.packed
    on_disk = (sf.entries["model.layers.1.mlp.down_proj.packed"][2]
               - sf.entries["model.layers.0.self_attn.q_proj.packed"][2])
    assert b.data_ptr() - a.data_ptr() != on_disk
    with pytest.raises(ValueError, match="weights"):
        load_model(r3mes_dir, weights="disk")


def test_float_head_survives_conversion(hf_dirs, tmp_path):
    convert(hf_dirs["packed"], tmp_path / "f", head="float")
    a, _ = load_model(hf_dirs["packed"], head="float")
    b, info = load_model(tmp_path / "f")
    assert info.head == "float32"
    assert torch.equal(a(PROMPT), b(PROMPT))


def test_int4_head_converts_loads_and_generates(hf_dirs, r3mes_dir, tmp_path):
    convert(hf_dirs["packed"], tmp_path / "i4", head="int4")
    model, info = load_model(tmp_path / "i4")
    assert info.head == "int4-g64"
    assert model.lm_head.kind == "int4"
    direct, _ = load_model(hf_dirs["packed"], head="int4")
    assert torch.equal(model(PROMPT), direct(PROMPT))
    exact, _ = load_model(hf_dirs["packed"], head="float")
    a, b = exact(PROMPT), model(PROMPT)
    assert float((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()) < 0.15  # 4-bit: ~0.1
    out = generate(model, [PROMPT[0].tolist()], GenerationConfig(max_new_tokens=6,
                                                                stop_token_ids=()))
    assert len(out[0].tokens) == 6
    # What `r3mes info --model` reports, from the config alone, is what loads.
    four, eight = describe_model(tmp_path / "i4"), describe_model(r3mes_dir)
    assert four["head"] == "int4-g64" and eight["head"] == "int8-rowwise"
    assert four["head_bytes"] == model.lm_head.nbytes()
    assert eight["head_bytes"] == load_model(r3mes_dir)[0].lm_head.nbytes()
    assert four["ternary_bytes"] == eight["ternary_bytes"]


def test_r3mes_directory_converts_to_another_head(r3mes_dir, tmp_path):
    manifest = convert(r3mes_dir, tmp_path / "re", head="int4")
    assert manifest["head"] == "int4-g64"
    int8, _ = load_model(r3mes_dir)
    int4, _ = load_model(tmp_path / "re")
    h = torch.randn(3, int8.config.hidden_size)
    a, b = int8.lm_head(h), int4.lm_head(h)
    assert float((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()) < 0.15  # 4-bit: ~0.1
    assert (tmp_path / "re" / "tokenizer.json").exists()


def test_int4_head_calibrated_on_text(hf_dirs, tmp_path):
    from r3mes.core.head_calibration import hidden_importance

    text = "the quick brown fox jumps over the lazy dog. " * 20
    convert(hf_dirs["packed"], tmp_path / "plain", head="int4")
    convert(hf_dirs["packed"], tmp_path / "cal", head="int4", calibration_text=text)
    plain, _ = load_model(tmp_path / "plain")
    cal, info = load_model(tmp_path / "cal")
    assert info.head == "int4-g64"
    # The importance moved some steps, hence stored values (the same head otherwise).
    assert not torch.equal(plain.lm_head.int4.scale, cal.lm_head.int4.scale)
    assert not torch.equal(plain.lm_head.int4.packed, cal.lm_head.int4.packed)
    exact, _ = load_model(hf_dirs["packed"], head="float")
    imp = hidden_importance(exact, list(range(3, 40)))
    assert imp.shape == (exact.config.hidden_size,) and bool((imp > 0).all())
    with pytest.raises(ValueError, match="int4"):
        convert(hf_dirs["packed"], tmp_path / "bad", head="int8", calibration_text=text)
    with pytest.raises(ValueError, match="2 tokens"):
        hidden_importance(exact, [5])


# ---------------------------------------------------------------- malformed checkpoints
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(hf_dirs, tmp_path):
    d = _copy(hf_dirs["float"], tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing tensor "
                       r"'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(d)


def test_wrong_shape_is_named(hf_dirs, tmp_path):
    d = _copy(hf_dirs["float"], tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' "
                       r"has shape \[8, 64\], expected \[32, 64\]"):
        load_model(d)


def test_unknown_architecture_is_refused(hf_dirs, tmp_path):
    d = _copy(hf_dirs["float"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown architecture.*gpt2"):
        load_model(d)


def test_truncated_weights_file_is_refused(hf_dirs, tmp_path):
    d = _copy(hf_dirs["packed"], tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor '.+' needs"):
        load_model(d)


def test_truncated_r3mes_file_is_refused(r3mes_dir, tmp_path):
    d = _copy(r3mes_dir, tmp_path / "m")
    f = d / WEIGHTS_FILE
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load_model(d)


def test_corrupt_r3mes_weights_fail_the_hash_check(r3mes_dir, tmp_path):
    d = _copy(r3mes_dir, tmp_path / "m")
    f = d / WEIGHTS_FILE
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(d, verify=True)
    load_model(d)  # without the hash check: the structure itself is intact


def test_newer_format_version_is_refused(r3mes_dir, tmp_path):
    d = _copy(r3mes_dir, tmp_path / "m")
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (d / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format_version"):
        load_model(d)


def test_directory_without_weights_is_refused(hf_dirs, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(hf_dirs["float"] / "config.json", d)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(d)
