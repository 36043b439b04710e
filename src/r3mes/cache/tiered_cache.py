"""``TieredDoRACache``: DoRA experts in three tiers, so a cold load never stalls a query.

Tiers (seed Decision 2), each sized in MB because adapters differ in rank and size:

1. **device**: the *prepared* form the backend consumes (on the GPU for CUDA; packed with
   precomputed row norms for CPU). Produced by the ``prepare(adapter_dir, tensors)``
   callback, which the cache treats as opaque.
2. **RAM**: host tensors as read from the safetensors file, LRU.
3. **store**: the content-addressed :class:`~r3mes.cache.adapter_store.AdapterStore` on disk.

The tiers are *exclusive*: an adapter's bytes are counted in exactly one tier. A tier-1
entry keeps a reference to its host tensors, so demoting it to tier 2 under pressure costs no
disk read (on CUDA those host tensors are extra RAM not counted in tier 2; stats report them
as ``tier1.host_bytes``).

Policies: promotion on use (a tier-2 or tier-3 hit goes to tier 1); demotion under pressure
(tier 1 LRU -> tier 2, tier 2 LRU -> dropped, still on disk); pinned adapters are loaded at
:meth:`TieredDoRACache.start` and never leave tier 1; entries held through
:meth:`TieredDoRACache.use` are not evicted while held. Concurrent requests for one adapter
share one load (single flight). Disk reads and ``prepare`` run in a thread pool so the event
loop never blocks on them. With a :class:`~r3mes.cache.vram_manager.VRAMManager`, tier 1 also
stays within the device budget and gives memory back when the model or the KV cache need it.

All tier bookkeeping happens under one ``threading.Lock`` held only for dictionary updates
(never across I/O or ``prepare``), because the VRAM manager's reclaim callback may run on
another thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from r3mes.cache.adapter_store import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterStore,
    AdapterValidationError,
    DigestMismatchError,
)
from r3mes.cache.vram_manager import MB, VRAMBudgetError, VRAMManager
from r3mes.errors import R3mesError
from r3mes.utils.safetensors_io import tensors_from_buffer

log = logging.getLogger(__name__)

#: ``prepare(adapter_dir, tensors) -> prepared``: turns host tensors into the backend's form.
PrepareFn = Callable[[Path, dict[str, Any]], Any]
#: ``prepared_size(prepared) -> bytes`` it occupies in tier 1.
SizeFn = Callable[[Any], int]
#: ``release(prepared)``: a prepared object left tier 1 (or was never recorded there).
ReleaseFn = Callable[[Any], None]


class CacheCapacityError(R3mesError, RuntimeError):
    """An adapter cannot be placed in tier 1 (too large, or everything there is pinned/held)."""


@dataclass
class LoadedAdapter:
    """The default prepared form: the adapter's tensors (on ``device`` if one was given)."""

    adapter_id: str
    digest: str
    path: Path
    tensors: dict[str, Any]
    nbytes: int


# Tier 2 holds the same record with the tensors in host memory.
_HostEntry = LoadedAdapter


@dataclass
class _DeviceEntry:
    host: _HostEntry
    prepared: Any
    nbytes: int
    leases: int = 0

    @property
    def adapter_id(self) -> str:
        return self.host.adapter_id


@dataclass
class _TierStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

    def latency_summary(self) -> dict[str, float | int | None]:
        values = sorted(self.latencies)
        if not values:
            return {"count": 0, "mean": None, "p50": None, "p95": None, "max": None}

        def pct(q: float) -> float:
            return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)] * 1e3

        return {"count": len(values), "mean": sum(values) / len(values) * 1e3,
                "p50": pct(0.50), "p95": pct(0.95), "max": values[-1] * 1e3}


def _tensor_bytes(tensors: dict[str, Any]) -> int:
    return sum(int(t.numel()) * int(t.element_size()) for t in tensors.values())


