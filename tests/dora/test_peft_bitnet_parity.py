"""A PEFT DoRA adapter on a transformers BitNet, loaded by r3mes (issue 21).

PEFT wraps every projection (r=8, all seven, B ~ 0.02 N(0,1), magnitudes moved by up to
20%) of a small transformers ``BitNetForCausalLM`` whose projections are ``nn.Linear``
modules computing BitNet's forward (int8 absmax activations times the dequantised ternary
weight); the packed checkpoint of the same weights and PEFT's saved adapter load in
r3mes. Two checks per adapter storage and seed:

* every projection, fed the input PEFT's layer saw, is as close to PEFT's output as the
  storage's own rounding of A and B allows (the values the kernel stores, applied in
  float64): the kernel adds nothing measurable to it (no step of the fp16/int8 paths loses
  more than the storage);
* the logits over 48 positions stay within a bound per storage, and greedy tokens agree
  wherever PEFT's top token is not a near-tie.

Why the logit bounds are loose compared to the per-layer error: BitNet rounds every
projection's input to int8, so a difference of one float rounding can move an activation
to the next int8 step, and that step (1/127 of the row's largest value) then travels to
every later position. Measured on this model, Gaussian noise of 1e-6 of the row maximum
on each projection's output moves the logits by 0.4%, 1e-5 by 0.8%; fp16 storage's
rounding is ~5e-5 of a projection's output and int8's ~1.6e-3. The issue's bars (int8
within 1% and 99% of the top tokens) are held on a trained model, which is not chaotic:
``test_peft_trained_parity.py``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from dora_testmodels import PEFT_TARGETS, QLinear

from r3mes import kernels
from r3mes.core.backends import BitNetCppBackend, PyTorchBackend
from r3mes.core.dora import dora_modules
from r3mes.kernels import reference

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

SEEDS = (0, 1, 2)
# Measured (seeds 0-3, 48 positions): fp32 <= 0.55%, fp16 <= 1.0%, int8 <= 1.5%.
LOGIT_BOUND = {"fp32": 0.01, "fp16": 0.02, "int8": 0.03}


def _build(seed: int, root):
    """The packed HF directory r3mes loads, PEFT's model with a random strong adapter
    (saved to root/adapter), and the 48 prompt ids."""
    from safetensors.torch import save_file
    from transformers import BitNetConfig, BitNetForCausalLM
    from transformers.integrations.bitnet import pack_weights

    cfg = BitNetConfig(vocab_size=320, hidden_size=64, intermediate_size=160,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, tie_word_embeddings=False,
                       bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=0.1)
    torch.manual_seed(seed)
    model = BitNetForCausalLM(cfg).float().eval()
    tensors = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.endswith("_proj"):
            s = reference.weight_scale(mod.weight)
            t = reference.quantize_weight(mod.weight, s)
            tensors[name + ".weight"] = pack_weights(t.clone())
            tensors[name + ".weight_scale"] = s.reshape(1)
            q = QLinear(mod.in_features, mod.out_features, bias=False)
            q.weight = torch.nn.Parameter(t.float() / s, requires_grad=False)
            model.set_submodule(name, q)
    for name, p in model.state_dict().items():
        if "_proj" not in name:
            tensors[name] = p.contiguous()
    (root / "packed").mkdir(parents=True)
    save_file(tensors, str(root / "packed" / "model.safetensors"))
    config = cfg.to_dict()
    config.update(architectures=["BitNetForCausalLM"], quantization_config={
        "quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"})
    (root / "packed" / "config.json").write_text(json.dumps(config))

    pm = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, use_dora=True, lora_dropout=0.0, target_modules=PEFT_TARGETS))
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif "magnitude" in n:
                p.mul_(1 + 0.2 * (2 * torch.rand(p.shape, generator=g) - 1))
    pm.save_pretrained(root / "adapter")
    ids = torch.randint(3, 300, (1, 48), generator=torch.Generator().manual_seed(seed))
    return pm, ids


@pytest.fixture(scope="module", params=SEEDS)
def case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"peft_bitnet_{request.param}")
    pm, ids = _build(request.param, root)
    inputs, outputs = {}, {}

    def capture(path):
        def hook(mod, args, out):
            inputs[path], outputs[path] = args[0].detach().clone(), out.detach().clone()
        return hook

    handles = [mod.register_forward_hook(capture(path.removeprefix("base_model.model.")))
               for path, mod in pm.named_modules() if path.endswith(tuple(PEFT_TARGETS))
               and hasattr(mod, "lora_A")]
    with torch.no_grad():
        logits = pm(ids).logits[0].float()
    for h in handles:
        h.remove()
    return {"root": root, "ids": ids, "logits": logits, "inputs": inputs, "outputs": outputs,
            "peft": pm}


def _backend(kind: str, root):
    be = PyTorchBackend() if kind == "torch" else BitNetCppBackend(adapter_storage=kind)
    be.load_base_model(root / "packed", head="float")
    be.load_dora_adapter("x", root / "adapter")
    return be


def test_the_reference_backend_equals_peft(case):
    # Every op on its torch reference, loading included: PEFT's formula op for op. Native
    # ops sum in other orders (the adapter's norms at load, the fused kernel), and one float
    # rounding can move an int8 activation step: the chaos the module docstring describes
    # (seed 0 on a Sapphire Rapids moves the logits by 0.03). The storage tests bound those.
    with kernels.use_reference():
        be = _backend("torch", case["root"])
        got = be.inference(case["ids"].tolist(), ["x"], [1.0])[0]
    torch.testing.assert_close(got, case["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("storage", ["fp32", "fp16", "int8"])
def test_each_projection_loses_no_more_than_its_storage(case, storage):
    be = _backend(storage, case["root"])
    mods = dora_modules(be.model)
    assert set(mods) == set(case["inputs"]) and len(mods) == 14
    for path, mod in mods.items():
        x, want = case["inputs"][path][0], case["outputs"][path][0].double()
        mod.set_mix([("x", 1.0)])
        with torch.no_grad():
            got = mod(x).double()
        mod.set_mix(None)
        # The storage alone: the values the kernel holds, applied exactly.
        ad = mod._kernel_adapter("x")
        a, gb = (t.double() for t in ad.effective())
        base = reference.ternary_linear(x, mod.base.ternary.unpack(), mod.base.ternary.scale)
        store = ad.g.double() * base.double() + ad.scaling * (x.double() @ a.t()) @ gb.t()
        scale = float(want.norm())
        err, err_store = float((got - want).norm()) / scale, float((store - want).norm()) / scale
        assert err <= 1.1 * err_store + 2e-6, (path, err, err_store)
        if storage != "fp32":
            assert err_store > 1e-6  # the bound above is the storage's, not float rounding


@pytest.mark.parametrize("storage", ["fp32", "fp16", "int8"])
def test_logits_and_greedy_tokens_follow_peft(case, storage):
    be = _backend(storage, case["root"])
    got = be.inference(case["ids"].tolist(), ["x"], [1.0])[0]
    want = case["logits"]
    rel = float((got - want).norm() / want.norm())
    assert rel <= LOGIT_BOUND[storage], rel
    ours, theirs = got.argmax(-1), want.argmax(-1)
    for pos in torch.nonzero(ours != theirs).flatten().tolist():
        # A different top token only where PEFT's top two are closer than the logits moved.
        margin = float(want[pos, theirs[pos]] - want[pos, ours[pos]])
        assert margin <= 2 * float((got[pos] - want[pos]).abs().max()), (pos, margin)
    assert float((ours == theirs).float().mean()) >= 0.9
