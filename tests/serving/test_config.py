"""The YAML configuration: defaults, layering, validation errors that name their source."""

from __future__ import annotations

import pytest

from r3mes.config import ConfigError, R3mesConfig, dump_yaml, load_config


def test_defaults_are_the_seeds():
    cfg = load_config(environ={})
    assert cfg.router.strategy == "hybrid"
    assert (cfg.router.hybrid.keyword_weight, cfg.router.hybrid.semantic_weight) == (0.3, 0.7)
    assert cfg.router.hybrid.fast_path_threshold == 0.85
    assert cfg.router.gating.general_fallback_threshold == 0.5
    assert cfg.cache.tier1_vram.preload == ["turkish_dora", "general_dora"]
    assert cfg.rag.top_k == 5 and cfg.rag.chunk_size == 512 and cfg.rag.chunk_overlap == 50
    assert cfg.server.host == "127.0.0.1" and cfg.server.api_key is None


def test_a_user_file_changes_only_its_keys(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("router:\n  hybrid:\n    fast_path_threshold: 0.9\nserver:\n  port: 9100\n")
    cfg = load_config(path, environ={})
    assert cfg.router.hybrid.fast_path_threshold == 0.9 and cfg.server.port == 9100
    assert cfg.router.hybrid.keyword_weight == 0.3


def test_home_config_yaml_is_picked_up(tmp_path):
    (tmp_path / "config.yaml").write_text("rag:\n  top_k: 7\n")
    assert load_config(home=tmp_path, environ={}).rag.top_k == 7


def test_environment_overrides_the_file_and_flags_override_the_environment(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  port: 9100\n")
    env = {"R3MES_SERVER__PORT": "9200", "R3MES_RAG__INDICES": "[medical, general]",
           "R3MES_MODEL": "/models/bitnet", "R3MES_HOME": "/ignored"}
    cfg = load_config(path, environ=env)
    assert cfg.server.port == 9200 and cfg.rag.indices == ["medical", "general"]
    assert cfg.model.path == "/models/bitnet"
    cfg = load_config(path, environ=env, overrides={"server.port": 9300, "model.path": None})
    assert cfg.server.port == 9300 and cfg.model.path == "/models/bitnet"


def test_a_bad_value_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("router:\n  hybrid:\n    keyword_weight: lots\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*router\.hybrid\.keyword_weight"):
        load_config(path, environ={})


def test_an_unknown_key_is_refused_as_a_typo(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("rag:\n  topk: 3\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*rag\.topk.*unknown key"):
        load_config(path, environ={})


def test_a_bad_environment_variable_is_named():
    with pytest.raises(ConfigError, match="R3MES_SERVER__PORT.*server.port"):
        load_config(environ={"R3MES_SERVER__PORT": "eighty"})
    with pytest.raises(ConfigError, match="R3MES_NOPE__X"):
        load_config(environ={"R3MES_NOPE__X": "1"})


def test_invalid_yaml_and_missing_files_are_named(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("router: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml", environ={})
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path, environ={})


def test_cross_field_rules_are_checked():
    with pytest.raises(ConfigError, match="chunk_overlap"):
        load_config(environ={}, overrides={"rag.chunk_overlap": 600})
    with pytest.raises(ConfigError, match="reranker_model"):
        load_config(environ={}, overrides={"rag.rerank": True})
    with pytest.raises(ConfigError, match="invalid index name"):
        load_config(environ={}, overrides={"rag.indices": ["../medicine"]})
    # The user's own index names are valid (issue 25).
    assert load_config(environ={}, overrides={"rag.indices": ["medicine-2024"]}).rag.indices \
        == ["medicine-2024"]


def test_the_dump_loads_back_to_the_same_config(tmp_path):
    cfg = load_config(environ={}, overrides={"generation.temperature": 0.7})
    path = tmp_path / "round.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path, environ={}) == cfg
    assert cfg.get("generation.temperature") == 0.7
    assert isinstance(R3mesConfig().to_dict()["router"]["gating"], dict)


def test_the_packaged_yaml_spells_out_the_schema_defaults():
    # One place sets defaults (the schema); the YAML file shows them to users.
    assert load_config(environ={}) == R3mesConfig()


def test_pipeline_and_router_defaults_come_from_the_schema():
    import dataclasses

    from r3mes.config import schema_default
    from r3mes.router.hybrid_router import HybridConfig
    from r3mes.router.vram_adaptive_gating import GatingConfig
    from r3mes.serving import PipelineConfig

    default = PipelineConfig()
    assert default == PipelineConfig.from_settings(R3mesConfig())
    for f in dataclasses.fields(PipelineConfig):
        key = f.metadata.get("setting")
        if key is not None and f.metadata.get("convert") is None:
            assert getattr(default, f.name) == schema_default(key), f.name
    assert default.system_prompt.startswith("You are a helpful assistant")
    hybrid = HybridConfig()
    assert (hybrid.keyword_weight, hybrid.semantic_weight, hybrid.fast_path_threshold,
            hybrid.adaptive_weighting) == (
        schema_default("router.hybrid.keyword_weight"),
        schema_default("router.hybrid.semantic_weight"),
        schema_default("router.hybrid.fast_path_threshold"),
        schema_default("router.hybrid.adaptive_weighting"))
    assert default.hybrid_config() == hybrid
    gating = GatingConfig()
    assert gating.max_k == schema_default("router.gating.vram_24gb_max_experts")
    assert default.gating_config() == gating
    # The mutable defaults are copies: changing one pipeline's list changes no other's.
    default.preload_experts.append("x")
    assert "x" not in PipelineConfig().preload_experts
    assert schema_default("cache.tier1_vram.preload") == ["turkish_dora", "general_dora"]


def test_removed_keys_are_ignored_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old.yaml"
    path.write_text("dora:\n  default_rank: 8\nrouter:\n  keyword:\n    confidence_threshold: 0.2\n"
                    "  semantic:\n    device: cuda\ncache:\n  tier2_ram:\n"
                    "    eviction_policy: lru\n    capacity_mb: 100\n"
                    "rag:\n  serving_node:\n    indices: [general]\n")
    with caplog.at_level("WARNING", logger="r3mes.config"):
        cfg = load_config(path, environ={"R3MES_DORA__DEFAULT_ALPHA": "16"})
    assert cfg.cache.tier2_ram.capacity_mb == 100
    assert "dora" not in cfg.to_dict() and "keyword" not in cfg.to_dict()["router"]
    for key in ("dora", "router.keyword", "router.semantic.device",
                "cache.tier2_ram.eviction_policy", "rag.serving_node", "R3MES_DORA__DEFAULT_ALPHA"):
        assert key in caplog.text
    # A key that never existed is still a typo.
    path.write_text("dora_settings:\n  rank: 8\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path, environ={})


def test_rag_embedding_model_picks_the_model_of_new_indices(tmp_path):
    import dataclasses

    from r3mes.rag.embedder import E5_MODEL, embedding_fingerprint
    from r3mes.serving import PipelineConfig
    from r3mes.serving.startup import open_rag_store

    path = tmp_path / "e5.yaml"
    path.write_text(f"rag:\n  embedding_model: {E5_MODEL}\n")
    config = PipelineConfig.from_settings(load_config(path, environ={}))
    store = open_rag_store(dataclasses.replace(config, home=str(tmp_path / "home")))
    assert store.embedding_model == E5_MODEL
    assert store.fingerprint == embedding_fingerprint(E5_MODEL) != embedding_fingerprint()
    # The bundled indices were built with MiniLM and keep it.
    assert store.existing()


def test_the_packed_prefill_budget_reaches_the_engine_and_is_validated(tmp_path):
    from r3mes.serving.pipeline_config import PipelineConfig

    path = tmp_path / "c.yaml"
    path.write_text("inference:\n  max_prefill_tokens: 96\n")
    cfg = load_config(path, environ={})
    assert PipelineConfig.from_settings(cfg).max_prefill_tokens == 96
    assert load_config(environ={}).inference.max_prefill_tokens == 64
    path.write_text("inference:\n  max_prefill_tokens: -1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*inference\.max_prefill_tokens"):
        load_config(path, environ={})


def test_the_kv_cache_dtype_reaches_the_engine_and_is_validated(tmp_path):
    from r3mes.serving.pipeline_config import PipelineConfig

    path = tmp_path / "c.yaml"
    path.write_text("inference:\n  kv_cache_dtype: float16\n")
    assert PipelineConfig.from_settings(load_config(path, environ={})).kv_cache_dtype == "float16"
    assert load_config(environ={}).inference.kv_cache_dtype == "float32"
    path.write_text("inference:\n  kv_cache_dtype: bfloat16\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*inference\.kv_cache_dtype"):
        load_config(path, environ={})
