"""Paged (continuous-batching) decode: rows of different sequences at different positions in
one native call, each bit-identical to the same sequence decoded alone."""

from __future__ import annotations

import pytest
import torch

from r3mes import kernels
from r3mes.core.dora import set_adapter_mix
from r3mes.core.kv_blocks import KVBlockPool, KVCacheFull
from r3mes.core.model import BitNetForCausalLM

from .test_native_decode import _add_experts, _model, native_running, use_native

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs the native module")

EXPERTS = ["e0", "e1", "e2"]
# (prompt, mix): different lengths, different mixes, one row on the base model alone.
ROWS = [
    ([5, 9, 13, 2, 7, 100, 31], [("e0", 1.0)]),
    ([44, 3], [("e1", 0.3), ("e2", 0.7)]),
    ([8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 19], []),
    ([250, 1, 77, 64], [("e2", 0.5), ("e0", 0.25), ("e1", 0.25)]),
    ([12, 13, 14, 15, 16], [("e0", 0.6), ("e2", 0.4)]),
]


@pytest.fixture(scope="module")
def model() -> BitNetForCausalLM:
    m = _model()
    _add_experts(m, EXPERTS)
    for module in m.linear_modules().values():
        module.storage = "int8"
    return m


@pytest.fixture(params=[1, 2, 4])
def threads(request: pytest.FixtureRequest):
    before = kernels.get_num_threads()
    kernels.set_num_threads(request.param)
    yield request.param
    kernels.set_num_threads(before)


def _set_rows(model: BitNetForCausalLM, mixes: list[list[tuple[str, float]]]) -> None:
    set_adapter_mix(model, mixes[0] if len(mixes) == 1 else mixes)


def _run(model: BitNetForCausalLM, rows: list[int], steps: int, block_size: int = 4,
         stagger: bool = False, dtype: torch.dtype = torch.float32,
         pools: list[KVBlockPool] | None = None) -> dict[int, list[torch.Tensor]]:
    """Greedy decode of ROWS[rows] in one pool (of ``dtype``; appended to ``pools``); with
    ``stagger`` row i joins at step i (so rows of different ages share every step). Returns
    each row's logits per step."""
    pool = KVBlockPool(model.config, num_blocks=64, block_size=block_size, dtype=dtype)
    if pools is not None:
        pools.append(pool)
    state: dict[int, dict] = {}
    out: dict[int, list[torch.Tensor]] = {r: [] for r in rows}
    pending = list(rows)
    for _ in range(steps + (len(rows) if stagger else 0)):
        joining = pending[:1] if stagger else pending[:]
        for r in joining:
            prompt, mix = ROWS[r]
            blocks = pool.allocate(pool.blocks_for(len(prompt) + steps + 1))
            _set_rows(model, [mix])
            logits = model.prefill_paged(prompt, pool, blocks)
            state[r] = {"blocks": blocks, "pos": len(prompt), "tok": int(logits.argmax())}
            out[r].append(logits)
            pending.remove(r)
        live = [r for r in state if len(out[r]) <= steps]
        if not live:
            break
        _set_rows(model, [ROWS[r][1] for r in live])
        logits = model.decode_paged(
            torch.tensor([state[r]["tok"] for r in live]), pool,
            KVBlockPool.table([state[r]["blocks"] for r in live]),
            torch.tensor([state[r]["pos"] for r in live]))
        for i, r in enumerate(live):
            out[r].append(logits[i])
            state[r]["pos"] += 1
            state[r]["tok"] = int(logits[i].argmax())
    return out


def test_batched_rows_equal_each_row_alone_bit_for_bit(model, threads) -> None:
    use_native(model, True)
    alone = {r: _run(model, [r], steps=6)[r] for r in range(len(ROWS))}
    for rows in ([0, 1], [0, 1, 2], list(range(len(ROWS)))):
        together = _run(model, rows, steps=6)
        for r in rows:
            assert all(torch.equal(a, b) for a, b in zip(alone[r], together[r], strict=True)), r
    staggered = _run(model, list(range(len(ROWS))), steps=6, stagger=True)
    for r in range(len(ROWS)):
        assert all(torch.equal(a, b) for a, b in zip(alone[r], staggered[r], strict=True)), r
    assert native_running(model), "the native decode layers must have run"


