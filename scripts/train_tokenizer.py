"""Train the demo model's byte-level BPE tokenizer with the ``tokenizers`` library.

    python scripts/train_tokenizer.py --out .train/tokenizer [--vocab-size 8192]
        [--corpora scripts/corpora.json] [--extra PATH ...]

Writes ``tokenizer.json`` (plus ``tokenizer_config.json`` and ``special_tokens_map.json`` so
``transformers.PreTrainedTokenizerFast`` reads it too). Special tokens: ``<s>`` (bos, id 0),
``</s>`` (eos, id 1), ``<pad>`` (pad, id 2). Training is deterministic: the corpora are read
in a fixed order and the BPE trainer breaks ties by content, so the same inputs give a
byte-identical ``tokenizer.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_CORPORA, SPECIAL_TOKENS, load_corpora, resolve  # noqa: E402


def build_tokenizer(texts, vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """A trained byte-level BPE over ``texts`` (an iterable of strings)."""
    tok = Tokenizer(models.BPE())
    # NFC so that Turkish letters typed as base + combining mark map to the same bytes.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"], SPECIAL_TOKENS["pad"]]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def write_tokenizer(tok: Tokenizer, out: Path, model_max_length: int = 2048) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special_map = {"bos_token": SPECIAL_TOKENS["bos"], "eos_token": SPECIAL_TOKENS["eos"],
                   "pad_token": SPECIAL_TOKENS["pad"]}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
           "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
           **special_map}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".train/tokenizer", help="output directory")
    ap.add_argument("--corpora", default=str(DEFAULT_CORPORA), help="corpus list (JSON)")
    ap.add_argument("--extra", nargs="*", default=[], help="additional text/JSONL paths")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--min-frequency", type=int, default=2)
    args = ap.parse_args(argv)

    corpora = load_corpora(args.corpora, extra_paths=args.extra)

    def texts():
        for c in corpora:
            yield from c.documents()

    tok = build_tokenizer(texts(), args.vocab_size, args.min_frequency)
    out = resolve(args.out)
    write_tokenizer(tok, out)
    digest = hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    print(json.dumps({"out": str(out), "vocab_size": tok.get_vocab_size(),
                      "corpora": [c.name for c in corpora], "sha256": digest}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
