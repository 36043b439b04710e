"""Chunking: token budgets, sentence boundaries, overlap, loaders and their refusals."""

from __future__ import annotations

import json

import pytest

from r3mes.rag import Chunker, Document, DocumentError, load_documents


@pytest.fixture(scope="module")
def chunker() -> Chunker:
    return Chunker(max_tokens=40, overlap=12)


def _sentences(n: int) -> str:
    return " ".join(f"Sentence number {i} talks about topic {i} in a few words." for i in range(n))


def test_default_chunker_is_512_tokens_with_50_overlap():
    c = Chunker()
    assert (c.max_tokens, c.overlap) == (512, 50)


def test_chunks_respect_the_token_budget(chunker):
    chunks = chunker.chunk(Document("d", _sentences(30)))
    assert len(chunks) > 3
    for ch in chunks:
        assert chunker.count_tokens(ch.text) <= chunker.max_tokens


def test_chunks_end_on_sentence_boundaries(chunker):
    for ch in chunker.chunk(Document("d", _sentences(30))):
        assert ch.text.endswith("."), ch.text


def test_consecutive_chunks_overlap_by_whole_sentences(chunker):
    chunks = chunker.chunk(Document("d", _sentences(30)))
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.start < a.end  # the next chunk starts inside the previous one
        first_sentence_of_b = b.text.split(". ")[0] + "."
        assert first_sentence_of_b in a.text


def test_chunks_keep_doc_id_position_and_metadata(chunker):
    chunks = chunker.chunk(Document("doc-7", _sentences(20), {"source": "x.txt"}))
    assert [c.position for c in chunks] == list(range(len(chunks)))
    assert all(c.doc_id == "doc-7" and c.metadata["source"] == "x.txt" for c in chunks)
    assert chunks[2].chunk_id == "doc-7#2"


def test_a_sentence_longer_than_the_budget_is_split_on_tokens(chunker):
    text = " ".join(f"word{i}" for i in range(300))  # no punctuation at all
    chunks = chunker.chunk(Document("long", text))
    assert len(chunks) > 1
    assert all(chunker.count_tokens(c.text) <= chunker.max_tokens for c in chunks)
    assert "word0" in chunks[0].text and "word299" in chunks[-1].text


def test_short_document_is_one_chunk(chunker):
    chunks = chunker.chunk(Document("s", "Just one short line."))
    assert [c.text for c in chunks] == ["Just one short line."]


def test_empty_document_is_refused(chunker):
    with pytest.raises(DocumentError, match="'blank' is empty"):
        chunker.chunk(Document("blank", "  \n\t "))


def test_overlap_must_be_smaller_than_the_budget():
    with pytest.raises(ValueError, match="overlap"):
        Chunker(max_tokens=20, overlap=20)


def test_markdown_headings_start_new_chunks_and_name_the_section(tmp_path):
    p = tmp_path / "guide.md"
    p.write_text("# Setup\n\nInstall it.\n\n## Usage\n\nRun it daily.\n", encoding="utf-8")
    docs = load_documents(p)
    assert docs[0].metadata["title"] == "Setup"
    chunks = Chunker(max_tokens=200, overlap=10).chunk(docs[0])
    assert [c.metadata["section"] for c in chunks] == ["Setup", "Usage"]
    assert "Run it daily." in chunks[1].text and "Install" not in chunks[1].text


def test_plain_text_file_is_one_document_named_after_the_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("Some notes.", encoding="utf-8")
    (doc,) = load_documents(p)
    assert doc.doc_id == "notes.txt" and doc.text == "Some notes."


def test_jsonl_gives_one_document_a_line_with_metadata(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text(json.dumps({"id": "a", "text": "Alpha.", "title": "A"}) + "\n\n"
                 + json.dumps({"text": "Beta."}) + "\n", encoding="utf-8")
    a, b = load_documents(p)
    assert (a.doc_id, a.metadata["title"]) == ("a", "A")
    assert b.doc_id == "docs.jsonl:3"


def test_malformed_jsonl_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(DocumentError, match=r"bad\.jsonl:2: malformed JSON"):
        load_documents(p)


def test_jsonl_line_without_text_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"title": "no body"}\n', encoding="utf-8")
    with pytest.raises(DocumentError, match=r"bad\.jsonl:1: missing string field 'text'"):
        load_documents(p)


def test_duplicate_jsonl_ids_are_refused(tmp_path):
    p = tmp_path / "dup.jsonl"
    p.write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n', encoding="utf-8")
    with pytest.raises(DocumentError, match="duplicate document id '1'"):
        load_documents(p)


def test_binary_file_is_refused(tmp_path):
    p = tmp_path / "image.txt"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(DocumentError, match="binary"):
        load_documents(p)


def test_non_utf8_file_is_refused(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("café".encode("latin-1"))
    with pytest.raises(DocumentError, match="not valid UTF-8"):
        load_documents(p)


def test_empty_file_is_refused(tmp_path):
    p = tmp_path / "empty.md"
    p.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DocumentError, match="empty"):
        load_documents(p)


def test_oversized_file_is_refused_before_reading(tmp_path):
    p = tmp_path / "big.txt"
    p.write_text("x" * 5000, encoding="utf-8")
    with pytest.raises(DocumentError, match="over the .* limit"):
        load_documents(p, max_file_bytes=4096)


def test_unsupported_suffix_and_missing_file_are_refused(tmp_path):
    p = tmp_path / "data.pdf"
    p.write_text("text", encoding="utf-8")
    with pytest.raises(DocumentError, match="unsupported file type '.pdf'"):
        load_documents(p)
    with pytest.raises(DocumentError, match="no such file"):
        load_documents(tmp_path / "missing.txt")
