"""The continuous-batching engine on a real native backend and the tiny real model."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from r3mes import kernels
from r3mes.core.backends import BitNetCppBackend, PyTorchBackend
from r3mes.core.generation import GenerationConfig
from r3mes.serving.engine import Engine, EngineOverloaded, GenerationJob

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs the native module")

PROMPTS = [[5, 9, 13, 2, 7, 100, 31], [44, 3], [8] * 17 + [19], [250, 1, 77, 64],
           [12, 13, 14, 15, 16], [60, 61], [90, 3, 4, 200, 201, 7, 7, 7, 9], [33]]


@pytest.fixture(scope="module")
def backend(assets) -> BitNetCppBackend:
    b = BitNetCppBackend()
    b.load_base_model(assets["model"])
    experts = sorted(p for p in assets["experts"].iterdir() if p.is_dir())
    for e in experts[:3]:
        b.load_dora_adapter(e.name, e)
    return b


def _mixes(backend) -> list[list[tuple[str, float]]]:
    names = sorted(backend.adapters)
    return [[(names[0], 1.0)], [(names[1], 0.3), (names[2], 0.7)], [],
            [(names[2], 0.5), (names[0], 0.5)], [(names[1], 1.0)],
            [(names[0], 0.2), (names[1], 0.3), (names[2], 0.5)], [(names[2], 1.0)], []]


def _job(prompt, mix, n=10, **sampling) -> GenerationJob:
    params = GenerationConfig(max_new_tokens=n, stop_token_ids=[], **sampling)
    return GenerationJob(list(prompt), list(mix), params)


def _alone(backend, prompts, mixes) -> list[list[int]]:
    """Each job's tokens when it runs alone (an engine of one row)."""
    out = []
    for p, m in zip(prompts, mixes, strict=True):
        engine = Engine(backend, max_batch=1)
        job = _job(p, m)
        engine.generate([job])
        engine.close()
        out.append(job.tokens)
    return out


def test_concurrent_jobs_equal_each_job_alone(backend) -> None:
    """Greedy rows of 8 different mixes, joining at different times: every row's tokens
    equal the same job run alone (the native rows are bit-identical)."""
    mixes = _mixes(backend)
    alone = _alone(backend, PROMPTS, mixes)
    engine = Engine(backend, max_batch=8, kv_tokens=1024)
    jobs = [_job(p, m) for p, m in zip(PROMPTS, mixes, strict=True)]
    # Staggered arrivals: the first row is decoding (held at its third token) when the
    # others join, at different positions.
    go = threading.Event()
    jobs[0].on_token = lambda t: len(jobs[0].tokens) != 3 or go.wait(30)
    futures = [engine.submit(jobs[0])]
    while len(jobs[0].tokens) < 3:
        time.sleep(0.001)
    futures += [engine.submit(job) for job in jobs[1:]]
    go.set()
    timings = [f.result(timeout=120) for f in futures]
    engine.close()
    assert [j.tokens for j in jobs] == alone
    assert max(t.batch_size for t in timings) > 1, "the rows must have shared steps"
    # The seven that queued while the first was held joined at one step: their prompts of
    # two tokens or more were prefilled in one pass.
    assert engine.counters["packed_prefills"] == 1
    assert engine.pool.used_blocks == 0  # every row gave its blocks back


def test_a_half_kv_cache_keeps_rows_independent(backend) -> None:
    """kv_dtype="float16": the pool holds halves, and a row's tokens still do not depend on
    the rows it shares steps with (each job alone on a half cache gives the same)."""
    mixes = _mixes(backend)[:4]
    alone = []
    for p, m in zip(PROMPTS[:4], mixes, strict=True):
        single = Engine(backend, max_batch=1, kv_dtype="float16")
        job = _job(p, m)
        single.generate([job])
        single.close()
        alone.append(job.tokens)
    engine = Engine(backend, max_batch=4, kv_megabytes=1.0, kv_dtype="float16")
    jobs = [_job(p, m) for p, m in zip(PROMPTS[:4], mixes, strict=True)]
    engine.generate(jobs)
    engine.close()
    assert engine.pool.k.dtype == torch.float16
    assert [j.tokens for j in jobs] == alone
    with pytest.raises(ValueError, match="kv_dtype"):
        Engine(backend, kv_dtype="bfloat16")


