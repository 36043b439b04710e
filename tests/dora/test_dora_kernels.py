"""The DoRA kernels against plain torch: fp16 conversion, factored norms, fused mix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r3mes import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native module not built")

LEVELS = list(kernels.info()["supported_simd_levels"]) if kernels.available() else []


def _weight(out: int, inp: int, seed: int = 0) -> kernels.TernaryWeight:
    g = torch.Generator().manual_seed(seed)
    return kernels.quantize_weight(torch.randn(out, inp, generator=g))


def _adapter(w, rank, seed, storage, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, w.in_features, generator=g) * scale
    b = torch.randn(w.out_features, rank, generator=g) * scale
    m = torch.rand(w.out_features, generator=g) + 0.5
    s = 2.0 / rank
    gain = kernels.dora_gain(m, kernels.dora_row_norms(w, a, b, s))
    return kernels.prepare_dora_adapter(a, b, gain, s, storage), (a, b, m, s)


def test_fp16_conversion_matches_ieee_round_to_nearest_even():
    x = np.concatenate([
        np.random.default_rng(0).standard_normal(10000) * 10.0 ** np.arange(-7, 3).repeat(1000),
        np.array([0.0, -0.0, 65504.0, 65520.0, 1e-8, 5.96e-8, 6.1e-5, -3.0e-5, np.inf], np.float32),
    ]).astype(np.float32)
    ours = kernels._native.fp16_round(x)
    with np.errstate(over="ignore"):  # 65520 and inf overflow to inf on purpose
        want = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(ours, want)


@pytest.mark.parametrize("out,inp,rank", [(33, 300, 4), (64, 256, 16), (7, 513, 64), (100, 40, 8)])
def test_factored_row_norms_match_dense_float64(simd_level, out, inp, rank):
    w = _weight(out, inp, seed=rank)
    g = torch.Generator().manual_seed(7)
    a = torch.randn(rank, inp, generator=g)
    b = torch.randn(out, rank, generator=g) * 0.1
    s = 1.7
    dense = torch.linalg.vector_norm(w.dequantize().double() + s * (b.double() @ a.double()), dim=1)
    torch.testing.assert_close(kernels.dora_row_norms(w, a, b, s), dense, rtol=2e-6, atol=0)


def test_ternary_float_matmul_matches_dense(simd_level):
    w = _weight(77, 300)
    a = torch.randn(5, 300)
    torch.testing.assert_close(kernels.ternary_float_matmul(w, a),
                               (w.dequantize().double() @ a.double().t()).float(),
                               rtol=1e-5, atol=1e-5)


def _unfused(x, w, raw, mix, bias=None):
    """Each expert's DoRA output from the raw fp32 tensors, then the weighted sum."""
    base = kernels.reference.ternary_linear(x, w.unpack(), w.scale)
    w0 = w.dequantize().double()
    y = torch.zeros_like(base)
    mix = mix.expand(x.shape[0], len(raw))
    for e, (a, b, m, s) in enumerate(raw):
        gain = m.double() / torch.linalg.vector_norm(w0 + s * (b.double() @ a.double()), dim=1)
        y = y + mix[:, e:e + 1] * (gain.float() * (base + s * (x @ a.t()) @ b.t()))
    y = torch.where((mix == 0).all(dim=1, keepdim=True), base, y)
    return y if bias is None else y + bias


