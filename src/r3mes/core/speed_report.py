"""``r3mes bench``: prefill and decode speed of a model directory, like ``llama-bench``.

The model runs on the native CPU backend (:class:`~r3mes.core.backends.BitNetCppBackend`)
through :meth:`~r3mes.core.backends.base.InferenceBackend.stream`, the call the pipeline
and ``r3mes generate`` make, so a figure here includes what a user waits for (the expert
mix, greedy sampling, detokenisation) and nothing else. Two tests, as llama-bench runs them:

* **pp** (prefill): a prompt of ``prompt_tokens`` random ids into an empty KV cache; the
  time from the call to the first generated token (the whole prompt in one forward pass).
* **tg** (decode): a one-token prompt, then ``warmup_tokens`` untimed decode steps, then
  ``gen_tokens`` timed ones; the rate is the timed tokens over the sum of their gaps
  (each gap: one decode step, its sampling and detokenisation).

Every (threads, experts) case runs once untimed, then ``repetitions`` times with the cases
interleaved (repetition-major), so a noisy moment on the machine hits every case alike.
Rates are reported as mean and sample standard deviation over the repetitions.

Experts: ``K`` DoRA adapters mixed with equal weights, either random ones (rank 16 on every
projection, built in memory in the backend's adapter storage) or the first ``K`` of the
PEFT directories given.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from r3mes import kernels

__all__ = ["BenchCase", "SpeedReport", "random_adapters", "run_speed_report"]

RANDOM_RANK = 16
#: Bytes an adapter element takes per storage (A and B; the per-row scales are not counted).
_STORAGE_BYTES = {"int8": 1, "fp16": 2, "fp32": 4}


@dataclass
class BenchCase:
    """One measured test: ``kind`` "pp" or "tg" at ``threads`` with ``experts`` mixed."""

    kind: str
    tokens: int
    threads: int
    experts: int
    samples_tok_s: list[float] = field(default_factory=list)

    @property
    def test(self) -> str:
        return f"{self.kind}{self.tokens}"

    def to_dict(self) -> dict[str, Any]:
        s = self.samples_tok_s
        mean = statistics.fmean(s) if s else 0.0
        return {"test": self.test, "kind": self.kind, "tokens": self.tokens,
                "threads": self.threads, "experts": self.experts,
                "tok_s_mean": round(mean, 3),
                "tok_s_stdev": round(statistics.stdev(s), 3) if len(s) > 1 else 0.0,
                "ms_per_token": round(1e3 / mean, 3) if mean > 0 else None,
                "samples_tok_s": [round(v, 3) for v in s]}


@dataclass
class SpeedReport:
    """What :func:`run_speed_report` measured; :meth:`to_dict` is ``r3mes bench --json``."""

    model: dict[str, Any]
    cpu: dict[str, Any]
    settings: dict[str, Any]
    cases: list[BenchCase]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "cpu": self.cpu, "settings": self.settings,
                "results": [c.to_dict() for c in self.cases]}


def cpu_info() -> dict[str, Any]:
    """CPU name, the native kernels' SIMD level and features, AMX, core count."""
    info = kernels.info()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"name": name, "cores": os.cpu_count(), "simd_level": info.get("simd_level"),
            "features": sorted(k for k, v in (info.get("cpu_features") or {}).items() if v),
            "amx": bool(info.get("amx")), "weight_layout": info.get("weight_layout")}


def _model_info(backend: Any) -> dict[str, Any]:
    model, info = backend.model, backend.load_info
    cfg = model.config
    sizes = model.num_parameters_bytes()
    ternary_params = sum(lin.ternary.out_features * lin.ternary.in_features
                         for lin in model.base_linears().values())
    embed = cfg.vocab_size * cfg.hidden_size
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    return {"path": info.path, "format": info.format, "head": info.head,
            "head_kind": model.lm_head.kind, "load_seconds": round(info.seconds, 3),
            "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size,
            "parameters": {"ternary": ternary_params, "embedding": embed, "lm_head": head,
                           "total": ternary_params + embed + head},
            "weight_bytes": sizes,
            # Every decode step streams every ternary weight and the whole head; the
            # embedding is a row lookup.
            "bytes_per_token": sizes["ternary"] + sizes["lm_head"]}


def random_adapters(backend: Any, count: int, rank: int = RANDOM_RANK,
                    seed: int = 1) -> list[str]:
    """Load ``count`` random DoRA adapters (rank ``rank`` on every projection, in the
    backend's adapter storage) into ``backend``'s model; returns their ids."""
    from r3mes.core.dora import dora_modules

    g = torch.Generator().manual_seed(seed)
    names = [f"random{i}" for i in range(count)]
    for module in dora_modules(backend.model).values():
        for name in names:
            a = torch.randn(rank, module.in_features, generator=g) / module.in_features ** 0.5
            b = 0.01 * torch.randn(module.out_features, rank, generator=g)
            m = 1.0 + 0.01 * torch.rand(module.out_features, generator=g)
            module.load_adapter(name, a, b, m, 2.0)
    for name in names:
        # The backend's registry of loaded experts: what its expert mix accepts.
        backend.adapters[name] = Path(f"<random rank {rank}>")
    return names


