"""The r3mes configuration: one YAML file, validated, overridable by environment and flags.

The packaged defaults live in ``r3mes/serving/dora_config.yaml`` (the seed's
``config/dora_config.yaml``, extended with generation, post-processing and server
settings). :func:`load_config` layers, later winning:

1. the packaged defaults;
2. a user file: ``path``, else ``$R3MES_CONFIG``, else ``<home>/config.yaml`` when it exists
   (it need only hold the keys it changes);
3. environment variables ``R3MES_<SECTION>__<KEY>[__<SUBKEY>...]`` whose values are parsed
   as YAML (``R3MES_SERVER__PORT=9000``, ``R3MES_RAG__INDICES="[medical, general]"``), and the
   shortcuts ``R3MES_MODEL`` (``model.path``) and ``R3MES_API_KEY`` (``server.api_key``);
4. ``overrides``: a mapping of dotted keys (``{"router.gating.vram_gb": 24}``), which is how
   command-line flags arrive.

Every layer is validated as it is applied, so a bad value raises :class:`ConfigError` naming
where it came from (the file, the environment variable or the flag) and the dotted field.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from r3mes.errors import R3mesError
from r3mes.utils.paths import r3mes_home

ENV_PREFIX = "R3MES_"
#: environment shortcuts -> dotted key
ENV_SHORTCUTS = {"R3MES_MODEL": "model.path", "R3MES_API_KEY": "server.api_key"}
DEFAULT_CONFIG_FILE = "dora_config.yaml"  # next to r3mes/serving/__init__.py
#: keys older configurations may hold that nothing reads any more (dotted; a section name
#: covers its whole subtree): dropped with a warning instead of refused, so those files load
REMOVED_KEYS = ("dora", "router.keyword", "router.semantic.device",
                "cache.tier2_ram.eviction_policy", "rag.serving_node")

log = logging.getLogger(__name__)


class ConfigError(R3mesError, ValueError):
    """The configuration is invalid; the message names the source (file, env var, flag) and
    the dotted field."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- schema


class ModelSection(_Section):
    path: str | None = None
    experts_dir: str | None = None
    knowledge_dir: str | None = None


class SemanticSection(_Section):
    model: str | None = None


class HybridSection(_Section):
    keyword_weight: float = Field(0.3, ge=0)
    semantic_weight: float = Field(0.7, ge=0)
    fast_path_threshold: float = Field(0.85, ge=0, le=1)
    adaptive_weighting: bool = True

    @model_validator(mode="after")
    def _weights(self) -> HybridSection:
        if self.keyword_weight + self.semantic_weight <= 0:
            raise ValueError("keyword_weight and semantic_weight must not both be 0")
        return self


class GatingSection(_Section):
    vram_8gb_max_experts: int = Field(1, ge=1)
    vram_16gb_max_experts: int = Field(2, ge=1)
    vram_24gb_max_experts: int = Field(3, ge=1)
    general_fallback_threshold: float = Field(0.5, ge=0, le=1)
    min_weight: float = Field(0.1, ge=0, lt=1)
    vram_gb: float | None = Field(None, ge=0)
    fill_with_general: bool = True
    general_fill_score: float = Field(0.3, gt=0, le=1)


class RouterSection(_Section):
    strategy: Literal["keyword", "semantic", "hybrid"] = "hybrid"
    registry: str | None = None
    semantic: SemanticSection = SemanticSection()
    hybrid: HybridSection = HybridSection()
    gating: GatingSection = GatingSection()


class Tier1Section(_Section):
    preload: list[str] = Field(default_factory=lambda: ["turkish_dora", "general_dora"])
    capacity_mb: float = Field(512, ge=0)


class Tier2Section(_Section):
    capacity_mb: float = Field(2048, ge=0)


class Tier3Section(_Section):
    max_size_gb: float | None = Field(10, gt=0)


class CacheSection(_Section):
    tier1_vram: Tier1Section = Tier1Section()
    tier2_ram: Tier2Section = Tier2Section()
    tier3_disk: Tier3Section = Tier3Section()
    predictive_loading: bool = True


