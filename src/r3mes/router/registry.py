"""The expert registry: which DoRA experts exist, what they cover, how to recognise them.

The registry is a YAML file (``data/experts.yaml`` ships with the package). Each entry
describes one expert; see the file's header for the fields. Users add experts by editing a
copy of the file and passing its path (``--registry`` on the command line), no code needed.

Every problem with a registry file raises :class:`RegistryError` naming the file, the
expert and the field, so a bad file never takes the process down with a bare traceback.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from r3mes.errors import R3mesError

EXPERT_KINDS = ("domain", "language", "task", "fallback")
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")
_LANG_RE = re.compile(r"^[a-z]{2,3}$")
_FIELDS = {"id", "kind", "description", "language", "strong", "weak", "patterns", "queries"}
_LIST_FIELDS = ("strong", "weak", "patterns", "queries")


class RegistryError(R3mesError, ValueError):
    """A registry file (or a restriction of it) is invalid; the message names what and where."""


@dataclass(frozen=True)
class Expert:
    """One routable expert.

    ``strong``/``weak`` are word stems (natural spelling; folded when compiled),
    ``patterns`` raw regular expressions over folded text, ``queries`` representative
    queries for the semantic router, ``language`` the ISO 639-1 code of a language expert.
    """

    id: str
    kind: str
    description: str
    queries: tuple[str, ...]
    strong: tuple[str, ...] = ()
    weak: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    language: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The entry as plain data (the registry file's schema)."""
        out: dict[str, Any] = {"id": self.id, "kind": self.kind, "description": self.description}
        if self.language is not None:
            out["language"] = self.language
        out.update(
            strong=list(self.strong),
            weak=list(self.weak),
            patterns=list(self.patterns),
            queries=list(self.queries),
        )
        return out


@dataclass(frozen=True)
class ExpertRegistry:
    """An ordered, validated set of experts loaded from ``source``.

    ``digest`` identifies the content of the full registry file; a restricted view
    (:meth:`restrict`) keeps the digest of the file it came from, so stored expert
    embeddings stay valid for every restriction.
    """

    experts: tuple[Expert, ...]
    source: str
    digest: str
    #: every expert of the file, also in a restricted view (what stored embeddings cover)
    universe: tuple[Expert, ...] = ()
    _by_id: dict[str, Expert] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.universe:
            object.__setattr__(self, "universe", self.experts)
        self._by_id.update({e.id: e for e in self.experts})

    def __iter__(self) -> Iterator[Expert]:
        return iter(self.experts)

    def __len__(self) -> int:
        return len(self.experts)

    def __contains__(self, expert_id: object) -> bool:
        return expert_id in self._by_id

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(e.id for e in self.experts)

    def get(self, expert_id: str) -> Expert:
        """The expert named ``expert_id``; :class:`KeyError` naming the registry otherwise."""
        try:
            return self._by_id[expert_id]
        except KeyError:
            raise KeyError(f"unknown expert '{expert_id}' in registry {self.source}") from None

    @property
    def fallback(self) -> Expert:
        """The single ``kind: fallback`` expert (``general_dora`` in the default registry)."""
        return next(e for e in self.experts if e.kind == "fallback")

    def languages(self) -> dict[str, str]:
        """Language code -> id of the language expert for it (in this view)."""
        return {e.language: e.id for e in self.experts if e.language is not None}

    def all_languages(self) -> tuple[str, ...]:
        """Languages of every language expert in the file, restricted view or not."""
        return tuple(e.language for e in self.universe if e.language is not None)

    def restrict(self, expert_ids: Iterable[str]) -> ExpertRegistry:
        """The registry limited to ``expert_ids`` (e.g. the experts whose adapters are installed).

        The fallback expert is always kept: it stands for "the base model with the general
        adapter, or none", so routing never ends with nothing to run. Unknown ids raise
        :class:`RegistryError` listing them.
        """
        wanted = list(dict.fromkeys(expert_ids))
        unknown = [i for i in wanted if i not in self._by_id]
        if unknown:
            raise RegistryError(
                f"{self.source}: unknown expert id(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(self.ids)}"
            )
        keep = set(wanted) | {self.fallback.id}
        return ExpertRegistry(
            tuple(e for e in self.experts if e.id in keep), self.source, self.digest, self.universe
        )

    def full(self) -> ExpertRegistry:
        """The unrestricted registry this view was taken from."""
        return ExpertRegistry(self.universe, self.source, self.digest)


