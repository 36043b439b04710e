"""The native decode layer (csrc/model/) against the layer-by-layer torch decode path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r3mes import kernels
from r3mes.core.backends.native_decode import NativeDecoder
from r3mes.core.dora import set_adapter_mix
from r3mes.core.model import (
    LINEAR_NAMES,
    BitNetConfig,
    BitNetForCausalLM,
    LMHead,
    bitlinear_from_packed,
)

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs the native module")

SHAPES = {"self_attn.q_proj": (96, 96), "self_attn.k_proj": (48, 96),
          "self_attn.v_proj": (48, 96), "self_attn.o_proj": (96, 96),
          "mlp.gate_proj": (200, 96), "mlp.up_proj": (200, 96), "mlp.down_proj": (96, 200)}


def _model(hidden_act: str = "relu2", sub_norms: bool = True, seed: int = 0) -> BitNetForCausalLM:
    cfg = BitNetConfig(vocab_size=300, hidden_size=96, intermediate_size=200,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       hidden_act=hidden_act, sub_norms=sub_norms)
    g = torch.Generator().manual_seed(seed)
    layers = [{name.split(".")[1]: bitlinear_from_packed(
        kernels.quantize_weight(torch.randn(*SHAPES[name], generator=g))) for name in LINEAR_NAMES}
        for _ in range(cfg.num_hidden_layers)]
    model = BitNetForCausalLM(cfg, torch.randn(300, 96, generator=g), layers,
                              LMHead.from_float(torch.randn(300, 96, generator=g)))
    NativeDecoder.attach(model)  # what the native backend does
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    return model


def _add_experts(model: BitNetForCausalLM, names: list[str], rank: int = 4) -> None:
    g = torch.Generator().manual_seed(7)
    for path, module in model.linear_modules().items():
        for i, name in enumerate(names):
            if i == 1 and "mlp" in path:
                continue  # the second expert adapts attention only: "missing" -> base
            module.load_adapter(name, torch.randn(rank, module.in_features, generator=g) * 0.1,
                                torch.randn(module.out_features, rank, generator=g) * 0.1,
                                torch.rand(module.out_features, generator=g) + 0.5, scaling=2.0)


def use_native(model: BitNetForCausalLM, native: bool) -> None:
    """Decode through fresh native layers, or through the model's torch layers."""
    if native:
        NativeDecoder.attach(model).reset()
    else:
        model.decode_hook = None


def native_running(model: BitNetForCausalLM) -> bool:
    """Whether the model's last decode steps ran in the native layers."""
    return isinstance(model.decode_hook, NativeDecoder) and model.decode_hook.running


def _decode_logits(model: BitNetForCausalLM, prompts: list[list[int]], steps: int,
                   native: bool) -> torch.Tensor:
    """Logits of `steps` decode steps (greedy tokens fed back) after a left-padded prompt."""
    use_native(model, native)
    width = max(len(p) for p in prompts)
    pad = [width - len(p) for p in prompts]
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    cache = model.new_cache(len(prompts), width + steps + 1, pad)
    logits = model(ids, cache, last_only=True)
    out = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        logits = model(token, cache, last_only=True)
        out.append(logits)
    assert native_running(model) == native
    return torch.cat(out, dim=1)


def _assert_close(native: torch.Tensor, torch_path: torch.Tensor) -> None:
    # The int8 activation quantisation can round one value differently when the float
    # norms differ in the last bit; a few logits then move by one quantisation step.
    diff = (native - torch_path).abs()
    scale = torch_path.abs().max()
    assert float(diff.max()) <= 2e-2 * float(scale)
    assert float(diff.mean()) <= 1e-3 * float(scale)


@pytest.mark.parametrize("hidden_act,sub_norms", [("relu2", True), ("silu", False)])
def test_native_decode_matches_the_torch_layer_path(hidden_act, sub_norms) -> None:
    model = _model(hidden_act, sub_norms)
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    native = _decode_logits(model, prompts, 6, native=True)
    reference = _decode_logits(model, prompts, 6, native=False)
    _assert_close(native, reference)