class InferenceSection(_Section):
    backend: Literal["auto", "pytorch", "bitnet_cpp"] = "auto"
    fallback_backend: Literal["pytorch", "bitnet_cpp"] = "pytorch"
    device: str = "cpu"
    # Adapter storage of the native backend: None = its default (int8 on CPU, fp16 on GPU).
    adapter_storage: Literal["int8", "fp16", "fp32"] | None = None
    max_batch_size: int = Field(8, ge=1, le=256)
    # Requests waiting for a batch row; one more is refused (HTTP 429 with Retry-After).
    max_queue: int = Field(64, ge=0, le=100000)
    # The KV-cache budget shared by all running requests: tokens, or else MiB.
    kv_cache_tokens: int | None = Field(None, ge=1)
    kv_cache_mb: float = Field(1024.0, gt=0)
    kv_block_size: int = Field(16, ge=1, le=1024)
    # The cache's element type. float16 (opt-in, lossy) halves the memory a position takes
    # (twice the requests in one budget) and the cache bytes a decode step reads; each key
    # and value is rounded to a half (BENCHMARKS.md, issue 19, "16-bit KV cache").
    kv_cache_dtype: Literal["float32", "float16"] = "float32"
    # Prompt tokens of the requests joining at one step prefilled in one pass at most (0 or
    # 1: each prompt alone). A pass reads the weights once for all its prompts, but each of
    # them gets its first token only when the whole pass is done and the running requests
    # wait for it: it pays for short prompts (4 of 12-21 tokens: 730 ms for all against 1150
    # one after another) and costs time to first token for long ones, where prefill is
    # compute-bound (BENCHMARKS.md, issue 19, fifth pass).
    max_prefill_tokens: int = Field(64, ge=0, le=1_000_000)


class RagSection(_Section):
    enabled: bool = True
    vector_store: Literal["faiss"] = "faiss"
    embedding_model: str = "all-MiniLM-L6-v2"
    chunk_size: int = Field(512, ge=16)
    chunk_overlap: int = Field(50, ge=0)
    top_k: int = Field(5, ge=1, le=100)
    hybrid_search: bool = True
    rerank: bool = False
    reranker_model: str | None = None
    indices: list[str] | None = None
    max_context_chars: int = Field(4000, ge=0)

    @model_validator(mode="after")
    def _check(self) -> RagSection:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError("chunk_overlap must be smaller than chunk_size")
        if self.rerank and not self.reranker_model:
            raise ValueError("rerank: true needs reranker_model (a local cross-encoder directory)")
        if self.indices is not None:
            from r3mes.rag.errors import UnknownIndexError
            from r3mes.rag.indices import check_index_name

            for name in self.indices:  # the user's own index names are allowed
                try:
                    check_index_name(name)
                except UnknownIndexError as exc:
                    raise ValueError(str(exc)) from None
        return self