def test_a_bad_prompt_in_a_packed_prefill_fails_alone(backend) -> None:
    """Jobs joining together, one with a token id past the vocabulary: the packed prefill
    refuses it, each prompt then runs alone, and only that job fails."""
    mixes = _mixes(backend)
    alone = _alone(backend, PROMPTS[1:4], mixes[1:4])
    engine = Engine(backend, max_batch=8, kv_tokens=1024)
    holder = _job(PROMPTS[0], mixes[0])
    go = threading.Event()
    holder.on_token = lambda t: len(holder.tokens) != 2 or go.wait(30)
    first = engine.submit(holder)
    while len(holder.tokens) < 2:
        time.sleep(0.001)
    good = [_job(p, m) for p, m in zip(PROMPTS[1:4], mixes[1:4], strict=True)]
    bad = _job([5, 10**7, 6], [])
    futures = [engine.submit(j) for j in (good[0], bad, good[1], good[2])]
    go.set()
    first.result(timeout=120)
    with pytest.raises(ValueError, match="token ids"):
        futures[1].result(timeout=120)
    for f in (futures[0], futures[2], futures[3]):
        f.result(timeout=120)
    engine.close()
    assert [j.tokens for j in good] == alone
    assert engine.counters["packed_prefills"] == 0
    assert engine.pool.used_blocks == 0


def test_the_reference_backend_runs_the_same_schedule(assets) -> None:
    b = PyTorchBackend()
    b.load_base_model(assets["model"])
    jobs = [_job(p, [], n=5) for p in PROMPTS[:3]]
    engine = Engine(b, max_batch=4, kv_tokens=256)
    engine.generate(jobs)
    engine.close()
    assert all(len(j.tokens) == 5 and j.finish_reason == "length" for j in jobs)


def test_per_row_sampling_is_reproducible_with_a_seed(backend) -> None:
    mix = _mixes(backend)[0]
    sampled = dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=11)
    engine = Engine(backend, max_batch=8, kv_tokens=1024)
    alone = _job(PROMPTS[0], mix, **sampled)
    engine.generate([alone])
    crowd = [_job(p, m) for p, m in zip(PROMPTS[1:], _mixes(backend)[1:], strict=True)]
    again = _job(PROMPTS[0], mix, **sampled)
    engine.generate([*crowd, again])  # greedy neighbours do not change the sampled row
    other_seed = _job(PROMPTS[0], mix, **{**sampled, "seed": 12})
    engine.generate([other_seed])
    engine.close()
    assert again.tokens == alone.tokens
    assert other_seed.tokens != alone.tokens


def test_stop_token_and_callback_end_a_row_and_free_its_blocks(backend) -> None:
    engine = Engine(backend, max_batch=4, kv_tokens=512)
    probe = _job(PROMPTS[1], [], n=6)
    engine.generate([probe])
    eos = probe.tokens[2]
    stop_at_eos = GenerationJob(PROMPTS[1], [], GenerationConfig(max_new_tokens=6,
                                                                 stop_token_ids=[eos]))
    seen: list[int] = []
    callback = _job(PROMPTS[1], [], n=6)
    callback.on_token = lambda t: (seen.append(t), len(seen) < 2)[1]
    engine.generate([stop_at_eos, callback])
    engine.close()
    first_eos = probe.tokens.index(eos)
    assert stop_at_eos.tokens == probe.tokens[:first_eos] and stop_at_eos.finish_reason == "stop"
    assert callback.tokens == probe.tokens[:2] and callback.finish_reason == "stop"
    assert engine.pool.used_blocks == 0


