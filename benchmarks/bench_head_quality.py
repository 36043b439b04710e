"""What a lighter LM head costs in quality: top-1 agreement with the float head, perplexity.

The final hidden states of held-out text (the last 2% of each training corpus, as
scripts/train_base.py holds out) are computed once; each head kind then turns the same
states into logits, so the comparison isolates the head. The reference is the float head;
a model directory that stores no float head (the bundled demo model ships its int8 head)
uses that head dequantised as the float reference, and the int4 heads are quantised from
it - they round twice, so the figures are a bound on what a float source would give.

    python benchmarks/bench_head_quality.py                       # bundled demo model
    python benchmarks/bench_head_quality.py --model DIR --random-text 4096   # e.g. 2B shape

Writes a markdown table (and --json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from r3mes import kernels
from r3mes.core.checkpoint import load_model
from r3mes.core.head_calibration import final_hidden_states
from r3mes.core.model import LMHead
from r3mes.core.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "r3mes" / "assets" / "demo_model"


def heldout_windows(tok: Tokenizer, seq: int, per_corpus: int) -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(ROOT / "scripts"))
    from _common import load_corpora

    out = {}
    for corpus in load_corpora():
        ids: list[int] = []
        for doc in corpus.documents():
            ids.extend(tok.encode(doc, add_special_tokens=False))
        held = np.asarray(ids[int(len(ids) * 0.98):], dtype=np.int64)
        n = min(per_corpus, (len(held) - 1) // (seq + 1))
        if n < 1:
            continue
        starts = np.linspace(0, len(held) - seq - 1, n).astype(np.int64)
        out[corpus.name] = torch.from_numpy(np.stack([held[s:s + seq + 1] for s in starts]))
    return out


def heads_to_compare(model) -> dict[str, LMHead]:
    ref = model.lm_head.dequantized_weight().float()
    heads = {"float": LMHead.from_float(ref, "float")}
    if model.lm_head.kind == "int8":
        heads["int8 (stored)"] = model.lm_head
    else:
        heads["int8"] = LMHead.from_float(ref, "int8")
    for group in kernels.INT4_GROUPS:
        heads[f"int4 g{group}"] = LMHead.from_float(ref, "int4", group=group)
    return heads


@torch.no_grad()
def compare(states: torch.Tensor, targets: torch.Tensor | None,
            heads: dict[str, LMHead], chunk: int = 512) -> dict[str, dict[str, float]]:
    """Per head: top-1 agreement with the float head, relative logit RMS error against it,
    bytes and (with targets) perplexity. The float logits of a chunk are made once."""
    h = states.reshape(-1, states.shape[-1])
    t = None if targets is None else targets.reshape(-1)
    sums = {name: {"agree": 0.0, "err": 0.0, "nll": 0.0} for name in heads}
    norm = 0.0
    for r0 in range(0, len(h), chunk):
        ref = heads["float"](h[r0:r0 + chunk])
        ref_top = ref.argmax(-1)
        norm += ref.pow(2).sum().item()
        for name, head in heads.items():
            logits = ref if name == "float" else head(h[r0:r0 + chunk])
            acc = sums[name]
            acc["agree"] += (logits.argmax(-1) == ref_top).sum().item()
            acc["err"] += (logits - ref).pow(2).sum().item()
            if t is not None:
                acc["nll"] += F.cross_entropy(logits, t[r0:r0 + chunk], reduction="sum").item()
    n = len(h)
    stats: dict[str, dict[str, float]] = {}
    for name, acc in sums.items():
        stats[name] = {"top1_agreement": acc["agree"] / n,
                       "rel_logit_rms": math.sqrt(acc["err"] / norm),
                       "bytes": heads[name].nbytes()}
        if t is not None:
            stats[name]["perplexity"] = math.exp(acc["nll"] / n)
    if t is not None:
        base = stats["float"]["perplexity"]
        for s in stats.values():
            s["perplexity_change"] = s["perplexity"] / base - 1.0
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEMO))
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--per-corpus", type=int, default=24, help="held-out windows per corpus")
    ap.add_argument("--random-text", type=int, default=0, metavar="N",
                    help="N random token ids instead of the corpora (a random-weight model "
                    "has no text it predicts; agreement only)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    model, info = load_model(args.model)
    model.eval()
    if args.random_text:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (args.random_text // args.seq,
                                                         args.seq + 1), generator=g)
        sets = {"random ids": ids}
    else:
        sets = heldout_windows(Tokenizer(args.model), args.seq, args.per_corpus)
    heads = heads_to_compare(model)
    report = {"model": args.model, "stored_head": info.head, "sets": {}}
    for name, windows in sets.items():
        states = final_hidden_states(model, windows[:, :-1])
        targets = None if args.random_text else windows[:, 1:]
        report["sets"][name] = compare(states, targets, heads)
    print(f"model {args.model} (stored head {info.head}); reference: float head")
    print("| text | head | MB | top-1 agreement | rel. logit RMS | perplexity | change |")
    print("|---|---|---|---|---|---|---|")
    for set_name, stats in report["sets"].items():
        for head, s in stats.items():
            ppl = f"{s['perplexity']:.3f}" if "perplexity" in s else "-"
            change = f"{100 * s['perplexity_change']:+.2f}%" if "perplexity" in s else "-"
            print(f"| {set_name} | {head} | {s['bytes'] / 1e6:.2f} | "
                  f"{100 * s['top1_agreement']:.2f}% | {100 * s['rel_logit_rms']:.2f}% | "
                  f"{ppl} | {change} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
