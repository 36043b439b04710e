"""BitLinearDoRA: initialisation, gradients, mixes, the kernel path against the torch path."""

from __future__ import annotations

import pytest
import torch
from dora_testmodels import TinyStack, frozen_bitlinear

from r3mes import kernels
from r3mes.core.bitlinear import BitLinear
from r3mes.core.dora import BitLinearDoRA, apply_dora, set_adapter_mix


def _layer(inp=72, out=40, storage="fp32", **kw) -> BitLinearDoRA:
    return BitLinearDoRA(BitLinear(inp, out).freeze(), storage=storage, **kw)


def _randomise(layer: BitLinearDoRA, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.2)
        layer.lora_magnitude_vector[name].mul_(torch.rand(layer.out_features, generator=g) + 0.5)


def test_fresh_adapter_changes_nothing(seeded):
    layer = _layer()
    layer.add_adapter("a", 8, 16.0)
    x = torch.randn(2, 5, 72)
    bare = layer.base(x)
    layer.set_mix([("a", 1.0)])
    torch.testing.assert_close(layer(x), bare, rtol=1e-6, atol=1e-6)  # training path
    with torch.no_grad():
        torch.testing.assert_close(layer(x), bare, rtol=1e-6, atol=1e-6)  # kernel path


def test_magnitude_starts_at_the_row_norm_of_w0(seeded):
    layer = _layer()
    layer.add_adapter("a", 4, 4.0)
    want = torch.linalg.vector_norm(layer.base.dequantized_weight().double(), dim=1).float()
    torch.testing.assert_close(layer.lora_magnitude_vector["a"].detach(), want)


def test_gradients_reach_a_b_m_and_never_the_base(seeded):
    base = BitLinear(72, 40)  # a float (trainable) BitLinear: its weight must stay untouched
    layer = BitLinearDoRA(base)
    layer.add_adapter("a", 4, 8.0)
    _randomise(layer, "a", 0)
    layer.set_mix([("a", 1.0)])
    x = torch.randn(3, 72, requires_grad=True)
    layer(x).square().sum().backward()
    for p in (layer.lora_A["a"], layer.lora_B["a"], layer.lora_magnitude_vector["a"]):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert base.weight.grad is None and not base.weight.requires_grad
    assert x.grad is not None and x.grad.abs().sum() > 0  # flows on to earlier layers