def test_rows_on_a_half_cache_equal_each_row_alone_bit_for_bit(model, threads) -> None:
    use_native(model, True)
    half = torch.float16
    alone = {r: _run(model, [r], steps=5, dtype=half)[r] for r in range(len(ROWS))}
    together = _run(model, list(range(len(ROWS))), steps=5, stagger=True, dtype=half)
    for r in range(len(ROWS)):
        assert all(torch.equal(a, b) for a, b in zip(alone[r], together[r], strict=True)), r


def test_a_half_cache_stores_each_key_and_value_rounded_as_torch(model) -> None:
    """The first decode step's layer-0 key and value depend on nothing the cache held
    before: on a half cache the native layer stores exactly torch's .half() of what a float32
    cache gets. The logits stay near the float32 cache's; the torch path on a half cache
    gives the native one's to float rounding."""
    use_native(model, True)
    pools: list[KVBlockPool] = []
    full = _run(model, [0], steps=1, pools=pools)[0]
    half = _run(model, [0], steps=1, dtype=torch.float16, pools=pools)[0]
    position = len(ROWS[0][0])  # where the first decoded token's key and value went
    block, offset = position // 4, position % 4  # both pools hand out the same blocks
    for name in ("k", "v"):
        stored = getattr(pools[1], name)[0, block, :, offset]
        assert stored.dtype == torch.float16
        assert torch.equal(stored, getattr(pools[0], name)[0, block, :, offset].half()), name
    # Lossy, and the int8 activations amplify it (a value moved across a rounding step):
    # up to ~2% of the logits' range on this small random model; garbage would be far off.
    for a, b in zip(full, half, strict=True):
        assert float((a - b).abs().max()) < 0.1 * float(a.abs().max())
    use_native(model, False)
    try:
        torch_half = _run(model, [0, 1, 3], steps=3, dtype=torch.float16)
    finally:
        use_native(model, True)
    native_half = _run(model, [0, 1, 3], steps=3, dtype=torch.float16)
    for r in native_half:
        for a, b in zip(native_half[r], torch_half[r], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _packed_against_alone(model: BitNetForCausalLM, rows: list[int]):
    """Each of ROWS[rows] prefilled alone, then all in one packed pass, in one pool: the
    alone and packed logits, and each row's (alone, packed) blocks."""
    pool = KVBlockPool(model.config, num_blocks=64, block_size=4)
    alone_logits, blocks = [], []
    for r in rows:
        prompt, mix = ROWS[r]
        mine = pool.allocate(pool.blocks_for(len(prompt)))
        _set_rows(model, [mix])
        alone_logits.append(model.prefill_paged(prompt, pool, mine))
        blocks.append(mine)
    packed_blocks = [pool.allocate(pool.blocks_for(len(ROWS[r][0]))) for r in rows]
    _set_rows(model, [ROWS[r][1] for r in rows for _ in ROWS[r][0]])
    packed = model.prefill_paged_many([ROWS[r][0] for r in rows], pool, packed_blocks)
    return pool, torch.stack(alone_logits), packed, list(zip(blocks, packed_blocks, strict=True))


def test_packed_prefill_equals_each_prompt_alone_bit_for_bit(model, threads) -> None:
    # The prompts of jobs joining at one step, prefilled in one pass on the native kernels
    # (every token a row with its own sequence's mix; attention per sequence): each prompt's
    # logits and every key/value it leaves in the pool are those of its prefill alone.
    rows = [0, 1, 2, 3, 4]
    pool, alone, packed, blocks = _packed_against_alone(model, rows)
    assert packed.shape == (len(rows), model.config.vocab_size)
    assert torch.equal(packed, alone)
    for r, (mine, theirs) in zip(rows, blocks, strict=True):
        n = len(ROWS[r][0])
        for layer in range(model.config.num_hidden_layers):
            want_k, want_v = pool.gather(layer, mine, n)
            got_k, got_v = pool.gather(layer, theirs, n)
            assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v), (r, layer)
    assert (packed[0] - packed[3]).abs().max() > 0  # different prompts and mixes


def test_packed_prefill_on_the_reference_kernels_stays_close(model) -> None:
    # The torch reference's float matmuls round by their shapes, so there a packed pass is
    # only close to each prompt alone (the engine packs on the native backend only).
    with kernels.use_reference():
        _, alone, packed, _ = _packed_against_alone(model, [0, 1, 3])
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