class TieredDoRACache:
    """A three-tier cache of DoRA experts in front of an :class:`AdapterStore`.

    Args:
        store: tier 3.
        tier1_capacity_mb: device tier budget (MB of prepared adapters).
        tier2_capacity_mb: RAM tier budget (MB of host tensors).
        prepare: ``prepare(adapter_dir, tensors) -> object`` run when an adapter enters tier 1.
            Default: :class:`LoadedAdapter` with the tensors moved to ``device``.
        prepared_size: bytes a prepared object occupies; default: its ``nbytes`` attribute if
            it has an integer one, else the host tensors' bytes.
        release: ``release(prepared)``, called once for every object ``prepare`` made, when
            it leaves tier 1 (demoted, invalidated, replaced, closed) or could not be placed
            there. With :class:`~r3mes.cache.residency.AdapterResidency`'s ``prepare`` and
            ``release`` the cache owns which adapters the backend holds.
        device: where the default ``prepare`` puts tensors (``None``: leave them on the host).
        pinned: adapter ids loaded into tier 1 by :meth:`start` and never evicted.
        vram: optional device budget shared with the base model and the KV cache.
        verify_on_load: re-hash the weights on every tier-3 load (catches bit rot; costs
            ~1 ms per 2 MB). Off by default: the store verifies at import and on demand,
            and a size check catches truncation on every load.
        executor: thread pool for disk reads and ``prepare``; default: a private pool.
    """

    def __init__(
        self,
        store: AdapterStore,
        *,
        tier1_capacity_mb: float,
        tier2_capacity_mb: float,
        prepare: PrepareFn | None = None,
        prepared_size: SizeFn | None = None,
        release: ReleaseFn | None = None,
        device: Any = None,
        pinned: Sequence[str] = (),
        vram: VRAMManager | None = None,
        verify_on_load: bool = False,
        executor: Executor | None = None,
        max_workers: int = 2,
    ) -> None:
        for name, value in (("tier1_capacity_mb", tier1_capacity_mb),
                            ("tier2_capacity_mb", tier2_capacity_mb)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative number of MB, got {value!r}")
        self.store = store
        self.tier1_capacity_bytes = int(tier1_capacity_mb * MB)
        self.tier2_capacity_bytes = int(tier2_capacity_mb * MB)
        self._prepare = prepare
        self._prepared_size = prepared_size
        self._release = release
        self.device = device
        self.vram = vram
        self.verify_on_load = verify_on_load
        self._own_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="r3mes-cache")
        self._initial_pins = list(dict.fromkeys(pinned))
        self._pinned: set[str] = set()
        self._t1: OrderedDict[str, _DeviceEntry] = OrderedDict()
        self._t2: OrderedDict[str, _HostEntry] = OrderedDict()
        self._t1_bytes = 0
        self._t2_bytes = 0
        self._lock = threading.RLock()
        self._inflight_t1: dict[str, asyncio.Task[_DeviceEntry]] = {}
        self._inflight_host: dict[str, asyncio.Task[_HostEntry]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._stats = {1: _TierStats(), 2: _TierStats(), 3: _TierStats()}
        self._requests = 0
        self._joins = 0
        self._prefetches = 0
        self._prefetch_errors = 0
        self._closed = False
        if vram is not None:
            vram.register_reclaimer("experts", self._reclaim)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load and pin the start-up adapters (e.g. ``turkish_dora``, ``general_dora``).

        Raises CacheCapacityError if they do not fit in tier 1 together, and the store's
        errors (e.g. AdapterNotFoundError) for a missing one.
        """
        for adapter_id in self._initial_pins:
            await self.pin(adapter_id)

    async def pin(self, adapter_id: str) -> None:
        """Load ``adapter_id`` into tier 1 and keep it there until :meth:`unpin`."""
        with self._lock:
            self._pinned.add(adapter_id)
        try:
            await self._load_t1(adapter_id, request=False)
        except BaseException:
            with self._lock:
                self._pinned.discard(adapter_id)
            raise

    def unpin(self, adapter_id: str) -> None:
        """Make ``adapter_id`` evictable again (it stays cached until pressure demotes it)."""
        with self._lock:
            self._pinned.discard(adapter_id)

    async def close(self) -> None:
        """Cancel background warming, drop all tiers (releasing VRAM), stop the pool."""
        self._closed = True
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        with self._lock:
            for adapter_id in list(self._t1):
                self._drop_t1(adapter_id)
            self._t2.clear()
            self._t2_bytes = 0
        if self.vram is not None:
            self.vram.unregister_reclaimer(self._reclaim)
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> TieredDoRACache:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ public API

    async def get_adapter(self, adapter_id: str) -> Any:
        """The prepared form of ``adapter_id``, loading it through the tiers if needed.

        A tier-1 hit returns without awaiting anything slow. Concurrent calls for the same
        adapter share one load. Raises the store's errors (AdapterNotFoundError,
        AdapterValidationError) and CacheCapacityError.
        """
        if self._closed:
            raise RuntimeError("the cache is closed")
        start = time.perf_counter()
        with self._lock:
            self._requests += 1
            entry = self._t1.get(adapter_id)
            if entry is not None:
                self._t1.move_to_end(adapter_id)
                stats = self._stats[1]
                stats.hits += 1
                stats.latencies.append(time.perf_counter() - start)
                return entry.prepared
            self._stats[1].misses += 1
        entry = await self._load_t1(adapter_id, request=True)
        return entry.prepared

    @contextlib.asynccontextmanager
    async def use(self, adapter_id: str) -> AsyncIterator[Any]:
        """``async with cache.use(id) as prepared``: the entry cannot be evicted inside."""
        while True:
            prepared = await self.get_adapter(adapter_id)
            with self._lock:
                entry = self._t1.get(adapter_id)
                # It may have been demoted between the load finishing and us running again.
                if entry is not None and entry.prepared is prepared:
                    entry.leases += 1
                    break
        try:
            yield prepared
        finally:
            with self._lock:
                entry.leases -= 1

    def predictive_load(self, adapter_ids: Iterable[str], *, tier: int = 1) -> asyncio.Task[None]:
        """Warm ``adapter_ids`` into ``tier`` (1 or 2) in the background and return at once.

        Must be called from a running event loop. The returned task may be awaited or
        ignored; failures (e.g. an unknown id) are logged and counted in
        ``stats()["prefetch_errors"]``, never raised into the caller.
        """
        if tier not in (1, 2):
            raise ValueError(f"tier must be 1 or 2, got {tier!r}")
        ids = list(dict.fromkeys(adapter_ids))
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._warm(ids, tier))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def tier_of(self, adapter_id: str) -> int | None:
        """1 or 2 if cached in that tier, 3 if only in the store, ``None`` if unknown."""
        with self._lock:
            if adapter_id in self._t1:
                return 1
            if adapter_id in self._t2:
                return 2
        return 3 if adapter_id in self.store else None

    def invalidate(self, adapter_id: str) -> None:
        """Forget ``adapter_id`` in tiers 1 and 2 (e.g. after it was replaced in the store)."""
        with self._lock:
            if adapter_id in self._t1:
                self._drop_t1(adapter_id)
            host = self._t2.pop(adapter_id, None)
            if host is not None:
                self._t2_bytes -= host.nbytes

    def tier1_ids(self) -> list[str]:
        """Tier-1 ids, least recently used first."""
        with self._lock:
            return list(self._t1)

    def tier2_ids(self) -> list[str]:
        """Tier-2 ids, least recently used first."""
        with self._lock:
            return list(self._t2)

    def stats(self) -> dict[str, Any]:
        """Per-tier counters, bytes, utilisation and latencies (JSON-ready).

        ``latency_ms`` of tier 1 is the hit path; of tier 2 a promotion (``prepare``); of
        tier 3 a disk read plus ``prepare`` (background loads included). Hits and misses
        count requests only; a request that joined an in-flight load is a tier-1 miss and an
        ``inflight_join``.
        """
        with self._lock:
            t1_cap = self.tier1_capacity_bytes
            out: dict[str, Any] = {
                "requests": self._requests,
                "inflight_joins": self._joins,
                "prefetches": self._prefetches,
                "prefetch_errors": self._prefetch_errors,
                "pinned": sorted(self._pinned),
            }
            for tier, used, cap, entries in (
                (1, self._t1_bytes, t1_cap, len(self._t1)),
                (2, self._t2_bytes, self.tier2_capacity_bytes, len(self._t2)),
            ):
                s = self._stats[tier]
                out[f"tier{tier}"] = {
                    "hits": s.hits, "misses": s.misses, "loads": s.loads,
                    "evictions": s.evictions, "entries": entries, "bytes": used,
                    "capacity_bytes": cap,
                    "utilisation": (used / cap) if cap else 0.0,
                    "hit_rate": (s.hits / (s.hits + s.misses)) if s.hits + s.misses else None,
                    "latency_ms": s.latency_summary(),
                }
            out["tier1"]["host_bytes"] = sum(e.host.nbytes for e in self._t1.values())
        s3 = self._stats[3]
        store_used = self.store.total_bytes()
        store_cap = self.store.max_size_bytes
        out["tier3"] = {
            "hits": s3.hits, "misses": s3.misses, "loads": s3.loads, "evictions": s3.evictions,
            "bytes": store_used, "capacity_bytes": store_cap,
            "utilisation": (store_used / store_cap) if store_cap else None,
            "hit_rate": (s3.hits / (s3.hits + s3.misses)) if s3.hits + s3.misses else None,
            "bytes_read": s3.bytes_loaded,
            "read_mb_per_s": (s3.bytes_loaded / MB / s3.load_seconds) if s3.load_seconds else None,
            "latency_ms": s3.latency_summary(),
        }
        if self.vram is not None:
            out["vram"] = self.vram.snapshot()
        return out

    # ------------------------------------------------------------------ loading

    async def _warm(self, ids: list[str], tier: int) -> None:
        async def one(adapter_id: str) -> None:
            try:
                with self._lock:
                    if adapter_id in self._t1 or (tier == 2 and adapter_id in self._t2):
                        return
                    self._prefetches += 1
                if tier == 1:
                    await self._load_t1(adapter_id, request=False)
                else:
                    host, from_tier = await self._ensure_host(adapter_id, request=False)
                    if from_tier == 3:
                        with self._lock:
                            if adapter_id not in self._t1:
                                self._insert_t2(host)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a prefetch is a hint: never fail the caller for it
                with self._lock:
                    self._prefetch_errors += 1
                log.warning("predictive load of %r failed: %s", adapter_id, exc)

        await asyncio.gather(*(one(i) for i in ids))

    async def _load_t1(self, adapter_id: str, *, request: bool) -> _DeviceEntry:
        with self._lock:
            entry = self._t1.get(adapter_id)
        if entry is not None:
            return entry
        task = self._inflight_t1.get(adapter_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._do_load_t1(adapter_id, request))
            self._inflight_t1[adapter_id] = task
            task.add_done_callback(lambda t: self._forget(self._inflight_t1, adapter_id, t))
        elif request:
            with self._lock:
                self._joins += 1
        # shield: a cancelled caller must not cancel a load other callers are waiting for.
        return await asyncio.shield(task)

    async def _do_load_t1(self, adapter_id: str, request: bool) -> _DeviceEntry:
        start = time.perf_counter()
        host, from_tier = await self._ensure_host(adapter_id, request=request)
        with self._lock:
            existing = self._t1.get(adapter_id)
            if existing is not None and existing.host.digest == host.digest:
                return existing
        loop = asyncio.get_running_loop()
        prepared: Any = None
        try:
            with self._lock:
                # Make room for roughly this much before prepare allocates on the device.
                self._make_room_t1(adapter_id, host.nbytes)
            prepared = await loop.run_in_executor(self._executor, self._run_prepare, host)
            size = self._size_of(prepared, host)
            entry = _DeviceEntry(host=host, prepared=prepared, nbytes=size)
            with self._lock:
                self._insert_t1(entry)
        except BaseException:
            if prepared is not None and self._release is not None:
                self._release(prepared)  # made but never recorded in tier 1
            if from_tier == 3:  # keep what we read: the next attempt is then a tier-2 hit
                with self._lock:
                    if adapter_id not in self._t2 and adapter_id not in self._t1:
                        self._insert_t2(host)
            raise
        elapsed = time.perf_counter() - start
        with self._lock:
            stats = self._stats[from_tier]
            stats.latencies.append(elapsed)
            if from_tier == 2:
                stats.loads += 1
            self._stats[1].loads += 1
        return entry

    async def _ensure_host(self, adapter_id: str, *, request: bool) -> tuple[_HostEntry, int]:
        with self._lock:
            host = self._t2.get(adapter_id)
            if host is not None:
                if request:
                    self._stats[2].hits += 1
                return host, 2
            if request:
                self._stats[2].misses += 1
        task = self._inflight_host.get(adapter_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._read_host(adapter_id, request))
            self._inflight_host[adapter_id] = task
            task.add_done_callback(lambda t: self._forget(self._inflight_host, adapter_id, t))
        return await asyncio.shield(task), 3

    async def _read_host(self, adapter_id: str, request: bool) -> _HostEntry:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            host = await loop.run_in_executor(self._executor, self._read_host_sync, adapter_id)
        except Exception:
            if request:
                with self._lock:
                    self._stats[3].misses += 1
            raise
        elapsed = time.perf_counter() - start
        with self._lock:
            s3 = self._stats[3]
            if request:
                s3.hits += 1
            s3.loads += 1
            s3.bytes_loaded += host.nbytes
            s3.load_seconds += elapsed
        return host

    def _read_host_sync(self, adapter_id: str) -> _HostEntry:
        """Read an adapter's tensors from the store (runs in the thread pool)."""
        import hashlib

        record = self.store.ensure(adapter_id)
        path = self.store.objects / record.digest
        weights = path / WEIGHTS_NAME
        try:
            config_size = (path / CONFIG_NAME).stat().st_size
            with open(weights, "rb", buffering=0) as handle:
                size = os.fstat(handle.fileno()).st_size
                if size + config_size != record.size_bytes:
                    raise AdapterValidationError(
                        f"{weights}: {size + config_size} bytes on disk, the manifest recorded "
                        f"{record.size_bytes} (truncated?); run `r3mes adapters verify`")
                # One read into one buffer; the tensors are views of it (no second copy).
                buffer = torch.empty(size, dtype=torch.uint8)
                view = memoryview(buffer.numpy())
                got = 0
                while got < size:
                    n = handle.readinto(view[got:])
                    if not n:
                        raise AdapterValidationError(f"{weights}: ended after {got} bytes")
                    got += n
        except FileNotFoundError as exc:
            raise AdapterValidationError(
                f"{exc.filename}: missing from the store; run `r3mes adapters verify`") from exc
        if self.verify_on_load:
            digest = hashlib.sha256(view).hexdigest()
            if digest != record.files.get(WEIGHTS_NAME):
                raise DigestMismatchError(
                    f"{weights}: sha256 {digest} does not match the manifest's "
                    f"{record.files.get(WEIGHTS_NAME)}")
        # The file passed header validation when it entered the store and its size matches
        # the manifest; the header is validated again so a damaged file is an
        # AdapterValidationError naming it, never a crash.
        tensors = tensors_from_buffer(buffer, weights, AdapterValidationError)
        self.store.touch(adapter_id)
        return _HostEntry(adapter_id, record.digest, path, tensors, _tensor_bytes(tensors))

    def _run_prepare(self, host: _HostEntry) -> Any:
        if self._prepare is not None:
            return self._prepare(host.path, host.tensors)
        tensors = host.tensors
        if self.device is not None:
            tensors = {k: v.to(self.device) for k, v in tensors.items()}
        return replace(host, tensors=tensors)

    def _size_of(self, prepared: Any, host: _HostEntry) -> int:
        if self._prepared_size is not None:
            size = self._prepared_size(prepared)
        else:
            size = getattr(prepared, "nbytes", None)
            if not isinstance(size, int) or isinstance(size, bool):
                size = host.nbytes
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"prepared_size returned {size!r} for {host.adapter_id!r}; "
                             "expected a non-negative int")
        return size

    @staticmethod
    def _forget(table: dict[str, asyncio.Task[Any]], key: str, task: asyncio.Task[Any]) -> None:
        if table.get(key) is task:
            del table[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: the awaiting callers received it

    # ------------------------------------------------------------------ tier bookkeeping
    # Everything below is called with self._lock held.

    def _t1_room(self) -> int:
        room = self.tier1_capacity_bytes - self._t1_bytes
        if self.vram is not None:
            room = min(room, self.vram.free_bytes())
        return room

    def _evictable_t1(self, keep: str) -> str | None:
        for adapter_id, entry in self._t1.items():  # LRU first
            if adapter_id != keep and adapter_id not in self._pinned and entry.leases == 0:
                return adapter_id
        return None

    def _make_room_t1(self, adapter_id: str, nbytes: int) -> None:
        if nbytes > self.tier1_capacity_bytes:
            raise CacheCapacityError(
                f"adapter {adapter_id!r} needs {nbytes / MB:.1f} MB, more than the whole tier-1 "
                f"capacity of {self.tier1_capacity_bytes / MB:.1f} MB")
        while self._t1_room() < nbytes:
            victim = self._evictable_t1(keep=adapter_id)
            if victim is None:
                pinned = sorted(self._pinned & self._t1.keys())
                raise CacheCapacityError(
                    f"no room in tier 1 for {adapter_id!r} ({nbytes / MB:.1f} MB): "
                    f"{self._t1_bytes / MB:.1f} of {self.tier1_capacity_bytes / MB:.1f} MB used"
                    f"{', device budget exhausted' if self.vram is not None else ''}, and "
                    f"nothing is evictable (pinned: {', '.join(pinned) or 'none'}; the rest is "
                    "held by use())")
            self._demote_t1(victim)

    def _insert_t1(self, entry: _DeviceEntry) -> None:
        adapter_id = entry.adapter_id
        if adapter_id in self._t1:
            self._drop_t1(adapter_id)
        self._make_room_t1(adapter_id, entry.nbytes)
        if self.vram is not None:
            try:
                self.vram.reserve(_vram_name(adapter_id), entry.nbytes, "experts")
            except VRAMBudgetError as exc:
                raise CacheCapacityError(f"tier 1 cannot take {adapter_id!r}: {exc}") from exc
        self._t1[adapter_id] = entry
        self._t1_bytes += entry.nbytes
        host = self._t2.pop(adapter_id, None)  # exclusive tiers
        if host is not None:
            self._t2_bytes -= host.nbytes

    def _drop_t1(self, adapter_id: str) -> _DeviceEntry:
        entry = self._t1.pop(adapter_id)
        self._t1_bytes -= entry.nbytes
        if self.vram is not None:
            with contextlib.suppress(KeyError):
                self.vram.release(_vram_name(adapter_id))
        if self._release is not None:
            self._release(entry.prepared)
        return entry

    def _demote_t1(self, adapter_id: str) -> None:
        entry = self._drop_t1(adapter_id)
        self._stats[1].evictions += 1
        self._insert_t2(entry.host)

    def _insert_t2(self, host: _HostEntry) -> None:
        if host.adapter_id in self._t2:
            self._t2.move_to_end(host.adapter_id)
            return
        if host.nbytes > self.tier2_capacity_bytes:
            return  # too big for RAM tier: it stays on disk only
        while self._t2_bytes + host.nbytes > self.tier2_capacity_bytes:
            _victim, dropped = self._t2.popitem(last=False)
            self._t2_bytes -= dropped.nbytes
            self._stats[2].evictions += 1
        self._t2[host.adapter_id] = host
        self._t2_bytes += host.nbytes

    def _reclaim(self, nbytes: int) -> int:
        """VRAM-manager callback: demote tier-1 LRU entries until ``nbytes`` are freed."""
        freed = 0
        with self._lock:
            while freed < nbytes:
                victim = self._evictable_t1(keep="")
                if victim is None:
                    break
                freed += self._t1[victim].nbytes
                self._demote_t1(victim)
        return freed


def _vram_name(adapter_id: str) -> str:
    return f"expert:{adapter_id}"
