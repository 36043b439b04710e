"""Token generation for many users at once: continuous (iteration-level) batching.

The pipeline never touches the model directly: every generation is a
:class:`GenerationJob` (prompt ids, the expert mix, sampling parameters, a per-token
callback) handed to :meth:`Engine.submit`. The engine's own thread runs the schedule:

- **Every decode step**, finished rows leave and waiting jobs join (FIFO): the prompts of
  the jobs joining at one step are prefilled together, in one pass over the weights
  (:meth:`~r3mes.core.backends.InferenceBackend.prefill_paged_many`, up to
  ``max_prefill_tokens`` tokens a pass; each prompt's result is the one it gets alone), a
  job's first token is sampled from its prefill's logits, and from
  the next step on it decodes together with every other running row in one native call per
  layer (:meth:`~r3mes.core.backends.InferenceBackend.decode_paged`): each row at its own
  position, with its own expert mix, temperature, top-k, top-p, repetition penalty and seed.
  A row's tokens do not depend on the rows it shares a step with.
- **KV memory is a budget**: one pool of cache blocks (:class:`~r3mes.core.kv_blocks.KVBlockPool`)
  sized in the config. A job joins only when the pool has the blocks for its prompt plus
  its whole answer, so a running row never runs out of cache and nothing is truncated.
  Jobs that do not fit wait in the queue; when the queue holds ``max_queue`` jobs,
  :meth:`Engine.submit` raises :class:`EngineOverloaded` (the server answers 429 with
  ``Retry-After``).
- A row stops at the model's EOS, at its length limit, when its callback returns ``False``
  (stop string seen) or when its ``cancel`` event is set (client gone): its blocks go back
  to the pool before the next step.

Backends without paged decode (the CUDA path for now) get the previous schedule: the jobs
that queued while a batch ran are generated together through the backend's batched
``stream`` (rows batch when their sampling parameters agree).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from r3mes.core.generation import GenerationConfig, sample_next, stop_token_ids
from r3mes.core.kv_blocks import KV_DTYPES
from r3mes.errors import R3mesError

if TYPE_CHECKING:
    from r3mes.core.backends import InferenceBackend

log = logging.getLogger(__name__)

#: ``on_token(token_id) -> keep_going``; runs in the engine thread.
TokenCallback = Callable[[int], bool]
#: Called in the engine thread with the backend adapter names the running rows and the
#: joining job need, before the job's prefill (the pipeline loads and releases adapters).
AdapterHook = Callable[[set[str]], None]


class EngineOverloaded(R3mesError, RuntimeError):
    """The queue is full; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineClosed(R3mesError, RuntimeError):
    """The engine was closed before the job ran."""


@dataclass
class GenerationJob:
    """One prompt to continue. ``mix`` is ``[(backend adapter name, weight)]`` (empty: the
    base model alone). The engine fills ``tokens`` (EOS excluded) and ``finish_reason``
    (``"stop"``: EOS, callback or cancel; ``"length"``)."""

    prompt_ids: list[int]
    mix: list[tuple[str, float]]
    params: GenerationConfig
    on_token: TokenCallback | None = None
    cancel: threading.Event | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class JobTiming:
    """What :meth:`Engine.submit`'s future resolves to."""

    queue_ms: float  # from submit to the start of the job's prefill
    batch_size: int  # the most rows that decoded together while the job ran


@dataclass
class _Row:
    job: GenerationJob
    future: Future[JobTiming]
    submitted: float
    started: float = 0.0
    prompt: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    position: int = 0  # where the next token's key/value goes (= tokens in the cache)
    last: int = 0  # the token fed to the next step
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # bool [1, V] for the repetition penalty
    stop_ids: frozenset[int] = frozenset()  # tokens that end the row (EOS / end of turn)
    batch_size: int = 1


def _sampling_key(config: GenerationConfig) -> tuple[Any, ...]:
    """Jobs of the static schedule batch together only when everything but the length
    limit agrees."""
    return (config.temperature, config.top_k, config.top_p, config.repetition_penalty,
            config.seed)


