"""Generation: KV cache, batching, sampling options, stop strings, streaming, chat."""

from __future__ import annotations

import pytest
import torch

from r3mes.core.checkpoint import load_model
from r3mes.core.generation import GenerationConfig, generate, sample_next, stream
from r3mes.core.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model(r3mes_dir):
    return load_model(r3mes_dir)[0]


@pytest.fixture(scope="module")
def tok(r3mes_dir):
    return Tokenizer(r3mes_dir)


def test_cached_decode_equals_a_full_forward(model):
    ids = torch.tensor([[0, 5, 9, 33, 200, 7, 64]])
    full = model(ids)
    cache = model.new_cache(1, 16)
    parts = [model(ids[:, :4], cache), model(ids[:, 4:5], cache), model(ids[:, 5:], cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_is_the_argmax_of_a_full_forward(model):
    prompt = [0, 11, 22, 33]
    out = generate(model, [prompt], GenerationConfig(max_new_tokens=6, stop_token_ids=()))
    ids = list(prompt)
    for _ in range(6):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out[0].tokens == ids[len(prompt):]
    assert out[0].finish_reason == "length"


def test_batched_prompts_of_different_lengths_match_one_by_one(model):
    prompts = [[0, 5, 6], [0, 40, 41, 42, 43, 44, 45], [0, 99]]
    cfg = GenerationConfig(max_new_tokens=5, stop_token_ids=())
    batched = generate(model, prompts, cfg)
    for p, r in zip(prompts, batched, strict=True):
        assert generate(model, [p], cfg)[0].tokens == r.tokens


def test_same_seed_same_sample_and_other_seed_differs(model):
    cfg = dict(max_new_tokens=12, temperature=50.0, stop_token_ids=())  # flat: a real draw
    a = generate(model, [[0, 3, 4]], GenerationConfig(seed=7, **cfg))[0].tokens
    b = generate(model, [[0, 3, 4]], GenerationConfig(seed=7, **cfg))[0].tokens
    c = generate(model, [[0, 3, 4]], GenerationConfig(seed=8, **cfg))[0].tokens
    assert a == b
    assert a != c


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, [[0, 8, 9]], GenerationConfig(max_new_tokens=6,
                                                           stop_token_ids=()))[0].tokens
    for extra in (dict(top_k=1), dict(top_p=1e-6)):
        cfg = GenerationConfig(max_new_tokens=6, temperature=1.0, seed=1, stop_token_ids=(),
                               **extra)
        assert generate(model, [[0, 8, 9]], cfg)[0].tokens == greedy


def test_repetition_penalty_follows_the_hf_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.5]])
    seen = torch.tensor([[True, True, False, False]])
    cfg = GenerationConfig(repetition_penalty=2.0)
    # token 0: 2.0 / 2 = 1.0 < 1.5 (token 3 wins); token 1: -2 * 2 = -4.
    assert int(sample_next(logits, cfg, seen, None)[0]) == 3


def test_top_k_sampling_never_leaves_the_top_k():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    cfg = GenerationConfig(temperature=5.0, top_k=2)
    picks = sample_next(logits, cfg, None, gen)
    assert set(picks.tolist()) == {0, 1}


def test_eos_token_stops_a_row(model):
    greedy = generate(model, [[0, 8, 9]], GenerationConfig(max_new_tokens=6,
                                                           stop_token_ids=()))[0].tokens
    out = generate(model, [[0, 8, 9]], GenerationConfig(max_new_tokens=6,
                                                        stop_token_ids=(greedy[2],)))[0]
    assert out.tokens == greedy[: greedy.index(greedy[2]) + 1]
    assert out.finish_reason == "eos"


def test_stop_string_is_cut_and_never_streamed(model, tok):
    prompt = tok.encode("the quick brown")
    free = generate(model, [prompt], GenerationConfig(max_new_tokens=10, stop_token_ids=()),
                    tokenizer=tok)[0]
    assert len(free.text) > 4
    stop = free.text[2:4]
    cfg = GenerationConfig(max_new_tokens=10, stop=(stop,), stop_token_ids=())
    events = list(stream(model, [prompt], cfg, tok))
    streamed = "".join(e.text for e in events)
    assert streamed == free.text[: free.text.find(stop)]
    assert events[-1].finish_reason == "stop"


def test_streamed_text_adds_up_to_the_final_text(model, tok):
    prompt = tok.encode("hello world")
    cfg = GenerationConfig(max_new_tokens=12, stop_token_ids=())
    events = list(stream(model, [prompt], cfg, tok))
    result = generate(model, [prompt], cfg, tok)[0]
    assert "".join(e.text for e in events) == result.text == tok.decode(result.tokens)
    assert [e.finished for e in events] == [False] * 11 + [True]


def test_chat_template_is_rendered(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<s>User: hi</s>Assistant:"


def test_bad_prompts_are_refused(model):
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate(model, [[1], []])
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [[10_000]])
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0.0)


def test_a_tiny_temperature_samples_the_top_token_instead_of_failing() -> None:
    logits = torch.tensor([[1e30, 3.0e30, -2.0e30, 2.9e30]])
    config = GenerationConfig(temperature=1e-30, seed=1)
    token = sample_next(logits, config, None, torch.Generator().manual_seed(1))
    assert int(token) == 1
