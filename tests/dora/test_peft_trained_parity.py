"""A strong PEFT DoRA adapter on a *trained* BitNet, loaded by r3mes (issue 21).

The bundled demo model (trained, 4 layers, hidden 256) is rebuilt as a transformers
``BitNetForCausalLM`` whose projections are ``nn.Linear`` modules computing BitNet's
forward (int8 absmax activations times the dequantised ternary weight), so PEFT wraps
them. PEFT gets a strong random DoRA adapter (r=8, all seven projections, magnitudes
moved by up to 20%, as the issue's recipe but with B ~ 0.2 N(0,1): it moves the logits by
~25%), saves it, and r3mes loads that directory on the demo model. Over 2048 tokens of
real text (8 windows of 256), for every adapter storage of the native backend: the
relative logit error to PEFT (float32) and the share of positions whose top token equals
PEFT's.

Bars (issue 21): the default storage (int8) and fp16 within 1% with >= 99% of the top
tokens equal, fp32 within 0.5%. Measured (``benchmarks/bench_dora_precision.py``, 3 seeds,
7424 positions): fp32 0.05% / 99.95-100%, fp16 0.15-0.16% / 99.76-99.97%, int8
0.26-0.30% / 99.69-99.89%; the torch reference itself 0.04-0.05% / 99.92-100% (float
rounding alone).

Why this is checked on a trained model: the random checkpoints of
``test_peft_bitnet_parity.py`` are chaotic under BitNet's int8 activation rounding. On
them a difference of one float rounding anywhere tips some activation to the next int8
step and the logits move by percents: transformers in float32 against transformers in
float64, same weights, differ by up to 2.1% at hidden 256 (``benchmarks/
bench_dora_precision.py --hidden 256``), and PEFT itself with its adapter rounded to fp16
moves by 2.6-3.0%, as much as r3mes's fp16 storage does. A trained model is not
chaotic, which is what the bars above measure.
"""

from __future__ import annotations

import json
import os
from importlib.resources import files

import pytest
import torch
from dora_testmodels import PEFT_TARGETS, QLinear

from r3mes.core.backends import BitNetCppBackend, PyTorchBackend
from r3mes.core.checkpoint import load_model
from r3mes.core.tokenizer import Tokenizer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

ASSETS = files("r3mes") / "assets"
DEMO = ASSETS / "demo_model"
SEEDS = (0, 1, 2)
WINDOWS, WINDOW = 8, 256  # 2048 positions
LOGIT_BOUND = {"fp32": 0.005, "fp16": 0.01, "int8": 0.01}
TOP1_AGREEMENT = 0.99
# The recipe is B ~ 0.02 N(0,1); on this model that moves the logits ~2%. Ten
# times that moves them ~25% (the random models' adapters move theirs 30-60%, but those
# models are chaotic, see above; at 0.4 (~50%) even fp16 storage and the torch reference
# drop to 98.6-99.9% of PEFT's top tokens, float rounding alone).
B_STD = 0.2


def transformers_twin() -> torch.nn.Module:
    """The demo model as a transformers BitNetForCausalLM with QLinear projections."""
    from transformers import BitNetConfig, BitNetForCausalLM

    ours, _ = load_model(DEMO)
    hf = ours.config.to_hf_config()
    del hf["quantization_config"]
    model = BitNetForCausalLM(BitNetConfig(**hf)).float().eval()
    # The demo model's head is stored int8 (per-row absmax), which quantises its input per
    # token as the projections do: a QLinear of the dequantised head is the same product.
    state = {name: lin.dequantized_weight() for name, lin in ours.base_linears().items()}
    assert ours.lm_head.kind == "int8"
    state["lm_head"] = ours.lm_head.dequantized_weight()
    for name, w in state.items():
        q = QLinear(w.shape[1], w.shape[0], bias=False)
        q.weight = torch.nn.Parameter(w.float().clone(), requires_grad=False)
        model.set_submodule(name, q)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.removesuffix(".weight") in state:
                continue
            p.copy_(ours.get_parameter(name) if name.endswith("norm.weight")
                    else ours.model.embed_tokens.weight)
    return model


