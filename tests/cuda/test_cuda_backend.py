"""``BitNetCppBackend`` on a GPU (``device="cuda"``) against the CPU native backend.

CPU-runnable: device selection (``"cuda"`` refused without a GPU, ``"auto"`` falls back to
the CPU, bad strings refused), and the two device-generic pieces of the GPU path run on the
CPU: the static decode step (:class:`StaticDecoder`, what the CUDA graph captures) against
the model's own decode, and the ``torch._int_mm`` LM head against the native int8 head.

GPU-only (skipped without a CUDA device): logits and greedy tokens of the CUDA backend
match the CPU backend with and without experts, the int8 head is bit-exact, CUDA-graph
decode equals eager decode bit for bit, heterogeneous batches, capabilities.
"""

from __future__ import annotations

import pytest
import torch

from r3mes import kernels
from r3mes.core.backends import BitNetCppBackend
from r3mes.core.backends.cuda_model import (
    DeviceLMHead,
    StaticDecoder,
    move_model_to_cuda,
    resolve_device,
)
from r3mes.core.backends.native_decode import NativeDecoder
from r3mes.core.dora import dora_modules, set_adapter_mix
from r3mes.core.generation import GenerationConfig
from r3mes.core.model import (
    LINEAR_NAMES,
    BitNetConfig,
    BitNetForCausalLM,
    LMHead,
    RMSNorm,
    bitlinear_from_packed,
)
from r3mes.kernels import cuda

needs_gpu = pytest.mark.skipif(
    not cuda.available(), reason="needs a CUDA device (torch.cuda and r3mes._native_cuda)"
)
no_gpu = pytest.mark.skipif(cuda.available(), reason="checks the behaviour without a GPU")
needs_native = pytest.mark.skipif(not kernels.available(), reason="needs r3mes._native")

CONFIG = BitNetConfig(vocab_size=321, hidden_size=64, intermediate_size=160,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
                      pad_token_id=2)
PROMPTS = [[0, 12, 40, 7, 99, 3, 18, 260], [0, 5, 77], [0, 300, 41, 9, 9]]


def tiny_model(seed: int = 0) -> BitNetForCausalLM:
    """A random 2-layer BitNet (vocab 321: not a multiple of 8, untied int8 head)."""
    g = torch.Generator().manual_seed(seed)
    h, i, kv = CONFIG.hidden_size, CONFIG.intermediate_size, 2 * CONFIG.head_dim
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h),
              "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
              "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    layers = []
    for _ in range(CONFIG.num_hidden_layers):
        layers.append({name.split(".")[1]: bitlinear_from_packed(
            kernels.quantize_weight(torch.randn(*shapes[name], generator=g)))
            for name in LINEAR_NAMES})
    embed = torch.randn(CONFIG.vocab_size, h, generator=g)
    head = LMHead.from_float(torch.randn(CONFIG.vocab_size, h, generator=g) * 0.3)
    model = BitNetForCausalLM(CONFIG, embed, layers, head)
    NativeDecoder.attach(model)  # the CPU decode the static step is compared with
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=g))
    return model


def add_experts(model: BitNetForCausalLM, names: tuple[str, ...] = ("alpha", "beta"),
                storage: str = "fp16") -> None:
    """Inference adapters with non-trivial B and magnitudes on every projection."""
    g = torch.Generator().manual_seed(7)
    for module in dora_modules(model).values():
        module.storage = storage
        for name in names:
            a = torch.randn(4, module.in_features, generator=g) * 0.2
            b = torch.randn(module.out_features, 4, generator=g) * 0.2
            m = torch.rand(module.out_features, generator=g) + 0.5
            module.load_adapter(name, a, b, m, scaling=2.0)


