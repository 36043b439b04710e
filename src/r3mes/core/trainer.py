"""Train one DoRA expert against a frozen ternary base: deterministic, resumable, PEFT output.

``train_adapter(model, texts, tokenizer=..., output_dir=...)`` adds a fresh DoRA adapter to
every targeted :class:`~r3mes.core.dora.BitLinearDoRA` of a causal LM, trains only the
adapter (A, B, magnitude) with AdamW on next-token cross-entropy, checkpoints every
``checkpoint_every`` steps, resumes from the last checkpoint, and saves the adapter as a
PEFT directory (:func:`r3mes.core.adapter_io.save_peft_adapter`).

Determinism: the adapter initialisation and the data order are functions of ``seed`` (and
the step), so the same call gives the same adapter, and an interrupted run resumed from
its checkpoint ends exactly where the uninterrupted run ends.

The model is any ``nn.Module`` mapping input ids [B, T] to logits [B, T, V] (or an object
with ``.logits``) whose forward runs with autograd enabled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn
from tqdm.auto import tqdm

from r3mes.core.adapter_io import save_peft_adapter
from r3mes.core.dora import BitLinearDoRA, dora_modules, set_adapter_mix
from r3mes.utils.atomic import atomic_write_bytes, atomic_write_json
from r3mes.utils.jsonl import jsonl_records

__all__ = [
    "TrainConfig",
    "TrainResult",
    "evaluate_perplexity",
    "load_texts",
    "train_adapter",
]

_STATE_JSON = "trainer_state.json"
_STATE_TENSORS = "trainer_state.safetensors"
# Settings that must match for a checkpoint to be resumed.
_RESUME_KEYS = ("adapter_name", "rank", "alpha", "use_rslora", "target_modules", "batch_size",
                "seq_len", "lr", "weight_decay", "seed")


@dataclass
class TrainConfig:
    """Hyper-parameters of one adapter training run."""

    adapter_name: str = "expert"
    rank: int = 16
    alpha: float = 32.0
    use_rslora: bool = False
    target_modules: list[str] | None = None  # leaf names (q_proj, ...); None: all
    steps: int = 200
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50


@dataclass
class TrainResult:
    """What a run did: steps done, per-step losses (of this process), the PEFT directory."""

    steps: int
    losses: list[float] = field(default_factory=list)
    output_dir: Path | None = None
    resumed_from: int = 0


TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def load_texts(path: str | Path) -> list[str]:
    """Training texts from a ``.txt`` (paragraphs split on blank lines) or ``.jsonl`` file
    (one object per line with a string ``"text"``). Errors name the file and line."""
    path = Path(path)
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; training "
                         f"text is {', '.join(TEXT_SUFFIXES)} (convert other formats to text "
                         "first)")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read training text ({exc})") from None
    if path.suffix == ".jsonl":
        texts = []
        for i, obj in jsonl_records(path, raw.splitlines()):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path}:{i}: expected an object with a string 'text'")
            texts.append(obj["text"])
    else:
        texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if not texts:
        raise ValueError(f"{path}: holds no text")
    return texts


def _encode(tokenizer: Any, text: str) -> list[int]:
    out = tokenizer.encode(text) if hasattr(tokenizer, "encode") else tokenizer(text)
    out = getattr(out, "ids", out)
    return [int(t) for t in out]


def _token_windows(texts: Sequence[str], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """All texts as one token stream (EOS between texts when the tokenizer has one), cut
    into windows of seq_len + 1 tokens: [N, seq_len + 1]."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for t in texts:
        stream.extend(_encode(tokenizer, t))
        if eos is not None:
            stream.append(int(eos))
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(
            f"texts: {len(stream)} tokens, fewer than one window of seq_len+1={seq_len + 1}"
        )
    ids = torch.tensor(stream[: n * seq_len + 1], dtype=torch.long)
    return torch.stack([ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


def _batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Sample indices of ``step``: a fixed permutation per epoch, seeded by (seed, epoch)."""
    idx = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        idx.append(int(torch.randperm(n, generator=g)[pos]))
    return torch.tensor(idx)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return getattr(out, "logits", out)


def _targets(model: nn.Module, names: Sequence[str] | None) -> dict[str, BitLinearDoRA]:
    mods = dora_modules(model)
    if names is not None:
        wanted = set(names)
        mods = {p: m for p, m in mods.items() if p.rsplit(".", 1)[-1] in wanted}
    if not mods:
        raise ValueError(f"model: no BitLinearDoRA module matches target_modules={names}")
    return mods


def _adapter_params(mods: dict[str, BitLinearDoRA], name: str) -> list[tuple[str, nn.Parameter]]:
    out = []
    for path in sorted(mods):
        m = mods[path]
        out += [(f"{path}.lora_A", m.lora_A[name]), (f"{path}.lora_B", m.lora_B[name]),
                (f"{path}.lora_magnitude_vector", m.lora_magnitude_vector[name])]
    return out


def _save_checkpoint(ckpt: Path, step: int, cfg: TrainConfig, params, opt) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for i, (key, p) in enumerate(params):
        tensors[f"param/{key}"] = p.detach().contiguous()
        st = opt.state.get(p, {})
        for slot in ("exp_avg", "exp_avg_sq", "step"):
            if slot in st:
                tensors[f"opt/{i}/{slot}"] = torch.as_tensor(st[slot]).detach().reshape(-1).clone()
    ckpt.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(ckpt / _STATE_TENSORS, save(tensors))
    # The JSON is written last: it names the step the tensors belong to.
    atomic_write_json(ckpt / _STATE_JSON, {"step": step, "config": asdict(cfg)})


def _load_checkpoint(ckpt: Path, cfg: TrainConfig, params, opt) -> int:
    state_file = ckpt / _STATE_JSON
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        step = int(state["step"])
        saved_cfg = state["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{state_file}: unreadable trainer checkpoint ({exc})") from None
    for k in _RESUME_KEYS:
        if saved_cfg.get(k) != asdict(cfg)[k]:
            raise ValueError(
                f"{state_file}: checkpoint has {k}={saved_cfg.get(k)!r} but this run has "
                f"{asdict(cfg)[k]!r}; use another checkpoint_dir or resume=False"
            )
    try:
        tensors = load_file(str(ckpt / _STATE_TENSORS))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{ckpt / _STATE_TENSORS}: unreadable ({exc})") from None
    with torch.no_grad():
        for i, (key, p) in enumerate(params):
            t = tensors.get(f"param/{key}")
            if t is None or t.shape != p.shape:
                raise ValueError(f"{ckpt / _STATE_TENSORS}: key 'param/{key}' missing or "
                                 f"of the wrong shape")
            p.copy_(t)
            if f"opt/{i}/exp_avg" in tensors:
                opt.state[p] = {
                    "step": tensors[f"opt/{i}/step"].reshape(()).clone(),
                    "exp_avg": tensors[f"opt/{i}/exp_avg"].reshape(p.shape).clone(),
                    "exp_avg_sq": tensors[f"opt/{i}/exp_avg_sq"].reshape(p.shape).clone(),
                }
    return step


def train_adapter(
    model: nn.Module,
    texts: Sequence[str] | str | Path,
    *,
    tokenizer: Any,
    output_dir: str | Path,
    config: TrainConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    max_steps_this_run: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train a DoRA expert on ``texts`` (a list of strings, or a .txt/.jsonl path).

    Args:
        model: causal LM whose projections are BitLinearDoRA (frozen base).
        tokenizer: ``.encode(text)`` (ids or an object with ``.ids``) or a callable.
        output_dir: where the PEFT adapter directory is written at the end.
        config: hyper-parameters; keyword ``overrides`` replace single fields.
        checkpoint_dir: default ``output_dir/checkpoint``.
        resume: continue from the checkpoint there (settings must match).
        progress: show a tqdm bar.
        max_steps_this_run: stop (after checkpointing) when this many steps ran in this
            call, to split a run; the PEFT directory is written only when training ends.
        on_step: called with (step, loss) after every step.

    Returns a :class:`TrainResult`. The adapter stays in the model, selected as its mix.
    """
    cfg = TrainConfig(**{**asdict(config or TrainConfig()), **overrides})
    if cfg.steps < 1:  # zero steps would write an untrained adapter and call it trained
        raise ValueError(f"steps must be at least 1, got {cfg.steps}")
    if isinstance(texts, (str, Path)):
        texts = load_texts(texts)
    output_dir = Path(output_dir)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else output_dir / "checkpoint"
    windows = _token_windows(texts, tokenizer, cfg.seq_len)

    mods = _targets(model, cfg.target_modules)
    torch.manual_seed(cfg.seed)  # A's Kaiming init
    for path in sorted(mods):
        if cfg.adapter_name in mods[path].adapter_names:
            mods[path].remove_adapter(cfg.adapter_name)
        mods[path].add_adapter(cfg.adapter_name, cfg.rank, cfg.alpha, cfg.use_rslora)
    set_adapter_mix(model, [(cfg.adapter_name, 1.0)])
    for p in model.parameters():
        p.requires_grad_(False)
    params = _adapter_params(mods, cfg.adapter_name)
    for _, p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, weight_decay=cfg.weight_decay)

    start = 0
    if resume and (ckpt / _STATE_JSON).exists():
        start = _load_checkpoint(ckpt, cfg, params, opt)
    result = TrainResult(steps=start, resumed_from=start)
    was_training = model.training
    model.train()
    end = cfg.steps if max_steps_this_run is None else min(cfg.steps, start + max_steps_this_run)
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=cfg.adapter_name)
    try:
        for step in range(start, end):
            batch = windows[_batch_indices(step, cfg.batch_size, len(windows), cfg.seed)]
            with torch.enable_grad():
                logits = _logits(model, batch[:, :-1])
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                       batch[:, 1:].reshape(-1))
                if not loss.requires_grad:
                    raise RuntimeError(
                        "model forward ran without autograd (is it decorated with "
                        "torch.no_grad?); the trainer needs gradients through the model"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip)
            opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"step {step}: loss is {value}; lower lr")
            result.losses.append(value)
            result.steps = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if on_step is not None:
                on_step(step, value)
            if cfg.checkpoint_every > 0 and (step + 1) % cfg.checkpoint_every == 0:
                _save_checkpoint(ckpt, step + 1, cfg, params, opt)
        _save_checkpoint(ckpt, result.steps, cfg, params, opt)
        if result.steps >= cfg.steps:
            result.output_dir = save_peft_adapter(model, cfg.adapter_name, output_dir)
    finally:
        bar.close()
        for _, p in params:
            p.requires_grad_(False)
        model.train(was_training)
    return result


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    texts: Sequence[str] | str | Path,
    *,
    tokenizer: Any,
    seq_len: int = 128,
    batch_size: int = 8,
) -> float:
    """exp(mean next-token cross-entropy) over all windows of ``texts`` with the model's
    current adapter mix."""
    if isinstance(texts, (str, Path)):
        texts = load_texts(texts)
    windows = _token_windows(texts, tokenizer, seq_len)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        logits = _logits(model, batch[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                       batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    return math.exp(total / count)
