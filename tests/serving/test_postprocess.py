"""Post-processing: the safety filter, citations, whitespace, and stream == complete."""

from __future__ import annotations

import pytest

from r3mes.serving.postprocess import Postprocessor, SafetyFilter, cited_numbers, postprocess

SOURCES = {1: {"doc_id": "med_1", "index": "medical", "title": "Insulin", "source": None},
           2: {"doc_id": "code_1", "index": "code", "title": None, "source": "docs.python"}}


def test_blocked_terms_are_masked_as_whole_words_case_insensitively():
    f = SafetyFilter(["secret plan", "foo"])
    text, masked = f.apply("The Secret Plan uses FOO, not food or foobar.")
    assert text == "The [filtered] uses [filtered], not food or foobar."
    assert masked == ["Secret Plan", "FOO"]


def test_turkish_and_unicode_terms_are_masked():
    text, _ = SafetyFilter(["şifre"]).apply("Şifre: 1234, şifreler değil")
    assert text == "[filtered]: 1234, şifreler değil"


def test_a_disabled_or_empty_filter_passes_text_through():
    assert SafetyFilter(["x"], enabled=False).apply("x y") == ("x y", [])
    assert SafetyFilter([]).apply("x y") == ("x y", [])


@pytest.mark.parametrize("text", [
    "  Hello foo world [1] and more foo.  \n",
    "foo",
    "   ",
    "no citation here, foobar foo-bar barfoo",
    "Uses [2] then [1] then [2] again; [9] is unknown.",
])
def test_every_way_of_streaming_gives_the_complete_answer(text):
    safety = SafetyFilter(["foo", "more foo"])
    complete, outcome = postprocess(text, SOURCES, safety=safety)
    for step in (1, 2, 3, 7):
        proc = Postprocessor(SOURCES, safety=safety)
        pieces = [proc.feed(text[i:i + step]) for i in range(0, len(text), step)]
        pieces.append(proc.finish())
        assert "".join(pieces) == complete, step
        assert proc.outcome.masked_terms == outcome.masked_terms


def test_cited_sources_are_listed_in_citation_order():
    out, outcome = postprocess("See [2] and [1].", SOURCES)
    assert [c["number"] for c in outcome.cited] == [2, 1]
    assert out.endswith("Sources:\n[2] docs.python (code_1, code)\n[1] Insulin (med_1, medical)")


def test_without_citations_every_retrieved_source_is_listed():
    out, outcome = postprocess("An answer.", SOURCES)
    assert outcome.cited == []
    assert out == ("An answer.\n\nSources:\n[1] Insulin (med_1, medical)\n"
                   "[2] docs.python (code_1, code)")


def test_citations_can_be_turned_off_and_whitespace_kept():
    out, _ = postprocess("  text  ", SOURCES, citations=False, strip_whitespace=False)
    assert out == "  text  "


def test_unknown_citation_numbers_are_ignored():
    assert cited_numbers("[3] [1] [1]", SOURCES) == [1]