def _adapter_bytes(backend: Any, ids: Sequence[str], storage: str) -> int:
    """Bytes of A and B the experts ``ids`` add to every decoded token."""
    from r3mes.core.dora import dora_modules

    total = 0
    for module in dora_modules(backend.model).values():
        for name in ids:
            if name in module.adapter_names:
                rank = int(module.adapter_config(name)["rank"])
                total += rank * (module.in_features + module.out_features)
    return total * _STORAGE_BYTES.get(storage, 4)


def _prefill_rate(backend: Any, prompt: list[int], mix: list[str]) -> float:
    from r3mes.core.generation import GenerationConfig

    config = GenerationConfig(max_new_tokens=1, stop_token_ids=())
    t0 = time.perf_counter()
    for _ in backend.stream([prompt], config, mix):
        pass
    return len(prompt) / (time.perf_counter() - t0)


def _decode_rate(backend: Any, first: int, mix: list[str], warmup: int, gen: int) -> float:
    from r3mes.core.generation import GenerationConfig

    # +1: the first token comes from the prefill of the one-token prompt.
    config = GenerationConfig(max_new_tokens=1 + warmup + gen, stop_token_ids=())
    stamps = [time.perf_counter() for _ in backend.stream([[first]], config, mix)]
    timed = stamps[1 + warmup - 1:]  # the gap before each of the last ``gen`` tokens
    return gen / (timed[-1] - timed[0])


def run_speed_report(model_dir: str | os.PathLike[str], *, threads: Sequence[int] = (2,),
                     experts: Sequence[int] = (0,), prompt_tokens: int = 128,
                     gen_tokens: int = 64, warmup_tokens: int = 16, repetitions: int = 5,
                     adapters: Sequence[str | os.PathLike[str]] = (), head: str = "int8",
                     seed: int = 0) -> SpeedReport:
    """Measure prefill (pp) and decode (tg) tok/s of ``model_dir`` (HF or r3mes format).

    Args:
        threads: native kernel thread counts to measure (each case runs at each).
        experts: numbers of DoRA experts mixed (0: the base model alone).
        prompt_tokens: pp prompt length; gen_tokens: timed decode steps per repetition
            (0 leaves that test out, as llama-bench's ``-p 0`` / ``-n 0`` do).
        warmup_tokens: untimed decode steps before the timed ones.
        adapters: PEFT DoRA directories; when given, ``K`` experts are the first ``K``
            of them, else random rank-16 adapters are built in memory.
        head: the LM head of an HF directory (``"int8"``, ``"float"``, ...); an r3mes
            directory has its own.

    Raises:
        CheckpointError: the model directory is missing or malformed.
        ValueError: a bad setting (non-positive counts, more experts than adapters).
        RuntimeError: the native module is not built.
    """
    from r3mes.core.backends import BitNetCppBackend

    for name, value, low in (("threads", min(threads, default=0), 1),
                             ("prompt_tokens", prompt_tokens, 0),
                             ("gen_tokens", gen_tokens, 0), ("warmup_tokens", warmup_tokens, 0),
                             ("repetitions", repetitions, 1),
                             ("experts", min(experts, default=-1), 0)):
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    if not prompt_tokens and not gen_tokens:
        raise ValueError("prompt_tokens and gen_tokens are both 0: nothing to measure")
    most = max(experts)
    if adapters and most > len(adapters):
        raise ValueError(f"{most} experts asked for, {len(adapters)} adapters given")
    before = kernels.get_num_threads()
    backend = BitNetCppBackend()
    backend.load_base_model(model_dir, head=head)
    model = backend.model
    if adapters:
        ids = [f"adapter{i}" for i in range(most)]
        for name, path in zip(ids, adapters, strict=False):
            backend.load_dora_adapter(name, path)
    else:
        ids = random_adapters(backend, most) if most else []
    rng = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=rng).tolist()
    first = int(torch.randint(0, vocab, (1,), generator=rng))
    cases = [BenchCase(kind, n, t, k) for t in threads for k in experts
             for kind, n in (("pp", prompt_tokens), ("tg", gen_tokens)) if n]
    try:
        for rep in range(repetitions + 1):  # the first round is a warm-up, not recorded
            for case in cases:
                backend.set_num_threads(case.threads)
                mix = ids[:case.experts]
                rate = (_prefill_rate(backend, prompt, mix) if case.kind == "pp"
                        else _decode_rate(backend, first, mix, warmup_tokens, gen_tokens))
                if rep:
                    case.samples_tok_s.append(rate)
    finally:
        kernels.set_num_threads(before)
    info = _model_info(backend)
    info["adapter_bytes_per_token"] = {str(k): _adapter_bytes(backend, ids[:k],
                                                              backend.adapter_storage)
                                       for k in experts}
    settings = {"backend": backend.name, "threads": list(threads), "experts": list(experts),
                "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
                "warmup_tokens": warmup_tokens, "repetitions": repetitions,
                "adapters": [str(p) for p in adapters[:most]] if adapters
                else f"random rank {RANDOM_RANK}" if most else None,
                "adapter_storage": backend.adapter_storage, "torch": torch.__version__}
    return SpeedReport(info, cpu_info(), settings, cases)
