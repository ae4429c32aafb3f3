"""Weight sync, coordinator side: builds the group (one plan per member) and runs the two-phase
update: trainer SendWeights + every replica ReceiveWeights concurrently, then Commit on all, or
Abort on all if anything failed (replicas keep serving the old version)."""
from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

from rlgrid.v1 import common_pb2 as pb
from services.common.weight_sync import Rendezvous, choose_backend, choose_transport
from services.coordinator.clients import RolloutPool, StepError, TrainerClient

log = logging.getLogger(__name__)


class WeightSync:
    def __init__(self, rendezvous: Rendezvous, trainer: TrainerClient, rollouts: RolloutPool, *, bucket_mb: int,
                 ipc: bool = True):
        """`ipc`: plan cuda_ipc where every replica shares the trainer's GPU (False: always a broadcast group;
        bench/gpu_colocated.py measures both)."""
        self.rendezvous, self.trainer, self.rollouts = rendezvous, trainer, rollouts
        self.bucket_bytes = bucket_mb * 1024 * 1024
        # the group's own collectives give up when the calls driving them do (rpc_timeout_s.weight_sync)
        self.timeout_s = math.ceil(trainer.timeouts.weight_sync)
        self.group_id: str | None = None
        self.kind = ""              # how the group moves the weights: cuda_ipc, nccl or gloo
        self._members: list = []    # the replicas the group was built for
        self.ipc = ipc              # off once cuda_ipc could not join (e.g. separate IPC namespaces): broadcast from then on

    def _plan(self, ipc: bool = True) -> list[pb.WeightSyncPlan]:
        tinfo = self.trainer.call("GetInfo", pb.Empty())
        rinfos = self.rollouts.call_all("GetInfo", pb.Empty())
        by_name = [{p.name: (tuple(p.shape), p.dtype) for p in r.params} for r in rinfos]
        if any(b != by_name[0] for b in by_name[1:]):
            raise StepError("rollout replicas serve different models or dtypes; give them the same "
                            "models.policy.load and models.policy.dtype")
        mismatch = [t.name for t in tinfo.params if by_name[0].get(t.name, (None,))[0] != tuple(t.shape)]
        if mismatch or len(by_name[0]) != len(tinfo.params):
            raise StepError(f"trainer and rollout models differ (e.g. {mismatch[:3]}, {len(tinfo.params)} vs "
                            f"{len(by_name[0])} parameters): models.policy.load and models.policy_trainer.load "
                            f"must be the same architecture")
        wire = [pb.ParamSpec(name=t.name, shape=t.shape, dtype=by_name[0][t.name][1]) for t in tinfo.params]
        transport, backend, why = choose_transport(tinfo, rinfos)
        if transport == "cuda_ipc" and not ipc:
            (backend, why), transport = choose_backend(tinfo, rinfos), "broadcast"
        if why:
            log.info("weight sync over %s: %s", backend or transport, why)
        ranks, world_size = [0], 1   # the trainer sends as rank 0
        for r in rinfos:              # a replica with k receiving processes takes k consecutive ranks
            ranks.append(world_size)
            world_size += max(r.sync_ranks, 1)
        common = dict(group_id=self.rendezvous.new_group_id(), transport=transport,
                      secret=self.rendezvous.new_secret(),   # the store prefix: members only (security.md)
                      backend=backend, rendezvous_host=self.rendezvous.host,
                      rendezvous_port=self.rendezvous.port, world_size=world_size, params=wire,
                      bucket_bytes=self.bucket_bytes, timeout_s=self.timeout_s)
        return [pb.WeightSyncPlan(rank=rank, **common) for rank in ranks]

    def _prepare(self) -> None:
        plans = self._plan(ipc=self.ipc)
        try:
            self._join(plans)
        except StepError as exc:
            if plans[0].transport != "cuda_ipc" or "could not map the trainer's memory" not in str(exc):
                raise
            # a member failed to map the trainer's memory (processes in separate containers without a shared
            # IPC namespace, for one): nothing changed, so the same members join a broadcast group instead
            log.warning("weight sync over cuda_ipc failed to join, using a broadcast group instead: %s", exc)
            self.ipc = False
            plans = self._plan(ipc=False)
            self._join(plans)
        self.group_id, self._members = plans[0].group_id, list(self.rollouts.replicas)
        self.kind = plans[0].backend or plans[0].transport
        log.info("weight-sync group %s: trainer + %d replicas over %s", self.group_id, len(plans) - 1, self.kind)

    def _join(self, plans: list[pb.WeightSyncPlan]) -> None:
        members = [self.trainer, *self.rollouts.replicas]
        with ThreadPoolExecutor(len(members)) as pool:
            futures = [pool.submit(m.call, "PrepareWeightSync", plan, "weight_sync") for m, plan in zip(members, plans)]
            for f in futures:
                f.result()

    def sync(self, version: int) -> dict[str, float]:
        """Every replica serves `version` afterwards, or (on error) still its old version. A replica
        that stopped answering is dropped and the sync retried once without it."""
        try:
            return self._sync(version)
        except StepError:
            dead = self.rollouts.unreachable()
            if not dead or len(dead) == len(self.rollouts.replicas):
                raise
            self.rollouts.drop(dead)
            return self._sync(version)

    def _sync(self, version: int) -> dict[str, float]:
        start = time.perf_counter()
        if self.group_id is None or self._members != self.rollouts.replicas:
            self._prepare()
        request = pb.WeightSyncRequest(group_id=self.group_id, version=version)
        replicas = self.rollouts.replicas
        with ThreadPoolExecutor(1 + len(replicas)) as pool:
            send = pool.submit(self.trainer.call, "SendWeights", request, "weight_sync")
            receives = [pool.submit(r.call, "ReceiveWeights", request, "weight_sync") for r in replicas]
            errors = []
            for f in [send, *receives]:
                try:
                    f.result()
                except Exception as exc:  # noqa: BLE001 - collected, then all aborted
                    errors.append(exc)
        if errors:
            self.group_id = None   # a broken collective leaves the group unusable: rebuild next time
            for r in replicas:
                try:
                    r.call("AbortWeights", request)
                except StepError:   # the replica may be the one that died
                    pass
            raise StepError(f"weight sync to version {version} failed; replicas keep their old version: {errors[0]}")
        commit_start = time.perf_counter()
        commits = self.rollouts.call_all("CommitWeights", request, "weight_sync")
        if any(c.version != version for c in commits):
            raise StepError(f"a replica did not commit version {version}: {[c.version for c in commits]}")
        end = time.perf_counter()
        return {"sync/seconds": end - start, "sync/bytes": float(send.result().bytes),
                "sync/send_seconds": send.result().seconds,
                "sync/receive_seconds": max(f.result().seconds for f in receives),
                "sync/commit_seconds": end - commit_start}
