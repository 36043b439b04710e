"""``InferenceBackend``: the one interface the serving layer uses to run a BitNet model.

A backend loads a base model (:meth:`load_base_model`), DoRA experts
(:meth:`load_dora_adapter`), and runs ``inference`` (logits) and ``generate``/``stream``
with any mix of the loaded experts. Subclasses decide only *how* the forward pass runs
(:meth:`_forward`) and what they report (:meth:`get_capabilities`).
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from r3mes.core.checkpoint import LoadInfo, ModelShape, load_model
from r3mes.core.dora import dora_modules, set_adapter_mix
from r3mes.core.generation import GenerationConfig, GenerationResult, TokenEvent
from r3mes.core.generation import generate as _generate
from r3mes.core.generation import stream as _stream
from r3mes.core.kv_blocks import KVBlockPool
from r3mes.core.model import BitNetForCausalLM, KVCache
from r3mes.core.tokenizer import Tokenizer

__all__ = ["InferenceBackend", "Prompt"]

#: A prompt: token ids, a string, or chat messages ([{"role": ..., "content": ...}]).
Prompt = Sequence[int] | str | Sequence[dict[str, str]]
#: An expert mix: ``[(adapter_id, weight)]`` (empty: the base model alone).
Mix = Sequence[tuple[str, float]]


class InferenceBackend(ABC):
    """Base model + DoRA experts + generation. Not thread-safe for concurrent calls on
    the same instance (calls are serialised by an internal lock)."""

    name = "abstract"
    #: How loaded adapters are stored for the kernels ("fp16": compact, "fp32": exact).
    adapter_storage = "fp32"

    def __init__(self) -> None:
        self.model: BitNetForCausalLM | None = None
        self.tokenizer: Tokenizer | None = None
        self.load_info: LoadInfo | None = None
        self.adapters: dict[str, Path] = {}
        self._lock = threading.RLock()
        self._rows_key: tuple[Any, ...] | None = None  # the mix rows set last (_use_rows)

    # ---- loading ---------------------------------------------------------------------
    def load_base_model(self, path: str | os.PathLike[str], *, head: str = "int8",
                        verify: bool = False) -> LoadInfo:
        """Load a model directory (HF or r3mes packed) and its tokenizer if present."""
        model, info = load_model(path, head=head, verify=verify)
        tok = Tokenizer(path) if (Path(path) / "tokenizer.json").is_file() else None
        for module in dora_modules(model).values():
            module.storage = self.adapter_storage
        with self._lock:
            self.model, self.tokenizer, self.load_info = model, tok, info
            self.adapters = {}
        return info

    def _require_model(self) -> BitNetForCausalLM:
        if self.model is None:
            raise RuntimeError(f"{self.name}: no base model loaded (call load_base_model)")
        return self.model

    def load_dora_adapter(self, adapter_id: str, path: str | os.PathLike[str]) -> None:
        """Load a PEFT DoRA adapter directory as expert ``adapter_id`` (all or nothing)."""
        from r3mes.core.adapter_io import load_peft_adapter

        model = self._require_model()
        with self._lock:
            if adapter_id in self.adapters:
                raise ValueError(f"adapter {adapter_id!r} is already loaded")
            load_peft_adapter(model, path, adapter_id)
            self.adapters[adapter_id] = Path(path)
            self._rows_key = None

    def unload_dora_adapter(self, adapter_id: str) -> None:
        """Remove expert ``adapter_id`` from the model; KeyError when it is not loaded."""
        with self._lock:
            if adapter_id not in self.adapters:
                raise KeyError(f"adapter {adapter_id!r} is not loaded")
            for module in dora_modules(self._require_model()).values():
                if adapter_id in module.adapter_names:
                    module.remove_adapter(adapter_id)
            del self.adapters[adapter_id]
            self._rows_key = None

    # ---- what the serving layer reads of the loaded model -----------------------------
    def max_context(self) -> int | None:
        """The model's context length (``max_position_embeddings``), ``None`` if unset."""
        value = self._require_model().config.max_position_embeddings
        return int(value) if isinstance(value, int) and value > 0 else None

    def model_shape(self) -> ModelShape:
        """The loaded model's :class:`~r3mes.core.checkpoint.ModelShape` (what an adapter
        must match to fit it; no weights digest)."""
        from r3mes.core.checkpoint import _linear_shapes

        config = self._require_model().config
        return ModelShape(_linear_shapes(config), config.num_hidden_layers, None)

    # ---- the mix -----------------------------------------------------------------------
    def _set_mix(self, adapter_ids: Sequence[str], adapter_weights: Sequence[float]) -> None:
        ids = list(adapter_ids)
        weights = list(adapter_weights) if adapter_weights else [1.0] * len(ids)
        if len(weights) != len(ids):
            raise ValueError(f"adapter_weights: {len(weights)} weights for {len(ids)} adapters")
        for a in ids:
            if a not in self.adapters:
                raise KeyError(f"adapter {a!r} is not loaded (loaded: {sorted(self.adapters)})")
        model = self._require_model()
        set_adapter_mix(model, list(zip(ids, weights, strict=True)) if ids else None)
        self._rows_key = None

    def _set_mixes(self, adapter_mixes: Sequence[Sequence[tuple[str, float]]]) -> None:
        """One expert mix per batch row (a heterogeneous batch); an empty row is the base."""
        rows = []
        for row in adapter_mixes:
            for a, _ in row:
                if a not in self.adapters:
                    raise KeyError(f"adapter {a!r} is not loaded (loaded: {sorted(self.adapters)})")
            rows.append([(a, float(w)) for a, w in row])
        set_adapter_mix(self._require_model(), rows)
        self._rows_key = None

    def _apply_mix(self, n_rows: int, adapter_ids: Sequence[str],
                   adapter_weights: Sequence[float],
                   adapter_mixes: Sequence[Sequence[tuple[str, float]]] | None) -> None:
        if adapter_mixes is None:
            self._set_mix(adapter_ids, adapter_weights)
            return
        if adapter_ids:
            raise ValueError("pass either adapter_ids/adapter_weights or adapter_mixes, not both")
        if len(adapter_mixes) != n_rows:
            raise ValueError(f"adapter_mixes: {len(adapter_mixes)} mixes for {n_rows} prompts")
        self._set_mixes(adapter_mixes)

    # ---- continuous batching (serving.engine) ----------------------------------------
    @contextmanager
    def _kernel_context(self) -> Iterator[None]:
        """Where this backend's forward passes run (e.g. the reference kernels)."""
        yield

    def new_kv_pool(self, *, tokens: int | None = None, megabytes: float | None = None,
                    block_size: int = 16, max_tokens: int | None = None,
                    dtype: torch.dtype = torch.float32) -> KVBlockPool:
        """A KV block pool for the loaded model, sized by ``tokens`` or ``megabytes``
        (``dtype``: float32, or float16 for the opt-in half cache)."""
        return KVBlockPool.from_budget(self._require_model().config, tokens=tokens,
                                       megabytes=megabytes, block_size=block_size,
                                       max_tokens=max_tokens, dtype=dtype)

    def _use_rows(self, mixes: Sequence[Mix]) -> None:
        """Sets one expert mix per row, skipping the work when it is the one already set."""
        key = tuple(tuple(sorted((a, float(w)) for a, w in row)) for row in mixes)
        if key == self._rows_key:
            return
        if len(key) == 1:
            self._set_mix([a for a, _ in key[0]], [w for _, w in key[0]])
        else:
            self._set_mixes(key)
        self._rows_key = key

    def prefill_paged(self, prompt_ids: Sequence[int], mix: Mix, pool: KVBlockPool,
                      blocks: list[int]) -> torch.Tensor:
        """Runs one sequence's prompt with its expert mix into ``blocks`` of ``pool``;
        returns the logits [V] of its last position."""
        model = self._require_model()
        with self._lock, self._kernel_context():
            self._use_rows([mix])
            return model.prefill_paged(prompt_ids, pool, blocks)

    def prefill_paged_many(self, prompts: Sequence[Sequence[int]], mixes: Sequence[Mix],
                           pool: KVBlockPool, blocks: Sequence[list[int]]) -> torch.Tensor:
        """:meth:`prefill_paged` for several sequences in one pass (see
        :meth:`BitNetForCausalLM.prefill_paged_many`: the same results as one at a time,
        the weights read once); logits [n, V]."""
        model = self._require_model()
        if not len(prompts) == len(mixes) == len(blocks):
            raise ValueError(f"{len(prompts)} prompts, {len(mixes)} expert mixes and "
                             f"{len(blocks)} block lists")
        with self._lock, self._kernel_context():
            self._use_rows([mix for prompt, mix in zip(prompts, mixes, strict=True)
                            for _ in prompt])
            return model.prefill_paged_many(prompts, pool, blocks)

    def decode_paged(self, tokens: torch.Tensor, mixes: Sequence[Mix], pool: KVBlockPool,
                     table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token for each of B sequences, row b with expert mix ``mixes[b]`` (see
        :meth:`BitNetForCausalLM.decode_paged`); logits [B, V]."""
        model = self._require_model()
        if len(mixes) != tokens.shape[0]:
            raise ValueError(f"{len(mixes)} expert mixes for {tokens.shape[0]} rows")
        with self._lock, self._kernel_context():
            self._use_rows(mixes)
            return model.decode_paged(tokens, pool, table, positions)

    # ---- running -----------------------------------------------------------------------
    @abstractmethod
    def _forward(self, input_ids: torch.Tensor, cache: KVCache, last_only: bool) -> torch.Tensor:
        """The forward pass on this backend's kernels."""

    def inference(self, input_ids: torch.Tensor | Sequence[Sequence[int]],
                  adapter_ids: Sequence[str] = (),
                  adapter_weights: Sequence[float] = ()) -> torch.Tensor:
        """Logits float32 [B, T, V] for token ids [B, T] with the given expert mix."""
        model = self._require_model()
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        with self._lock:
            self._set_mix(adapter_ids, adapter_weights)
            try:
                return self._forward(ids, model.new_cache(ids.shape[0], ids.shape[1]), False)
            finally:
                self._set_mix((), ())

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt; chat messages go through the tokenizer's chat template."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], dict)):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (tokenizer.json in the model "
                                 "directory)")
            if isinstance(prompt, str):
                return self.tokenizer.encode(prompt)
            text = self.tokenizer.apply_chat_template(list(prompt))
            return self.tokenizer.encode(text, add_special_tokens=False)
        return [int(t) for t in prompt]

    def stream(self, prompts: Sequence[Prompt], config: GenerationConfig | None = None,
               adapter_ids: Sequence[str] = (),
               adapter_weights: Sequence[float] = (),
               adapter_mixes: Sequence[Sequence[tuple[str, float]]] | None = None,
               ) -> Generator[TokenEvent, None, None]:
        """Generate for a batch of prompts, yielding :class:`TokenEvent` s as they come
        (``close()`` the generator to stop early: the expert mix is reset).

        ``adapter_mixes`` gives each prompt its own ``[(adapter_id, weight)]`` (a
        heterogeneous batch: one forward pass, a different expert mix per row).
        """
        model = self._require_model()
        ids = [self.encode_prompt(p) for p in prompts]
        with self._lock:
            self._apply_mix(len(ids), adapter_ids, adapter_weights, adapter_mixes)
            try:
                yield from _stream(model, ids, config, self.tokenizer, self._forward)
            finally:
                self._set_mix((), ())

    def generate(self, prompts: Sequence[Prompt], config: GenerationConfig | None = None,
                 adapter_ids: Sequence[str] = (),
                 adapter_weights: Sequence[float] = (),
                 adapter_mixes: Sequence[Sequence[tuple[str, float]]] | None = None,
                 ) -> list[GenerationResult]:
        """Generate to completion; one :class:`GenerationResult` per prompt (see
        :meth:`stream` for ``adapter_mixes``)."""
        model = self._require_model()
        ids = [self.encode_prompt(p) for p in prompts]
        with self._lock:
            self._apply_mix(len(ids), adapter_ids, adapter_weights, adapter_mixes)
            try:
                return _generate(model, ids, config, self.tokenizer, self._forward)
            finally:
                self._set_mix((), ())

    # ---- reporting ---------------------------------------------------------------------
    @abstractmethod
    def get_capabilities(self) -> dict[str, Any]:
        """device, memory, kernels, precision, features."""

    def supports_feature(self, name: str) -> bool:
        return name in self.get_capabilities().get("features", ())

    def _model_capabilities(self) -> dict[str, Any]:
        if self.model is None:
            return {"model_loaded": False}
        sizes = self.model.num_parameters_bytes()
        return {"model_loaded": True, "model_bytes": sizes,
                "head": self.model.lm_head.kind, "adapters": sorted(self.adapters),
                "load": None if self.load_info is None else vars(self.load_info)}
