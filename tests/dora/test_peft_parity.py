"""Parity with HF PEFT: same outputs, and adapters move between PEFT and r3mes both ways."""

from __future__ import annotations

import copy

import pytest
import torch
from dora_testmodels import TinyStack, frozen_bitlinear, linear_like

from r3mes.core.adapter_io import load_peft_adapter, save_peft_adapter
from r3mes.core.dora import apply_dora, set_adapter_mix

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _peft_model(twin: TinyStack, r: int = 4, alpha: float = 8.0, rslora: bool = False):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, use_dora=True,
                          lora_dropout=0.0, use_rslora=rslora)
    return peft.get_peft_model(copy.deepcopy(twin), cfg)


def _randomise_peft(pm, seed: int) -> None:
    """Non-trivial A, B, m (a fresh PEFT adapter has B = 0 and would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                if "magnitude" in name:
                    p.mul_(torch.rand(p.shape, generator=g) + 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture
def pair(seeded):
    bitnet = TinyStack(frozen_bitlinear)
    twin = linear_like(bitnet)
    apply_dora(bitnet, quantize_activations=False, storage="fp32")
    return bitnet, twin


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_saved_adapter_loads_in_r3mes_with_the_same_output(pair, tmp_path, rslora):
    bitnet, twin = pair
    pm = _peft_model(twin, rslora=rslora)
    _randomise_peft(pm, 0)
    pm.save_pretrained(tmp_path / "peft")
    info = load_peft_adapter(bitnet, tmp_path / "peft/", "expert")
    assert len(info.modules) == 8 and info.use_rslora is rslora
    set_adapter_mix(bitnet, [("expert", 1.0)])
    x = torch.randn(3, 5, 40)
    with torch.no_grad():
        want = pm(x)
        got = bitnet(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_trainable_forward_matches_peft_including_gradients(pair):
    bitnet, twin = pair
    pm = _peft_model(twin)
    _randomise_peft(pm, 1)
    q = bitnet.model.layers[0].self_attn.q_proj
    pq = pm.base_model.model.model.layers[0].self_attn.q_proj
    q.add_adapter("t", 4, 8.0)
    with torch.no_grad():
        q.lora_A["t"].copy_(pq.lora_A["default"].weight)
        q.lora_B["t"].copy_(pq.lora_B["default"].weight)
        q.lora_magnitude_vector["t"].copy_(pq.lora_magnitude_vector["default"].weight)
    q.set_mix([("t", 1.0)])
    x = torch.randn(4, 40)
    y, py = q(x), pq(x)
    torch.testing.assert_close(y, py, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    py.square().sum().backward()
    torch.testing.assert_close(q.lora_A["t"].grad, pq.lora_A["default"].weight.grad,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q.lora_B["t"].grad, pq.lora_B["default"].weight.grad,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q.lora_magnitude_vector["t"].grad,
                               pq.lora_magnitude_vector["default"].weight.grad,
                               rtol=1e-4, atol=1e-5)


def test_r3mes_saved_adapter_loads_in_peft_with_the_same_output(pair, tmp_path):
    bitnet, twin = pair
    g = torch.Generator().manual_seed(3)
    for layer in [m for m in bitnet.modules() if hasattr(m, "add_adapter")]:
        layer.add_adapter("mine", 4, 6.0)
        with torch.no_grad():
            layer.lora_B["mine"].copy_(torch.randn(layer.lora_B["mine"].shape, generator=g) * 0.3)
            layer.lora_magnitude_vector["mine"].mul_(1.3)
    save_peft_adapter(bitnet, "mine", tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path / "ours")
    set_adapter_mix(bitnet, [("mine", 1.0)])
    x = torch.randn(2, 7, 40)
    with torch.no_grad():
        torch.testing.assert_close(bitnet(x), pm(x), rtol=1e-5, atol=1e-5)


def test_adapter_covering_some_layers_round_trips_through_peft(pair, tmp_path):
    bitnet, twin = pair
    layer = bitnet.model.layers[1].mlp.down_proj
    layer.add_adapter("one", 8, 16.0)
    with torch.no_grad():
        layer.lora_B["one"].normal_()
    save_peft_adapter(bitnet, "one", tmp_path / "one")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(twin), tmp_path / "one")
    pm.save_pretrained(tmp_path / "back")
    info = load_peft_adapter(bitnet, tmp_path / "back", "back")
    assert info.modules == ("model.layers.1.mlp.down_proj",)
    x = torch.randn(3, 40)
    with torch.no_grad():
        set_adapter_mix(bitnet, [("one", 1.0)])
        first = bitnet(x)
        set_adapter_mix(bitnet, [("back", 1.0)])
        torch.testing.assert_close(bitnet(x), first, rtol=0, atol=0)
        torch.testing.assert_close(pm(x), first, rtol=1e-5, atol=1e-5)
