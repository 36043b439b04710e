"""BM25 and the Turkish/English tokenizer."""

from __future__ import annotations

import pytest

from r3mes.rag.sparse import BM25Index, TokenizerConfig, tokenize, turkish_lower

PLAIN = TokenizerConfig(stem=False, stopwords=False)


def test_turkish_lower_maps_dotted_and_dotless_i():
    assert turkish_lower("İSTANBUL") == "istanbul"
    assert turkish_lower("IŞIK") == "ışık"
    assert turkish_lower("Iğdır") == "ığdır"


def test_turkish_text_is_lowercased_by_turkish_rules():
    assert tokenize("IŞIK ve İstanbul", PLAIN) == ["ışık", "ve", "istanbul"]


def test_english_text_keeps_english_casing():
    assert tokenize("I like Iris In Idaho", PLAIN) == ["like", "iris", "in", "idaho"]


def test_python_lower_of_dotted_capital_i_never_leaves_a_combining_dot():
    assert "\u0307" not in "".join(tokenize("İzmir", TokenizerConfig(language="en", stem=False)))


def test_apostrophe_suffixes_are_dropped():
    assert tokenize("Ankara'da ve İzmir’e", PLAIN) == ["ankara", "ve", "izmir"]


def test_turkish_stemming_conflates_inflections():
    cfg = TokenizerConfig(stem=True, stopwords=False)
    assert tokenize("kitaplarımızdan", cfg) == tokenize("kitapları", cfg) == ["kitap"]
    assert tokenize("hücreleri", cfg) == tokenize("hücre", cfg)


def test_forced_turkish_stems_words_without_turkish_letters():
    # "kitaplar" has no letter that marks it as Turkish, so auto mode treats it as English
    auto = TokenizerConfig(stem=True, stopwords=False)
    forced = TokenizerConfig(language="tr", stem=True, stopwords=False)
    assert tokenize("kitaplar", auto) == ["kitaplar"]
    assert tokenize("kitaplar", forced) == ["kitap"]


def test_english_stemming_conflates_inflections():
    cfg = TokenizerConfig(stem=True, stopwords=False)
    assert tokenize("running", cfg) == tokenize("runs", cfg)


def test_stopwords_are_removed_in_both_languages():
    assert tokenize("the cat and the dog") == tokenize("cat dog")
    assert "ve" not in tokenize("kedi ve köpek")


def test_unknown_language_is_refused():
    with pytest.raises(ValueError, match="language"):
        TokenizerConfig(language="de")


def test_bm25_ranks_the_matching_document_first():
    ix = BM25Index()
    ix.add([1, 2, 3], ["Hücreleri birleştirmek için tabloyu seçin.",
                       "Sayfa numarası eklemek için alt bilgiyi açın.",
                       "Cats chase mice."])
    assert ix.search("hücre birleştirme", 3)[0][0] == 1
    assert ix.search("sayfa numaraları", 3)[0][0] == 2
    assert ix.search("IŞIK", 3) == []  # no term matches: no results, not noise


def test_bm25_delete_and_update():
    ix = BM25Index()
    ix.add([1, 2], ["apples and pears", "bananas"])
    ix.remove([1])
    assert ix.search("apples", 5) == []
    ix.add([2], ["apples now"])  # replaces id 2
    assert [i for i, _ in ix.search("apples", 5)] == [2]
    assert ix.search("bananas", 5) == []


def test_bm25_allowed_ids_filter():
    ix = BM25Index()
    ix.add([1, 2, 3], ["red apple", "green apple", "blue sky"])
    assert [i for i, _ in ix.search("apple", 5, allowed_ids={2, 3})] == [2]


def test_bm25_over_documents_that_tokenise_to_nothing_finds_nothing():
    # Symbols-only documents leave bm25s an empty vocabulary, which it cannot index (found
    # by the API fuzzer through /api/v1/rag/search); a search must answer empty, then
    # work again once a real document arrives.
    ix = BM25Index()
    ix.add([1, 2], ["...", "?!"])
    assert ix.search("0", 5) == []
    assert ix.search("apples", 5) == []
    ix.add([3], ["apples and pears"])
    assert [i for i, _ in ix.search("apples", 5)] == [3]
