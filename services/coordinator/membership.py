"""Which rollout replicas a run uses: replicas join a running run, and come back after they left.

A replica that registers with the coordinator during a run is set up in the background (GetInfo, then
Setup with the run's config, its model checked against the trainer's) while the steps go on. At the
next step boundary (`admit`, which the loop calls just before the weight sync) it joins the pool: the
group is rebuilt with it, it receives that step's new weights in the same broadcast as every other
replica, commits them, and gets prompts from the next step on.

Why from the trainer, in the sync every replica takes part in anyway, and not peer-to-peer from a
replica that has the weights: the broadcast carries the same bytes to one more receiver, so a join costs
the others one group rebuild (a rendezvous: milliseconds over gloo, NCCL's communicator set-up on GPUs)
and nothing else, and the joiner's slow part (building its engine: loading the model, starting vLLM)
runs in the background, never inside a step. A peer-to-peer copy would need a second sending path in
the rollout service, a second group per join, and the source replica's serving weights held still while
it sends, to spare the trainer's broadcast one receiver.

A replica leaves when a call to it fails (RolloutPool.drop). It comes back on its own: once it has
registered again after it left (a restarted process registers with a new secret; a replica whose link
came back re-registers within 5 s), it is set up and joins like a new one. A replica whose model does
not fit the run is refused until it registers with a new secret (it restarted, maybe reconfigured).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from services.coordinator.clients import Rollout, RolloutPool, StepError
from services.coordinator.workers import WorkerRegistry

log = logging.getLogger(__name__)


class Membership:
    """Joins for one run's RolloutPool. `start` sets up the replicas the run starts with; from then on
    a watcher sets up new ones as they register, and `admit` lets them in at step boundaries."""

    def __init__(self, pool: RolloutPool, workers: WorkerRegistry, setup: pb.SetupRequest, *, poll_s: float = 1.0):
        self.pool, self.workers, self.setup, self.poll_s = pool, workers, setup, poll_s
        self._lock = threading.Lock()
        self._pending: set[str] = set()            # being set up now
        self._ready: dict[str, tuple[Rollout, float]] = {}   # set up (in that many seconds), waiting to join
        self._failed_at: dict[str, float] = {}     # a setup failed then: retried once it registers again
        self._refused: dict[str, str] = {}         # its model does not fit: retried under a new secret only
        self._shapes: dict[str, tuple] = {}        # the trainer's parameters, which every replica must serve
        self._dtypes: dict[str, int] | None = None  # the first replica's wire dtypes: one plan serves all
        self._stop = threading.Event()
        self.started = False

    def start(self, addresses: list[str], trainer_info) -> None:
        """Sets up the replicas the run starts with, concurrently; one that fails is reported and left out
        (StepError when none is left). Then watches the registry for replicas that join."""
        self.started = True
        self._shapes = {p.name: tuple(p.shape) for p in trainer_info.params}
        replicas = [self.pool.connect(a, self.workers.secret(a)) for a in addresses]
        with ThreadPoolExecutor(max(1, len(replicas))) as pool:
            problems = list(pool.map(self._set_up, replicas))
        for replica, problem in zip(replicas, problems):   # in registry order: prompts shard the same way
            if problem is None:
                self.pool.replicas = [*self.pool.replicas, replica]
            else:
                self._failed_at[replica.address] = time.monotonic()
                self.pool.report(f"rollout replica {replica.address} is left out of the run: {problem}")
        if not self.pool.replicas:
            raise StepError(f"no rollout replica could be set up for this run: {problems[0]}")
        threading.Thread(target=self._watch, name="membership", daemon=True).start()

    def admit(self) -> list[str]:
        """At a step boundary: replicas set up since the last one join the pool, so the weight sync that
        follows includes them. Returns their addresses."""
        with self._lock:
            ready, self._ready = self._ready, {}
        for address, (replica, seconds) in ready.items():
            self.pool.add(replica, f" (set up in {seconds:.1f} s; it receives the weights at this step's sync)")
        return list(ready)

    def close(self) -> None:
        self._stop.set()

    # ---- internals ------------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                for worker in self.workers.alive(cpb.ROLLOUT):
                    if self._eligible(worker.address):
                        threading.Thread(target=self._join, args=(worker.address,), name="join", daemon=True).start()
            except Exception:  # noqa: BLE001 - the watcher outlives a bad pass; the next one tries again
                log.exception("membership watcher")

    def _eligible(self, address: str) -> bool:
        """Not in the run, not being set up; if it left or failed, registered again since."""
        with self._lock:
            if address in self._pending or address in self._ready:
                return False
            if address in self._refused and self._refused[address] == self.workers.secret(address):
                return False
            if any(r.address == address for r in self.pool.replicas):
                return False
            since = max(self.pool.left_at.get(address, -1.0), self._failed_at.get(address, -1.0))
            seen = self.workers.registered_at(address)
            if seen is None or seen <= since:
                return False
            self._pending.add(address)
            return True

    def _join(self, address: str) -> None:
        log.info("rollout replica %s registered: setting it up to join the run", address)
        start = time.monotonic()
        secret = self.workers.secret(address)
        replica = self.pool.connect(address, secret)
        problem = self._set_up(replica)
        with self._lock:
            self._pending.discard(address)
            if problem is None and not self._stop.is_set():
                self._ready[address] = (replica, time.monotonic() - start)
            elif problem is not None:
                self._failed_at[address] = time.monotonic()
        if problem is not None and not self._stop.is_set():
            self.pool.report(f"rollout replica {address} could not join the run: {problem}")
        log.info("rollout replica %s: %s", address, problem or "set up, joins at the next step boundary")

    def _set_up(self, replica: Rollout) -> str | None:
        """GetInfo, Setup with the run's config, the model checked; None when it can serve the run."""
        try:
            replica.handshake()
            info = replica.call("Setup", self.setup, "setup")
        except StepError as exc:
            return str(exc)
        shapes = {p.name: tuple(p.shape) for p in info.params}
        dtypes = {p.name: p.dtype for p in info.params}
        with self._lock:
            if shapes != self._shapes:
                self._refused[replica.address] = replica.secret or ""
                return (f"it serves another model than the trainer ({len(shapes)} vs {len(self._shapes)} parameters "
                        f"or other shapes): models.policy.load and models.policy_trainer.load must be the same "
                        f"architecture")
            if self._dtypes is None:
                self._dtypes = dtypes
            elif dtypes != self._dtypes:
                self._refused[replica.address] = replica.secret or ""
                return "it serves another dtype than the run's other replicas: give them the same models.policy.dtype"
        return None
