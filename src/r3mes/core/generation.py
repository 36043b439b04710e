"""Text generation: a plain loop over a preallocated KV cache.

One prefill call for the whole (left-padded) batch, then one decode call per new token.
Sampling per row: repetition penalty (HF's rule: divide positive logits, multiply negative
ones, for every token already in the row), then greedy (``temperature == 0``) or
temperature, top-k, top-p and a seeded multinomial draw. A row stops at an EOS token, a
stop string (cut from the text, never streamed) or ``max_new_tokens``.

:func:`stream` yields a :class:`TokenEvent` per row per step (with the new text, held back
while it could still become a stop string or is an incomplete UTF-8 sequence);
:func:`generate` collects them into :class:`GenerationResult` s.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from r3mes.core.model import BitNetConfig, BitNetForCausalLM, KVCache
from r3mes.core.tokenizer import Tokenizer

__all__ = [
    "ForwardFn",
    "GenerationConfig",
    "GenerationResult",
    "TokenEvent",
    "generate",
    "sample_next",
    "stop_token_ids",
    "stream",
]

#: ``forward(input_ids [B, T], cache, last_only) -> logits [B, T or 1, V]``.
ForwardFn = Callable[[torch.Tensor, KVCache, bool], torch.Tensor]


@dataclass
class GenerationConfig:
    """Decoding options. ``temperature == 0`` is greedy (top-k/top-p are then unused)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] | None = None  # None: the model's and tokenizer's EOS
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass
class TokenEvent:
    """One generated token of one batch row."""

    index: int
    token_id: int
    text: str | None  # new text to show (None without a tokenizer)
    finished: bool
    finish_reason: str | None = None  # "eos", "stop" or "length" when finished


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None


def sample_next(logits: torch.Tensor, config: GenerationConfig, seen: torch.Tensor | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]; ``seen`` bool [B, V] for the repetition penalty."""
    logits = logits.float()
    if config.repetition_penalty != 1.0 and seen is not None:
        p = config.repetition_penalty
        penalised = torch.where(logits < 0, logits * p, logits / p)
        logits = torch.where(seen, penalised, logits)
    if config.temperature == 0.0:
        return logits.argmax(dim=-1)
    # Shifted by the row maximum first: a tiny temperature then scales values <= 0 (the
    # softmax is the same) instead of overflowing the largest logits to inf (NaN probs).
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= config.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def stop_token_ids(config: GenerationConfig, model_config: BitNetConfig,
                   tokenizer: Tokenizer | None) -> frozenset[int]:
    """The tokens that end a row: ``config.stop_token_ids`` when given, else the model's EOS
    ids (all of them: chat models declare end of turn too) and the tokenizer's EOS."""
    if config.stop_token_ids is not None:
        return frozenset(config.stop_token_ids)
    ids = set(model_config.eos_token_id)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


class _RowText:
    """Incremental detokenisation of one row with stop-string hold-back."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""

    def push(self, token_id: int | None) -> tuple[str, bool]:
        """Add a token (None: flush at the end); returns (new text, hit a stop string)."""
        if token_id is not None:
            self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        hit = False
        for s in self.stop:
            pos = text.find(s)
            if pos != -1:
                text, hit = text[:pos], True
        safe = len(text)
        if not hit and token_id is not None:
            if text.endswith("\ufffd"):  # an incomplete multi-byte character
                safe = len(text.rstrip("\ufffd"))
            for s in self.stop:  # a suffix that may still grow into a stop string
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        safe = min(safe, len(text) - n)
                        break
        safe = max(safe, self.emitted)
        delta = text[self.emitted:safe]
        self.emitted = safe
        self.text = text
        return delta, hit


def stream(model: BitNetForCausalLM, prompts: Sequence[Sequence[int]],
           config: GenerationConfig | None = None, tokenizer: Tokenizer | None = None,
           forward: ForwardFn | None = None) -> Iterator[TokenEvent]:
    """Generate for a batch of token-id prompts of any lengths, yielding tokens as they come.

    Raises ValueError for an empty prompt, out-of-range ids, or stop strings without a
    tokenizer.
    """
    config = config or GenerationConfig()
    if not prompts:
        return
    if config.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    cfg = model.config
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"prompts[{i}]: token ids must be in [0, {cfg.vocab_size})")
    fwd = forward or (lambda ids, cache, last_only: model(ids, cache, last_only=last_only))
    stop_ids = stop_token_ids(config, cfg, tokenizer)
    bsz = len(prompts)
    longest = max(len(p) for p in prompts)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    pad = [longest - len(p) for p in prompts]
    ids = torch.full((bsz, longest), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, pad[b]:] = torch.as_tensor(list(p), dtype=torch.long)
    if config.max_new_tokens == 0:
        return
    cache = model.new_cache(bsz, longest + config.max_new_tokens, pad)
    seen = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros(bsz, cfg.vocab_size, dtype=torch.bool)
        for b, p in enumerate(prompts):
            seen[b, torch.as_tensor(list(p))] = True
    generator = None
    if config.temperature > 0:
        generator = torch.Generator()
        generator.manual_seed(config.seed if config.seed is not None
                              else int.from_bytes(os.urandom(8), "little") >> 1)
    texts = [_RowText(tokenizer, config.stop) if tokenizer is not None else None
             for _ in range(bsz)]
    active = [True] * bsz
    logits = fwd(ids, cache, True)[:, -1]
    for step in range(config.max_new_tokens):
        nxt = sample_next(logits, config, seen, generator)
        last_step = step == config.max_new_tokens - 1
        for b in range(bsz):
            if not active[b]:
                continue
            tok = int(nxt[b])
            if seen is not None:
                seen[b, tok] = True
            reason = None
            delta = None
            if tok in stop_ids:
                reason = "eos"
                if texts[b] is not None:
                    delta, _ = texts[b].push(None)
            else:
                if texts[b] is not None:
                    delta, hit = texts[b].push(tok)
                    if hit:
                        reason = "stop"
                if reason is None and last_step:
                    reason = "length"
                    if texts[b] is not None:
                        more, _ = texts[b].push(None)
                        delta += more
            if reason is not None:
                active[b] = False
            yield TokenEvent(b, tok, delta, reason is not None, reason)
        if not any(active):
            break
        step_ids = torch.where(torch.tensor(active), nxt, torch.full_like(nxt, pad_id))
        logits = fwd(step_ids[:, None], cache, True)[:, -1]


def generate(model: BitNetForCausalLM, prompts: Sequence[Sequence[int]],
             config: GenerationConfig | None = None, tokenizer: Tokenizer | None = None,
             forward: ForwardFn | None = None) -> list[GenerationResult]:
    """Run :func:`stream` to completion; one result per prompt (tokens, text, reason)."""
    results = [GenerationResult(prompt_tokens=len(p), text="" if tokenizer else None)
               for p in prompts]
    for ev in stream(model, prompts, config, tokenizer, forward):
        r = results[ev.index]
        r.tokens.append(ev.token_id)
        if ev.text is not None:
            r.text += ev.text
        if ev.finished:
            r.finish_reason = ev.finish_reason
    return results
