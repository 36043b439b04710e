"""Quantisation-aware training, from scratch, of the small BitNet b1.58 demo model.

    python scripts/train_base.py --tokenizer .train/tokenizer --out .train/base \
        [--corpora scripts/corpora.json] [--steps 400] [--batch 8] [--seq 256] [--seed 1234]

The model is the library's own (:meth:`r3mes.core.model.BitNetForCausalLM.for_training`):
every projection a ternary ``BitLinear`` trained with straight-through estimators; the LM
head and embeddings stay float, as in BitNet b1.58.

* Data: each corpus in the list is tokenised once (``<s> doc </s>`` per document) and cached
  under ``OUT/data/``; its last ``--heldout-frac`` of tokens is held out. Training windows are
  drawn per step from an RNG seeded with ``(seed, step)``, corpora in proportion to their
  configured weights, so a resumed run sees exactly the batches an uninterrupted one would.
* Resumable: ``OUT/checkpoint/`` holds ``model.safetensors``, ``optimizer.safetensors`` and
  ``state.json`` (written atomically every ``--ckpt-every`` steps); rerunning the same command
  continues from there.
* Logs: ``OUT/log.jsonl`` has one JSON object per logged step (loss, lr, tokens, seconds) and
  per evaluation (held-out perplexity per corpus and overall).
* Output: ``OUT/hf/`` is an HF-format float BitNet directory (``config.json``,
  ``model.safetensors``, tokenizer files, ``generation_config.json``, ``training.json``).
  ``--export-only`` writes it from the latest checkpoint without training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_CORPORA, SPECIAL_TOKENS, load_corpora, resolve, seed_everything  # noqa: E402

from r3mes.core.model import BitNetConfig, BitNetForCausalLM  # noqa: E402
from r3mes.utils.atomic import atomic_write_json  # noqa: E402


# ----------------------------------------------------------------------------- data
def tokenize_corpus(corpus, tok: Tokenizer, cache_dir: Path) -> np.ndarray:
    """All documents of ``corpus`` as one uint16 token stream (cached as .npy)."""
    cache = cache_dir / f"{corpus.name}.npy"
    if cache.exists():
        return np.load(cache, allow_pickle=False)
    bos, eos = tok.token_to_id(SPECIAL_TOKENS["bos"]), tok.token_to_id(SPECIAL_TOKENS["eos"])
    docs = list(corpus.documents())
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.append(bos)
        ids.extend(enc.ids)
        ids.append(eos)
    arr = np.asarray(ids, dtype=np.uint16)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, arr, allow_pickle=False)
    os.replace(tmp, cache)
    return arr


class Streams:
    """Train/held-out token streams per corpus and a deterministic batch sampler."""

    def __init__(self, corpora, tok: Tokenizer, cache_dir: Path, heldout_frac: float) -> None:
        self.names, self.train, self.heldout, weights = [], [], [], []
        for c in corpora:
            arr = tokenize_corpus(c, tok, cache_dir)
            cut = int(len(arr) * (1.0 - heldout_frac))
            self.names.append(c.name)
            self.train.append(arr[:cut])
            self.heldout.append(arr[cut:])
            weights.append(c.weight if c.weight is not None else float(len(arr)))
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()

    def batch(self, seed: int, step: int, batch: int, seq: int) -> torch.Tensor:
        rng = np.random.default_rng([seed, step])
        which = rng.choice(len(self.train), size=batch, p=self.weights)
        rows = []
        for ci in which:
            arr = self.train[ci]
            start = int(rng.integers(0, len(arr) - seq - 1))
            rows.append(arr[start:start + seq + 1].astype(np.int64))
        return torch.from_numpy(np.stack(rows))

    def heldout_windows(self, seq: int, per_corpus: int) -> dict[str, torch.Tensor]:
        """Fixed, evenly spaced held-out windows [n, seq+1] per corpus."""
        out = {}
        for name, arr in zip(self.names, self.heldout, strict=True):
            n = min(per_corpus, max(1, (len(arr) - 1) // (seq + 1)))
            starts = np.linspace(0, len(arr) - seq - 1, n).astype(np.int64)
            out[name] = torch.from_numpy(
                np.stack([arr[s:s + seq + 1].astype(np.int64) for s in starts]))
        return out


def lm_loss(model: BitNetForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over ``ids`` [B, T+1]."""
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: BitNetForCausalLM, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    """Held-out perplexity per corpus and over all windows (token-weighted)."""
    model.eval()
    out, tot_loss, tot_n = {}, 0.0, 0
    for name, w in windows.items():
        loss_sum, n = 0.0, 0
        for i in range(0, len(w), 8):
            chunk = w[i:i + 8]
            loss_sum += float(lm_loss(model, chunk)) * chunk[:, 1:].numel()
            n += chunk[:, 1:].numel()
        out[name] = math.exp(loss_sum / n)
        tot_loss += loss_sum
        tot_n += n
    out["all"] = math.exp(tot_loss / tot_n)
    model.train()
    return out


# ----------------------------------------------------------------------------- checkpoints
def lr_at(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * frac))


def save_checkpoint(ckpt: Path, model, opt, state: dict) -> None:
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp / "model.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    opt_tensors = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    opt_tensors[f"{names[id(p)]}::{key}"] = torch.as_tensor(st[key]).contiguous()
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    atomic_write_json(tmp / "state.json", state)
    old = ckpt.with_name(ckpt.name + ".old")
    if ckpt.exists():
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)
    if old.exists():
        shutil.rmtree(old)