def real_text_ids(windows: int | None = WINDOWS) -> torch.Tensor:
    """[windows, 256] token ids of the bundled knowledge documents (EN and TR prose, code);
    ``None``: every whole window they hold."""
    tok = Tokenizer(DEMO)
    text = " ".join(json.loads(line)["text"] for name in ("general", "medical", "legal", "code")
                    for line in (ASSETS / "knowledge" / "docs" / f"{name}.jsonl")
                    .read_text().splitlines())
    ids = tok.encode(text)
    windows = len(ids) // WINDOW if windows is None else windows
    assert len(ids) >= windows * WINDOW
    return torch.tensor(ids[:windows * WINDOW]).view(windows, WINDOW)


def randomise_adapter(pm, seed: int, b_std: float = B_STD) -> None:
    """The strong random adapter: B ~ b_std N(0,1), magnitudes moved by up to 20%."""
    g = torch.Generator().manual_seed(2000 + seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(b_std * torch.randn(p.shape, generator=g))
            elif "magnitude" in n:
                p.mul_(1 + 0.2 * (2 * torch.rand(p.shape, generator=g) - 1))


def strong_adapter_model(twin: torch.nn.Module, seed: int) -> torch.nn.Module:
    """PEFT's DoRA model on a copy of ``twin`` with the strong random adapter of ``seed``."""
    import copy

    torch.manual_seed(seed)  # PEFT draws A from the global generator
    pm = peft.get_peft_model(copy.deepcopy(twin), peft.LoraConfig(
        r=8, lora_alpha=16, use_dora=True, lora_dropout=0.0, target_modules=PEFT_TARGETS))
    randomise_adapter(pm, seed)
    return pm


@pytest.fixture(scope="module")
def twin():
    return transformers_twin()


@pytest.fixture(scope="module", params=SEEDS)
def case(request, twin, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"peft_trained_{request.param}")
    pm = strong_adapter_model(twin, request.param)
    pm.save_pretrained(root / "adapter")
    ids = real_text_ids()
    with torch.no_grad():
        logits = pm(ids).logits.float()
        with pm.disable_adapter():
            base = pm(ids).logits.float()
    return {"root": root, "ids": ids, "logits": logits, "base": base}


def _logits(kind: str, case) -> torch.Tensor:
    be = PyTorchBackend() if kind == "torch" else BitNetCppBackend(adapter_storage=kind)
    be.load_base_model(DEMO)
    be.load_dora_adapter("x", case["root"] / "adapter")
    return be.inference(case["ids"].tolist(), ["x"], [1.0])


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _same_model(got: torch.Tensor, want: torch.Tensor) -> None:
    # Equal to float rounding (1e-7 at most positions) except where one rounding tips an
    # int8 activation (~4e-4 over all positions on this model), which may swap the top
    # token of a near-tie: one position in a thousand at most.
    per_position = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert float(per_position.median()) < 1e-5
    assert _rel(got, want) < 1e-3
    assert float((got.argmax(-1) != want.argmax(-1)).float().mean()) <= 1e-3


def test_the_twin_is_the_demo_model(case):
    be = PyTorchBackend()
    be.load_base_model(DEMO)
    _same_model(be.inference(case["ids"].tolist()), case["base"])


def test_the_adapter_is_strong(case):
    # An adapter that hardly moves the logits would make every storage look exact.
    assert _rel(case["logits"], case["base"]) > 0.15


def test_the_reference_backend_equals_peft(case):
    _same_model(_logits("torch", case), case["logits"])


@pytest.mark.parametrize("storage", ["fp32", "fp16", "int8"])
def test_every_storage_keeps_peft_logits_and_top_tokens(case, storage):
    got, want = _logits(storage, case), case["logits"]
    assert _rel(got, want) <= LOGIT_BOUND[storage]
    agreement = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    assert agreement >= TOP1_AGREEMENT, agreement


def test_the_default_storage_is_int8():
    assert BitNetCppBackend().adapter_storage == "int8"
