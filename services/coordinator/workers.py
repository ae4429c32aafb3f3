"""Workers that registered themselves; a run uses whoever is registered and alive when it starts."""
from __future__ import annotations

import threading
import time

from rlgrid.v1 import coordinator_pb2 as cpb
from services.common.rpc import InvalidArgument, wait_healthy

# Services re-register every 5 s; one silent for this long is considered gone.
STALE_AFTER_S = 30.0


class WorkerRegistry:
    def __init__(self):
        self._workers: dict[str, tuple[cpb.WorkerInfo, float]] = {}
        self._lock = threading.Lock()
        self.changed = threading.Event()

    def register(self, info: cpb.WorkerInfo) -> str:
        if info.kind not in (cpb.ROLLOUT, cpb.TRAINER):
            raise InvalidArgument("kind must be ROLLOUT or TRAINER")
        host, _, port = info.address.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidArgument(f"address must be host:port, got {info.address!r}")
        with self._lock:
            is_new = info.address not in self._workers
            self._workers[info.address] = (info, time.monotonic())
        if is_new:
            self.changed.set()
        return info.address

    def alive(self, kind: int | None = None) -> list[cpb.WorkerInfo]:
        now = time.monotonic()
        with self._lock:
            return sorted((w for w, seen in self._workers.values()
                           if now - seen < STALE_AFTER_S and (kind is None or w.kind == kind)),
                          key=lambda w: w.address)

    def serving(self, kind: int, timeout: float = 2.0) -> list[cpb.WorkerInfo]:
        """Registered workers of `kind` that answer a health check now (a killed one can still
        look registered for STALE_AFTER_S)."""
        serving = []
        for w in self.alive(kind):
            try:
                wait_healthy(w.address, timeout=timeout)
                serving.append(w)
            except Exception:  # noqa: BLE001 - unreachable, or not serving
                pass
        return serving