def padded_batch(prompts: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    longest = max(len(p) for p in prompts)
    pad = [longest - len(p) for p in prompts]
    ids = torch.full((len(prompts), longest), CONFIG.pad_token_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, pad[b]:] = torch.tensor(p)
    return ids, pad


# ---- device selection (runs everywhere) --------------------------------------------------------


@needs_native
@no_gpu
def test_cuda_device_is_refused_without_a_gpu():
    with pytest.raises(RuntimeError, match="no CUDA device|not built"):
        BitNetCppBackend(device="cuda")
    with pytest.raises(RuntimeError, match="no CUDA device|not built"):
        BitNetCppBackend(device="cuda:0")


@needs_native
@no_gpu
def test_auto_device_picks_the_cpu_without_a_gpu():
    backend = BitNetCppBackend(device="auto", cuda_graphs=True)
    assert backend.device == torch.device("cpu")
    assert backend.adapter_storage == "int8"
    assert backend.cuda_graphs is False
    caps = backend.get_capabilities()
    assert caps["device"] == "cpu"
    assert "cuda" not in caps["features"]


@needs_native
@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu", "", "cuda:-1", "cuda0", "mps"])
def test_bad_device_strings_are_refused(device):
    with pytest.raises(ValueError, match="device"):
        BitNetCppBackend(device=device)


@needs_native
def test_a_device_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match="device"):
        BitNetCppBackend(device=0)  # type: ignore[arg-type]


@needs_native
def test_cuda_graphs_on_the_cpu_device_are_refused():
    with pytest.raises(ValueError, match="cuda_graphs"):
        BitNetCppBackend(device="cpu", cuda_graphs=True)


@needs_native
@no_gpu
def test_moving_a_model_to_cuda_is_refused_without_a_gpu():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="no CUDA device|not built"):
        move_model_to_cuda(model)
    assert model.inv_freq.device.type == "cpu"  # nothing moved
    assert resolve_device("auto") == torch.device("cpu")


# ---- the GPU path's device-generic pieces, on the CPU -------------------------------------


@needs_native
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_int_mm_head_equals_the_native_int8_head_bit_for_bit(rows):
    head = tiny_model().lm_head
    assert head.kind == "int8" and head.vocab_size % 8 != 0  # exercises the row padding
    x = torch.randn(rows, CONFIG.hidden_size, generator=torch.Generator().manual_seed(rows))
    device_head = DeviceLMHead(head, "cpu")
    assert torch.equal(device_head(x), head(x))
    assert device_head.int8.data.shape == (CONFIG.vocab_size, head.int8.data.shape[1])


@needs_native
@pytest.mark.parametrize("mix", ["none", "shared", "per_row"])
def test_static_decode_step_matches_the_model_decode(mix):
    model = tiny_model()
    add_experts(model)
    if mix == "shared":
        set_adapter_mix(model, [("alpha", 0.6), ("beta", 0.4)])
    elif mix == "per_row":
        set_adapter_mix(model, [[("alpha", 1.0)], [], [("alpha", 0.5), ("beta", 0.5)]])
    ids, pad = padded_batch(PROMPTS)
    steps = 6
    ref_cache = model.new_cache(len(PROMPTS), ids.shape[1] + steps, pad)
    st_cache = model.new_cache(len(PROMPTS), ids.shape[1] + steps, pad)
    ref = model(ids, ref_cache, last_only=True)
    model(ids, st_cache, last_only=True)
    decoder = StaticDecoder(model)
    for _ in range(steps):
        token = ref[:, -1].argmax(dim=-1, keepdim=True)
        ref = model(token, ref_cache, last_only=True)
        got = decoder.step(token, st_cache)
        assert got.shape == ref.shape == (len(PROMPTS), 1, CONFIG.vocab_size)
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=2e-3)
        assert torch.equal(got.argmax(dim=-1), ref.argmax(dim=-1))
    assert st_cache.length == ref_cache.length
    torch.testing.assert_close(st_cache.k, ref_cache.k, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st_cache.v, ref_cache.v, rtol=1e-4, atol=1e-4)
    assert decoder.captures == 0  # no graphs on the CPU


