"""Token generation on an :class:`~r3mes.core.backends.InferenceBackend`, batch by batch.

The pipeline never touches the model directly: every generation is a
:class:`GenerationJob` (prompt ids, the expert mix, sampling parameters, a per-token
callback) handed to :meth:`Engine.generate`, which runs in the pipeline's single inference
thread. Jobs that queued while a batch was running are generated together in the next one
through the backend's batched ``stream(prompts, config, adapter_ids, adapter_weights)``:

- jobs batch together when their sampling parameters agree (the length limit may differ:
  a row that reached its own limit is simply no longer reported);
- their expert mixes must be equal, unless the backend mixes experts per row
  (``supports_feature("heterogeneous_batch")`` and a ``stream(..., adapter_mixes=...)``
  keyword), in which case any mixes share a batch.

Stop strings are the pipeline's business (it decodes incrementally); the engine stops a row
at the model's EOS, at its length limit, or when the job's callback returns ``False``
(stop string seen, client gone). When every row of a batch has stopped the backend's
generator is closed, which ends the batch early.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from r3mes.core.generation import GenerationConfig

#: ``on_token(token_id) -> keep_going``; runs in the inference thread.
TokenCallback = Callable[[int], bool]


def _sampling_key(config: GenerationConfig) -> tuple[Any, ...]:
    """Jobs batch together only when everything but the length limit agrees."""
    return (config.temperature, config.top_k, config.top_p, config.repetition_penalty,
            config.seed)


@dataclass
class GenerationJob:
    """One prompt to continue. ``mix`` is ``[(backend adapter name, weight)]`` (empty: the
    base model alone). :meth:`Engine.generate` fills ``tokens`` (EOS excluded) and
    ``finish_reason`` (``"stop"``: EOS or callback, ``"length"``)."""

    prompt_ids: list[int]
    mix: list[tuple[str, float]]
    params: GenerationConfig
    on_token: TokenCallback | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class Engine:
    """Runs batches of :class:`GenerationJob` on a loaded backend.

    Args:
        backend: an InferenceBackend with a model loaded.
        max_context: the model's context length; a prompt longer than it allows (with the
            answer's budget) is cut from the left, keeping the question at the end.
    """

    def __init__(self, backend: Any, max_context: int | None = None) -> None:
        self.backend = backend
        self.max_context = max_context
        self.name = str(getattr(backend, "name", type(backend).__name__))
        self.hetero = _supports(backend, "heterogeneous_batch") and _takes_kwarg(
            backend.stream, "adapter_mixes")
        self.batching = _supports(backend, "batch")

    def plan(self, jobs: Sequence[GenerationJob], max_batch: int) -> list[list[GenerationJob]]:
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
            if group is None or len(group) >= max_batch:
                group = groups[key] = []
                batches.append(group)
            group.append(job)
        return batches

    def generate(self, jobs: Sequence[GenerationJob], max_batch: int = 8) -> int:
        """Generate every job; returns the number of backend batches used. Runs in the
        inference thread."""
        batches = self.plan(jobs, max_batch)
        for batch in batches:
            self._run(batch)
        return len(batches)

    def _fit(self, ids: list[int], budget: int) -> list[int]:
        if self.max_context is None:
            return ids
        return ids[-max(1, self.max_context - budget):]

    def _run(self, batch: list[GenerationJob]) -> None:
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
                    elif len(job.tokens) >= job.params.max_new_tokens:
                        job.finish_reason = "length"
                    elif ev.finished:
                        job.finish_reason = "stop" if ev.finish_reason == "stop" else "length"
                if job.finish_reason is not None:
                    live -= 1
                    if live == 0:
                        break
        finally:
            close = getattr(events, "close", None)
            if callable(close):
                close()
        for job in batch:
            if job.finish_reason is None:
                job.finish_reason = "length"


def _supports(backend: Any, feature: str) -> bool:
    fn = getattr(backend, "supports_feature", None)
    try:
        return bool(fn(feature)) if callable(fn) else False
    except Exception:  # an unknown feature name must not break serving
        return False


def _takes_kwarg(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