def test_frozen_base_passes_gradient_to_the_input(seeded):
    layer = _layer()
    layer.add_adapter("a", 4, 8.0)
    layer.set_mix([("a", 1.0)])
    x = torch.randn(3, 72, requires_grad=True)
    layer(x).sum().backward()
    # straight-through: d(sum y)/dx of the base part is the column sum of W0 (times g = 1)
    torch.testing.assert_close(x.grad[0], layer.base.dequantized_weight().sum(0), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("storage", ["fp32", "fp16", "int8"])
def test_kernel_path_matches_training_path(seeded, storage):
    layer = _layer(storage=storage)
    for i, (n, r) in enumerate([("a", 4), ("b", 16), ("c", 8)]):
        layer.add_adapter(n, r, 2.0 * r)
        _randomise(layer, n, i)
    layer.set_mix([("a", 2.0), ("b", 1.0), ("c", 1.0)])  # normalised to 0.5/0.25/0.25
    x = torch.randn(4, 72)
    y_train = layer(x)
    with torch.no_grad():
        y_kernel = layer(x)
    tol = {"fp32": 1e-5, "fp16": 2e-3, "int8": 2e-2}[storage]
    torch.testing.assert_close(y_kernel, y_train.detach(), rtol=tol, atol=tol)


def test_mix_equals_weighted_sum_of_single_expert_outputs(seeded):
    layer = _layer()
    for i, n in enumerate("ab"):
        layer.add_adapter(n, 4, 8.0)
        _randomise(layer, n, i)
    x = torch.randn(5, 72)
    with torch.no_grad():
        layer.set_mix([("a", 1.0)])
        ya = layer(x)
        layer.set_mix([("b", 1.0)])
        yb = layer(x)
        layer.set_mix([("a", 3.0), ("b", 1.0)])
        torch.testing.assert_close(layer(x), 0.75 * ya + 0.25 * yb, rtol=1e-5, atol=1e-5)


def test_heterogeneous_batch_gives_each_element_its_own_mix(seeded):
    layer = _layer()
    for i, n in enumerate("ab"):
        layer.add_adapter(n, 8, 8.0)
        _randomise(layer, n, i)
    x = torch.randn(3, 6, 72)  # [B, T, in]: all T tokens of element b use mix b
    mixes = [[("a", 1.0)], [], [("a", 1.0), ("b", 1.0)]]
    with torch.no_grad():
        layer.set_mix(mixes)
        y = layer(x)
        for b, mix in enumerate(mixes):
            layer.set_mix(mix or None)
            torch.testing.assert_close(y[b], layer(x[b]), rtol=1e-5, atol=1e-5)
        layer.set_mix(mixes)
        with pytest.raises(ValueError, match="heterogeneous"):
            layer(torch.randn(2, 6, 72))


def test_no_mix_is_bit_exact_bare_bitlinear(seeded):
    layer = _layer()
    layer.add_adapter("a", 4, 8.0)
    _randomise(layer, "a", 0)
    x = torch.randn(3, 72)
    assert torch.equal(layer(x), layer.base(x))


def test_kernel_cache_follows_training_updates(seeded):
    layer = _layer()
    layer.add_adapter("a", 4, 8.0)
    layer.set_mix([("a", 1.0)])
    x = torch.randn(2, 72)
    with torch.no_grad():
        before = layer(x)
        layer.lora_B["a"].add_(0.3)  # in place, as an optimizer step
        after = layer(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, layer(x).detach(), rtol=1e-5, atol=1e-5)


def test_load_adapter_validates_and_remove_adapter_forgets(seeded):
    layer = _layer()
    a, b, m = torch.randn(4, 72), torch.randn(40, 4), torch.rand(40)
    with pytest.raises(ValueError, match="lora_A"):
        layer.load_adapter("x", torch.randn(4, 71), b, m, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        layer.load_adapter("x", a, torch.randn(40, 5), m, 1.0)
    with pytest.raises(ValueError, match="magnitude"):
        layer.load_adapter("x", a, b, torch.rand(41), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        layer.load_adapter("x", a, b, torch.full((40,), float("nan")), 1.0)
    assert layer.adapter_names == []
    layer.load_adapter("x", a, b, m, 1.0)
    assert not layer.lora_A["x"].requires_grad
    with pytest.raises(ValueError, match="already exists"):
        layer.load_adapter("x", a, b, m, 1.0)
    layer.set_mix([("x", 1.0)])
    layer.remove_adapter("x")
    assert layer.adapter_names == []
    with pytest.raises(KeyError, match="removed"):
        layer(torch.randn(1, 72))
    with pytest.raises(KeyError):
        layer.set_mix([("x", 1.0)])


def test_loaded_adapter_gain_uses_factored_norms(seeded):
    layer = _layer()
    a, b, m = torch.randn(8, 72) * 0.1, torch.randn(40, 8) * 0.1, torch.rand(40) + 0.5
    layer.load_adapter("x", a, b, m, 0.5)
    w0 = layer.base.dequantized_weight().double()
    dense = torch.linalg.vector_norm(w0 + 0.5 * b.double() @ a.double(), dim=1)
    torch.testing.assert_close(layer.row_norms("x"), dense, rtol=2e-6, atol=0)


def test_bad_mixes_are_refused(seeded):
    layer = _layer()
    layer.add_adapter("a", 4, 8.0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        layer.set_mix([("a", -1.0)])
    with pytest.raises(ValueError, match="sum to 0"):
        layer.set_mix([("a", 0.0)])
    with pytest.raises(KeyError, match="nope"):
        layer.set_mix([("nope", 1.0)])


def test_model_mix_with_an_expert_covering_one_layer_uses_base_elsewhere(seeded):
    model = TinyStack(frozen_bitlinear)
    wrapped = apply_dora(model, ["q_proj", "down_proj"])
    assert wrapped == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                       "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    q0 = model.model.layers[0].self_attn.q_proj
    q0.add_adapter("only_q0", 4, 8.0)
    _randomise(q0, "only_q0", 0)
    assert set_adapter_mix(model, [("only_q0", 1.0)]) == 4
    x = torch.randn(2, 40)
    with torch.no_grad():
        torch.testing.assert_close(model.model.layers[1].self_attn.q_proj(x),
                                   model.model.layers[1].self_attn.q_proj.base(x))
        q0.set_mix([("only_q0", 1.0)])
        full = q0(x)
    with pytest.raises(KeyError, match="ghost"):
        set_adapter_mix(model, [("ghost", 1.0)])
    assert q0.mix == [("only_q0", 1.0)]  # unchanged by the refused call
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.add_adapter("other", 4, 8.0)
        set_adapter_mix(model, [("only_q0", 1.0), ("other", 1.0)])
        torch.testing.assert_close(q0(x), 0.5 * full + 0.5 * q0.base(x), rtol=1e-5, atol=1e-5)


def test_torch_backend_matches_native(seeded):
    layer = _layer()
    layer.add_adapter("a", 16, 16.0)
    _randomise(layer, "a", 0)
    layer.set_mix([("a", 1.0)])
    x = torch.randn(3, 72)
    with torch.no_grad():
        native = layer(x)
        with kernels.use_reference():
            layer.lora_B["a"].mul_(1.0)  # bump the version: rebuild the cached adapter
            torch.testing.assert_close(layer(x), native, rtol=1e-5, atol=1e-5)
    assert kernels.available()
