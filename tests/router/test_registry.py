"""The expert registry file: contents of the packaged one and errors for bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from r3mes.router.keyword_router import language_detector
from r3mes.router.registry import RegistryError, load_registry

SEED_EXPERTS = {
    "medical_dora": "domain", "legal_dora": "domain", "coding_dora": "domain",
    "finance_dora": "domain", "science_dora": "domain", "history_dora": "domain",
    "education_dora": "domain", "turkish_dora": "language", "german_dora": "language",
    "french_dora": "language", "spanish_dora": "language", "arabic_dora": "language",
    "chinese_dora": "language", "summarization_dora": "task", "translation_dora": "task",
    "qa_dora": "task", "creative_dora": "task", "analysis_dora": "task",
    "general_dora": "fallback",
}


def test_packaged_registry_has_the_seeds_19_experts_with_their_kinds() -> None:
    registry = load_registry()
    assert {e.id: e.kind for e in registry} == SEED_EXPERTS
    assert registry.fallback.id == "general_dora"


def test_every_expert_has_representative_queries_in_every_language_it_serves() -> None:
    """Language experts: 15-20 examples, Turkish, English and their own language. Topical
    experts: at least 40, with short questions in each of TR/EN/DE/FR/ES (what real users
    type is what the semantic stage must recognise)."""
    detector = language_detector(["tr", "en", "de", "fr", "es", "ar", "zh"])
    for expert in load_registry():
        languages = {detector.classify(q)[0] for q in expert.queries}
        if expert.kind == "language":
            assert 15 <= len(expert.queries) <= 20, expert.id
            assert {"tr", "en", expert.language} <= languages, (expert.id, languages)
        else:
            assert len(expert.queries) >= 40, expert.id
            assert {"tr", "en", "de", "fr", "es"} <= languages, (expert.id, languages)


def test_language_experts_name_their_language() -> None:
    languages = load_registry().languages()
    assert languages == {
        "tr": "turkish_dora", "de": "german_dora", "fr": "french_dora",
        "es": "spanish_dora", "ar": "arabic_dora", "zh": "chinese_dora",
    }


def test_malformed_yaml_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("experts:\n  - id: a\n    kind: [domain\n", encoding="utf-8")
    with pytest.raises(RegistryError, match=r"broken\.yaml.*malformed YAML"):
        load_registry(path)


def test_missing_registry_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"nowhere\.yaml.*not found"):
        load_registry(tmp_path / "nowhere.yaml")


def test_broken_regex_is_refused_naming_the_expert_and_pattern(
    small_registry_file: Path,
) -> None:
    text = small_registry_file.read_text(encoding="utf-8")
    small_registry_file.write_text(
        text.replace("strong: [recipe, tarif]", "strong: [recipe]\n    patterns: ['(unclosed']"),
        encoding="utf-8",
    )
    with pytest.raises(RegistryError, match=r"experts\.yaml: expert 'cooking_dora'.*\(unclosed"):
        load_registry(small_registry_file)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("kind: domain\n    description: Cooking.", "kind: cuisine\n    description: Cooking.",
         r"'kind' must be one of"),
        ("id: sports_dora", "id: cooking_dora", r"duplicate expert id 'cooking_dora'"),
        ("kind: fallback", "kind: task", r"exactly one 'fallback'"),
        ("description: Sports.", "description: Sports.\n    color: red", r"unknown field.*color"),
        ('queries: ["Hello there", "Merhaba"]', "queries: []", r"at least one representative"),
        ("id: sports_dora", "id: Sports Dora!", r"invalid 'id'"),
    ],
)
def test_invalid_entries_are_refused_with_a_clear_message(
    small_registry_file: Path, old: str, new: str, message: str
) -> None:
    small_registry_file.write_text(
        small_registry_file.read_text(encoding="utf-8").replace(old, new), encoding="utf-8"
    )
    with pytest.raises(RegistryError, match=message) as info:
        load_registry(small_registry_file)
    assert str(small_registry_file) in str(info.value)


def test_restriction_to_unknown_expert_ids_is_refused_listing_them() -> None:
    with pytest.raises(RegistryError, match=r"unknown expert id\(s\) nope_dora"):
        load_registry().restrict(["medical_dora", "nope_dora"])


def test_restriction_keeps_the_fallback_expert() -> None:
    restricted = load_registry().restrict(["medical_dora"])
    assert restricted.ids == ("medical_dora", "general_dora")
    assert len(restricted.universe) == 19


def test_digest_changes_when_the_file_content_changes(small_registry_file: Path) -> None:
    before = load_registry(small_registry_file).digest
    small_registry_file.write_text(
        small_registry_file.read_text(encoding="utf-8").replace("Merhaba", "Selam"),
        encoding="utf-8",
    )
    assert load_registry(small_registry_file).digest != before