def test_a_cancelled_row_leaves_at_once_and_the_others_finish(backend) -> None:
    engine = Engine(backend, max_batch=4, kv_tokens=2048)
    cancel = threading.Event()
    gone = _job(PROMPTS[0], [], n=400)
    gone.cancel = cancel
    gone.on_token = lambda t: (len(gone.tokens) < 3 or cancel.set()) or True
    stays = [_job(p, [], n=20) for p in PROMPTS[1:3]]
    futures = [engine.submit(j) for j in (gone, *stays)]
    for f in futures:
        f.result(timeout=120)
    engine.close()
    assert gone.finish_reason == "stop" and len(gone.tokens) <= 4
    assert all(len(j.tokens) == 20 for j in stays)


def test_kv_budget_queues_jobs_that_do_not_fit_and_refuses_impossible_ones(backend) -> None:
    # 64 positions: one job of 17 + 40 positions at a time; the second waits for the first.
    engine = Engine(backend, max_batch=8, kv_tokens=64, kv_block_size=16)
    first, second = _job(PROMPTS[2], [], n=40), _job(PROMPTS[2], [], n=40)
    f1, f2 = engine.submit(first), engine.submit(second)
    t1, t2 = f1.result(timeout=120), f2.result(timeout=120)
    assert t1.batch_size == 1 and t2.batch_size == 1  # never together: the cache holds one
    assert first.tokens == second.tokens and len(first.tokens) == 40
    too_long = _job(PROMPTS[2], [], n=100)
    with pytest.raises(ValueError, match="positions of KV cache"):
        engine.submit(too_long).result(timeout=60)
    engine.close()


def test_a_full_queue_is_refused_with_a_retry_hint(backend) -> None:
    engine = Engine(backend, max_batch=1, max_queue=2, kv_tokens=1024)
    hold = threading.Event()
    blocker = _job(PROMPTS[0], [], n=50)
    blocker.on_token = lambda t: hold.wait(30) or True
    futures = [engine.submit(blocker)]
    deadline = time.time() + 30
    while engine.stats()["running"] == 0 and time.time() < deadline:
        time.sleep(0.01)
    futures += [engine.submit(_job(p, [], n=2)) for p in PROMPTS[1:3]]
    assert not engine.accepting()
    with pytest.raises(EngineOverloaded) as info:
        engine.submit(_job(PROMPTS[3], [], n=2))
    assert info.value.retry_after >= 1
    hold.set()
    for f in futures:
        f.result(timeout=120)
    assert engine.stats()["rejected"] == 1 and engine.accepting()
    engine.close()


def test_nothing_to_generate_and_empty_prompts_are_answered_at_once(backend) -> None:
    engine = Engine(backend, max_batch=2, kv_tokens=256)
    nothing = _job(PROMPTS[0], [], n=0)
    engine.submit(nothing).result(timeout=60)
    assert nothing.tokens == [] and nothing.finish_reason == "length"
    with pytest.raises(ValueError, match="empty"):
        engine.submit(_job([], [], n=3)).result(timeout=60)
    assert engine.pool is None or engine.pool.used_blocks == 0
    engine.close()


def test_a_queue_of_zero_still_takes_jobs_while_rows_are_free(backend) -> None:
    engine = Engine(backend, max_batch=2, max_queue=0, kv_tokens=512)
    # The first token's callback holds the engine thread until the third submit has been
    # tried, so both rows are still taken then (3 tokens could otherwise finish first).
    tried = threading.Event()
    first = _job(PROMPTS[0], [], n=3)
    first.on_token = lambda token: tried.wait(timeout=60)
    second = _job(PROMPTS[1], [], n=3)
    futures = [engine.submit(first), engine.submit(second)]
    try:
        with pytest.raises(EngineOverloaded):
            engine.submit(_job(PROMPTS[2], [], n=3))  # both rows taken, nowhere to wait
    finally:
        tried.set()
    for f in futures:
        f.result(timeout=60)
    assert len(first.tokens) == 3 and len(second.tokens) == 3
    engine.close()