def load_checkpoint(ckpt: Path, model, opt) -> dict:
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    for name, p in model.named_parameters():
        if f"{name}::exp_avg" in tensors:
            opt.state[p] = {"step": tensors[f"{name}::step"],
                            "exp_avg": tensors[f"{name}::exp_avg"],
                            "exp_avg_sq": tensors[f"{name}::exp_avg_sq"]}
    return json.loads((ckpt / "state.json").read_text())


def export_hf(model: BitNetForCausalLM, tok_dir: Path, out: Path, training: dict) -> None:
    """Write the HF float BitNet directory (atomically: temp dir + rename)."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    cfg = model.config
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id[0],
           "pad_token_id": cfg.pad_token_id, "do_sample": True, "temperature": 0.8,
           "top_p": 0.95, "max_new_tokens": 128}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(tok_dir / f, tmp / f)
    (tmp / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default=".train/tokenizer")
    ap.add_argument("--out", default=".train/base")
    ap.add_argument("--corpora", default=str(DEFAULT_CORPORA))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--heldout-frac", type=float, default=0.02)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--ckpt-every", type=int, default=10)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop (checkpointed) after this many steps in this run; rerun to go on")
    ap.add_argument("--export-only", action="store_true",
                    help="write OUT/hf from the latest checkpoint and exit")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    tok_dir, out = resolve(args.tokenizer), resolve(args.out)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    cfg = BitNetConfig(vocab_size=tok.get_vocab_size(), hidden_size=args.hidden,
                       intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       rope_theta=args.rope_theta,
                       # the context the model has actually seen: the serving engine keeps
                       # prompts within it (RoPE positions beyond it were never trained)
                       max_position_embeddings=args.seq,
                       bos_token_id=tok.token_to_id(SPECIAL_TOKENS["bos"]),
                       eos_token_id=tok.token_to_id(SPECIAL_TOKENS["eos"]),
                       pad_token_id=tok.token_to_id(SPECIAL_TOKENS["pad"]))
    model = BitNetForCausalLM.for_training(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    ckpt = out / "checkpoint"
    state = {"step": 0, "tokens": 0, "seconds": 0.0, "last_eval": None}
    if ckpt.exists():
        state = load_checkpoint(ckpt, model, opt)
        print(f"resumed from {ckpt} at step {state['step']}", file=sys.stderr)

    corpora = load_corpora(args.corpora)
    streams = Streams(corpora, tok, out / "data", args.heldout_frac)
    windows = streams.heldout_windows(args.seq, args.eval_windows)
    log = (out / "log.jsonl").open("a", encoding="utf-8")

    def write_log(rec: dict) -> None:
        log.write(json.dumps(rec) + "\n")
        log.flush()

    def training_record() -> dict:
        return {"config": cfg.to_dict(), "args": vars(args), "corpora": streams.names,
                "corpus_weights": streams.weights.tolist(),
                "train_tokens_available": {n: int(len(a)) for n, a in
                                           zip(streams.names, streams.train, strict=True)},
                "steps": state["step"], "tokens_seen": state["tokens"],
                "train_seconds": state["seconds"], "heldout_perplexity": state["last_eval"],
                "torch": torch.__version__}

    if not args.export_only:
        model.train()
        end = args.steps if args.stop_after is None else min(args.steps,
                                                             state["step"] + args.stop_after)
        bar = tqdm(range(state["step"], end), initial=state["step"], total=args.steps,
                   desc="train-base", mininterval=10)
        t_last = time.time()
        for step in bar:
            lr = lr_at(step, args.steps, args.lr, args.warmup, args.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            ids = streams.batch(args.seed, step, args.batch, args.seq)
            loss = lm_loss(model, ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            now = time.time()
            state["seconds"] += now - t_last
            t_last = now
            state["step"] = step + 1
            state["tokens"] += int(ids[:, 1:].numel())
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.2e}")
            if (step + 1) % args.log_every == 0 or step == 0:
                write_log({"step": step + 1, "loss": float(loss.detach()), "lr": lr,
                           "tokens": state["tokens"], "seconds": round(state["seconds"], 1)})
            last = step + 1 == end
            if (step + 1) % args.eval_every == 0 or last:
                ppl = evaluate(model, windows)
                state["last_eval"] = {"step": step + 1, "perplexity": ppl}
                write_log({"step": step + 1, "eval": ppl})
                t_last = time.time()  # evaluation time is not training time
            if (step + 1) % args.ckpt_every == 0 or last:
                save_checkpoint(ckpt, model, opt, state)
                t_last = time.time()
        bar.close()
        if state["step"] < args.steps:
            print(f"stopped at step {state['step']} of {args.steps}; rerun to continue",
                  file=sys.stderr)
            return 0
    if state["last_eval"] is None or state["last_eval"]["step"] != state["step"]:
        ppl = evaluate(model, windows)
        state["last_eval"] = {"step": state["step"], "perplexity": ppl}
        write_log({"step": state["step"], "eval": ppl})
    export_hf(model, tok_dir, out / "hf", training_record())
    print(json.dumps({"hf": str(out / "hf"), "steps": state["step"],
                      "tokens": state["tokens"], "seconds": round(state["seconds"], 1),
                      "heldout_perplexity": state["last_eval"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