@needs_native
def test_static_decode_step_refuses_bad_input():
    model = tiny_model()
    cache = model.new_cache(1, 2)
    decoder = StaticDecoder(model)
    with pytest.raises(ValueError, match="token ids"):
        decoder.step(torch.tensor([[CONFIG.vocab_size]]), cache)
    with pytest.raises(ValueError, match=r"\[batch, 1\]"):
        decoder.step(torch.tensor([[3, 4]]), cache)
    decoder.step(torch.tensor([[3]]), cache)
    decoder.step(torch.tensor([[4]]), cache)
    with pytest.raises(ValueError, match="exceeds the cache"):
        decoder.step(torch.tensor([[5]]), cache)


# ---- on a GPU ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from r3mes.core.checkpoint import save_model

    path = tmp_path_factory.mktemp("cuda_backend") / "tiny"
    save_model(tiny_model(), path)
    return path


@pytest.fixture(scope="module")
def adapter_dirs(model_dir, write_random_adapters):
    """Two PEFT DoRA adapters with non-trivial B and magnitudes."""
    return write_random_adapters(model_dir, 0.3)


def _loaded(backend: BitNetCppBackend, model_dir, adapter_dirs) -> BitNetCppBackend:
    backend.load_base_model(model_dir)
    for name, path in adapter_dirs.items():
        backend.load_dora_adapter(name, path)
    return backend


@pytest.fixture(scope="module")
def cpu_backend(model_dir, adapter_dirs):
    """The CPU native backend with the same adapter values as the GPU's (fp16)."""
    return _loaded(BitNetCppBackend(adapter_storage="fp16"), model_dir, adapter_dirs)


@pytest.fixture(scope="module")
def gpu_backend(model_dir, adapter_dirs):
    return _loaded(BitNetCppBackend(device="cuda"), model_dir, adapter_dirs)


@pytest.fixture(scope="module")
def graph_backend(model_dir, adapter_dirs):
    return _loaded(BitNetCppBackend(device="cuda", cuda_graphs=True), model_dir, adapter_dirs)


MIXES = [((), ()), (("alpha",), (1.0,)), (("alpha", "beta"), (0.7, 0.3))]


@needs_gpu
def test_the_gpu_backend_holds_the_model_on_the_device(gpu_backend):
    model = gpu_backend.model
    assert gpu_backend.adapter_storage == "fp16"
    for lin in model.base_linears().values():
        assert isinstance(lin.ternary, cuda.CudaTernaryWeight)
        assert lin.ternary.device.type == "cuda"
    assert model.model.embed_tokens.weight.is_cuda
    assert model.model.norm.weight.is_cuda
    assert isinstance(model.lm_head, DeviceLMHead) and model.lm_head.int8.data.is_cuda
    assert model.new_cache(1, 4).k.is_cuda
    module = next(iter(dora_modules(model).values()))
    assert module._prepared["alpha"].extra["cuda"][1].device.type == "cuda"


@needs_gpu
@pytest.mark.parametrize("ids,weights", MIXES)
def test_gpu_logits_and_greedy_tokens_match_the_cpu_backend(cpu_backend, gpu_backend, ids,
                                                             weights):
    prompt = [PROMPTS[0]]
    a = gpu_backend.inference(prompt, ids, weights)
    b = cpu_backend.inference(prompt, ids, weights)
    assert a.device.type == "cpu" and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-3)
    cfg = GenerationConfig(max_new_tokens=10, stop_token_ids=())
    assert (gpu_backend.generate(prompt, cfg, ids, weights)[0].tokens
            == cpu_backend.generate(prompt, cfg, ids, weights)[0].tokens)


@needs_gpu
def test_the_gpu_int8_head_equals_the_cpu_head_bit_for_bit(cpu_backend, gpu_backend):
    x = torch.randn(5, CONFIG.hidden_size, generator=torch.Generator().manual_seed(3))
    want = cpu_backend.model.lm_head(x)
    got = gpu_backend.model.lm_head(x.cuda()).cpu()
    assert torch.equal(got, want)


