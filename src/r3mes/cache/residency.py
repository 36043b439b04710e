"""Which DoRA adapters live inside the backend: the tiered cache's tier-1 slots.

The cache (:class:`~r3mes.cache.tiered_cache.TieredDoRACache`) decides which adapters are
in tier 1; :class:`AdapterResidency` is its ``prepare``/``release`` pair for a backend, in
the way vLLM's LoRA adapter manager owns its slots:

- ``prepare(adapter_dir, tensors)`` (cache thread, an adapter entering tier 1) loads the
  adapter into the backend under a name taken from its content digest (two ids with the
  same content share one copy) and counts a reference to it;
- ``release(slot)`` (the entry left tier 1) drops the reference; nothing is unloaded yet,
  because a generation may be running with it;
- ``sync(needed)`` (the engine thread, before a job joins the batch) unloads every adapter
  no tier-1 entry refers to and no running row needs, and loads any ``needed`` one that is
  not loaded.

The reference is counted *before* the backend load in ``prepare``, so an adapter that was
prepared but not yet recorded in tier 1 is never unloaded by a ``sync`` running in between
(the reload race of the first pipeline, which repaired it after the fact).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class AdapterHost(Protocol):
    """What residency needs of a backend (:class:`~r3mes.core.backends.InferenceBackend`)."""

    adapters: Mapping[str, Any]

    def load_dora_adapter(self, adapter_id: str, path: str) -> None: ...

    def unload_dora_adapter(self, adapter_id: str) -> None: ...


@dataclass(frozen=True)
class AdapterSlot:
    """The cache's tier-1 object for a backend: the adapter's name inside the backend and
    the bytes of its host tensors."""

    name: str
    nbytes: int


def slot_name(digest: str) -> str:
    """The backend name of the adapter with store digest ``digest``."""
    return f"dora-{digest[:24]}"


class AdapterResidency:
    """The adapters of one backend, loaded and unloaded as the tiered cache says (see the
    module notes). Thread-safe: ``prepare``/``release`` run in the cache's threads,
    ``sync`` in the engine's."""

    def __init__(self, backend: AdapterHost) -> None:
        self.backend = backend
        self._refs: Counter[str] = Counter()
        self._paths: dict[str, Path] = {}
        self._lock = threading.RLock()

    def prepare(self, path: Path, tensors: Mapping[str, Any]) -> AdapterSlot:
        """Loads the adapter directory ``path`` (a store object, named by its digest) into
        the backend unless it is there; one more reference to it."""
        name = slot_name(Path(path).name)
        nbytes = sum(int(t.numel()) * int(t.element_size()) for t in tensors.values())
        with self._lock:
            self._paths[name] = Path(path)
            self._refs[name] += 1
            try:
                if name not in self.backend.adapters:
                    self.backend.load_dora_adapter(name, str(path))
            except BaseException:
                self._drop_ref(name)
                raise
        return AdapterSlot(name, nbytes)

    def release(self, slot: AdapterSlot) -> None:
        """One reference fewer to ``slot``; the backend copy goes at a later :meth:`sync`
        once nothing refers to it."""
        with self._lock:
            self._drop_ref(slot.name)

    def sync(self, needed: Iterable[str]) -> None:
        """Unloads the adapters nothing refers to and ``needed`` does not name; loads the
        ``needed`` ones that are not loaded (a job never runs without its adapters).
        Raises KeyError for a needed name this residency never prepared."""
        needed = set(needed)
        with self._lock:
            for name in [n for n in self._paths if n in self.backend.adapters]:
                if self._refs[name] == 0 and name not in needed:
                    self.backend.unload_dora_adapter(name)
            for name in sorted(needed - set(self.backend.adapters)):
                if name not in self._paths:
                    raise KeyError(f"adapter {name!r} was never prepared for this backend")
                self.backend.load_dora_adapter(name, str(self._paths[name]))

    def referenced(self) -> dict[str, int]:
        """Backend name -> tier-1 references (names with none left out)."""
        with self._lock:
            return {name: n for name, n in self._refs.items() if n > 0}

    def _drop_ref(self, name: str) -> None:
        self._refs[name] -= 1
        if self._refs[name] <= 0:
            del self._refs[name]
