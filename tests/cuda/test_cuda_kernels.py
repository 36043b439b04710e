"""The CUDA kernels (r3mes._native_cuda) against the torch/CPU reference.

Two halves:

* Host tests, run everywhere the module is built (nvcc at build time, no GPU needed): the
  module imports, it carries sm_80 and sm_90 code, the GPU weight layout is the documented
  bijection, the kernels' per-lane programs (host emulation, same fragment code) compute
  the exact integer product, and bad arguments are refused before any launch.
* GPU tests, skipped without a CUDA device: parity with the CPU kernels (integer part
  exact, ternary_linear bit for bit, DoRA within float rounding), odd shapes, poisoned
  outputs, heterogeneous expert batches, factored norms, and compute-sanitizer memcheck.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from visible_gpus import expected_cuda_devices

from r3mes import kernels
from r3mes.kernels import cuda, reference

pytestmark = pytest.mark.skipif(not cuda.compiled(), reason="r3mes._native_cuda was not built")

needs_gpu = pytest.mark.skipif(
    not cuda.available(), reason="needs a CUDA device (torch.cuda and r3mes._native_cuda)"
)

ODD_SHAPES = [(1, 1), (3, 255), (17, 257), (33, 1000), (1001, 64), (5, 63), (2, 65)]  # (N, K)


def _finished(out: torch.Tensor, used: str, kernel: str) -> torch.Tensor:
    """Wait for the launch, check the binding ran the kernel asked for, return out on CPU."""
    torch.cuda.synchronize()
    if kernel != "auto":
        assert used == kernel
    return out.cpu()


def _native():
    from r3mes import _native_cuda

    return _native_cuda


def _ternary(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)


def _reference_pack(t: np.ndarray) -> np.ndarray:
    """The layout of csrc/cuda/layout.h written out from its comment, weight by weight."""
    n, k = t.shape
    kp = -(-k // 64) * 64
    out = np.full((n, kp // 4), 0x55, dtype=np.uint8)  # code 1 (weight 0) everywhere
    for r in range(n):
        for j in range(k):
            c, i, p, b = j // 64, (j % 64) // 16, (j % 16) // 4, j % 4
            byte = 16 * c + 4 * i + b
            cleared = int(out[r, byte]) & ~(3 << 2 * p) & 0xFF
            out[r, byte] = cleared | ((int(t[r, j]) + 1) << 2 * p)
    return out


# ---- host: module, layout, emulation, argument checks ----------------------------------------


def test_module_imports_and_counts_the_devices_torch_sees():
    count = _native().device_count()
    assert isinstance(count, int) and count >= 0
    expected = expected_cuda_devices()
    if expected is not None:
        assert count == expected
    info = cuda.info()
    assert info["device_count"] == count
    assert info["compiled"] is True
    assert info["available"] == (torch.cuda.is_available() and info["device_count"] > 0)


def test_module_carries_code_for_sm80_and_sm90():
    archs = cuda.compiled_architectures()
    assert 80 in archs and 90 in archs, archs


@pytest.mark.parametrize("n,k", ODD_SHAPES + [(4, 2560)])
def test_gpu_repack_round_trips_on_odd_shapes(n, k):
    t = _ternary(n, k, seed=n * 1000 + k)
    packed = _native().repack_ternary(t.numpy())
    assert packed.shape == (n, _native().packed_row_bytes(k))
    assert packed.shape[1] % 16 == 0  # every row a whole number of aligned 16-byte chunks
    np.testing.assert_array_equal(_native().unpack_ternary(packed, k), t.numpy())


@pytest.mark.parametrize("n,k", [(3, 1), (2, 70), (5, 200)])
def test_gpu_repack_is_the_documented_layout_with_zero_padding(n, k):
    t = _ternary(n, k, seed=k).numpy()
    np.testing.assert_array_equal(_native().repack_ternary(t), _reference_pack(t))


def test_gpu_repack_refuses_values_outside_ternary():
    t = np.zeros((3, 10), dtype=np.int8)
    t[1, 3] = 2
    with pytest.raises(ValueError, match=r"value 2 at \[1, 3\]"):
        _native().repack_ternary(t)
    with pytest.raises(ValueError, match="dtype int8"):
        _native().repack_ternary(t.astype(np.int16))


def test_repack_for_gpu_keeps_the_cpu_weight_values():
    w = kernels.quantize_weight(torch.randn(37, 300, generator=torch.Generator().manual_seed(1)))
    packed = cuda.repack_for_gpu(w)
    assert torch.equal(cuda.unpack_gpu_layout(packed, 300), w.unpack())


@pytest.mark.parametrize("kernel", ["gemv", "mma"])
@pytest.mark.parametrize("m", [1, 2, 7, 33])
@pytest.mark.parametrize("n,k", [(1, 1), (3, 255), (17, 257), (33, 1000), (20, 4200)])
def test_emulated_kernel_lanes_compute_the_exact_integer_product(kernel, m, n, k):
    g = torch.Generator().manual_seed(m * 7 + n * 13 + k)
    q = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    t = _ternary(n, k, seed=k + n)
    kp = _native().padded_k(k)
    qp = np.zeros((m, kp), dtype=np.int8)
    qp[:, :k] = q.numpy()
    qsum = q.numpy().astype(np.int32).sum(axis=1).astype(np.int32)
    packed = _native().repack_ternary(t.numpy())
    got = _native().emulate_gemm_int(qp, qsum, packed, k, kernel)
    np.testing.assert_array_equal(got, reference.ternary_matmul_int(q, t).numpy())


def test_api_refuses_cpu_tensors_with_a_clear_error():
    w = cuda.CudaTernaryWeight(torch.zeros(4, 16, dtype=torch.uint8), 1.0, 4, 64)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="x: expected a CUDA tensor, got device cpu"):
        cuda.ternary_linear(x, w)
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        cuda.quantize_activations(x)
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        cuda.dora_linear(x, w, [], torch.zeros(1, 0))
    with pytest.raises(ValueError, match="q: expected a CUDA tensor"):
        cuda.ternary_matmul_int(torch.zeros(2, 64, dtype=torch.int8), w)
    with pytest.raises(TypeError, match="CudaTernaryWeight"):
        cuda.ternary_linear(x, kernels.quantize_weight(torch.randn(4, 64)))
    with pytest.raises(ValueError, match="kernel"):
        cuda.ternary_linear(x, w, kernel="wgmma")


def test_copying_a_weight_to_a_non_cuda_device_is_refused():
    w = kernels.quantize_weight(torch.randn(4, 64))
    with pytest.raises(ValueError, match="expected a CUDA device, got cpu"):
        cuda.CudaTernaryWeight.from_cpu(w, "cpu")


@pytest.mark.skipif(cuda.available(), reason="checks the behaviour without a GPU")
def test_without_a_device_the_api_says_so():
    w = kernels.quantize_weight(torch.randn(4, 64))
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda.CudaTernaryWeight.from_cpu(w)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda.prepare_dora_adapter_cuda(torch.zeros(2, 64), torch.zeros(4, 2), torch.ones(4), 1.0)
    assert not cuda.available()


def _gemm_kwargs(**over):
    # Pointers that pass validation never reach these tests: each call below breaks one rule.
    args = dict(q=4096, qsum=8192, x_scale=12288, packed=16384, m=2, n=3, k=64, w_scale=1.0,
                bias=0, out=20480, out_i32=0, stream=0, kernel="auto")
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,message",
    [
        ({"q": 0}, "q: null device pointer"),
        ({"packed": 0}, "packed: null device pointer"),
        ({"packed": 16384 + 8}, "packed: device pointer not aligned to 16 bytes"),
        ({"q": 4096 + 4}, "q: device pointer not aligned to 16 bytes"),
        ({"qsum": 8192 + 2}, "qsum: device pointer not aligned to 4 bytes"),
        ({"x_scale": 0}, "x_scale: null device pointer"),
        ({"k": 0}, r"K \(in_features\) must be in"),
        ({"k": (1 << 22) + 1}, r"K \(in_features\) must be in"),
        ({"n": 0}, r"N \(out_features\) must be in"),
        ({"m": -1}, r"M \(tokens\) must be >= 0"),
        ({"out": 0}, "exactly one of out"),
        ({"out_i32": 24576}, "exactly one of out"),
        ({"w_scale": 0.0}, "w_scale must be a positive finite number"),
        ({"w_scale": float("nan")}, "w_scale must be a positive finite number"),
        ({"kernel": "tiled"}, "kernel: expected 'auto', 'gemv' or 'mma'"),
    ],
)
def test_native_gemm_refuses_bad_arguments_before_any_launch(over, message):
    with pytest.raises(ValueError, match=message):
        _native().ternary_gemm(**_gemm_kwargs(**over))


def test_native_dora_refuses_too_many_adapters_and_bad_mix_rows():
    ad = (4096, 8192, 12288, 4, 1.0, True)
    base = dict(x=4096, q=4096, x_scale=8192, qsum=8192, z=4096, packed=16384, m=2, n=3, k=64,
                w_scale=1.0, bias=0, mix=4096, mix_rows=1, base_weight=0, out=20480, stream=0)
    n_max = _native().max_adapters
    with pytest.raises(ValueError, match=f"at most {n_max}"):
        _native().dora_linear(**{**base, "adapters": [ad] * (n_max + 1)})
    with pytest.raises(ValueError, match="mix: expected 1 row or one per token"):
        _native().dora_linear(**{**base, "adapters": [ad], "mix_rows": 3})
    with pytest.raises(ValueError, match=r"adapters\[0\]: rank must be > 0"):
        _native().dora_linear(**{**base, "adapters": [(4096, 8192, 12288, 0, 1.0, True)]})
    with pytest.raises(ValueError, match=r"adapters\[1\].A: null device pointer"):
        _native().dora_linear(**{**base, "adapters": [ad, (0, 8192, 12288, 4, 1.0, True)]})


def test_native_row_norms_refuses_bad_rank_and_scale():
    base = dict(packed=16384, n=3, k=64, w_scale=1.0, lora_A=4096, lora_B=8192, rank=4,
                scaling=1.0, gram=4096, norms=8192, stream=0)
    with pytest.raises(ValueError, match="rank must be in"):
        _native().dora_row_norms(**{**base, "rank": 0})
    with pytest.raises(ValueError, match="w_scale"):
        _native().dora_row_norms(**{**base, "w_scale": -1.0})


# ---- GPU: parity with the CPU kernels -----------------------------------------------------------


def _cpu_weight(n: int, k: int, seed: int) -> kernels.TernaryWeight:
    return kernels.quantize_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))


def _activations(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g))
    if m > 2:
        x[1] = 0.0  # absmax below the 1e-5 clamp
        x[2, : max(1, k // 3)] *= 100.0  # one dominant block
    return x


@needs_gpu
@pytest.mark.parametrize("m,k", [(1, 1), (2, 255), (7, 257), (33, 1000), (128, 2560)])
def test_quantize_activations_matches_the_cpu_bit_for_bit(m, k):
    x = _activations(m, k, seed=m + k)
    q, s = cuda.quantize_activations(x.cuda())
    q_ref, s_ref = reference.quantize_activations(x)
    assert torch.equal(q.cpu(), q_ref)
    assert torch.equal(s.cpu(), s_ref)


@needs_gpu
def test_a_token_with_nan_gets_nan_outputs_and_check_finite_raises():
    w = cuda.CudaTernaryWeight.from_cpu(_cpu_weight(9, 70, 0))
    x = torch.randn(3, 70, device="cuda")
    x[1, 5] = float("nan")
    y = cuda.ternary_linear(x, w)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()
    with pytest.raises(ValueError, match="NaN or Inf"):
        cuda.ternary_linear(x, w, check_finite=True)


def _poisoned_gemm(x_gpu, w, kernel, integer, bias=None):
    """Runs the native GEMM into an output pre-filled with poison; returns the output."""
    mod = _native()
    m, k = x_gpu.shape
    dev = x_gpu.device
    q = torch.full((m, mod.padded_k(k)), 99, dtype=torch.int8, device=dev)  # pad poisoned too
    s = torch.empty(m, dtype=torch.float32, device=dev)
    qsum = torch.empty(m, dtype=torch.int32, device=dev)
    stream = torch.cuda.current_stream().cuda_stream
    mod.quantize_activations(x_gpu.data_ptr(), m, k, q.data_ptr(), s.data_ptr(), qsum.data_ptr(),
                             stream)
    if integer:
        out = torch.full((m, w.out_features), -(2**31), dtype=torch.int32, device=dev)
        used = mod.ternary_gemm(q.data_ptr(), qsum.data_ptr(), 0, w.packed.data_ptr(), m,
                                w.out_features, k, w.scale, 0, 0, out.data_ptr(), stream, kernel)
    else:
        out = torch.full((m, w.out_features), float("nan"), device=dev)
        used = mod.ternary_gemm(q.data_ptr(), qsum.data_ptr(), s.data_ptr(), w.packed.data_ptr(),
                                m, w.out_features, k, w.scale,
                                0 if bias is None else bias.data_ptr(), out.data_ptr(), 0, stream,
                                kernel)
    return _finished(out, used, kernel)


@needs_gpu
@pytest.mark.parametrize("kernel", ["gemv", "mma"])
@pytest.mark.parametrize("m", [1, 2, 7, 33, 128])
@pytest.mark.parametrize("n,k", [(1, 1), (3, 255), (1001, 257), (17, 1000), (64, 2560)])
def test_integer_product_is_exact_and_every_output_is_written(kernel, m, n, k):
    tw = _cpu_weight(n, k, seed=n + k)
    w = cuda.CudaTernaryWeight.from_cpu(tw)
    x = _activations(m, k, seed=m * 31 + k)
    got = _poisoned_gemm(x.cuda(), w, kernel, integer=True)
    q, _ = reference.quantize_activations(x)
    assert torch.equal(got, reference.ternary_matmul_int(q, tw.unpack()))


@needs_gpu
@pytest.mark.parametrize("kernel", ["auto", "gemv", "mma"])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 33])
@pytest.mark.parametrize("n,k", [(3, 255), (1001, 257), (70, 1000)])
def test_ternary_linear_equals_the_cpu_kernel_bit_for_bit(kernel, m, n, k):
    tw = _cpu_weight(n, k, seed=3 * n + k)
    w = cuda.CudaTernaryWeight.from_cpu(tw)
    x = _activations(m, k, seed=m + 5 * k)
    bias = torch.randn(n)
    got = _poisoned_gemm(x.cuda(), w, kernel, integer=False, bias=bias.cuda())
    assert not torch.isnan(got).any()
    assert torch.equal(got, kernels.ternary_linear(x, tw, bias))
    y = cuda.ternary_linear(x.cuda().reshape(1, m, k), w, kernel=kernel)
    assert y.shape == (1, m, n)
    assert torch.equal(y.cpu()[0], kernels.ternary_linear(x, tw))


@needs_gpu
def test_ternary_matmul_int_api_matches_the_reference():
    tw = _cpu_weight(19, 333, seed=4)
    w = cuda.CudaTernaryWeight.from_cpu(tw)
    q = torch.randint(-128, 128, (5, 333), dtype=torch.int8)
    for kernel in ("gemv", "mma"):
        got = cuda.ternary_matmul_int(q.cuda(), w, kernel=kernel).cpu()
        assert torch.equal(got, reference.ternary_matmul_int(q, tw.unpack()))


def _cpu_adapter(w, rank, seed, storage):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, w.in_features, generator=g) * 0.05
    b = torch.randn(w.out_features, rank, generator=g) * 0.05
    m = torch.rand(w.out_features, generator=g) + 0.5
    s = 2.0 / rank
    gain = kernels.dora_gain(m, kernels.dora_row_norms(w, a, b, s))
    return kernels.prepare_dora_adapter(a, b, gain, s, storage)


def _poisoned_dora(x, w, adapters, mix, bias, base_weight, kernel):
    mod = _native()
    m, k = x.shape
    dev = x.device
    z_cols = sum(ad.rank for ad in adapters)
    q = torch.full((m, mod.padded_k(k)), 99, dtype=torch.int8, device=dev)
    s = torch.full((m,), float("nan"), device=dev)
    qsum = torch.full((m,), 12345, dtype=torch.int32, device=dev)
    z = torch.full((m, z_cols), float("nan"), device=dev)
    out = torch.full((m, w.out_features), float("nan"), device=dev)
    used = mod.dora_linear(
        x.data_ptr(), q.data_ptr(), s.data_ptr(), qsum.data_ptr(), z.data_ptr(),
        w.packed.data_ptr(), m, w.out_features, k, w.scale, 0 if bias is None else bias.data_ptr(),
        [ad.native() for ad in adapters], mix.data_ptr(), mix.shape[0],
        0 if base_weight is None else base_weight.data_ptr(), out.data_ptr(),
        torch.cuda.current_stream().cuda_stream, kernel)
    return _finished(out, used, kernel)


@needs_gpu
@pytest.mark.parametrize("kernel", ["gemv", "mma"])
@pytest.mark.parametrize("storage", ["fp32", "fp16"])
@pytest.mark.parametrize("n_experts", [1, 2, 3])
@pytest.mark.parametrize("rank", [4, 8, 16, 64])
def test_fused_dora_matches_the_unfused_reference(kernel, storage, n_experts, rank):
    tw = _cpu_weight(70, 300, seed=rank)
    w = cuda.CudaTernaryWeight.from_cpu(tw)
    cpu_ads = [_cpu_adapter(tw, rank, 10 * rank + e, storage) for e in range(n_experts)]
    gpu_ads = [cuda.CudaDoRAAdapter.from_cpu(ad) for ad in cpu_ads]
    x = torch.randn(3, 300)
    mix = torch.softmax(torch.randn(1, n_experts), dim=1)
    got = _poisoned_dora(x.cuda(), w, gpu_ads, mix.cuda(), None, None, kernel)
    ref = kernels.dora_linear_reference(x, tw, cpu_ads, mix)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("kernel", ["gemv", "mma"])
@pytest.mark.parametrize("m", [6, 33])
def test_fused_dora_heterogeneous_batch_with_bias_and_base_weight(kernel, m):
    tw = _cpu_weight(1001, 257, seed=m)
    w = cuda.CudaTernaryWeight.from_cpu(tw)
    cpu_ads = [_cpu_adapter(tw, r, 40 + r, "fp16") for r in (4, 16, 8)]
    gpu_ads = [cuda.CudaDoRAAdapter.from_cpu(ad) for ad in cpu_ads]
    x = torch.randn(m, 257)
    rows = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0.2, 0.3, 0.5], [0, 1.0, 0], [0, 0.5, 0.5],
                         [0, 0, 1.0]])
    mix = rows.repeat(-(-m // 6), 1)[:m]
    base_weight = torch.rand(m)
    bias = torch.randn(1001)
    got = _poisoned_dora(x.cuda(), w, gpu_ads, mix.cuda(), bias.cuda(), base_weight.cuda(), kernel)
    ref = kernels.dora_linear_reference(x, tw, cpu_ads, mix, bias, base_weight)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # an expert-free token is exactly the bare layer
    assert torch.equal(got[1], kernels.ternary_linear(x[1:2], tw, bias)[0])
    api = cuda.dora_linear(x.cuda(), w, gpu_ads, mix, bias, base_weight, kernel=kernel)
    assert torch.equal(api.cpu(), got)


@needs_gpu
def test_fused_dora_api_refuses_mismatched_adapters_and_mix():
    tw = _cpu_weight(50, 300, seed=1)
    w = cuda.CudaTernaryWeight.from_cpu(tw)
    ad = cuda.CudaDoRAAdapter.from_cpu(_cpu_adapter(tw, 4, 0, "fp32"))
    other = cuda.CudaDoRAAdapter.from_cpu(_cpu_adapter(_cpu_weight(51, 300, 2), 4, 0, "fp32"))
    x = torch.randn(2, 300, device="cuda")
    with pytest.raises(ValueError, match=r"adapters\[0\]: shape"):
        cuda.dora_linear(x, w, [other], torch.ones(1, 1))
    with pytest.raises(ValueError, match="mix"):
        cuda.dora_linear(x, w, [ad], torch.ones(3, 1))
    with pytest.raises(ValueError, match="mix: contains NaN"):
        cuda.dora_linear(x, w, [ad], torch.tensor([[float("nan")]]))


@needs_gpu
@pytest.mark.parametrize("out,inp,rank", [(33, 300, 4), (64, 256, 16), (7, 513, 64), (100, 40, 8)])
def test_factored_row_norms_match_dense_float64(out, inp, rank):
    tw = _cpu_weight(out, inp, seed=rank)
    w = cuda.CudaTernaryWeight.from_cpu(tw)
    g = torch.Generator().manual_seed(7)
    a = torch.randn(rank, inp, generator=g)
    b = torch.randn(out, rank, generator=g) * 0.1
    s = 1.7
    dense = torch.linalg.vector_norm(tw.dequantize().double() + s * (b.double() @ a.double()),
                                     dim=1)
    got = cuda.dora_row_norms(w, a.cuda(), b.cuda(), s).cpu()
    # dense W0 is T / s_w rounded to float32 (tw.dequantize()): agreement to float rounding
    torch.testing.assert_close(got, dense, rtol=2e-6, atol=0)


@needs_gpu
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="needs compute-sanitizer")
def test_compute_sanitizer_memcheck_is_clean_on_the_test_shapes():
    script = Path(__file__).with_name("sanitizer_workload.py")
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # exact buffer bounds
    proc = subprocess.run(
        ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "99",
         "--leak-check", "no", sys.executable, str(script)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    report = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, report
    assert "ERROR SUMMARY: 0 errors" in proc.stdout + proc.stderr, report
