"""Train the bundled DoRA experts on the demo base model and measure the perplexity matrix.

    python scripts/train_experts.py --base .train/base/hf --out .train/experts \
        [--eval-model .train/demo_model] [--experts scripts/experts.json] [--only ID ...]
        [--steps 80] [--rank 8] [--alpha 16] [--lr 2e-3] [--seed 0]

For every expert in ``scripts/experts.json`` the domain text is split into a training part
and a held-out part (see that file), a rank-``r`` DoRA adapter is trained on every
projection with :func:`r3mes.core.trainer.train_adapter` (deterministic, resumable; the
PEFT directory lands in ``OUT/<id>/adapter``), and an expert whose adapter exists already is
skipped, so an interrupted run is continued by rerunning the command.

Training runs through the library model loaded from the HF float directory
(:func:`r3mes.core.checkpoint.load_model` with a float LM head: projections frozen to
ternary and wrapped in ``BitLinearDoRA``, the adapters' gradients flowing through the
frozen base, as ``r3mes train-adapter`` does). The evaluation
loads every adapter with :func:`r3mes.core.adapter_io.load_peft_adapter` into the model
r3mes ships (``--eval-model``, default the HF directory) and measures held-out perplexity
of the base and of each expert on every domain: ``OUT/results.json`` and ``OUT/matrix.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_CORPORA, load_corpora, resolve, seed_everything  # noqa: E402

from r3mes.core.adapter_io import load_peft_adapter  # noqa: E402
from r3mes.core.checkpoint import load_model  # noqa: E402
from r3mes.core.dora import BitLinearDoRA, set_adapter_mix  # noqa: E402
from r3mes.core.tokenizer import Tokenizer  # noqa: E402
from r3mes.core.trainer import TrainConfig as AdapterConfig  # noqa: E402
from r3mes.core.trainer import evaluate_perplexity, train_adapter  # noqa: E402
from r3mes.utils.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from r3mes.utils.jsonl import jsonl_records  # noqa: E402

DEFAULT_EXPERTS = Path(__file__).resolve().parent / "experts.json"


# ----------------------------------------------------------------------------- data
def _paragraphs(text: str, max_chars: int = 1000) -> list[str]:
    """Blank-line separated paragraphs, whitespace-normalised; long ones cut at word
    boundaries into pieces of at most ``max_chars`` (some corpora have no blank lines)."""
    out = []
    for para in text.split("\n\n"):
        words, piece, n = para.split(), [], 0
        for w in words:
            if n + len(w) + 1 > max_chars and piece:
                out.append(" ".join(piece))
                piece, n = [], 0
            piece.append(w)
            n += len(w) + 1
        if piece:
            out.append(" ".join(piece))
    return out


def _own_items(src: dict) -> list[str]:
    """Paragraphs of a .txt file, or documents of a JSONL file filtered by domain/lang."""
    path = resolve(src["path"])
    if path.suffix == ".jsonl":
        items = []
        for _, obj in jsonl_records(path, path.read_text(encoding="utf-8").splitlines()):
            if "domain" in src and obj.get("domain") != src["domain"]:
                continue
            if "lang" in src and obj.get("lang") != src["lang"]:
                continue
            items.append(f"{obj.get('title', '')}\n{obj['text']}".strip())
        return items
    return _paragraphs(path.read_text(encoding="utf-8"))


def _corpus_split(src: dict, corpora: dict, seed: int) -> tuple[list[str], list[str]]:
    """Training paragraphs from the first 98% of a corpus, held-out ones from the last 2%."""
    corpus = corpora.get(src["corpus"])
    if corpus is None:
        print(f"warning: corpus {src['corpus']} unavailable, skipped", file=sys.stderr)
        return [], []
    paras = [p for doc in corpus.documents() for p in _paragraphs(doc)]
    sizes = np.cumsum([len(p) for p in paras])
    cut = int(np.searchsorted(sizes, sizes[-1] * 0.98))
    train_pool, held_pool = paras[:cut], paras[cut:]

    def take(pool: list[str], start: int, budget: int) -> list[str]:
        out, n = [], 0
        for p in pool[start:] + pool[:start]:
            if n >= budget:
                break
            out.append(p)
            n += len(p)
        return out

    rng = np.random.default_rng([seed, len(src["corpus"])])
    start = int(rng.integers(0, max(1, len(train_pool))))
    return take(train_pool, start, src["train_chars"]), take(held_pool, 0, src["heldout_chars"])


def expert_data(spec: list[dict], every: int, corpora: dict, seed: int
                ) -> tuple[list[str], list[str]]:
    train, held = [], []
    for src in spec:
        if "corpus" in src:
            tr, he = _corpus_split(src, corpora, seed)
        else:
            items = _own_items(src)
            tr = [t for i, t in enumerate(items) if i % every != every - 1]
            he = [t for i, t in enumerate(items) if i % every == every - 1]
        train += tr
        held += he
    return train, held


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=".train/base/hf", help="HF float directory of the base")
    ap.add_argument("--eval-model", default=None,
                    help="model directory to evaluate on (default: --base)")
    ap.add_argument("--out", default=".train/experts")
    ap.add_argument("--experts", default=str(DEFAULT_EXPERTS))
    ap.add_argument("--corpora", default=str(DEFAULT_CORPORA))
    ap.add_argument("--only", nargs="*", default=None, help="train only these expert ids")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-only", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    base, out = resolve(args.base), resolve(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = json.loads(resolve(args.experts).read_text(encoding="utf-8"))
    corpora = {c.name: c for c in load_corpora(args.corpora)}
    tok = Tokenizer(base)
    ids = [e for e in spec["experts"] if not args.only or e in args.only]
    data = {e: expert_data(spec["experts"][e], spec["heldout_every"], corpora, args.seed)
            for e in spec["experts"]}
    timings: dict[str, float] = {}
    losses: dict[str, list[float]] = {}

    if not args.eval_only:
        model, _ = load_model(base, head="float")
        for eid in ids:
            adapter_dir = out / eid / "adapter"
            if (adapter_dir / "adapter_config.json").exists():
                print(f"{eid}: adapter exists, skipped", file=sys.stderr)
                continue
            train_texts, _ = data[eid]
            t0 = time.time()
            cfg = AdapterConfig(adapter_name=eid, rank=args.rank, alpha=args.alpha,
                                steps=args.steps, batch_size=args.batch, seq_len=args.seq,
                                lr=args.lr, seed=args.seed, checkpoint_every=20)
            res = train_adapter(model, train_texts, tokenizer=tok, output_dir=adapter_dir,
                                config=cfg, checkpoint_dir=out / eid / "checkpoint")
            timings[eid] = time.time() - t0
            losses[eid] = res.losses
            atomic_write_json(out / eid / "train.json", {
                "expert": eid, "steps": res.steps, "seconds": timings[eid],
                "resumed_from": res.resumed_from, "losses": res.losses,
                "train_chars": sum(len(t) for t in train_texts), "config": vars(args)})
            for m in model.modules():
                if isinstance(m, BitLinearDoRA) and eid in m.adapter_names:
                    m.remove_adapter(eid)
        del model

    # ---- evaluation on the model r3mes ships
    eval_dir = resolve(args.eval_model) if args.eval_model else base
    model, info = load_model(eval_dir)
    experts = [e for e in spec["experts"] if (out / e / "adapter" / "adapter_config.json").exists()]
    for e in experts:
        load_peft_adapter(model, out / e / "adapter", e)
    domains = list(spec["experts"])
    matrix: dict[str, dict[str, float]] = {}
    for row in ["base", *experts]:
        set_adapter_mix(model, None if row == "base" else [(row, 1.0)])
        matrix[row] = {}
        for d in domains:
            held = data[d][1]
            matrix[row][d] = evaluate_perplexity(model, held, tokenizer=tok, seq_len=args.seq)
        print(row, {k: round(v, 1) for k, v in matrix[row].items()}, file=sys.stderr)
    wins = {e: bool(all(matrix[e][e] < matrix[r][e] for r in matrix if r != e))
            for e in experts}
    heldout_tokens = {d: sum(len(tok.encode(t)) for t in data[d][1]) for d in domains}
    results = {"eval_model": str(eval_dir), "eval_format": info.format, "domains": domains,
               "perplexity": matrix, "expert_beats_all_on_own_domain": wins,
               "heldout_tokens": heldout_tokens, "seq_len": args.seq}
    atomic_write_json(out / "results.json", results)
    header = "| model \\ held-out domain | " + " | ".join(d.removesuffix("_dora")
                                                         for d in domains) + " |"
    lines = [header, "|" + "---|" * (len(domains) + 1)]
    for row, vals in matrix.items():
        cells = []
        for d in domains:
            v = f"{vals[d]:.1f}"
            cells.append(f"**{v}**" if row == d else v)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    atomic_write_text(out / "matrix.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"wins": wins, "all_win": all(wins.values()) if wins else False,
                      "base_ppl": {d: round(matrix["base"][d], 1) for d in domains},
                      "geomean_base": math.exp(np.mean(np.log(list(matrix["base"].values()))))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