class Engine:
    """Schedules :class:`GenerationJob` s on a loaded backend (see the module notes).

    Args:
        backend: an InferenceBackend with a model loaded.
        max_context: the model's context length; a prompt longer than it allows (with the
            answer's budget) is cut from the left, keeping the question at the end.
        max_batch: rows decoded together at most.
        max_queue: jobs waiting for a row at most; beyond it :meth:`submit` raises
            EngineOverloaded (0: only as many jobs as there are free rows).
        kv_tokens / kv_megabytes: the KV-cache budget (one of them; default 1024 MiB),
            capped at what ``max_batch`` rows of ``max_context`` positions could use.
        kv_block_size: positions per cache block.
        kv_dtype: the cache's element type, ``"float32"`` or ``"float16"`` (opt-in: half the
            memory a position takes, each key and value rounded to a half; lossy, see
            :mod:`r3mes.core.kv_blocks`).
        adapters: see :data:`AdapterHook`.
        max_prefill_tokens: prompt tokens of the jobs joining at one step prefilled in one
            pass at most (the running rows wait for it, and every job of the pass gets its
            first token when the pass is done: it pays for short prompts); a longer prompt
            runs alone.
    """

    def __init__(self, backend: InferenceBackend, max_context: int | None = None, *,
                 max_batch: int = 8,
                 max_queue: int = 64, kv_tokens: int | None = None,
                 kv_megabytes: float | None = None, kv_block_size: int = 16,
                 kv_dtype: str = "float32",
                 adapters: AdapterHook | None = None, max_prefill_tokens: int = 64) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {sorted(KV_DTYPES)}, got {kv_dtype!r}")
        self.backend = backend
        self.max_context = max_context
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.name = backend.name
        self.continuous = backend.supports_feature("continuous_batching")
        self.hetero = backend.supports_feature("heterogeneous_batch")
        self.batching = backend.supports_feature("batch")
        self._kv_budget = (kv_tokens, None if kv_tokens is not None else (kv_megabytes or 1024.0))
        self._kv_block_size = kv_block_size
        self._kv_dtype = KV_DTYPES[kv_dtype]
        self._adapters = adapters
        self.pool: Any = None  # the KVBlockPool, made at the first job
        self._waiting: collections.deque[_Row] = collections.deque()
        self._running: list[_Row] = []
        self._joining = 0  # jobs being prefilled: out of the queue, not yet running
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._service_s = 5.0  # running mean of a job's time in the engine (Retry-After)
        # jobs: accepted; completed: finished without an error
        self.counters = {"jobs": 0, "completed": 0, "steps": 0, "tokens": 0, "rejected": 0,
                         "batches": 0, "packed_prefills": 0}

    # ---- the public side ----------------------------------------------------------------
    def submit(self, job: GenerationJob) -> Future[JobTiming]:
        """Queue ``job``; the future resolves when it has finished (or fails with its error).
        Raises EngineOverloaded when the queue is full and EngineClosed after close()."""
        row = _Row(job, Future(), time.perf_counter())
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if not self._has_room():
                self.counters["rejected"] += 1
                raise EngineOverloaded(
                    f"{len(self._waiting)} requests are already waiting (the queue holds "
                    f"{self.max_queue})", self.retry_after())
            self._waiting.append(row)
            self.counters["jobs"] += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="r3mes-engine",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        return row.future

    async def run(self, job: GenerationJob) -> JobTiming:
        """Queue ``job`` and wait for it without blocking the event loop (the async form of
        :meth:`submit`, with the same errors; the job's own error is raised here)."""
        return await asyncio.wrap_future(self.submit(job))

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (the engine takes no more jobs)."""
        return self._closed

    def generate(self, jobs: Sequence[GenerationJob]) -> None:
        """Run ``jobs`` to completion (blocking; for callers without an event loop)."""
        futures = [self.submit(job) for job in jobs]
        for f in futures:
            f.result()

    def accepting(self) -> bool:
        """Whether :meth:`submit` would take a job now."""
        return not self._closed and self._has_room()

    def _has_room(self) -> bool:
        # A job passes through the queue even when a row is free: free rows count as room.
        free_rows = max(0, self.max_batch - len(self._running) - self._joining)
        return len(self._waiting) < self.max_queue + free_rows

    def retry_after(self) -> float:
        """Seconds until a queue slot is likely free (a whole-second estimate, at least 1)."""
        waiting = len(self._waiting) + 1
        return float(max(1, math.ceil(self._service_s * waiting / self.max_batch)))

    def stats(self) -> dict[str, Any]:
        """Queue, rows and KV-cache occupancy (for /metrics and ``get_stats``)."""
        pool = self.pool
        return {"scheduler": "continuous" if self.continuous else "static",
                "running": len(self._running), "waiting": len(self._waiting),
                "max_batch": self.max_batch, "max_queue": self.max_queue,
                "kv_blocks_total": 0 if pool is None else pool.num_blocks,
                "kv_blocks_used": 0 if pool is None else pool.used_blocks,
                "kv_block_size": self._kv_block_size,
                "kv_bytes": 0 if pool is None else pool.nbytes, **self.counters}

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; jobs not finished fail with EngineClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the schedule -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._running and not self._closed:
                    self._cond.wait()
                if self._closed:
                    break
            try:
                if self.continuous:
                    self._step()
                else:
                    self._static_batch()
            except Exception as exc:  # a failed step fails its rows, never the engine
                log.exception("engine step failed")
                for row in self._running:
                    self._finish(row, error=exc)
                self._running = []
        error = EngineClosed("the engine was closed")
        for row in [*self._running, *self._waiting]:
            self._finish(row, error=error)
        self._running, self._waiting = [], collections.deque()

    def _step(self) -> None:
        """One iteration: cancelled rows leave, waiting jobs join, every row decodes a token."""
        for row in [r for r in self._running if self._cancelled(r)]:
            self._leave(row, "stop")
        self._admit()
        rows = self._running
        if not rows:
            return
        pool = self.pool
        logits = self.backend.decode_paged(
            torch.tensor([r.last for r in rows]), [r.job.mix for r in rows], pool,
            pool.table([r.blocks for r in rows]), torch.tensor([r.position for r in rows]))
        self.counters["steps"] += 1
        for row in rows:
            row.batch_size = max(row.batch_size, len(rows))
        for i, row in enumerate(list(rows)):
            row.position += 1
            self._deliver(row, logits[i])

    def _admit(self) -> None:
        """Moves waiting jobs into the batch while rows and KV blocks are free (in order: a
        job that does not fit yet keeps its place, and the ones behind it wait too); the
        jobs admitted together are prefilled together."""
        joining: list[_Row] = []
        tokens = 0
        try:
            while len(self._running) + len(joining) < self.max_batch:
                with self._cond:
                    if not self._waiting:
                        break
                    row = self._waiting[0]
                    if self._cancelled(row) or row.future.cancelled():
                        self._waiting.popleft()
                        self._finish(row, reason="stop")
                        continue
                    if row.job.params.max_new_tokens == 0 or not row.job.prompt_ids:
                        self._waiting.popleft()
                        if row.job.prompt_ids:
                            self._finish(row, reason="length")
                        else:
                            self._finish(row, error=ValueError("the prompt is empty"))
                        continue
                    pool = self._ensure_pool()
                    budget = row.job.params.max_new_tokens
                    row.prompt = self._fit(row.job.prompt_ids, budget)
                    need = pool.blocks_for(len(row.prompt) + budget)
                    if need > pool.num_blocks:
                        self._waiting.popleft()
                        self._finish(row, error=ValueError(
                            f"the request needs {len(row.prompt) + budget} positions of KV "
                            f"cache (prompt {len(row.prompt)} + max_tokens {budget}); the "
                            f"cache holds {pool.capacity_tokens} (raise "
                            "inference.kv_cache_tokens or lower max_tokens)"))
                        continue
                    if need > pool.free_blocks:
                        break
                    if joining and tokens + len(row.prompt) > self.max_prefill_tokens:
                        break  # joins at the next step
                    self._waiting.popleft()
                    row.blocks = pool.allocate(need)
                    joining.append(row)
                    tokens += len(row.prompt)
                    self._joining += 1
        finally:
            if joining:
                try:
                    self._join(joining)
                finally:
                    with self._cond:
                        self._joining -= len(joining)

    def _join(self, rows: list[_Row]) -> None:
        """Prefills the jobs (together where it can) and delivers each one's first token;
        they decode from the next step. A job that fails fails alone."""
        started = time.perf_counter()
        for row in rows:
            row.started = started
        try:
            if self._adapters is not None:
                self._adapters({n for r in (*self._running, *rows) for n, _ in r.job.mix})
        except Exception as exc:
            for row in rows:
                self._finish(row, error=exc)
            return
        ready = []
        for row in rows:
            params = row.job.params
            try:
                row.stop_ids = stop_token_ids(params, self.backend.model.config,
                                              self.backend.tokenizer)
            except Exception as exc:
                self._finish(row, error=exc)
                continue
            if params.temperature > 0:
                row.generator = torch.Generator()
                row.generator.manual_seed(params.seed if params.seed is not None
                                          else int.from_bytes(os.urandom(8), "little") >> 1)
            ready.append(row)
        # One pass for every prompt of at least two tokens (one token alone runs the decode
        # path); if it fails, each prompt runs alone and fails or succeeds on its own.
        packed = [r for r in ready if len(r.prompt) >= 2]
        logits_of: dict[int, torch.Tensor] = {}
        if len(packed) >= 2 and self.backend.supports_feature("packed_prefill"):
            try:
                out = self.backend.prefill_paged_many(
                    [r.prompt for r in packed], [r.job.mix for r in packed], self.pool,
                    [r.blocks for r in packed])
                logits_of = {id(r): out[i] for i, r in enumerate(packed)}
                self.counters["packed_prefills"] += 1
            except Exception:
                log.exception("packed prefill of %d prompts failed; prefilling each alone",
                              len(packed))
        for row in ready:
            logits = logits_of.get(id(row))
            try:
                if logits is None:
                    logits = self.backend.prefill_paged(row.prompt, row.job.mix, self.pool,
                                                        row.blocks)
                if row.job.params.repetition_penalty != 1.0:
                    row.seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool)
                    row.seen[0, torch.as_tensor(row.prompt)] = True
            except Exception as exc:
                self._finish(row, error=exc)
                continue
            row.position = len(row.prompt)
            self._running.append(row)
            row.batch_size = len(self._running)
            self._deliver(row, logits)

    def _deliver(self, row: _Row, logits: torch.Tensor) -> None:
        """Samples the row's next token from its logits [V] and hands it to the job."""
        job, params = row.job, row.job.params
        if params.temperature == 0 and row.seen is None:
            token = int(logits.argmax())
        else:
            token = int(sample_next(logits[None], params, row.seen, row.generator)[0])
        if row.seen is not None:
            row.seen[0, token] = True
        self.counters["tokens"] += 1
        if token in row.stop_ids:
            self._leave(row, "stop")
            return
        job.tokens.append(token)
        row.last = token
        if job.on_token is not None and job.on_token(token) is False:
            self._leave(row, "stop")
        elif self._cancelled(row):
            self._leave(row, "stop")
        elif len(job.tokens) >= params.max_new_tokens:
            self._leave(row, "length")

    def _leave(self, row: _Row, reason: str) -> None:
        if row in self._running:
            self._running.remove(row)
        self._finish(row, reason=reason)

    def _finish(self, row: _Row, reason: str | None = None,
                error: BaseException | None = None) -> None:
        if row.blocks and self.pool is not None:
            self.pool.release(row.blocks)
            row.blocks = []
        if row.job.finish_reason is None:
            row.job.finish_reason = reason or "stop"
        if row.started:
            spent = time.perf_counter() - row.started
            self._service_s = 0.8 * self._service_s + 0.2 * spent
        if row.future.done():
            return
        if error is not None:
            row.future.set_exception(error)
        else:
            self.counters["completed"] += 1
            started = row.started or time.perf_counter()
            row.future.set_result(JobTiming((started - row.submitted) * 1e3, row.batch_size))

    # ---- helpers ----------------------------------------------------------------------
    def _ensure_pool(self) -> Any:
        if self.pool is None:
            tokens, megabytes = self._kv_budget
            cap = None
            if self.max_context is not None:
                cap = self.max_batch * (self.max_context + self._kv_block_size)
            self.pool = self.backend.new_kv_pool(tokens=tokens, megabytes=megabytes,
                                                 block_size=self._kv_block_size, max_tokens=cap,
                                                 dtype=self._kv_dtype)
        return self.pool

    @staticmethod
    def _cancelled(row: _Row) -> bool:
        return row.job.cancel is not None and row.job.cancel.is_set()

    def _fit(self, ids: list[int], budget: int) -> list[int]:
        if self.max_context is None:
            return list(ids)
        return list(ids[-max(1, self.max_context - budget):])

    # ---- the static schedule (backends without paged decode) ----------------------------
    def plan(self, jobs: Sequence[GenerationJob]) -> list[list[GenerationJob]]:
        """Split ``jobs`` into batches this backend can run together, in arrival order."""
        groups: dict[tuple[Any, ...], list[GenerationJob]] = {}
        batches: list[list[GenerationJob]] = []
        for job in jobs:
            if not self.batching:
                batches.append([job])
                continue
            key = _sampling_key(job.params)
            if not self.hetero:
                key = key + (tuple((n, round(w, 9)) for n, w in job.mix),)
            group = groups.get(key)
            if group is None or len(group) >= self.max_batch:
                group = groups[key] = []
                batches.append(group)
            group.append(job)
        return batches

    def _static_batch(self) -> None:
        with self._cond:
            rows = [self._waiting.popleft()
                    for _ in range(min(len(self._waiting), self.max_batch))]
        by_job = {id(r.job): r for r in rows}
        for batch in self.plan([r.job for r in rows]):
            batch_rows = [by_job[id(j)] for j in batch]
            start = time.perf_counter()
            for r in batch_rows:
                r.started, r.batch_size = start, len(batch)
            try:
                if self._adapters is not None:
                    self._adapters({n for j in batch for n, _ in j.mix})
                self._run_static(batch)
            except Exception as exc:
                for r in batch_rows:
                    self._finish(r, error=exc)
                continue
            self.counters["batches"] += 1
            for r in batch_rows:
                self._finish(r, reason=r.job.finish_reason or "length")

    def _run_static(self, batch: list[GenerationJob]) -> None:
        steps = max(j.params.max_new_tokens for j in batch)
        config = replace(batch[0].params, max_new_tokens=steps)
        prompts = [self._fit(j.prompt_ids, steps) for j in batch]
        kwargs: dict[str, Any] = {}
        if self.hetero and len(batch) > 1:
            kwargs["adapter_mixes"] = [list(j.mix) for j in batch]
        else:
            kwargs["adapter_ids"] = [n for n, _ in batch[0].mix]
            kwargs["adapter_weights"] = [w for _, w in batch[0].mix]
        live = len(batch)
        events = self.backend.stream(prompts, config, **kwargs)
        try:
            for ev in events:
                job = batch[ev.index]
                if job.finish_reason is not None:
                    continue
                if ev.finish_reason == "eos":
                    job.finish_reason = "stop"
                else:
                    token = int(ev.token_id)
                    job.tokens.append(token)
                    if job.on_token is not None and job.on_token(token) is False:
                        job.finish_reason = "stop"
                    elif job.cancel is not None and job.cancel.is_set():
                        job.finish_reason = "stop"
                    elif len(job.tokens) >= job.params.max_new_tokens:
                        job.finish_reason = "length"
                    elif ev.finished:
                        job.finish_reason = "stop" if ev.finish_reason == "stop" else "length"
                if job.finish_reason is not None:
                    live -= 1
                    if live == 0:
                        break
        finally:
            events.close()  # a batch left early resets the backend's expert mix now
