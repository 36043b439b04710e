"""Stage 1: keyword patterns (Turkish casing and suffixes) and language detection."""

from __future__ import annotations

import pytest

from r3mes.router.keyword_router import KeywordRouter, clean_query, fold


@pytest.fixture(scope="module")
def keyword() -> KeywordRouter:
    return KeywordRouter()


def top(keyword: KeywordRouter, query: str) -> str:
    scores = [(e, s) for e, s in keyword.score(query) if keyword.registry.get(e).kind != "language"]
    return scores[0][0]


@pytest.mark.parametrize(
    ("text", "folded"),
    [
        ("İSTANBUL", "istanbul"),
        ("ISTANBUL", "istanbul"),
        ("ılık", "ilik"),
        ("DİYABET", "diyabet"),
        ("Şeker Ağrı Göğüs Çocuk", "seker agri gogus cocuk"),
        ("I think", "i think"),
        ("Straße", "strasse"),
        ("café", "cafe"),
    ],
)
def test_fold_merges_turkish_i_forms_case_and_accents(text: str, folded: str) -> None:
    assert fold(text) == folded


@pytest.mark.parametrize(
    "query",
    [
        "Diyabet hastalarında insülin direnci nasıl tedavi edilir?",
        "DİYABET HASTALARINDA İNSÜLİN DİRENCİ NASIL TEDAVİ EDİLİR?",
        "DIYABET HASTALARINDA INSULIN DIRENCI NASIL TEDAVI EDILIR?",
        "diyabet hastalarinda insulin direnci nasil tedavi edilir",
        "Dıyabet hastalarında ınsülın tedavısı",
    ],
)
def test_turkish_casing_and_ascii_typing_route_alike(keyword: KeywordRouter, query: str) -> None:
    scores = dict(keyword.score(query))
    assert top(keyword, query) == "medical_dora"
    assert scores["medical_dora"] >= 0.9


def test_turkish_suffixes_match_the_stem(keyword: KeywordRouter) -> None:
    # "mahkeme" -> "mahkemeye", "sözleşme" -> "sözleşmesinin", "avukat" -> "avukatımla"
    query = "Sözleşmesinin feshi için avukatımla mahkemeye gideceğim."
    assert top(keyword, query) == "legal_dora"
    assert dict(keyword.score(query))["legal_dora"] > 0.9


def test_stems_match_only_at_word_starts(keyword: KeywordRouter) -> None:
    # "bugün" must not count as the coding stem "bug"; "hissediyorum" not as finance's "hisse".
    assert "coding_dora" not in dict(keyword.score("Bugün kendimi iyi hissediyorum"))
    assert "finance_dora" not in dict(keyword.score("Bugün kendimi iyi hissediyorum"))


@pytest.mark.parametrize(
    ("query", "expert"),
    [
        ("Python'da for loop nasıl yazılır?", "coding_dora"),
        ("How do I fix this Python exception in my function?", "coding_dora"),
        ("Enflasyon ve faiz oranları yatırımı nasıl etkiler?", "finance_dora"),
        ("How does compound interest affect my mortgage loan?", "finance_dora"),
        ("Bu makaleyi özetle", "summarization_dora"),
        ("Translate this sentence into French.", "translation_dora"),
        ("Write a poem about the sea.", "creative_dora"),
        ("I have a migraine and a fever, what medication helps?", "medical_dora"),
    ],
)
def test_clear_queries_pick_their_expert(keyword: KeywordRouter, query: str, expert: str) -> None:
    assert top(keyword, query) == expert


@pytest.mark.parametrize(
    ("query", "language", "expert"),
    [
        ("Bugün hava çok güzel, dışarı çıkalım mı?", "tr", "turkish_dora"),
        ("Wie spät ist es eigentlich in Berlin?", "de", "german_dora"),
        ("Où est la gare la plus proche, s'il vous plaît?", "fr", "french_dora"),
        ("¿Dónde puedo comprar pan fresco por aquí?", "es", "spanish_dora"),
        ("أين أقرب محطة قطار من هنا؟", "ar", "arabic_dora"),
        ("请问最近的火车站在哪里？", "zh", "chinese_dora"),
    ],
)
def test_language_detection_scores_the_language_expert(
    keyword: KeywordRouter, query: str, language: str, expert: str
) -> None:
    scores, confidence, guess = keyword.analyse(query)
    assert guess.language == language
    assert dict(scores)[expert] >= 0.5
    assert confidence < 0.85  # language alone never triggers the fast path


def test_english_query_scores_no_language_expert(keyword: KeywordRouter) -> None:
    scores, _, guess = keyword.analyse("What should I cook for dinner tonight with my friends?")
    assert guess.language == "en"
    assert not any(keyword.registry.get(e).kind == "language" for e, _ in scores)


def test_too_short_text_has_no_language(keyword: KeywordRouter) -> None:
    assert keyword.detect_language("ok").language is None


def test_detector_languages_are_the_registry_languages_plus_english(keyword: KeywordRouter) -> None:
    assert keyword.detector_languages == ("ar", "de", "en", "es", "fr", "tr", "zh")


def test_restricted_router_scores_only_its_experts() -> None:
    restricted = KeywordRouter(expert_ids=["legal_dora"])
    scores = dict(restricted.score("Diyabet tedavisi hakkında avukatıma danıştım"))
    assert set(scores) <= {"legal_dora", "general_dora"}
    assert "legal_dora" in scores


def test_clean_query_replaces_undecodable_bytes_and_control_characters() -> None:
    broken = b"insulin \xff\xfe dose\x00".decode("utf-8", "surrogateescape")
    cleaned = clean_query(broken)
    cleaned.encode("utf-8")  # no lone surrogates left
    assert "\x00" not in cleaned and "insulin" in cleaned


def test_non_string_query_is_a_type_error(keyword: KeywordRouter) -> None:
    with pytest.raises(TypeError, match="query must be str"):
        keyword.score(b"bytes are not text")  # type: ignore[arg-type]
