"""The shared JSON Lines reader."""

from __future__ import annotations

import pytest

from r3mes.utils.jsonl import jsonl_records


def test_blank_lines_are_skipped_and_line_numbers_kept() -> None:
    lines = ['{"a": 1}', "", "   ", '[2]', '"x"']
    assert list(jsonl_records("f.jsonl", lines)) == [(1, {"a": 1}), (4, [2]), (5, "x")]


def test_a_bad_line_names_file_and_line_in_the_callers_error() -> None:
    class BadDocument(ValueError):
        pass

    records = jsonl_records("data/f.jsonl", ['{"a": 1}', "{oops"], BadDocument)
    assert next(records) == (1, {"a": 1})
    with pytest.raises(BadDocument, match=r"^data/f\.jsonl:2: malformed JSON \("):
        next(records)