def _decode_logits(backend: BitNetCppBackend, prompts, steps: int) -> list[torch.Tensor]:
    """Prefill then ``steps`` greedy decode steps through the backend's forward."""
    model = backend.model
    ids, pad = padded_batch(prompts)
    cache = model.new_cache(len(prompts), ids.shape[1] + steps, pad)
    out = [backend._forward(ids, cache, True)]
    for _ in range(steps):
        token = out[-1][:, -1].argmax(dim=-1, keepdim=True)
        out.append(backend._forward(token, cache, True))
    return out


@needs_gpu
@pytest.mark.parametrize("mix", ["none", "shared", "per_row"])
def test_cuda_graph_decode_equals_eager_decode_bit_for_bit(gpu_backend, graph_backend, mix):
    specs = {"none": None, "shared": [("alpha", 0.6), ("beta", 0.4)],
             "per_row": [[("alpha", 1.0)], [], [("alpha", 0.5), ("beta", 0.5)]]}
    captures = graph_backend._decoder.captures
    results = []
    for backend in (gpu_backend, graph_backend):
        set_adapter_mix(backend.model, specs[mix])
        try:
            results.append(_decode_logits(backend, PROMPTS, steps=8))
        finally:
            set_adapter_mix(backend.model, None)
    assert graph_backend._decoder.graph_error is None
    assert graph_backend._decoder.captures == captures + 1  # one capture for the cache
    for eager, graphed in zip(*results, strict=True):
        assert torch.equal(eager, graphed)


@needs_gpu
def test_graph_decode_matches_the_cpu_backend_and_recaptures_for_a_new_mix(cpu_backend,
                                                                           graph_backend):
    cfg = GenerationConfig(max_new_tokens=10, stop_token_ids=())
    captures = graph_backend._decoder.captures
    for ids, weights in MIXES:
        assert (graph_backend.generate(PROMPTS, cfg, ids, weights)
                == cpu_backend.generate(PROMPTS, cfg, ids, weights))
    assert graph_backend._decoder.graph_error is None
    assert graph_backend._decoder.captures == captures + len(MIXES)  # one per generation


@needs_gpu
@pytest.mark.parametrize("backend_name", ["gpu_backend", "graph_backend"])
def test_heterogeneous_batch_matches_the_cpu_backend(cpu_backend, backend_name, request):
    backend = request.getfixturevalue(backend_name)
    mixes = [[("alpha", 1.0)], [], [("alpha", 0.5), ("beta", 0.5)]]
    cfg = GenerationConfig(max_new_tokens=10, stop_token_ids=())
    got = backend.generate(PROMPTS, cfg, adapter_mixes=mixes)
    want = cpu_backend.generate(PROMPTS, cfg, adapter_mixes=mixes)
    assert [r.tokens for r in got] == [r.tokens for r in want]


@needs_gpu
def test_int8_adapters_are_refused_on_the_gpu():
    with pytest.raises(ValueError, match="adapter_storage"):
        BitNetCppBackend(device="cuda", adapter_storage="int8")


@needs_gpu
def test_capabilities_report_the_gpu(graph_backend):
    caps = graph_backend.get_capabilities()
    assert caps["device"] == f"cuda:{graph_backend.device.index}"
    assert caps["gpu"]["name"] == torch.cuda.get_device_name(graph_backend.device)
    assert caps["gpu"]["memory_total_bytes"] > 0
    assert set(caps["kernels"]["architectures"]) >= {80, 90}
    assert caps["cuda_graphs"]["enabled"] is True
    assert graph_backend.supports_feature("cuda_graphs")
    assert caps["model_loaded"] is True and caps["adapters"] == ["alpha", "beta"]


@needs_gpu
def test_auto_device_picks_the_gpu():
    assert BitNetCppBackend(device="auto").device.type == "cuda"