def default_registry_path() -> Path:
    """The registry shipped with the package."""
    return Path(__file__).with_name("data") / "experts.yaml"


def _string_list(value: Any, where: str, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise RegistryError(f"{where}: '{name}' must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


def _parse_expert(raw: Any, index: int, path: str) -> Expert:
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: experts[{index}] must be a mapping, got {type(raw).__name__}")
    expert_id = raw.get("id")
    if not isinstance(expert_id, str) or not _ID_RE.match(expert_id):
        raise RegistryError(
            f"{path}: experts[{index}] has an invalid 'id' {expert_id!r} "
            "(lower-case letters, digits, '_' or '-', at most 64 characters)"
        )
    where = f"{path}: expert '{expert_id}'"
    extra = set(raw) - _FIELDS
    if extra:
        raise RegistryError(f"{where}: unknown field(s) {', '.join(sorted(map(str, extra)))}")
    kind = raw.get("kind")
    if kind not in EXPERT_KINDS:
        raise RegistryError(
            f"{where}: 'kind' must be one of {', '.join(EXPERT_KINDS)}, got {kind!r}"
        )
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise RegistryError(f"{where}: 'description' must be a string")
    language = raw.get("language")
    if kind == "language":
        if not isinstance(language, str) or not _LANG_RE.match(language):
            raise RegistryError(f"{where}: a language expert needs 'language' (ISO 639-1 code)")
    elif language is not None:
        raise RegistryError(f"{where}: only language experts take 'language'")
    lists = {name: _string_list(raw.get(name), where, name) for name in _LIST_FIELDS}
    if not lists["queries"]:
        raise RegistryError(f"{where}: 'queries' needs at least one representative query")
    for pattern in lists["patterns"]:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise RegistryError(f"{where}: pattern {pattern!r} does not compile: {exc}") from None
    return Expert(
        id=expert_id,
        kind=kind,
        description=description.strip(),
        language=language,
        strong=lists["strong"],
        weak=lists["weak"],
        patterns=lists["patterns"],
        queries=lists["queries"],
    )


def parse_registry(data: Any, source: str) -> ExpertRegistry:
    """Validate already-parsed registry data (``{"version": 1, "experts": [...]}``)."""
    if not isinstance(data, dict) or not isinstance(data.get("experts"), list):
        raise RegistryError(f"{source}: expected a mapping with an 'experts' list")
    version = data.get("version", 1)
    if version != 1:
        raise RegistryError(f"{source}: unsupported registry version {version!r} (expected 1)")
    experts = [_parse_expert(raw, i, source) for i, raw in enumerate(data["experts"])]
    if not experts:
        raise RegistryError(f"{source}: the 'experts' list is empty")
    seen: set[str] = set()
    for e in experts:
        if e.id in seen:
            raise RegistryError(f"{source}: duplicate expert id '{e.id}'")
        seen.add(e.id)
    fallbacks = [e.id for e in experts if e.kind == "fallback"]
    if len(fallbacks) != 1:
        raise RegistryError(
            f"{source}: exactly one 'fallback' expert is required, found {fallbacks}"
        )
    languages: dict[str, str] = {}
    for e in experts:
        if e.language is not None:
            if e.language in languages:
                raise RegistryError(
                    f"{source}: experts '{languages[e.language]}' and '{e.id}' both claim "
                    f"language '{e.language}'"
                )
            languages[e.language] = e.id
    canonical = json.dumps([e.to_dict() for e in experts], sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return ExpertRegistry(tuple(experts), source, digest)


def load_registry(path: str | Path | None = None) -> ExpertRegistry:
    """Load and validate a registry file (the packaged one when ``path`` is ``None``)."""
    file = Path(path) if path is not None else default_registry_path()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegistryError(f"{file}: registry file not found") from None
    except UnicodeDecodeError as exc:
        raise RegistryError(f"{file}: registry file is not valid UTF-8 ({exc})") from None
    except OSError as exc:
        raise RegistryError(f"{file}: cannot read registry file ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RegistryError(f"{file}: malformed YAML: {exc}") from None
    return parse_registry(data, str(file))


def resolve_registry(
    registry: ExpertRegistry | str | Path | None, expert_ids: Sequence[str] | None = None
) -> ExpertRegistry:
    """A registry object from an object, a path or ``None`` (packaged), optionally restricted."""
    reg = registry if isinstance(registry, ExpertRegistry) else load_registry(registry)
    return reg.restrict(expert_ids) if expert_ids is not None else reg