class GenerationSection(_Section):
    max_new_tokens: int = Field(128, ge=1, le=32768)
    temperature: float = Field(0.7, ge=0, le=10)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    repetition_penalty: float = Field(1.1, gt=0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    system_prompt: str = ("You are a helpful assistant. Answer using the context when it is "
                          "relevant.")


class SafetySection(_Section):
    enabled: bool = True
    blocked_terms: list[str] = Field(default_factory=list)
    replacement: str = "[filtered]"


class PostprocessSection(_Section):
    citations: bool = True
    strip_whitespace: bool = True
    safety: SafetySection = SafetySection()


class ServerSection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    max_request_bytes: int = Field(1_048_576, ge=1024)
    max_prompt_chars: int = Field(16000, ge=1)
    max_tokens_limit: int = Field(1024, ge=1)
    max_concurrent_requests: int = Field(64, ge=1)
    model_name: str = "r3mes-bitnet"


class IpfsSection(_Section):
    """Where adapters and index snapshots move over IPFS (``r3mes.distribution``)."""

    api: str | None = None  # a kubo node's RPC API, e.g. http://127.0.0.1:5001
    gateway: str | None = None  # a trustless HTTP gateway, for nodes that run no daemon
    timeout_s: float = Field(60, gt=0)


class MinerNodeSection(_Section):
    """A miner node: pull the serving node's published index snapshots over IPFS."""

    sync_from_serving: bool = False
    serving_url: str | None = None  # the serving node's r3mes server
    interval_s: float = Field(21600, gt=0)  # 6 hours, the news index's publication cadence
    indices: list[str] | None = None  # None: every index the serving node publishes

    @model_validator(mode="after")
    def _check(self) -> MinerNodeSection:
        if self.sync_from_serving and not self.serving_url:
            raise ValueError("sync_from_serving: true needs serving_url")
        return self


class R3mesConfig(_Section):
    """The whole configuration (the schema of ``dora_config.yaml``)."""

    model: ModelSection = ModelSection()
    router: RouterSection = RouterSection()
    cache: CacheSection = CacheSection()
    inference: InferenceSection = InferenceSection()
    rag: RagSection = RagSection()
    generation: GenerationSection = GenerationSection()
    postprocess: PostprocessSection = PostprocessSection()
    server: ServerSection = ServerSection()
    ipfs: IpfsSection = IpfsSection()
    miner_node: MinerNodeSection = MinerNodeSection()

    def to_dict(self) -> dict[str, Any]:
        """Plain data, the YAML file's shape (the ``r3mes config show --json`` schema)."""
        return self.model_dump(mode="json")

    def get(self, dotted: str) -> Any:
        """The value at a dotted key (``"router.hybrid.keyword_weight"``)."""
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node


# --------------------------------------------------------------------------- loading


def default_config_path() -> Path:
    """The packaged defaults file."""
    import r3mes.serving

    return Path(r3mes.serving.__file__).resolve().parent / DEFAULT_CONFIG_FILE


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, "
                          f"got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _removed(dotted: str) -> bool:
    return any(dotted == key or dotted.startswith(key + ".") for key in REMOVED_KEYS)


def _drop_removed(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` without the :data:`REMOVED_KEYS` it holds, each dropped with a warning."""
    out = copy.deepcopy(data)
    for dotted in REMOVED_KEYS:
        *parents, last = dotted.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            del node[last]
            log.warning("%s: %s is no longer read by r3mes and is ignored; remove it",
                        source, dotted)
    return out


def _validate(data: Mapping[str, Any], source: str) -> R3mesConfig:
    try:
        return R3mesConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (a typo?)"
            problems.append(f"{field}: {msg} (got {err.get('input')!r})"
                            if err["type"] != "extra_forbidden" else f"{field}: {msg}")
        raise ConfigError(f"{source}: invalid configuration: " + "; ".join(problems)) from None


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, tuple[str, Any]]:
    """Dotted key -> (variable name, parsed value) for every ``R3MES_*__*`` variable and
    shortcut in ``environ``."""
    environ = os.environ if environ is None else environ
    out: dict[str, tuple[str, Any]] = {}
    for name, raw in environ.items():
        if name in ENV_SHORTCUTS:
            dotted = ENV_SHORTCUTS[name]
        elif name.startswith(ENV_PREFIX) and "__" in name[len(ENV_PREFIX):]:
            dotted = ".".join(p.lower() for p in name[len(ENV_PREFIX):].split("__"))
        else:
            continue  # R3MES_HOME, R3MES_SIMD, R3MES_CONFIG ... belong to others
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment variable {name}: not a valid value ({exc})") from exc
        out[dotted] = (name, value)
    return out


def user_config_path(path: str | os.PathLike[str] | None = None,
                     home: str | os.PathLike[str] | None = None,
                     environ: Mapping[str, str] | None = None) -> Path | None:
    """The user's config file: ``path``, else ``$R3MES_CONFIG``, else ``<home>/config.yaml``
    when it exists, else ``None``."""
    environ = os.environ if environ is None else environ
    if path is not None:
        return Path(path).expanduser()
    if environ.get("R3MES_CONFIG"):
        return Path(environ["R3MES_CONFIG"]).expanduser()
    candidate = r3mes_home(home) / "config.yaml"
    return candidate if candidate.is_file() else None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    home: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> R3mesConfig:
    """The effective configuration (see the module docstring for the layers).

    Raises :class:`ConfigError` naming the file, variable or flag and the field at fault.
    """
    data = _read_yaml(default_config_path())
    _validate(data, str(default_config_path()))
    user = user_config_path(path, home, environ)
    if user is not None:
        data = _merge(data, _drop_removed(_read_yaml(user), str(user)))
        _validate(data, str(user))
    for dotted, (name, value) in sorted(env_overrides(environ).items()):
        if _removed(dotted):
            log.warning("environment variable %s: %s is no longer read by r3mes and is "
                        "ignored", name, dotted)
            continue
        _set_dotted(data, dotted, value)
        _validate(data, f"environment variable {name}")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue  # an unset flag leaves the configured value
        if _removed(dotted):
            log.warning("option %s is no longer read by r3mes and is ignored", dotted)
            continue
        _set_dotted(data, dotted, value)
        _validate(data, f"option {dotted}")
    return _validate(data, "configuration")


_SCHEMA_DEFAULTS: R3mesConfig | None = None


def schema_default(dotted: str) -> Any:
    """The default of the setting at ``dotted`` (``"rag.top_k"``): the one place defaults
    are set. The packaged ``dora_config.yaml`` spells out the same values (a test holds
    them equal), and :class:`~r3mes.serving.PipelineConfig` and the router's configs take
    theirs from here. Mutable values come back as copies."""
    global _SCHEMA_DEFAULTS
    if _SCHEMA_DEFAULTS is None:
        _SCHEMA_DEFAULTS = R3mesConfig()
    return copy.deepcopy(_SCHEMA_DEFAULTS.get(dotted))


def config_sources(path: str | os.PathLike[str] | None = None,
                   home: str | os.PathLike[str] | None = None,
                   environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Where the effective configuration came from (for ``r3mes config show``)."""
    user = user_config_path(path, home, environ)
    return {
        "defaults": str(default_config_path()),
        "file": str(user) if user is not None else None,
        "environment": sorted(name for name, _ in env_overrides(environ).values()),
    }


def dump_yaml(config: R3mesConfig) -> str:
    """The configuration as YAML (loadable again with :func:`load_config`)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
