"""The device-memory budget shared by the base model, the KV cache and the DoRA experts.

Consumers *reserve* bytes under a name and a kind before they allocate, and *release* them
when they free. The manager answers "how much room is there?" for the expert cache
(tier-1 capacity) and for the router's VRAM-adaptive gating (how many experts may be mixed).

On CUDA the room is also bounded by what the driver reports free
(``torch.cuda.mem_get_info``) less a safety headroom, so memory taken by anything that did not
reserve (another process, allocator fragmentation) is respected. On CPU the budget is the
configured number.

When a reservation of another kind (base model, KV cache) does not fit, registered
*reclaimers* of kind ``experts`` are asked to free memory first (the tiered cache demotes
tier-1 experts to RAM), so experts yield to the model and the KV cache, never the reverse.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from r3mes.errors import R3mesError

MB = 1024 * 1024
KINDS = ("base_model", "kv_cache", "experts", "other")

#: ``reclaim(bytes_needed) -> bytes_freed``; must release its reservations before returning.
Reclaimer = Callable[[int], int]


class VRAMBudgetError(R3mesError, RuntimeError):
    """A reservation does not fit in the device budget (the message shows who holds what)."""


@dataclass(frozen=True)
class Reservation:
    """Bytes held under ``name``."""

    name: str
    kind: str
    nbytes: int


class VRAMManager:
    """Tracks reservations against a device budget.

    Args:
        budget_mb: the budget. ``None`` on CUDA means the device's total memory; on CPU it
            is required.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (a ``torch.device`` also works).
        headroom_mb: kept free on CUDA for the allocator and kernels' workspaces.
    """

    def __init__(self, budget_mb: float | None = None, *, device: Any = "cpu",
                 headroom_mb: float = 256.0) -> None:
        self.device = str(device)
        self.is_cuda = self.device.startswith("cuda")
        self.headroom_bytes = int(headroom_mb * MB)
        if self.is_cuda:
            import torch

            if not torch.cuda.is_available():
                raise VRAMBudgetError(f"device {self.device!r} requested but CUDA is not available")
            self._cuda_index = torch.device(self.device).index or 0
            total = torch.cuda.get_device_properties(self._cuda_index).total_memory
            budget = total if budget_mb is None else min(int(budget_mb * MB), total)
        else:
            if budget_mb is None:
                raise ValueError("budget_mb is required for a CPU device")
            budget = int(budget_mb * MB)
        if budget <= 0:
            raise ValueError(f"budget_mb must be positive, got {budget_mb!r}")
        self.budget_bytes = budget
        self._reservations: dict[str, Reservation] = {}
        self._reclaimers: list[tuple[str, Reclaimer]] = []
        self._lock = threading.RLock()

    @classmethod
    def auto(cls, budget_mb: float | None = None, headroom_mb: float = 256.0) -> VRAMManager:
        """A manager for CUDA device 0 when present, else for the CPU with ``budget_mb``
        (default 4096 MB)."""
        import torch

        if torch.cuda.is_available():
            return cls(budget_mb, device="cuda", headroom_mb=headroom_mb)
        return cls(4096.0 if budget_mb is None else budget_mb, device="cpu",
                   headroom_mb=headroom_mb)

    # ------------------------------------------------------------------ queries

    def reserved_bytes(self, kind: str | None = None) -> int:
        """Bytes reserved in total, or by one kind."""
        with self._lock:
            return sum(r.nbytes for r in self._reservations.values()
                       if kind is None or r.kind == kind)

    def device_free_bytes(self) -> int | None:
        """What the CUDA driver reports free less the headroom; ``None`` on CPU."""
        if not self.is_cuda:
            return None
        import torch

        free, _total = torch.cuda.mem_get_info(self._cuda_index)
        return max(0, free - self.headroom_bytes)

    def free_bytes(self) -> int:
        """Bytes that a new reservation of any kind may take now."""
        with self._lock:
            room = self.budget_bytes - self.reserved_bytes()
        device_free = self.device_free_bytes()
        if device_free is not None:
            room = min(room, device_free)
        return max(0, room)

    def available_for_experts_mb(self) -> float:
        """MB the expert cache may still add to its device tier right now."""
        return self.free_bytes() / MB

    def expert_room_mb(self) -> float:
        """MB experts may occupy in total (what they hold now plus what is free)."""
        return (self.reserved_bytes("experts") + self.free_bytes()) / MB

    def max_experts(self, expert_mb: float) -> int:
        """How many experts of ``expert_mb`` each fit in :meth:`expert_room_mb` (for gating)."""
        if expert_mb <= 0:
            raise ValueError(f"expert_mb must be positive, got {expert_mb!r}")
        return int(self.expert_room_mb() // expert_mb)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready view: budget, per-kind reserved, free, device free."""
        with self._lock:
            by_kind = {kind: self.reserved_bytes(kind) for kind in KINDS}
            reservations = [{"name": r.name, "kind": r.kind, "bytes": r.nbytes}
                            for r in self._reservations.values()]
        return {
            "device": self.device,
            "budget_bytes": self.budget_bytes,
            "reserved_bytes": by_kind,
            "free_bytes": self.free_bytes(),
            "device_free_bytes": self.device_free_bytes(),
            "reservations": reservations,
        }

    # ------------------------------------------------------------------ mutations

    def register_reclaimer(self, kind: str, reclaim: Reclaimer) -> None:
        """Register ``reclaim(bytes_needed) -> bytes_freed`` for memory of ``kind``."""
        _check_kind(kind)
        with self._lock:
            self._reclaimers.append((kind, reclaim))

    def unregister_reclaimer(self, reclaim: Reclaimer) -> None:
        with self._lock:
            self._reclaimers = [(k, r) for k, r in self._reclaimers if r is not reclaim]

    def reserve(self, name: str, nbytes: int, kind: str = "other", *,
                reclaim: bool = True) -> Reservation:
        """Reserve ``nbytes`` under ``name`` (unique). If it does not fit and ``kind`` is not
        ``experts``, expert reclaimers are asked to make room first.

        Raises:
            VRAMBudgetError: it still does not fit; nothing was reserved.
            ValueError: ``name`` is already reserved, or ``nbytes`` is negative.
        """
        _check_kind(kind)
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"cannot reserve a negative size ({nbytes}) for {name!r}")
        reservation = self._reserve_if_fits(name, kind, nbytes)
        if reservation is not None:
            return reservation
        if reclaim and kind != "experts":
            # Reclaimers run without our lock held: they take their own lock and then call
            # release() here, and the cache takes its lock before calling reserve(); holding
            # ours across the call would invert that order and could deadlock.
            with self._lock:
                reclaimers = [r for k, r in self._reclaimers if k == "experts"]
            for reclaimer in reclaimers:
                short = nbytes - self.free_bytes()
                if short <= 0:
                    break
                reclaimer(short)
            reservation = self._reserve_if_fits(name, kind, nbytes)
            if reservation is not None:
                return reservation
        with self._lock:
            raise VRAMBudgetError(self._over_budget_message(name, kind, nbytes))

    def _reserve_if_fits(self, name: str, kind: str, nbytes: int) -> Reservation | None:
        with self._lock:
            if name in self._reservations:
                raise ValueError(f"{name!r} is already reserved "
                                 f"({self._reservations[name].nbytes / MB:.1f} MB); release "
                                 "or resize it")
            if nbytes > self.free_bytes():
                return None
            reservation = Reservation(name, kind, nbytes)
            self._reservations[name] = reservation
            return reservation

    def try_reserve(self, name: str, nbytes: int, kind: str = "other") -> bool:
        """Like :meth:`reserve` without reclaiming; ``False`` instead of raising."""
        try:
            self.reserve(name, nbytes, kind, reclaim=False)
        except VRAMBudgetError:
            return False
        return True

    def release(self, name: str) -> int:
        """Release ``name``; returns the bytes freed. Raises KeyError if it is not reserved."""
        with self._lock:
            if name not in self._reservations:
                raise KeyError(f"no reservation named {name!r}")
            return self._reservations.pop(name).nbytes

    def resize(self, name: str, nbytes: int) -> Reservation:
        """Change the size of reservation ``name`` (e.g. the KV cache grows)."""
        with self._lock:
            if name not in self._reservations:
                raise KeyError(f"no reservation named {name!r}")
            old = self._reservations.pop(name)
        try:
            return self.reserve(name, nbytes, old.kind)
        except BaseException:
            with self._lock:  # put the old size back: a failed resize changes nothing
                self._reservations.setdefault(name, old)
            raise

    def _over_budget_message(self, name: str, kind: str, nbytes: int) -> str:
        held = ", ".join(f"{k} {self.reserved_bytes(k) / MB:.1f} MB" for k in KINDS
                         if self.reserved_bytes(k)) or "nothing"
        device_free = self.device_free_bytes()
        device = "" if device_free is None else f"; device reports {device_free / MB:.1f} MB free"
        return (f"cannot reserve {nbytes / MB:.1f} MB for {name!r} ({kind}) on {self.device}: "
                f"{self.free_bytes() / MB:.1f} MB free of a {self.budget_bytes / MB:.1f} MB "
                f"budget (reserved: {held}{device})")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown reservation kind {kind!r}; expected one of {', '.join(KINDS)}")