def test_native_decode_applies_expert_mixes_homogeneous_and_heterogeneous() -> None:
    model = _model()
    _add_experts(model, ["med", "law"])
    prompts = [[5, 6, 7, 8, 9], [11, 12], [3, 4, 5]]
    bare = _decode_logits(model, prompts, 4, native=True)
    for mix in ([("med", 0.7), ("law", 0.3)],
                [[("med", 1.0)], [], [("law", 0.5), ("med", 0.5)]]):
        set_adapter_mix(model, mix)
        native = _decode_logits(model, prompts, 4, native=True)
        reference = _decode_logits(model, prompts, 4, native=False)
        _assert_close(native, reference)
        assert float((native - bare).abs().max()) > 1e-3  # the experts did something
    set_adapter_mix(model, None)
    _assert_close(_decode_logits(model, prompts, 4, native=True), bare)


def test_changing_the_mix_between_steps_takes_effect_at_the_next_step() -> None:
    model = _model()
    _add_experts(model, ["med", "law"])
    cache = model.new_cache(1, 16)
    model(torch.tensor([[1, 2, 3]]), cache, last_only=True)
    snapshot = (cache.k.clone(), cache.v.clone(), cache.length)
    results = {}
    for mix in (None, [("med", 1.0)], [("law", 1.0)]):
        cache.k, cache.v, cache.length = snapshot[0].clone(), snapshot[1].clone(), snapshot[2]
        set_adapter_mix(model, mix)
        results[str(mix)] = model(torch.tensor([[4]]), cache, last_only=True)
    values = list(results.values())
    assert not torch.equal(values[0], values[1]) and not torch.equal(values[1], values[2])


def test_native_decode_is_bit_identical_across_runs_and_thread_counts() -> None:
    model = _model()
    _add_experts(model, ["med"])
    set_adapter_mix(model, [("med", 1.0)])
    runs = []
    for threads in (1, 2, 1):
        kernels.set_num_threads(threads)
        runs.append(_decode_logits(model, [[5, 6, 7], [8, 9]], 5, native=True))
    kernels.set_num_threads(0)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_models_the_native_layer_cannot_run_fall_back_to_torch() -> None:
    model = _model()
    for module in model.linear_modules().values():
        module.quantize_activations = False  # float base path: PEFT-parity mode
    cache = model.new_cache(1, 8)
    model(torch.tensor([[1, 2]]), cache, last_only=True)
    model(torch.tensor([[3]]), cache, last_only=True)
    assert model.decode_hook.unavailable


def test_decode_layer_refuses_bad_arguments_by_name() -> None:
    from r3mes import _native

    model = _model()
    layer = model.decode_hook.layers()[0]
    h = np.zeros((1, 96), dtype=np.float32)
    cache = np.zeros((2, 1, 2, 8, 24), dtype=np.float32)  # [layers, blocks, kv, 8, dim]
    table = np.zeros((1, 1), dtype=np.int32)
    start = np.zeros(1, dtype=np.int64)
    pos = np.zeros(1, dtype=np.int64)
    cs = np.ones((1, 24), dtype=np.float32)

    def step(h=h, k=cache, table=table, start=start, pos=pos, cos=cs):
        layer.step(h, k, k.copy(), 0, table, start, pos, cos, cs)

    with pytest.raises(ValueError, match="h: expected"):
        step(h=np.zeros((1, 95), np.float32))
    with pytest.raises(ValueError, match="outside the row's 8 positions"):
        step(pos=np.array([8], np.int64))
    with pytest.raises(ValueError, match="is not a block of the cache"):
        step(table=np.array([[1]], np.int32))
    with pytest.raises(ValueError, match="start"):
        step(start=np.array([1], np.int64))
    with pytest.raises(ValueError, match="k_cache"):
        step(k=cache[:, :, :1].copy())
    with pytest.raises(ValueError, match="cos/sin"):
        step(cos=cs[:, :12].copy())
    with pytest.raises(ValueError, match="NaN or Inf"):
        step(h=np.full((1, 96), np.nan, np.float32))
    tw = model.model.layers[0].self_attn.q_proj.base.ternary
    norm = np.ones(96, np.float32)
    good = [(tw._packed_np, 96, tw.scale)] * 7
    with pytest.raises(ValueError, match="k_proj: weight is"):
        _native.DecodeLayer(96, 200, 4, 2, 24, 1e-5, 0.2, "relu2", norm, norm, None, None, good)
    with pytest.raises(ValueError, match="activation"):
        _native.DecodeLayer(96, 200, 4, 2, 24, 1e-5, 0.2, "gelu", norm, norm, None, None, good)


