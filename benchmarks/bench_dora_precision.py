"""DoRA adapter storages against PEFT: logit error and top-token agreement (issue 21).

Two base models, each with strong random PEFT DoRA adapters (r=8, all seven projections,
magnitudes moved by up to 20%), PEFT's float32 logits as the truth:

* **trained**: the bundled demo model rebuilt as a transformers BitNet (the twin of
  ``tests/dora/test_peft_trained_parity.py``), B ~ 0.05 N(0,1), over 29 windows of 256
  tokens of the bundled knowledge documents;
* **random**: the random transformers BitNet of ``tests/dora/test_peft_bitnet_parity.py``
  (hidden 64 as there, or ``--hidden 256``), B ~ 0.02 N(0,1) as in the issue, 48 positions.

A third table loads a float transformers checkpoint (AutoBitLinear, quantised online)
and compares r3mes with transformers in float32 and float64.

Rows besides the r3mes backends measure how sensitive each model is to float rounding
alone: PEFT with its adapter rounded to fp16, and PEFT in float64 (same weights: on a
chaotic model one rounding difference tips an int8 activation and moves the logits).

    python benchmarks/bench_dora_precision.py [--seeds 3] [--hidden 256]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "dora"))

import test_peft_bitnet_parity as random_case  # noqa: E402
import test_peft_trained_parity as trained_case  # noqa: E402

from r3mes.core.backends import BitNetCppBackend, PyTorchBackend  # noqa: E402

STORAGES = ("fp32", "fp16", "int8")


def _stats(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    rel = float((got - want).norm() / want.norm())
    return rel, float((got.argmax(-1) == want.argmax(-1)).float().mean())


def _fp16_rounded(pm, ids: torch.Tensor) -> torch.Tensor:
    pm = copy.deepcopy(pm)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(p.half().float())
        return pm(ids).logits.float()


def _measure(pm, base_dir: Path, ids: torch.Tensor, root: Path) -> dict[str, tuple]:
    pm.save_pretrained(root / "adapter")
    with torch.no_grad():
        want = pm(ids).logits.float()
        with pm.disable_adapter():
            base = pm(ids).logits.float()
        rows = {"adapter's effect (PEFT with vs without)": (_stats(base, want)[0], None),
                "PEFT, adapter rounded to fp16": _stats(_fp16_rounded(pm, ids), want),
                "PEFT in float64": _stats(copy.deepcopy(pm).double()(ids).logits.float(), want)}
    for kind in ("torch",) + STORAGES:
        be = PyTorchBackend() if kind == "torch" else BitNetCppBackend(adapter_storage=kind)
        be.load_base_model(base_dir, head="float")  # the stored head (int8 in the demo)
        be.load_dora_adapter("x", root / "adapter")
        label = "r3mes torch reference" if kind == "torch" else f"r3mes native, {kind}"
        rows[label] = _stats(be.inference(ids.tolist(), ["x"], [1.0]), want)
    return rows


def trained(seed: int) -> dict[str, tuple]:
    pm = trained_case.strong_adapter_model(trained_case.transformers_twin(), seed)
    return _measure(pm, trained_case.DEMO, trained_case.real_text_ids(None),
                    Path(tempfile.mkdtemp()))


def random_model(seed: int, hidden: int) -> dict[str, tuple]:
    build = random_case._build
    if hidden != 64:  # the same recipe at a wider shape
        src = inspect.getsource(build).replace(
            "vocab_size=320, hidden_size=64, intermediate_size=160",
            f"vocab_size=1000, hidden_size={hidden}, intermediate_size={hidden * 5 // 2}").replace(
            "num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2",
            f"num_hidden_layers=4, num_attention_heads={hidden // 16}, "
            f"num_key_value_heads={hidden // 32}")
        ns = dict(random_case.__dict__)
        exec(src, ns)
        build = ns["_build"]
    root = Path(tempfile.mkdtemp())
    pm, ids = build(seed, root)
    return _measure(pm, root / "packed", ids, root)


def online_checkpoint(seed: int, hidden: int) -> dict[str, tuple]:
    """A float transformers checkpoint (quantised online by AutoBitLinear in every forward)
    loaded by r3mes, against transformers in float32 and float64: no adapter."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "model"))
    import conftest as hf_models

    from r3mes.core.checkpoint import load_model

    shape = {} if hidden == 64 else dict(
        hidden_size=hidden, intermediate_size=hidden * 5 // 2, num_hidden_layers=4,
        num_attention_heads=hidden // 16, num_key_value_heads=hidden // 32, vocab_size=1000)
    root = Path(tempfile.mkdtemp()) / "float"
    hf_models.random_hf_model(seed, **shape).save_pretrained(root)
    online = hf_models.quantize_like_hf(hf_models.random_hf_model(seed, **shape),
                                        "autobitlinear", "online")
    ids = torch.randint(3, 300, (1, 48), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = online(ids).logits.float()
        want64 = online.double()(ids).logits.float()
        ours = load_model(root, head="float")[0](ids)
    return {"transformers float64 vs float32": _stats(want64, want),
            "r3mes vs transformers float32": _stats(ours, want),
            "r3mes vs transformers float64": _stats(ours, want64)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=64, help="width of the random model")
    args = ap.parse_args()
    for title, run in (("trained demo model (7424 positions)", trained),
                       (f"random BitNet, hidden {args.hidden} (48 positions)",
                        lambda s: random_model(s, args.hidden)),
                       (f"float (online-quantised) random checkpoint, hidden {args.hidden}, "
                        "no adapter", lambda s: online_checkpoint(s, args.hidden))):
        results = [run(seed) for seed in range(args.seeds)]
        print(f"\n### {title}, seeds 0-{args.seeds - 1}\n")
        print("| | rel. logit error | top token equal |")
        print("|---|---|---|")
        for label in results[0]:
            errs = [r[label][0] for r in results]
            agree = [r[label][1] for r in results]
            a = "" if agree[0] is None else f"{min(agree):.2%} - {max(agree):.2%}"
            print(f"| {label} | {min(errs):.3%} - {max(errs):.3%} | {a} |")


if __name__ == "__main__":
    main()
