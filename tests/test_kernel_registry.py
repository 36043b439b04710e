"""The kernels' op registry: one device table per op, the choice between native, reference
and CUDA made in r3mes.kernels.dispatch, and use_reference() as a scoped switch."""

from __future__ import annotations

import threading

import pytest
import torch

from r3mes import kernels
from r3mes.kernels import dispatch, reference
from r3mes.kernels.dispatch import REGISTRY, KernelNotAvailableError, implementation

needs_native = pytest.mark.skipif(not kernels.available(), reason="native module not built")


def _reference_impl(*args: object) -> str:
    return "reference"


def _native_impl(*args: object) -> str:
    return "native"


def _cuda_impl(*args: object) -> str:
    return "cuda"


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch) -> None:
    # Every test starts from the process default; one sets the variable itself.
    monkeypatch.delenv("R3MES_BACKEND", raising=False)


def test_an_op_without_a_native_implementation_runs_its_reference(monkeypatch) -> None:
    monkeypatch.setitem(REGISTRY, "test_reference_only", {"reference": _reference_impl})
    assert implementation("test_reference_only") is _reference_impl
    with kernels.use_reference():
        assert implementation("test_reference_only") is _reference_impl


@needs_native
def test_arithmetic_ops_run_natively_unless_the_reference_is_asked_for() -> None:
    for op in ("ternary_linear", "int8_linear", "int4_linear", "dora_linear",
               "decode_attention", "quantize_activations"):
        assert implementation(op) is REGISTRY[op]["native"], op
        with kernels.use_reference():
            assert implementation(op) is REGISTRY[op]["reference"], op


def test_use_reference_nests_and_restores() -> None:
    before = kernels.use_native()
    with kernels.use_reference():
        assert not kernels.use_native()
        with kernels.use_reference():
            assert not kernels.use_native()
        assert not kernels.use_native()  # the inner block leaves the outer one's choice
    assert kernels.use_native() == before == kernels.available()


def test_use_reference_restores_after_an_exception() -> None:
    with pytest.raises(ZeroDivisionError), kernels.use_reference():
        _ = 1 / 0
    assert kernels.use_native() == kernels.available()


@needs_native
def test_use_reference_is_local_to_the_thread_that_enters_it() -> None:
    seen: list[bool] = []
    with kernels.use_reference():
        worker = threading.Thread(target=lambda: seen.append(kernels.use_native()))
        worker.start()
        worker.join()
        assert not kernels.use_native()
    assert seen == [True]


@needs_native
def test_the_environment_variable_sets_the_default(monkeypatch) -> None:
    monkeypatch.setenv("R3MES_BACKEND", "torch")
    assert not kernels.use_native()
    assert implementation("ternary_linear") is REGISTRY["ternary_linear"]["reference"]
    with kernels.use_reference():
        assert not kernels.use_native()
    assert not kernels.use_native()
    monkeypatch.setenv("R3MES_BACKEND", "native")
    assert kernels.use_native()


def test_an_op_nothing_can_run_is_named_in_the_error(monkeypatch) -> None:
    monkeypatch.setitem(REGISTRY, "test_cuda_only", {"cuda": _cuda_impl})
    with pytest.raises(KernelNotAvailableError, match="'test_cuda_only'.*neither a native nor"):
        implementation("test_cuda_only")
    assert implementation("test_cuda_only", "cuda") is _cuda_impl
    with pytest.raises(KernelNotAvailableError, match="'int8_linear' has no CUDA"):
        implementation("int8_linear", "cuda")
    with pytest.raises(KernelNotAvailableError, match="no kernel op named 'no_such_op'"):
        implementation("no_such_op")


@needs_native
def test_a_native_only_op_in_reference_mode_is_named_in_the_error(monkeypatch) -> None:
    monkeypatch.setitem(REGISTRY, "test_native_only", {"native": _native_impl})
    assert implementation("test_native_only") is _native_impl
    with kernels.use_reference(), pytest.raises(
            KernelNotAvailableError, match="'test_native_only'.*no torch reference"):
        implementation("test_native_only")
    with pytest.raises(KernelNotAvailableError, match="'test_native_only'.*prepared without"):
        implementation("test_native_only", native_ready=False)


def test_registering_an_op_twice_on_one_backend_is_refused(monkeypatch) -> None:
    monkeypatch.setitem(REGISTRY, "test_twice", {})
    dispatch.register("test_twice", "reference")(_reference_impl)
    with pytest.raises(ValueError, match="'test_twice': a reference implementation is already"):
        dispatch.register("test_twice", "reference")(_native_impl)
    with pytest.raises(ValueError, match="backend: expected one of"):
        dispatch.register("test_twice", "tpu")


@needs_native
def test_layout_ops_stay_native_in_reference_mode() -> None:
    w = torch.randn(24, 300)
    with kernels.use_reference():
        assert implementation("unpack_ternary") is REGISTRY["unpack_ternary"]["native"]
        tw = kernels.quantize_weight(w)  # packs with no torch reference: still runs
    assert torch.equal(tw.unpack(), reference.quantize_weight(w))


@needs_native
def test_reference_mode_runs_the_reference_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 8, 64, generator=gen)
    k = torch.randn(2, 2, 40, 64, generator=gen)
    v = torch.randn(2, 2, 40, 64, generator=gen)
    pad = torch.tensor([0, 5])
    with kernels.use_reference():
        y = kernels.decode_attention(q, k, v, pad, 33, 0.125)
    assert torch.equal(y, reference.decode_attention(q, k, v, pad, 33, 0.125))


@needs_native
def test_adapters_prepared_in_reference_mode_run_the_reference_afterwards() -> None:
    gen = torch.Generator().manual_seed(5)
    w = kernels.quantize_weight(torch.randn(48, 96, generator=gen))
    a, b = torch.randn(4, 96, generator=gen), torch.randn(48, 4, generator=gen)
    g = kernels.dora_gain(torch.rand(48, generator=gen) + 0.5,
                          kernels.dora_row_norms(w, a, b, 2.0))
    with kernels.use_reference():
        ad = kernels.prepare_dora_adapter(a, b, g, 2.0, "fp32")
        mix = kernels.prepare_dora_mix([ad], torch.ones(1, 1))
    assert ad.native is None and mix.native is None
    assert kernels.use_native()
    x = torch.randn(3, 96, generator=gen)
    expected = kernels.dora_linear_reference(x, w, [ad], torch.ones(1, 1))
    assert torch.equal(kernels.dora_linear(x, w, [ad], torch.ones(1, 1)), expected)
    assert torch.equal(kernels.dora_mix_linear(x, w, mix), expected)


def test_every_cuda_entry_names_a_function_of_the_cuda_module() -> None:
    from r3mes.kernels import cuda

    lazy = [op for op, table in REGISTRY.items()
            if "cuda" in table and table["cuda"].__qualname__ == f"cuda.{op}"]
    assert {"quantize_activations", "ternary_linear", "dora_linear", "dora_row_norms"} <= set(lazy)
    for op in lazy:
        assert callable(getattr(cuda, op)), op


def test_a_weight_that_is_not_a_cpu_weight_takes_the_cuda_entry() -> None:
    # The CUDA entry checks its weight before it needs a device, so this runs on any machine.
    with pytest.raises(TypeError, match="expected a CudaTernaryWeight"):
        kernels.ternary_linear(torch.randn(2, 8), object())
    with pytest.raises(TypeError, match="expected a CudaTernaryWeight"):
        kernels.dora_row_norms(object(), torch.randn(2, 8), torch.randn(4, 2), 1.0)