def test_a_batch_with_one_bad_row_is_refused_whichever_thread_quantises_it() -> None:
    # The rows of a batch are normalised and quantised on the pool's threads, split among
    # them: a NaN in the last row (the second thread's half) still refuses the step, before
    # anything is written to the cache.
    model = _model()
    layer = model.decode_hook.layers()[0]
    h = np.zeros((3, 96), dtype=np.float32)
    h[2, 5] = np.nan
    k = np.zeros((2, 3, 2, 8, 24), dtype=np.float32)
    v = k.copy()
    table = np.arange(3, dtype=np.int32)[:, None]
    zeros = np.zeros(3, dtype=np.int64)
    cs = np.ones((3, 24), dtype=np.float32)
    kernels.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="NaN or Inf"):
            layer.step(h, k, v, 0, table, zeros, zeros, cs, cs)
    finally:
        kernels.set_num_threads(0)
    assert not k.any() and not v.any()


def test_a_layer_that_stops_qualifying_sends_decode_back_to_torch() -> None:
    model = _model()
    cache = model.new_cache(1, 8)
    model(torch.tensor([[1, 2]]), cache, last_only=True)
    model(torch.tensor([[3]]), cache, last_only=True)
    assert native_running(model)
    model.model.layers[1].mlp.down_proj.quantize_activations = False
    length = cache.length
    model(torch.tensor([[4]]), cache, last_only=True)
    assert model.decode_hook.unavailable and cache.length == length + 1


def _step_after_prompt(model: BitNetForCausalLM) -> torch.Tensor:
    cache = model.new_cache(1, 8)
    model(torch.tensor([[1, 2, 3]]), cache, last_only=True)
    return model(torch.tensor([[4]]), cache, last_only=True)


def test_load_state_dict_and_optimizer_steps_reach_the_native_layers() -> None:
    model = _model()
    _add_experts(model, ["med"])
    set_adapter_mix(model, [("med", 1.0)])
    before = _step_after_prompt(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k in state:
        if k.endswith("lora_B.med"):
            state[k] = state[k] * 3.0
    model.load_state_dict(state)  # inference adapters: values change in place
    after_load = _step_after_prompt(model)
    assert not torch.equal(before, after_load)
    # a trainable adapter updated in place (as an optimizer step does)
    module = model.model.layers[0].self_attn.q_proj
    module.add_adapter("fresh", 4, 8.0)
    set_adapter_mix(model, [("fresh", 1.0)])
    untrained = _step_after_prompt(model)
    with torch.no_grad():
        module.lora_B["fresh"].add_(0.5)
    trained = _step_after_prompt(model)
    assert not torch.equal(untrained, trained)
    use_native(model, False)  # the torch layer path agrees with what native decode did
    _assert_close(trained, _step_after_prompt(model))


def test_two_threads_decoding_through_one_model_get_their_own_results() -> None:
    import threading

    model = _model()
    _add_experts(model, ["med"])
    set_adapter_mix(model, [("med", 1.0)])
    model.decode_hook.layers()  # built once; both threads share the layers

    def decode(prompt: list[int]) -> torch.Tensor:
        cache = model.new_cache(1, len(prompt) + 8)
        logits = model(torch.tensor([prompt]), cache, last_only=True)
        out = []
        for _ in range(6):
            logits = model(logits[:, -1].argmax(-1, keepdim=True), cache, last_only=True)
            out.append(logits)
        return torch.cat(out, dim=1)

    prompts = ([5, 6, 7], [9, 8, 7, 6])
    expected = [decode(p) for p in prompts]
    results: list[list[torch.Tensor]] = [[], []]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            for _ in range(25):
                results[i].append(decode(prompts[i]))
        except BaseException as exc:  # reported below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(torch.equal(r, expected[i]) for i in (0, 1) for r in results[i])
    assert native_running(model)
