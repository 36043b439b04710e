"""What the opt-in 16-bit KV cache costs in quality, against the float32 cache.

Both caches run the same native decode path (``NativeDecoder``, as the native backend and
the serving engine run it); only the element type of the block pool differs. Two measures
on held-out text (the last 2% of each training corpus, as scripts/train_base.py holds out):

* **teacher-forced**: each window's first ``--prompt`` tokens are prefilled into the pool,
  then every later token is decoded one step at a time (all windows as the rows of one
  batch): top-1 agreement of the logits, their relative RMS error against the float32
  cache's, and the perplexity of each;
* **greedy**: from the same prompts, ``--new`` tokens generated greedily with each cache:
  how many continuations are identical, and how far they agree before the first change.

    python benchmarks/bench_kv_quality.py                       # bundled demo model
    python benchmarks/bench_kv_quality.py --model DIR --random-text 4096   # e.g. 2B shape

Prints a markdown table (and writes --json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from r3mes import kernels
from r3mes.core.backends.native_decode import NativeDecoder
from r3mes.core.checkpoint import load_model
from r3mes.core.kv_blocks import KVBlockPool
from r3mes.core.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_head_quality import DEMO, heldout_windows  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16}


class Rows:
    """The windows' sequences in one block pool of ``dtype``, prefilled with ``prompt``."""

    def __init__(self, model, windows: torch.Tensor, prompt: int, length: int,
                 dtype: torch.dtype) -> None:
        self.model = model
        self.pool = KVBlockPool(model.config, len(windows) * (length // 16 + 1), 16, dtype)
        self.blocks = [self.pool.allocate(self.pool.blocks_for(length)) for _ in windows]
        self.table = KVBlockPool.table(self.blocks)
        self.first = torch.stack([model.prefill_paged(w[:prompt].tolist(), self.pool, b)
                                  for w, b in zip(windows, self.blocks, strict=True)])

    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        positions = torch.full((len(tokens),), position, dtype=torch.long)
        return self.model.decode_paged(tokens, self.pool, self.table, positions)


@torch.no_grad()
def teacher_forced(model, windows: torch.Tensor, prompt: int) -> dict[str, dict[str, float]]:
    """Top-1 agreement and relative logit RMS of the half cache against the float32 cache,
    and each cache's perplexity, over every decoded position of the windows."""
    seq = windows.shape[1] - 1
    rows = {name: Rows(model, windows, prompt, seq, dtype) for name, dtype in DTYPES.items()}
    agree = err = norm = 0.0
    nll = dict.fromkeys(DTYPES, 0.0)
    count = 0
    for t in range(prompt, seq):
        logits = {name: r.step(windows[:, t], t) for name, r in rows.items()}
        ref, half = logits["float32"], logits["float16"]
        agree += (half.argmax(-1) == ref.argmax(-1)).sum().item()
        err += (half - ref).pow(2).sum().item()
        norm += ref.pow(2).sum().item()
        for name, lg in logits.items():
            nll[name] += F.cross_entropy(lg, windows[:, t + 1], reduction="sum").item()
        count += len(windows)
    ppl = {name: math.exp(v / count) for name, v in nll.items()}
    return {"positions": count, "top1_agreement": agree / count,
            "rel_logit_rms": math.sqrt(err / norm), "perplexity": ppl}


@torch.no_grad()
def greedy(model, windows: torch.Tensor, prompt: int, new: int) -> dict[str, float]:
    """Greedy continuations of the windows' prompts with each cache, compared."""
    out = {}
    for name, dtype in DTYPES.items():
        rows = Rows(model, windows, prompt, prompt + new, dtype)
        tokens = rows.first.argmax(-1)
        generated = [tokens]
        for t in range(prompt, prompt + new - 1):
            tokens = rows.step(tokens, t).argmax(-1)
            generated.append(tokens)
        out[name] = torch.stack(generated, 1)
    same = out["float16"] == out["float32"]
    # Tokens before the first difference (all of them where there is none).
    prefix = torch.where(same.all(1), new, (~same).int().argmax(1))
    return {"sequences": len(windows), "identical": int(same.all(1).sum()),
            "mean_agreeing_prefix": float(prefix.float().mean()),
            "token_agreement": float(same.float().mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEMO))
    ap.add_argument("--seq", type=int, default=256, help="tokens a window")
    ap.add_argument("--prompt", type=int, default=16, help="prefilled tokens of a window")
    ap.add_argument("--new", type=int, default=64, help="greedy tokens a sequence")
    ap.add_argument("--per-corpus", type=int, default=12, help="held-out windows per corpus")
    ap.add_argument("--random-text", type=int, default=0, metavar="N",
                    help="N random token ids instead of the corpora (a random-weight model "
                    "has no text it predicts: agreement only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    if not 2 <= args.prompt < args.seq:
        ap.error("--prompt must be at least 2 and below --seq")

    kernels.set_num_threads(args.threads)
    torch.set_num_threads(1)
    model, _ = load_model(args.model)
    model.eval()
    NativeDecoder.attach(model)
    if args.random_text:
        g = torch.Generator().manual_seed(0)
        sets = {"random ids": torch.randint(0, model.config.vocab_size,
                                            (args.random_text // args.seq, args.seq + 1),
                                            generator=g)}
    else:
        sets = heldout_windows(Tokenizer(args.model), args.seq, args.per_corpus)
    report = {"model": args.model, "sets": {}}
    for name, windows in sets.items():
        report["sets"][name] = {"teacher_forced": teacher_forced(model, windows, args.prompt),
                                "greedy": greedy(model, windows, args.prompt, args.new)}
    print(f"model {args.model}; float16 KV cache against float32, native decode, "
          f"{args.prompt}-token prompts")
    print("| text | positions | top-1 agreement | rel. logit RMS | perplexity f32 -> f16 | "
          f"greedy {args.new} tokens: identical | agreeing prefix | token agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in report["sets"].items():
        tf, gr = r["teacher_forced"], r["greedy"]
        ppl = ("-" if args.random_text else
               f"{tf['perplexity']['float32']:.3f} -> {tf['perplexity']['float16']:.3f}")
        print(f"| {name} | {tf['positions']} | {100 * tf['top1_agreement']:.2f}% | "
              f"{100 * tf['rel_logit_rms']:.3f}% | {ppl} | "
              f"{gr['identical']}/{gr['sequences']} | {gr['mean_agreeing_prefix']:.1f} | "
              f"{100 * gr['token_agreement']:.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