def test_packed_prefill_refuses_what_it_cannot_run(model) -> None:
    pool = KVBlockPool(model.config, num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model.prefill_paged_many([[5, 6], [7]], pool, [pool.allocate(1), pool.allocate(1)])
    with pytest.raises(ValueError, match="token ids"):
        model.prefill_paged_many([[5, 6], [7, 10**9]], pool, [[0], [1]])
    with pytest.raises(ValueError, match="block lists"):
        model.prefill_paged_many([[5, 6], [7, 8]], pool, [[0]])


def test_block_size_does_not_change_results(model) -> None:
    use_native(model, True)
    small = _run(model, [0, 2, 3], steps=5, block_size=1)
    large = _run(model, [0, 2, 3], steps=5, block_size=32)
    for r in small:
        assert all(torch.equal(a, b) for a, b in zip(small[r], large[r], strict=True))


def test_paged_decode_matches_the_contiguous_cache_path(model) -> None:
    """The same sequence through generate()'s left-padded KVCache gives the same logits."""
    use_native(model, True)
    prompt, mix = ROWS[0]
    paged = _run(model, [0], steps=4)[0]
    _set_rows(model, [mix])
    cache = model.new_cache(1, len(prompt) + 5)
    logits = model(torch.tensor([prompt]), cache, last_only=True)[0, -1]
    contiguous = [logits]
    for _ in range(4):
        logits = model(logits.argmax().view(1, 1), cache, last_only=True)[0, -1]
        contiguous.append(logits)
    assert all(torch.equal(a, b) for a, b in zip(paged, contiguous, strict=True))


def test_native_paged_decode_matches_the_torch_reference(model) -> None:
    use_native(model, True)
    native = _run(model, [0, 1, 3], steps=4)
    use_native(model, False)  # the layer ops in torch, caches gathered from blocks
    try:
        torch_path = _run(model, [0, 1, 3], steps=4)
    finally:
        use_native(model, True)
    for r in native:
        for a, b in zip(native[r], torch_path[r], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            assert int(a.argmax()) == int(b.argmax())


def test_block_table_outside_the_pool_is_refused(model) -> None:
    use_native(model, True)
    set_adapter_mix(model, None)
    pool = KVBlockPool(model.config, num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="block_table"):
        model.decode_paged(torch.tensor([3]), pool, torch.tensor([[0, 5]], dtype=torch.int32),
                           torch.tensor([5]))
    with pytest.raises(ValueError, match="pos"):
        model.decode_paged(torch.tensor([3]), pool, torch.tensor([[0, 1]], dtype=torch.int32),
                           torch.tensor([8]))


def test_pool_accounting_and_budget() -> None:
    cfg = _model().config
    per_token = KVBlockPool.bytes_per_token(cfg)
    pool = KVBlockPool.from_budget(cfg, megabytes=per_token * 100 / 2**20, block_size=16)
    assert pool.capacity_tokens == 96 and pool.num_blocks == 6
    assert KVBlockPool.from_budget(cfg, tokens=1000, max_tokens=64).capacity_tokens == 64
    a = pool.allocate(4)
    assert pool.free_blocks == 2 and len(set(a)) == 4
    with pytest.raises(KVCacheFull, match="2 free blocks"):
        pool.allocate(3)
    assert pool.free_blocks == 2  # all or nothing
    pool.release(a)
    assert pool.free_blocks == 6 and pool.used_blocks == 0
    with pytest.raises(ValueError, match="below one block"):
        KVBlockPool.from_budget(cfg, tokens=8, block_size=16)
    with pytest.raises(ValueError, match="exactly one"):
        KVBlockPool.from_budget(cfg, tokens=8, megabytes=1.0)


def test_a_half_pool_holds_twice_the_tokens_of_a_budget() -> None:
    cfg = _model().config
    half = torch.float16
    assert KVBlockPool.bytes_per_token(cfg, half) * 2 == KVBlockPool.bytes_per_token(cfg)
    budget = KVBlockPool.bytes_per_token(cfg) * 100 / 2**20
    full = KVBlockPool.from_budget(cfg, megabytes=budget, block_size=16)
    small = KVBlockPool.from_budget(cfg, megabytes=budget, block_size=16, dtype=half)
    assert (full.capacity_tokens, small.capacity_tokens) == (96, 192)  # 100 and 200 tokens
    assert small.k.dtype == half and small.nbytes == full.nbytes
    with pytest.raises(ValueError, match="float32 or float16"):
        KVBlockPool(cfg, num_blocks=2, dtype=torch.bfloat16)