@pytest.mark.parametrize("n_experts", [1, 2, 3])
@pytest.mark.parametrize("rank", [4, 8, 16, 64])
def test_fused_kernel_matches_unfused_reference(simd_level, n_experts, rank):
    w = _weight(70, 300, seed=rank)  # odd sizes: 70 rows (not a tile multiple), K=300
    made = [_adapter(w, rank, 10 * rank + e, "fp32") for e in range(n_experts)]
    x = torch.randn(3, 300)
    mix = torch.softmax(torch.randn(1, n_experts), dim=1)
    y = kernels.dora_linear(x, w, [m[0] for m in made], mix)
    torch.testing.assert_close(y, _unfused(x, w, [m[1] for m in made], mix), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("storage", ["fp32", "fp16", "int8"])
def test_prepared_mix_gives_the_one_shot_result(simd_level, storage):
    # A mix prepared once (gains summed into one factor a row) against dora_linear, which
    # sums them as it goes: per-token mixes with an expert-free row and a base weight, and
    # one mix for every token; 131 rows leave a partial 16-row tile.
    w = _weight(131, 300, seed=21)
    made = [_adapter(w, r, 110 + r, storage)[0] for r in (16, 4, 7)]
    x = torch.randn(4, 300)
    bias = torch.randn(131)
    per_token = torch.tensor([[0.5, 0.25, 0.25], [0, 0, 0], [0, 1.0, 0], [0.1, 0.2, 0.3]])
    base_w = torch.tensor([0.0, 0.0, 0.0, 0.4])
    prepared = kernels.prepare_dora_mix(made, per_token, base_w)
    assert prepared.base_factor.shape == (4, 131)
    assert torch.equal(prepared.base_factor[1], torch.ones(131))  # no expert: the bare base
    y = kernels.dora_mix_linear(x, w, prepared, bias)
    torch.testing.assert_close(y, kernels.dora_linear(x, w, made, per_token, bias, base_w),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, kernels.dora_linear_reference(x, w, made, per_token, bias,
                                                                base_w), rtol=1e-5, atol=1e-5)
    one = torch.tensor([[0.2, 0.5, 0.3]])
    y1 = kernels.dora_mix_linear(x, w, kernels.prepare_dora_mix(made, one))
    torch.testing.assert_close(y1, kernels.dora_linear(x, w, made, one), rtol=1e-6, atol=1e-6)
    assert (y1 - kernels.ternary_linear(x, w)).abs().max() > 1e-3  # the adapters act


@pytest.mark.parametrize("storage", ["fp32", "int8"])
def test_threaded_fused_layer_is_the_same_at_every_thread_count_and_batch_size(simd_level, storage):
    # Big enough for the worker threads (the small cases above run inline): the A pass is
    # split into one task a worker, claimed inside the row chunks, its tasks cutting across
    # adapters (ranks 16, 4, 12 with 1-4 threads); one token quantises x once per task.
    # Every row's result is an exact integer sum then the same float steps, so the output
    # cannot depend on the split: bit for bit, at every thread count, in a batch or alone.
    w = _weight(1000, 1111, seed=31)
    made = [_adapter(w, r, 120 + r, storage)[0] for r in (16, 4, 12)]
    x = torch.randn(3, 1111)
    mix = torch.tensor([[0.5, 0.2, 0.3]])
    prepared = kernels.prepare_dora_mix(made, mix)
    outs = []
    try:
        for n in (1, 2, 3, 4):
            kernels.set_num_threads(n)
            outs.append(kernels.dora_mix_linear(x, w, prepared))
            alone = torch.cat([kernels.dora_mix_linear(x[i:i + 1], w, prepared) for i in range(3)])
            assert torch.equal(alone, outs[-1]), f"{n} threads: one token at a time differs"
    finally:
        kernels.set_num_threads(0)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    torch.testing.assert_close(outs[0], kernels.dora_linear_reference(x, w, made, mix),
                               rtol=1e-5, atol=1e-5)
    assert (outs[0] - kernels.ternary_linear(x, w)).abs().max() > 1e-3  # the adapters act


@pytest.mark.parametrize("storage", ["int8", "fp16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_batch_of_own_mixes_equals_each_row_alone(simd_level, storage, threads):
    # A decode batch where every row has its own mix (some share adapters, one has none):
    # the SIMD epilogues go adapter by adapter over the batch's rows, each adapter's B tile
    # widened once for all the rows using it. Every row must come out as it does alone.
    w = _weight(203, 600, seed=8)
    made = [_adapter(w, r, 90 + e, storage)[0] for e, r in enumerate((16, 16, 8, 4, 16))]
    x = torch.randn(9, 600, generator=torch.Generator().manual_seed(9))
    mix = torch.tensor([[0.5, 0.5, 0, 0, 0], [0, 1.0, 0, 0, 0], [0, 0, 0, 0, 0],
                        [0.2, 0.3, 0.5, 0, 0], [0, 0, 0.4, 0.6, 0], [1.0, 0, 0, 0, 0],
                        [0, 0.3, 0, 0.3, 0.4], [0, 0, 0, 0, 1.0], [0.1, 0.1, 0.1, 0.1, 0.6]])
    bias = torch.randn(203)
    base_w = torch.rand(9)
    kernels.set_num_threads(threads)
    try:
        batch = kernels.dora_linear(x, w, made, mix, bias, base_w)
        alone = torch.cat([kernels.dora_linear(x[i:i + 1], w, made, mix[i:i + 1], bias,
                                               base_w[i:i + 1]) for i in range(9)])
    finally:
        kernels.set_num_threads(0)
    assert torch.equal(batch, alone)
    torch.testing.assert_close(batch, kernels.dora_linear_reference(x, w, made, mix, bias,
                                                                    base_w),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 3])
def test_many_rows_sharing_adapters_each_equal_the_row_alone(simd_level, threads):
    # 37 rows sharing int8 adapters of ranks 6 and 13 (the A pass's four-row blocks with
    # tails, its tasks cutting across tokens and adapters): each row comes out exactly as it
    # does alone.
    w = _weight(150, 700, seed=12)
    made = [_adapter(w, r, 70 + r, "int8")[0] for r in (6, 13)]
    x = torch.randn(37, 700, generator=torch.Generator().manual_seed(13))
    mix = torch.stack([torch.tensor([1.0, 0.0]) if i % 5 == 0 else
                       torch.tensor([0.0, 1.0]) if i % 5 == 1 else
                       torch.tensor([0.4, 0.6]) for i in range(37)])
    kernels.set_num_threads(threads)
    try:
        batch = kernels.dora_linear(x, w, made, mix)
        alone = torch.cat([kernels.dora_linear(x[i:i + 1], w, made, mix[i:i + 1])
                           for i in range(37)])
    finally:
        kernels.set_num_threads(0)
    assert torch.equal(batch, alone)
    torch.testing.assert_close(batch, kernels.dora_linear_reference(x, w, made, mix),
                               rtol=1e-5, atol=1e-5)


def test_prepared_mix_rejects_what_does_not_fit():
    w = _weight(40, 64, seed=22)
    made = [_adapter(w, 4, 120 + e, "int8")[0] for e in range(2)]
    with pytest.raises(ValueError, match="at least one adapter"):
        kernels.prepare_dora_mix([], torch.ones(1, 0))
    with pytest.raises(ValueError, match="mix"):
        kernels.prepare_dora_mix(made, torch.ones(1, 3))
    with pytest.raises(ValueError, match="NaN"):
        kernels.prepare_dora_mix(made, torch.tensor([[float("nan"), 1.0]]))
    other = _adapter(_weight(48, 64), 4, 1, "int8")[0]
    with pytest.raises(ValueError, match="differs"):
        kernels.prepare_dora_mix([made[0], other], torch.ones(1, 2))
    prepared = kernels.prepare_dora_mix(made, torch.ones(3, 2) / 2)
    with pytest.raises(ValueError, match="3 rows"):
        kernels.dora_mix_linear(torch.randn(2, 64), w, prepared)
    with pytest.raises(TypeError, match="DoRAMix"):
        kernels.dora_mix_linear(torch.randn(1, 64), w, torch.ones(1, 2))
    with pytest.raises(ValueError, match="out_features|match"):
        kernels.dora_mix_linear(torch.randn(3, 64), _weight(41, 64), prepared)
    with pytest.raises(ValueError, match="in_features|expected"):
        kernels.dora_mix_linear(torch.randn(3, 128), _weight(40, 128), prepared)


def test_fused_kernel_heterogeneous_batch_with_bias(simd_level):
    w = _weight(129, 520, seed=3)
    made = [_adapter(w, r, 40 + r, "fp32") for r in (4, 16, 8)]
    x = torch.randn(6, 520)
    mix = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0.2, 0.3, 0.5], [0, 1.0, 0], [0, 0.5, 0.5],
                        [0, 0, 1.0]])
    bias = torch.randn(129)
    y = kernels.dora_linear(x, w, [m[0] for m in made], mix, bias)
    ref = _unfused(x, w, [m[1] for m in made], mix, bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # the expert-free row is exactly the bare layer
    torch.testing.assert_close(y[1], kernels.ternary_linear(x[1:2], w, bias)[0], rtol=0, atol=0)


def test_fused_kernel_fp16_storage_matches_its_reference_and_stays_close_to_fp32(simd_level):
    w = _weight(200, 256, seed=5)
    made16 = [_adapter(w, 16, 90 + e, "fp16") for e in range(3)]
    made32 = [_adapter(w, 16, 90 + e, "fp32") for e in range(3)]
    x = torch.randn(4, 256)
    mix = torch.tensor([[0.5, 0.25, 0.25]])
    y16 = kernels.dora_linear(x, w, [m[0] for m in made16], mix)
    ref16 = kernels.dora_linear_reference(x, w, [m[0] for m in made16], mix)
    torch.testing.assert_close(y16, ref16, rtol=1e-5, atol=1e-5)
    y32 = kernels.dora_linear(x, w, [m[0] for m in made32], mix)
    adapter_part = (y32 - kernels.ternary_linear(x, w)).abs().max()
    assert (y16 - y32).abs().max() < 2e-3 * adapter_part + 1e-6


def test_fused_kernel_int8_storage_matches_its_reference_and_stays_close_to_fp32(simd_level):
    # Odd sizes: tails in the A-pass dot product (K = 301) and partial 16-row B tiles.
    w = _weight(203, 301, seed=6)
    made8 = [_adapter(w, r, 70 + e, "int8") for e, r in enumerate((16, 4, 8))]
    made32 = [_adapter(w, r, 70 + e, "fp32") for e, r in enumerate((16, 4, 8))]
    x = torch.randn(5, 301)
    mix = torch.tensor([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [0, 0, 0], [0.2, 0.3, 0.5],
                        [1.0, 0, 0]])
    y8 = kernels.dora_linear(x, w, [m[0] for m in made8], mix)
    ref8 = kernels.dora_linear_reference(x, w, [m[0] for m in made8], mix)
    torch.testing.assert_close(y8, ref8, rtol=1e-5, atol=1e-5)
    y32 = kernels.dora_linear(x, w, [m[0] for m in made32], mix)
    adapter_part = (y32 - kernels.ternary_linear(x, w)).abs().max()
    # absmax int8 keeps each entry within half a step (max / 254) of its value; measured
    # here: 2e-6 of what the adapters change
    assert (y8 - y32).abs().max() < 2e-4 * adapter_part
    assert (y8 - y32).abs().max() > 0  # it is not secretly the fp32 path


def test_int8_storage_follows_its_reference_with_an_outlier_activation(simd_level):
    # One activation 10^4 times the others coarsens x's int16 grid (step max|x| / 32767)
    # to a third of a typical entry; the A pass must still follow the reference, which
    # spells the grids out (x per token, then z per token and adapter).
    w = _weight(64, 300, seed=8)
    made = [_adapter(w, r, 80 + e, "int8") for e, r in enumerate((16, 5))]
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(9)) * 0.01
    x[:, 7] = 100.0
    mix = torch.tensor([[0.6, 0.4]])
    y = kernels.dora_linear(x, w, [m[0] for m in made], mix)
    ref = kernels.dora_linear_reference(x, w, [m[0] for m in made], mix)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_int8_storage_with_vanishing_activations_stays_finite(simd_level):
    # max|x| = 1e-35: 32767 / max|x| would overflow float, so the A pass must see x as 0
    # (the kernel and the reference agree) instead of turning it into NaN.
    w = _weight(40, 300, seed=12)
    ad, _ = _adapter(w, 8, 13, "int8")
    x = torch.full((2, 300), 1e-35)
    x[1] = torch.randn(300)  # a normal token next to it is unaffected
    y = kernels.dora_linear(x, w, [ad], torch.ones(1, 1))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, kernels.dora_linear_reference(x, w, [ad], torch.ones(1, 1)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank", [2, 8])
def test_int8_a_pass_sums_exactly_past_int32_range(simd_level, rank):
    # K = 9000 (past the 4096 / 2048 blocks) with every |A8| = 127 and |x16| = 32767:
    # sums of 3.7e10 overflow int32 unless each block is widened to int64. Rank 8 runs the
    # four-rows-at-once A pass, rank 2 the one-row kernel.
    k = 9000
    w = _weight(16, k, seed=10)
    sign = torch.where(torch.arange(k) % 3 == 0, -1.0, 1.0)
    a = torch.ones(rank, k) * 0.01
    b = torch.full((16, rank), 0.02)
    ad = kernels.prepare_dora_adapter(a, b, torch.ones(16), 1.0, "int8")
    x = sign.reshape(1, k)
    y = kernels.dora_linear(x, w, [ad], torch.ones(1, 1))
    ref = kernels.dora_linear_reference(x, w, [ad], torch.ones(1, 1))
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    # (A x)_j = 0.01 * (k - 2 * 3000): the update alone, against the base
    update = y - kernels.ternary_linear(x, w)
    torch.testing.assert_close(update, torch.full((1, 16), rank * 0.02 * 0.01 * (k - 6000)),
                               rtol=1e-4, atol=0)


@pytest.mark.skipif(not {"avx512", "avx512vnni"} <= set(LEVELS),
                    reason="needs a CPU with both AVX-512 levels")
def test_int8_storage_gives_identical_results_with_and_without_vnni():
    # Same integer sums (vpdpwssd vs vpmaddwd + vpaddd), same float steps after them.
    w = _weight(203, 301, seed=11)
    made = [_adapter(w, r, 90 + e, "int8") for e, r in enumerate((16, 3))]
    x = torch.randn(4, 301)
    mix = torch.tensor([[0.7, 0.3]])
    before = kernels.simd_level()
    try:
        out = {}
        for level in ("avx512", "avx512vnni"):
            kernels.set_simd_level(level)
            out[level] = kernels.dora_linear(x, w, [m[0] for m in made], mix)
    finally:
        kernels.set_simd_level(before)
    assert torch.equal(out["avx512"], out["avx512vnni"])


def test_int8_quantisation_of_adapters_is_absmax_per_row_of_a_and_column_of_b():
    w = _weight(40, 64)
    ad, (a, b, _, _) = _adapter(w, 8, 3, "int8")
    a8, g_b8 = ad.effective()
    g_b = ad.g.unsqueeze(1) * b  # the kernel's B carries the gain
    for t, q, dim in ((a, a8, 1), (g_b, g_b8, 0)):
        step = t.abs().amax(dim=dim, keepdim=True) / 127
        assert bool(((q - t).abs() <= step / 2 + 1e-7).all())
        # the largest entry of each row (A) / column (B) is represented exactly
        idx = t.abs().argmax(dim=dim, keepdim=True)
        torch.testing.assert_close(q.gather(dim, idx), t.gather(dim, idx), rtol=1e-6, atol=0)


def test_int8_storage_halves_fp16_bytes():
    w = _weight(64, 256)
    a8, _ = _adapter(w, 16, 1, "int8")
    a16, _ = _adapter(w, 16, 1, "fp16")
    assert a8.native.storage == "int8" and a8.nbytes < 0.6 * a16.nbytes


def test_fp16_storage_halves_the_adapter_bytes():
    w = _weight(64, 256)
    a16, _ = _adapter(w, 16, 1, "fp16")
    a32, _ = _adapter(w, 16, 1, "fp32")
    assert a16.nbytes < 0.6 * a32.nbytes


def test_no_adapters_is_the_bare_ternary_layer():
    w = _weight(50, 300)
    x = torch.randn(2, 300)
    y = kernels.dora_linear(x, w, [], torch.zeros(1, 0))
    assert torch.equal(y, kernels.ternary_linear(x, w))


def test_fused_kernel_refuses_bad_mix_and_bad_input():
    w = _weight(50, 300)
    ad, _ = _adapter(w, 4, 0, "fp32")
    x = torch.randn(2, 300)
    with pytest.raises(ValueError, match="mix"):
        kernels.dora_linear(x, w, [ad], torch.ones(3, 1))
    with pytest.raises(ValueError, match="mix"):
        kernels.dora_linear(x, w, [ad], torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="NaN"):
        kernels.dora_linear(torch.full((1, 300), float("inf")), w, [ad], torch.ones(1, 1))
    other, _ = _adapter(_weight(51, 300), 4, 0, "fp32")
    with pytest.raises(ValueError, match="adapter.*0.*out_features|adapters\\[0\\]"):
        kernels.dora_linear(x, w, [other], torch.ones(1, 1))
    with pytest.raises(ValueError, match="lora_A"):
        kernels.prepare_dora_adapter(torch.full((4, 300), float("nan")), torch.zeros(50, 4),
                                     torch.ones(50), 1.0)


@pytest.mark.skipif(not kernels.available(), reason="native module not built")
def test_adapter_memory_is_returned_when_adapters_go():
    # Adapters share 32 MB slabs of huge-page memory (common/huge_pages.h); a slab must be
    # unmapped once its last adapter is freed, or loading and evicting experts would leak.
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    a = torch.randn(16, 2560) * 0.01
    b = torch.randn(6912, 16) * 0.01
    g = torch.ones(6912)
    keep = kernels.prepare_dora_adapter(a, b, g, 2.0, "int8")  # outlives every round
    start = rss_mb()
    for _ in range(4):
        batch = [kernels.prepare_dora_adapter(a, b, g, 2.0, "int8") for _ in range(300)]
        assert batch[-1].nbytes > 150_000  # ~54 MB a round
        del batch
    assert rss_mb() - start < 60
    x = torch.randn(1, 2560)
    w = kernels.quantize_weight(torch.randn(6912, 2560))
    torch.testing.assert_close(kernels.dora_linear(x, w, [keep], torch.ones(1, 1)),
                               kernels.dora_linear_reference(x, w, [keep], torch.ones(1, 1)),
                               rtol=1e-5, atol=1e-5)
