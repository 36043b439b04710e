"""Start-up of the pipeline: the components one query flows through, built from a
:class:`~r3mes.serving.pipeline_config.PipelineConfig`.

In the order :class:`~r3mes.serving.inference_pipeline.InferencePipeline` runs them:

1. :func:`open_adapter_store`: the data directory's adapter store, with the bundled (or
   configured) experts imported;
2. :func:`fitting_experts`: the stored experts that fit the model about to be served (the
   others are left out of routing, with why);
3. :func:`build_router` over those experts; :func:`open_rag_store` (the bundled knowledge
   imported into an empty data directory) and :func:`build_retriever`;
4. :func:`load_backend` (chosen by :func:`r3mes.core.backends.create_backend`, weights
   checked against their recorded sha256 meanwhile), :func:`load_tokenizer`;
5. :func:`build_engine` (continuous batching) and :func:`start_cache` (the tiered expert
   cache, which owns the adapters the backend holds through
   :class:`~r3mes.cache.residency.AdapterResidency`, with the preload experts pinned).

When no model is configured the bundled demo model (``r3mes/assets/demo_model``), its
experts (``r3mes/assets/experts/<id>/``) and its knowledge base (``r3mes/assets/knowledge/``)
are used; nothing is ever downloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r3mes.serving.errors import ModelNotFoundError, PipelineError
from r3mes.serving.pipeline_config import PipelineConfig

if TYPE_CHECKING:
    from r3mes.cache import AdapterStore, TieredDoRACache
    from r3mes.cache.residency import AdapterResidency
    from r3mes.core.backends import InferenceBackend
    from r3mes.core.checkpoint import ModelShape
    from r3mes.rag import RagStore, Retriever
    from r3mes.router.hybrid_router import HybridRouter
    from r3mes.serving.engine import AdapterHook, Engine

log = logging.getLogger(__name__)

MODEL_HELP = (
    "pass --model PATH (or set model.path in the config, or R3MES_MODEL): a local BitNet "
    "b1.58 directory with config.json, model.safetensors and tokenizer.json, for example "
    "microsoft/bitnet-b1.58-2B-4T downloaded yourself with `huggingface-cli download "
    "microsoft/bitnet-b1.58-2B-4T --local-dir DIR`, or a model converted with `r3mes "
    "convert`. r3mes never downloads models")

DEMO_MODEL_NOTICE = (
    "note: no model given, so this answer comes from r3mes' bundled demo model: a tiny toy "
    "(a few MB, trained on a handful of documents) that writes word salad. It shows the "
    "pipeline works; for real answers pass --model DIR with a BitNet b1.58 model "
    "(see the README)")


# --------------------------------------------------------------------------- the model


def assets_dir() -> Path:
    """``r3mes/assets`` inside the installed package (it may not exist)."""
    import r3mes

    # The package directory itself (importlib.resources may hand back a multiplexed
    # path in editable installs).
    return Path(r3mes.__file__).resolve().parent / "assets"


def resolve_model_path(path: str | Path | None) -> Path:
    """The model directory to load: ``path``, else the bundled demo model.

    Raises :class:`ModelNotFoundError` saying what to pass when neither exists.
    """
    if path is not None and str(path).strip():
        p = Path(path).expanduser()
        if not p.exists():
            raise ModelNotFoundError(f"model path {p} does not exist; {MODEL_HELP}")
        return p
    demo = assets_dir() / "demo_model"
    if demo.is_dir():
        return demo
    raise ModelNotFoundError(
        f"no model is configured and the bundled demo model ({demo}) is not installed; "
        f"{MODEL_HELP}")


def is_demo_model(path: Path) -> bool:
    """Whether ``path`` is the bundled demo model."""
    return path.resolve() == (assets_dir() / "demo_model").resolve()


def model_shape_before_loading(config: PipelineConfig, model_path: Path | None,
                               backend: InferenceBackend | None) -> ModelShape | None:
    """The shape of the model to serve: the loaded backend's, else read from the model
    directory's config (nothing loaded); ``None`` when it cannot be known (a backend passed
    in without a model, or a directory the load itself will report on)."""
    from r3mes.core.checkpoint import CheckpointError, read_model_shape

    if backend is not None:
        return backend.model_shape() if backend.model is not None else None
    try:
        return read_model_shape(model_path or resolve_model_path(config.model_path))
    except (CheckpointError, OSError) as exc:
        log.debug("model shape unknown before loading: %s", exc)
        return None


async def load_backend(config: PipelineConfig, model_path: Path,
                       executor: Executor) -> InferenceBackend:
    """The configured backend with ``model_path`` loaded, its weights checked against their
    recorded sha256 meanwhile (two threads of ``executor``, so the check costs no wall time
    where there is a core to spare)."""
    from r3mes.core.checkpoint import verify_weights

    def create() -> InferenceBackend:
        from r3mes.core.backends import UnknownBackendError, create_backend

        try:
            backend = create_backend(config.backend, device=config.device,
                                     adapter_storage=config.adapter_storage)
        except UnknownBackendError as exc:  # a setting's mistake: reported as the pipeline's
            raise PipelineError(str(exc)) from exc
        backend.load_base_model(str(model_path))
        return backend

    loop = asyncio.get_running_loop()
    backend, verified = await asyncio.gather(
        loop.run_in_executor(executor, create),
        loop.run_in_executor(executor, verify_weights, model_path), return_exceptions=True)
    for outcome in (verified, backend):
        if isinstance(outcome, BaseException):
            raise outcome
    return backend


def load_tokenizer(backend: InferenceBackend, model_path: Path | None) -> Any:
    """The backend's tokenizer, else the model directory's ``tokenizer.json``."""
    if backend.tokenizer is not None:
        return backend.tokenizer
    if model_path is None or not (Path(model_path) / "tokenizer.json").is_file():
        raise PipelineError(f"no tokenizer: {model_path}/tokenizer.json is missing and the "
                            "backend does not provide one")
    from r3mes.core.tokenizer import Tokenizer

    return Tokenizer(model_path)


def build_engine(config: PipelineConfig, backend: InferenceBackend,
                 adapters: AdapterHook) -> Engine:
    """The continuous-batching engine over ``backend``; ``adapters`` runs before each join
    (the residency's ``sync``)."""
    from r3mes.serving.engine import Engine

    return Engine(backend, max_context=backend.max_context(), max_batch=config.max_batch_size,
                  max_queue=config.max_queue, kv_tokens=config.kv_cache_tokens,
                  kv_megabytes=config.kv_cache_mb, kv_block_size=config.kv_block_size,
                  kv_dtype=config.kv_cache_dtype, adapters=adapters,
                  max_prefill_tokens=config.max_prefill_tokens)


async def start_cache(config: PipelineConfig, store: AdapterStore,
                      residency: AdapterResidency,
                      installed: Sequence[str]) -> tuple[TieredDoRACache, dict[str, Exception]]:
    """The tiered expert cache in front of ``store``, holding ``residency``'s adapter slots,
    with the installed preload experts pinned. Returns it and the preload experts that
    failed to load (a damaged expert is skipped, never fatal)."""
    from r3mes.cache import TieredDoRACache

    # verify_on_load: an adapter's weights are checked against the store's sha256 the first
    # time this process reads them (about 1 ms a 2 MB), so flipped bytes are refused
    # instead of used.
    cache = TieredDoRACache(store, tier1_capacity_mb=config.tier1_capacity_mb,
                            tier2_capacity_mb=config.tier2_capacity_mb,
                            prepare=residency.prepare, release=residency.release,
                            verify_on_load=True)
    await cache.start()
    failed: dict[str, Exception] = {}
    for expert in config.preload_experts:
        if expert not in installed:
            continue
        try:
            await cache.pin(expert)
        except Exception as exc:
            failed[expert] = exc
    return cache, failed


# --------------------------------------------------------------------------- experts


def open_adapter_store(config: PipelineConfig) -> AdapterStore:
    """The data directory's adapter store, with the experts of :func:`expert_dirs` imported."""
    from r3mes.cache import AdapterStore

    store = AdapterStore(config.home)
    try:  # the configured limit is the default of a new store, never a reset
        store.set_default_max_size_gb(config.store_max_size_gb)
    except OSError as exc:  # e.g. a full disk: recorded next time
        log.warning("adapter store size limit not recorded: %s", exc)
    for directory in expert_dirs(config):
        import_experts(store, directory)
    return store


def expert_dirs(config: PipelineConfig) -> list[Path]:
    """``experts_dir``; else, for the demo model (no model configured), the bundled experts."""
    if config.experts_dir:
        d = Path(config.experts_dir).expanduser()
        if not d.is_dir():
            raise PipelineError(f"experts_dir {d} is not a directory")
        return [d]
    bundled = assets_dir() / "experts"
    return [bundled] if config.model_path is None and bundled.is_dir() else []


def import_experts(store: AdapterStore, directory: Path) -> None:
    """Install every ``<directory>/<id>/`` PEFT adapter whose id the store lacks.

    An id already stored is updated only when it was installed from this same directory
    and the content changed (a new package version); an adapter the user added under that
    id is never replaced. Bundled experts are recorded with the demo model's weights
    digest, the one base model they were trained for."""
    from r3mes.cache import AdapterStoreError, adapter_digest

    bundled = directory.resolve() == (assets_dir() / "experts").resolve()
    fingerprint = _demo_weights_sha256() if bundled else None
    for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
        if not (sub / "adapter_config.json").is_file():
            continue
        try:
            if sub.name in store:
                record = store.get(sub.name)
                ours = record.source is not None and _same_path(record.source, sub)
                if not ours or record.digest == adapter_digest(sub):
                    continue
            store.add(sub, sub.name, replace=True, source=str(sub),
                      base_model_fingerprint=fingerprint)
        except (AdapterStoreError, OSError) as exc:
            log.warning("expert %s not imported: %s", sub, exc)


def fitting_experts(store: AdapterStore,
                    shape: ModelShape | None) -> tuple[list[str], dict[str, str]]:
    """The ids of the stored experts that fit a model of ``shape`` (all of them when it is
    unknown), and the others with why: made for another base model (its recorded
    fingerprint, or a bundled expert's, names other weights), an adapted module whose shape
    differs from the model's, files that no longer parse."""
    from r3mes.cache import AdapterValidationError
    from r3mes.cache.adapter_store import inspect_adapter_dir

    records = store.list()
    if shape is None:
        return [r.id for r in records], {}
    bundled = _bundled_expert_digests()
    demo_sha = _demo_weights_sha256()
    fitting: list[str] = []
    skipped: dict[str, str] = {}
    for record in records:
        trained_for = record.base_model_fingerprint or (
            demo_sha if record.digest in bundled else None)
        if trained_for is not None and trained_for != shape.weights_sha256:
            skipped[record.id] = "made for another base model"
            continue
        try:
            info = inspect_adapter_dir(store.objects / record.digest)
        except AdapterValidationError as exc:
            skipped[record.id] = f"damaged ({exc})"
            continue
        mismatch = _shape_mismatch(info.module_shapes, shape)
        if mismatch is not None:
            skipped[record.id] = mismatch
            continue
        fitting.append(record.id)
    return fitting, skipped


def skipped_notice(skipped: Mapping[str, str]) -> str:
    """One line for the user naming the experts left out of routing, grouped by why."""
    groups: dict[str, list[str]] = {}
    for expert, why in sorted(skipped.items()):
        groups.setdefault(why, []).append(expert)
    return (f"note: {len(skipped)} stored expert(s) do not fit this model and are not "
            "routed to: " + "; ".join(f"{', '.join(ids)} ({why})" for why, ids in groups.items()))


# --------------------------------------------------------------------------- router, RAG


def build_router(config: PipelineConfig, routable: Sequence[str]) -> HybridRouter:
    """The hybrid router over the registry's experts that are in ``routable`` (plus the
    fallback), its models loaded now rather than inside the first query."""
    from r3mes.router.hybrid_router import HybridRouter
    from r3mes.router.registry import resolve_registry

    registry = resolve_registry(config.registry, None)
    router = HybridRouter(registry, expert_ids=[e for e in registry.ids if e in routable],
                          config=config.hybrid_config(), gating=config.gating_config(),
                          model_name=config.semantic_model, home=config.home)
    warm_up_router(router, config)
    return router


def warm_up_router(router: Any, config: PipelineConfig) -> None:
    """Loads the sentence model (unless routing is keyword-only) and the keyword stage's
    language detector, so the first query pays no start-up cost."""
    if config.router_strategy != "keyword":
        with contextlib.suppress(AttributeError):  # a router passed in may have none
            router.semantic.load()
    with contextlib.suppress(Exception):
        router.keyword.analyse("warm up the language detector")


def open_rag_store(config: PipelineConfig) -> RagStore:
    """The data directory's RAG store, the bundled (or configured) knowledge imported when
    it holds no index."""
    from r3mes.rag import RagStore

    store = RagStore(config.home, embedding_model=config.rag_embedding_model)
    import_knowledge(store, config.knowledge_dir)
    return store


def build_retriever(config: PipelineConfig, store: RagStore) -> Retriever:
    """Hybrid (or dense) retrieval over ``store``, reranked when configured."""
    from r3mes.rag import Retriever

    return Retriever(store, mode=config.rag_mode, rerank=config.rerank,
                     reranker_model=config.reranker_model)


def import_knowledge(store: RagStore, knowledge_dir: str | None) -> None:
    """Copy the bundled (or ``knowledge_dir``'s) RAG snapshots into an empty data directory."""
    if store.existing():
        return
    src = Path(knowledge_dir).expanduser() if knowledge_dir else assets_dir() / "knowledge"
    for candidate in (src / "rag", src):
        if (candidate / "refs").is_dir() and (candidate / "snapshots").is_dir():
            from r3mes.utils.atomic import atomic_write_bytes

            dst = store.root
            with store.lock():
                for snap in (candidate / "snapshots").iterdir():
                    if snap.is_dir() and not (dst / "snapshots" / snap.name).exists():
                        shutil.copytree(snap, dst / "snapshots" / snap.name)
                (dst / "refs").mkdir(parents=True, exist_ok=True)
                for ref in (candidate / "refs").glob("*.json"):
                    if not (dst / "refs" / ref.name).exists():
                        atomic_write_bytes(dst / "refs" / ref.name, ref.read_bytes())
            return


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=1)
def _demo_weights_sha256() -> str | None:
    """The weights digest the bundled demo model's manifest records (None if not installed)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        manifest = json.loads((assets_dir() / "demo_model" / "r3mes_model.json").read_text())
        return str(manifest["weights_sha256"])
    return None


@functools.lru_cache(maxsize=1)
def _bundled_expert_digests() -> frozenset[str]:
    """Store digests of the bundled experts, from the assets' MANIFEST.json (no hashing):
    they tell a bundled expert installed by an older r3mes, which recorded no base model."""
    from r3mes.cache.adapter_store import ADAPTER_FILES, tree_digest

    digests: set[str] = set()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        files = json.loads((assets_dir() / "MANIFEST.json").read_text())["files"]
        expert_ids = {rel.split("/")[1] for rel in files if rel.startswith("experts/")}
        for expert in expert_ids:
            digests.add(tree_digest({name: files[f"experts/{expert}/{name}"]["sha256"]
                                     for name in ADAPTER_FILES}))
    return frozenset(digests)


def _same_path(recorded: str, path: Path) -> bool:
    with contextlib.suppress(OSError):
        return Path(recorded).resolve() == path.resolve()
    return False


def _shape_mismatch(module_shapes: Mapping[str, tuple[int, int]],
                    model: ModelShape) -> str | None:
    """Why an adapter with ``module_shapes`` (``"model.layers.3.mlp.up_proj" -> (out, in)``)
    does not fit ``model``, or ``None`` when every module matches."""
    for module, got in sorted(module_shapes.items()):
        parts = module.split(".")
        layer = next((int(p) for p in parts if p.isdigit()), None)
        suffix = ".".join(parts[-2:])
        want = model.linear_shapes.get(suffix)
        if want is None or layer is None or layer >= model.num_layers:
            return f"module {module} does not exist in this model"
        if tuple(want) != tuple(got):
            return (f"shapes differ (module {module} is {got[0]}x{got[1]}, the model's is "
                    f"{want[0]}x{want[1]})")
    return None
