"""A replica of the bitnet-b1.58-2B-4T directory (tests/model/real_layout.py) end to end:
its chat template and EOS ids, its logits against transformers, ask / serve / convert."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from r3mes.cli import main
from r3mes.core.checkpoint import load_model
from r3mes.core.generation import GenerationConfig, generate
from r3mes.core.tokenizer import Tokenizer

from .real_layout import build

SYSTEM = "You are a helpful assistant. Answer using the context when it is relevant."
MESSAGES = [{"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "what is the capital of france?"},
            {"role": "assistant", "content": "paris is the capital."},
            {"role": "user", "content": "and the capital of the fox?"}]


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    root = tmp_path_factory.mktemp("bitnet-2b-4t-replica")
    return root, build(root)


def _hf_chat_ids(root, messages) -> list[int]:
    from transformers import AutoTokenizer

    out = AutoTokenizer.from_pretrained(root).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True)
    return [int(i) for i in (out["input_ids"] if hasattr(out, "keys") else out)]


def test_chat_prompt_ids_equal_transformers_apply_chat_template(replica):
    root, ids = replica
    tok = Tokenizer(root)
    ours = tok.encode(tok.apply_chat_template(MESSAGES), add_special_tokens=False)
    want = _hf_chat_ids(root, MESSAGES)
    assert ours == want
    assert want[0] == ids["<|begin_of_text|>"] and want.count(ids["<|begin_of_text|>"]) == 1
    assert want.count(ids["<|eot_id|>"]) == len(MESSAGES)


def test_logits_match_transformers_and_every_eos_id_is_read(replica):
    from transformers import AutoModelForCausalLM

    root, ids = replica
    prompt = torch.tensor([_hf_chat_ids(root, MESSAGES)])
    hf = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32).eval()
    for p in hf.parameters():  # embeddings and norms stay bf16 under the quantizer
        p.data = p.data.float()
    assert type(hf.model.layers[0].mlp.down_proj).__name__ == "AutoBitLinear"
    with torch.no_grad():
        want = hf(prompt).logits[0]
    model, info = load_model(root, head="float")
    assert info.format == "hf-packed"
    assert model.config.eos_token_id == [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
    got = model(prompt)[0]
    # transformers multiplies the dequantised activations by T in float; r3mes sums the
    # int8 x ternary products exactly and scales once. They agree to float rounding until
    # that rounding tips one int8 activation to its neighbour, which changes every later
    # position a little (measured here: exact to position 22, 0.5% after). A packing or
    # weight_scale mistake would be wrong from the first position on.
    per_pos = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert float(per_pos[:16].max()) < 1e-5
    assert float((got - want).norm() / want.norm()) < 0.02
    assert int(got[-1].argmax()) == int(want[-1].argmax()) == ids["answer"]


def test_generation_stops_at_the_end_of_turn_token(replica):
    root, ids = replica
    model, _ = load_model(root)
    tok = Tokenizer(root)
    prompt = tok.encode(tok.apply_chat_template(MESSAGES), add_special_tokens=False)
    out = generate(model, [prompt], GenerationConfig(max_new_tokens=8), tokenizer=tok)[0]
    # <|eot_id|> is only in generation_config.json: the tokenizer's EOS is <|end_of_text|>.
    assert tok.eos_token_id == ids["<|end_of_text|>"]
    assert out.tokens == [ids["answer"], ids["<|eot_id|>"]] and out.finish_reason == "eos"


def test_ask_renders_the_chat_template_and_stops_at_end_of_turn(replica, tmp_path, capsys):
    root, ids = replica
    assert main(["ask", "--model", str(root), "--home", str(tmp_path), "--no-rag",
                 "--force-experts", "", "--temperature", "0", "--max-tokens", "8", "--json",
                 "what is the capital of france?"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["success"], out
    assert out["output"] == "paris" and out["tokens"] == [ids["answer"]]
    assert out["finish_reason"] == "stop"
    # The prompt is the template's rendering of [system, user], not "System: ...".
    want = _hf_chat_ids(root, [{"role": "system", "content": SYSTEM},
                               {"role": "user", "content": "what is the capital of france?"}])
    assert out["metrics"]["prompt_tokens"] == len(want)


def test_serve_model_with_the_openai_client(replica, tmp_path):
    openai = pytest.importorskip("openai")
    root, _ = replica
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "R3MES_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "r3mes.cli", "serve", "--model", str(root), "--home",
         str(tmp_path), "--no-rag", "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).json().get("status") == "ok":
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        out = client.chat.completions.create(
            model="base", messages=MESSAGES[:2], max_tokens=8, temperature=0)
        assert out.choices[0].message.content == "paris"
        assert out.choices[0].finish_reason == "stop"
        assert out.usage.completion_tokens == 1
        assert out.usage.prompt_tokens == len(_hf_chat_ids(root, [
            {"role": "system", "content": SYSTEM + "\n\n" + MESSAGES[0]["content"]},
            MESSAGES[1]]))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_convert_then_generate(replica, tmp_path, capsys):
    root, ids = replica
    dst = tmp_path / "conv"
    assert main(["convert", str(root), str(dst), "--json"]) == 0
    capsys.readouterr()
    manifest = json.loads((dst / "r3mes_model.json").read_text())
    assert manifest["config"]["eos_token_id"] == [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
    assert (dst / "generation_config.json").is_file()
    assert main(["generate", "--model", str(dst), "--json", "--max-tokens", "8", "--chat",
                 "what is the capital of france?"]) == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    assert res["tokens"] == [ids["answer"], ids["<|eot_id|>"]] and res["finish_reason"] == "eos"
