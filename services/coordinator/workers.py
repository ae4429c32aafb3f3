"""Workers that registered themselves: a run starts on whoever is registered and alive, and rollout
replicas that register later join it (membership.py).

Each worker registers with a secret it accepts steering calls with; the coordinator keeps it (never
in ListWorkers) and sends it on every call to that worker. A registration that brings a new secret
for an address is accepted only once the worker at that address accepts it (one GetInfo carrying it),
so nobody can register someone else's address under a secret of their own (docs/security.md)."""
from __future__ import annotations

import hmac
import threading
import time

import grpc

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import rollout_pb2_grpc, trainer_pb2_grpc
from services.common.rpc import InvalidArgument, PermissionDenied, make_channel, wait_healthy

# Services re-register every 5 s; one silent for this long is considered gone.
STALE_AFTER_S = 30.0
VERIFY_TIMEOUT_S = 5.0


def verify_secret(info: cpb.WorkerInfo) -> None:
    """Raises PermissionDenied unless the worker at info.address accepts info.secret."""
    stub_class = rollout_pb2_grpc.RolloutServiceStub if info.kind == cpb.ROLLOUT else trainer_pb2_grpc.TrainerServiceStub
    with make_channel(info.address, worker_secret=info.secret) as channel:
        try:
            stub_class(channel).GetInfo(pb.Empty(), timeout=VERIFY_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise PermissionDenied(f"the worker at {info.address} did not accept the secret this registration "
                                   f"carries ({exc.code().name}); a worker registers its own address") from None


class WorkerRegistry:
    def __init__(self, verify=verify_secret):
        self._workers: dict[str, tuple[cpb.WorkerInfo, float]] = {}
        self._secrets: dict[str, str] = {}
        self._verify = verify
        self._lock = threading.Lock()
        self.changed = threading.Event()

    def register(self, info: cpb.WorkerInfo) -> str:
        if info.kind not in (cpb.ROLLOUT, cpb.TRAINER):
            raise InvalidArgument("kind must be ROLLOUT or TRAINER")
        host, _, port = info.address.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidArgument(f"address must be host:port, got {info.address!r}")
        if not info.secret:
            raise InvalidArgument("secret is empty: a worker registers with the secret it accepts steering calls with")
        with self._lock:
            known = self._secrets.get(info.address)
        if known is None or not hmac.compare_digest(known.encode(), info.secret.encode()):
            self._verify(info)    # a call to the worker: outside the lock
        public = cpb.WorkerInfo()
        public.CopyFrom(info)
        public.ClearField("secret")
        with self._lock:
            is_new = info.address not in self._workers
            self._workers[info.address] = (public, time.monotonic())
            self._secrets[info.address] = info.secret
        if is_new:
            self.changed.set()
        return info.address

    def alive(self, kind: int | None = None) -> list[cpb.WorkerInfo]:
        now = time.monotonic()
        with self._lock:
            return sorted((w for w, seen in self._workers.values()
                           if now - seen < STALE_AFTER_S and (kind is None or w.kind == kind)),
                          key=lambda w: w.address)

    def registered_at(self, address: str) -> float | None:
        """time.monotonic() of the worker's last registration (None: never)."""
        with self._lock:
            entry = self._workers.get(address)
        return entry[1] if entry else None

    def secret(self, address: str) -> str:
        """The secret the worker at `address` registered with (sent on every call to it)."""
        with self._lock:
            return self._secrets.get(address, "")

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
