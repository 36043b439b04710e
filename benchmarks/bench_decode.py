"""Decode speed of a BitNet-b1.58-2B-4T-shaped model on the native CPU backend.

The model has the exact 2B-4T shapes (30 layers, hidden 2560, intermediate 6912, 20 heads,
5 kv heads, vocab 128256, tied int8 head) with random weights built in memory (nothing is
shipped or downloaded). Reported: decode ms/token and tok/s after a 128-token prompt, for
0, 1 and 3 DoRA experts (r=16 on every projection; int8 adapter storage, the native
backend's default, and fp16), next to the bandwidth floor (ternary + head bytes read per
token / the read bandwidth measured in the same run).

    python -m pytest benchmarks/bench_decode.py --benchmark-only -q --table-out decode.md
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from warmup import warm_up

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

CONFIG = BitNetConfig(vocab_size=128256, hidden_size=2560, intermediate_size=6912,
                      num_hidden_layers=30, num_attention_heads=20, num_key_value_heads=5,
                      tie_word_embeddings=True)
PROMPT, DECODE = 128, 32
WARM_UP_STEPS = 16  # at most; see warmup.py
RANK = 16


def _shapes(cfg: BitNetConfig) -> dict[str, tuple[int, int]]:
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
            "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}


def build_model(config: BitNetConfig = CONFIG, head_rows: int | None = None) -> BitNetForCausalLM:
    """The 2B-4T-shaped model with random ternary weights (also used by bench_cuda_decode and
    bench_serving). ``head_rows``: head rows past it are zero (an untied ``config`` then
    only ever predicts the first ``head_rows`` tokens, e.g. a small tokenizer's)."""
    rng = np.random.default_rng(0)
    shapes = _shapes(config)
    layers = []
    for _ in range(config.num_hidden_layers):
        layer = {}
        for name in LINEAR_NAMES:
            out_f, in_f = shapes[name]
            codes = rng.integers(0, 3, (out_f, in_f), dtype=np.int8) - 1
            packed = kernels.TernaryWeight.from_ternary(torch.from_numpy(codes), 1.0)
            layer[name.split(".")[1]] = bitlinear_from_packed(packed)
        layers.append(layer)
    embed = (torch.randn(config.vocab_size, config.hidden_size) * 0.02).to(torch.bfloat16)
    head = embed
    if head_rows is not None:
        head = embed.clone()
        head[head_rows:] = 0
    model = BitNetForCausalLM(config, embed, layers, LMHead.from_float(head))
    NativeDecoder.attach(model)  # decode steps in the native layers, as the native backend runs
    return model


@pytest.fixture(scope="module")
def model() -> BitNetForCausalLM:
    return build_model()


def add_experts(model: BitNetForCausalLM, count: int,
                storage: str = "int8") -> list[tuple[str, float]]:
    """``count`` random r=16 DoRA experts on every projection; returns an equal mix."""
    g = torch.Generator().manual_seed(1)
    names = [f"expert{e}_{storage}" for e in range(count)]
    for module in model.linear_modules().values():
        module.storage = storage
        for name in names:
            if name in module.adapter_names:
                continue
            a = torch.randn(RANK, module.in_features, generator=g) * 0.01
            b = torch.randn(module.out_features, RANK, generator=g) * 0.01
            m = torch.rand(module.out_features, generator=g) + 0.5
            module.load_adapter(name, a, b, m, scaling=2.0)
    return [(n, 1.0 / count) for n in names]


@pytest.mark.parametrize("experts,storage", [(0, "-"), (1, "int8"), (3, "int8"), (3, "fp16")])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode(benchmark, record_row, read_bandwidth, model, threads, experts, storage):
    kernels.set_num_threads(threads)
    torch.set_num_threads(1)  # tiny attention ops: intra-op threads cost more than they save
    mix = add_experts(model, experts, storage) if experts else None
    set_adapter_mix(model, mix)
    cache = model.new_cache(1, PROMPT + WARM_UP_STEPS + DECODE + 8)
    ids = torch.randint(0, CONFIG.vocab_size, (1, PROMPT),
                        generator=torch.Generator().manual_seed(2))
    model(ids, cache, last_only=True)
    token = torch.tensor([[17]])
    step = lambda: model(token, cache, last_only=True)  # noqa: E731
    warm_up(step, max_calls=WARM_UP_STEPS)
    benchmark.pedantic(step, rounds=DECODE - 2, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.median
    sizes = model.num_parameters_bytes()
    per_token = sizes["ternary"] + sizes["lm_head"]
    floor = read_bandwidth[threads] * 1e9 / per_token
    set_adapter_mix(model, None)
    record_row({"bench": "decode 2B-4T shape", "threads": threads, "experts": experts,
                "adapter storage": storage,
                "ms/token": f"{seconds * 1e3:.1f}", "tok/s": f"{1 / seconds:.1f}",
                "floor tok/s": f"{floor:.1f}", "MB read/token": f"{per_token / 1e6:.0f}"})


# --------------------------------------------------------------------------- batched decode
BATCH_EXPERTS = 8  # the experts the rows' mixes are drawn from


def add_batch_experts(model: BitNetForCausalLM) -> list[str]:
    """Eight random r=16 int8 experts on every projection (the pool rows draw mixes from)."""
    names = [f"expert{e}_int8" for e in range(BATCH_EXPERTS)]
    add_experts(model, BATCH_EXPERTS, "int8")
    return names


def row_mix(names: list[str], row: int) -> list[tuple[str, float]]:
    """Row ``row``'s own mix: 1, 2 or 3 experts, a different set for every row."""
    k = 1 + row % 3
    return [(names[(row * 3 + j) % len(names)], 1.0 / k) for j in range(k)]


def batch_step(model: BitNetForCausalLM, batch: int, with_experts: bool,
               position: int = PROMPT, first_row: int = 0,
               mix_of: Callable[[list[str], int], list[tuple[str, float]]] = row_mix,
               kv_dtype: torch.dtype = torch.float32):
    """A decode step of ``batch`` sequences at different positions of a block pool (row b
    at ``position + 7 b``, each with its own expert mix when ``with_experts``), as the
    serving engine runs it. ``first_row``: the rows are b = first_row, first_row + 1, ...
    (``batch=1, first_row=b``: row b of a batch run alone, its own mix and position).
    ``mix_of(names, b)``: row b's mix. ``kv_dtype``: the cache's element type."""
    from r3mes.core.kv_blocks import KVBlockPool

    names = add_batch_experts(model) if with_experts else []
    rows = range(first_row, first_row + batch)
    mixes = [mix_of(names, b) if names else [] for b in rows]
    set_adapter_mix(model, mixes if batch > 1 else (mixes[0] or None))
    per_row = (position + 7 * rows[-1]) // 16 + 1
    pool = KVBlockPool(model.config, num_blocks=batch * per_row, block_size=16,
                       dtype=kv_dtype)
    blocks = [pool.allocate(per_row) for _ in range(batch)]
    table = KVBlockPool.table(blocks)
    positions = torch.tensor([position + 7 * b for b in rows])
    tokens = torch.tensor([17 + b for b in rows])
    return lambda: model.decode_paged(tokens, pool, table, positions)


@pytest.mark.parametrize("with_experts", [False, True])
@pytest.mark.parametrize("batch", [1, 2, 4, 8, 16])
def test_batched_decode(benchmark, record_row, model, batch, with_experts):
    kernels.set_num_threads(2)
    torch.set_num_threads(1)
    step = batch_step(model, batch, with_experts)
    warm_up(step, max_calls=WARM_UP_STEPS)
    benchmark.pedantic(step, rounds=12, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.median
    set_adapter_mix(model, None)
    record_row({"bench": "batched decode 2B-4T shape", "threads": 2, "rows": batch,
                "mixes": "own 1-3 of 8 int8 experts" if with_experts else "none",
                "ms/step": f"{seconds * 1e3:.1f}", "aggregate tok/s": f"{batch / seconds:.1f}"})


def step_seconds(step) -> float:
    """Seconds a call of ``step`` takes: warmed up, then the mean of 8 calls."""
    warm_up(step, max_calls=WARM_UP_STEPS)
    t0 = time.perf_counter()
    for _ in range(8):
        step()
    return (time.perf_counter() - t0) / 8


def batched_main() -> None:
    """Each batch size against one row in the same run, cases alternated in blocks. Two
    baselines: row 0 alone (one expert: the fastest single stream), and the batch's own rows
    each run alone, one after another (each with its own 1-3 experts and position: the
    time the batch saves)."""
    import argparse

    ap = argparse.ArgumentParser(description="batched decode, cases alternated")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--experts", choices=("none", "mixed", "both"), default="both")
    ap.add_argument("--position", type=int, default=PROMPT,
                    help="the cache position of row 0 (row b: + 7 b); longer contexts read "
                         "more of the KV cache a step")
    ap.add_argument("--split", action="store_true",
                    help="instead: where the experts' cost goes at 8 rows (none; all rows on "
                         "one expert; each row its own expert; the rows' own mixes)")
    ap.add_argument("--packed", metavar="N,T",
                    help="instead: N prompts of T, T+3, ... tokens (each its own mix) "
                         "prefilled one at a time against one packed pass")
    ap.add_argument("--alone", action="store_true",
                    help="also run each row of the largest batch alone (its own mix and "
                         "position): the 'x the rows alone' column")
    ap.add_argument("--kv-dtypes", default="float32",
                    help="KV cache element types to run, comma-separated (float32, float16: "
                         "the opt-in half cache), alternated in the same rounds")
    args = ap.parse_args()
    if "1" not in args.batches.split(","):
        ap.error("--batches must include 1 (the one-row baseline)")
    kernels.set_num_threads(2)
    torch.set_num_threads(1)
    model = build_model()
    if args.split:
        split_main(model, args.rounds, args.position)
        return
    if args.packed:
        count, tokens = (int(v) for v in args.packed.split(","))
        packed_main(model, count, tokens, args.rounds)
        return
    kinds = {"none": [False], "mixed": [True], "both": [False, True]}[args.experts]
    sizes = [int(b) for b in args.batches.split(",")]
    from r3mes.core.kv_blocks import KV_DTYPES

    dtypes = args.kv_dtypes.split(",")
    if unknown := set(dtypes) - set(KV_DTYPES):
        ap.error(f"--kv-dtypes: unknown {sorted(unknown)} (known: {sorted(KV_DTYPES)})")
    # (KV dtype, experts, rows, first row): seconds
    best: dict[tuple[str, bool, int, int], float] = {}

    def measure(dtype: str, with_experts: bool, batch: int, first_row: int) -> None:
        dt = step_seconds(batch_step(model, batch, with_experts, args.position, first_row,
                                     kv_dtype=KV_DTYPES[dtype]))
        key = (dtype, with_experts, batch, first_row)
        best[key] = min(best.get(key, dt), dt)

    alone_rows = range(1, max(sizes)) if args.alone else range(0)
    for _ in range(args.rounds):
        for dtype in dtypes:
            for with_experts in kinds:
                for batch in sizes:
                    measure(dtype, with_experts, batch, 0)
                for b in alone_rows:
                    measure(dtype, with_experts, 1, b)
    print("| KV | rows | mixes | ms/step | aggregate tok/s | x one row | x the rows alone |")
    print("|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        for with_experts in kinds:
            one = best[(dtype, with_experts, 1, 0)]
            for batch in sizes:
                dt = best[(dtype, with_experts, batch, 0)]
                alone = "-"
                if args.alone:
                    alone = sum(best[(dtype, with_experts, 1, b)] for b in range(batch))
                    alone = f"{alone / dt:.2f}"
                print(f"| {dtype} | {batch} | "
                      f"{'own 1-3 of 8 experts' if with_experts else 'none'} | "
                      f"{dt * 1e3:.1f} | {batch / dt:.1f} | {batch * one / dt:.2f} | {alone} |")


def split_main(model: BitNetForCausalLM, rounds: int, position: int) -> None:
    """8 rows: without experts, all on one expert (8 mix entries, one expert's bytes), each
    on its own expert (8 entries, 8 experts' bytes), their own 1-3 expert mixes (15 entries,
    8 experts), cases alternated, best of ``rounds``."""
    cases = {"none": (False, row_mix), "all rows on one expert": (True, lambda n, b: [(n[0], 1.0)]),
             "each row its own expert": (True, lambda n, b: [(n[b], 1.0)]),
             "own 1-3 expert mixes": (True, row_mix)}
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, (with_experts, mix_of) in cases.items():
            dt = step_seconds(batch_step(model, 8, with_experts, position, mix_of=mix_of))
            best[name] = min(best.get(name, dt), dt)
    print("| 8 rows | ms/step | over no experts |")
    print("|---|---|---|")
    for name, dt in best.items():
        print(f"| {name} | {dt * 1e3:.1f} | {(dt - best['none']) * 1e3:+.1f} |")


def packed_main(model: BitNetForCausalLM, count: int, tokens: int, rounds: int) -> None:
    """The prefill of ``count`` joining prompts (row b: tokens + 3 b of them, its own mix
    of the 8 experts), one at a time (``prefill_paged``) against one packed pass
    (``prefill_paged_many``, as the serving engine runs the jobs joining at one step),
    alternated, best of ``rounds``."""
    from r3mes.core.kv_blocks import KVBlockPool

    names = add_batch_experts(model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 8000, (tokens + 3 * b,), generator=g).tolist()
               for b in range(count)]
    mixes = [row_mix(names, b) for b in range(count)]
    pool = KVBlockPool(model.config, num_blocks=sum(len(p) // 16 + 1 for p in prompts),
                       block_size=16)
    blocks = [pool.allocate(pool.blocks_for(len(p))) for p in prompts]

    def one_at_a_time() -> None:
        for prompt, mix, mine in zip(prompts, mixes, blocks, strict=True):
            set_adapter_mix(model, mix)
            model.prefill_paged(prompt, pool, mine)

    def packed() -> None:
        set_adapter_mix(model, [mix for p, mix in zip(prompts, mixes, strict=True) for _ in p])
        model.prefill_paged_many(prompts, pool, blocks)

    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, run in (("one at a time", one_at_a_time), ("packed", packed)):
            t0 = time.perf_counter()
            run()
            best[name] = min(best.get(name, 1e9), time.perf_counter() - t0)
    total = sum(len(p) for p in prompts)
    print(f"| {count} prompts, {tokens}-{tokens + 3 * (count - 1)} tokens | ms | tok/s |")
    print("|---|---|---|")
    for name, dt in best.items():
        print(f"| {name} | {dt * 1e3:.0f} | {total / dt:.0f} |")
    print(f"packed / one at a time: {best['one at a time'] / best['packed']:.2f}x")


if __name__ == "__main__":
    batched_main()
