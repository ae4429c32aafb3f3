"""Weight sync, coordinator side: builds the group (one plan per member) and runs the two-phase
update: trainer SendWeights + every replica ReceiveWeights concurrently, then Commit on all, or
Abort on all if any of them failed (replicas keep serving the old version).

The group is rebuilt whenever the pool's replicas changed (one joined or left) or a sync failed. A
replica that fails a sync (it died, hung, restarted, lost its link) leaves the run and the sync is
retried without it; one whose commit fails leaves too. A replica that misses new weights never
generates again in this run (it may rejoin: membership.py). A trainer that fails fails the sync."""
from __future__ import annotations

import functools
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from rlgrid.v1 import common_pb2 as pb
from services.common.weight_sync import Rendezvous, choose_backend, choose_transport
from services.coordinator.clients import Rollout, RolloutPool, StepError, TrainerClient

log = logging.getLogger(__name__)


class SyncFailed(StepError):
    """A sync attempt failed; `replicas` holds each replica's own error (some may only be the echo of
    another member's failure in the collective), `trainer` the trainer's or None."""

    def __init__(self, message: str, trainer: str | None, replicas: dict[Rollout, str]):
        super().__init__(message)
        self.trainer, self.replicas = trainer, replicas


def concurrently(calls: list[tuple[Any, Callable[[], Any]]]) -> tuple[dict, dict[Any, StepError]]:
    """Runs every call at once and waits for all (each has its deadline); (results, errors) by key."""
    with ThreadPoolExecutor(max(1, len(calls))) as pool:
        futures = {key: pool.submit(fn) for key, fn in calls}
    results, errors = {}, {}
    for key, future in futures.items():
        try:
            results[key] = future.result()
        except StepError as exc:
            errors[key] = exc
    return results, errors


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

    def sync(self, version: int) -> dict[str, float]:
        """Every replica left in the pool serves `version` afterwards, or (on error) its old version.
        After a failed attempt, replicas that do not answer (or restarted) leave the pool and the sync is
        retried without them: a failure in a collective echoes to every member, so blame goes first to
        whoever is unreachable. With nobody unreachable, the sync is retried once as it was; after that,
        replicas whose own calls failed leave. A trainer that does not answer raises at once."""
        retried = False
        while True:
            if not self.rollouts.replicas:
                raise StepError(f"weight sync to version {version}: no rollout replica is left in the run")
            try:
                return self._sync(version)
            except SyncFailed as exc:
                self.group_id = None    # a broken collective leaves the group unusable
                if exc.trainer is not None and not self._trainer_serves():
                    raise   # the trainer's own failure, not the echo of a replica's
                lost = self.rollouts.unhealthy()
                if not lost and not retried:
                    retried = True
                    continue
                if not lost and (exc.trainer is not None or not exc.replicas):
                    raise
                # the call each one failed in the sync says more than the probe that found it gone
                self.rollouts.drop({r: exc.replicas.get(r, why) for r, why in lost.items()} if lost else exc.replicas)

    def _trainer_serves(self) -> bool:
        """Whether the trainer answers, set up for this run (not restarted)."""
        try:
            info = self.trainer.call("GetInfo", pb.Empty())
        except StepError:
            return False
        return not self.rollouts.run_id or info.run_id == self.rollouts.run_id

    def _plan(self, replicas: list[Rollout], ipc: bool = True) -> list[pb.WeightSyncPlan]:
        infos, errors = concurrently([(self.trainer, functools.partial(self.trainer.call, "GetInfo", pb.Empty())),
                                      *[(r, functools.partial(r.call, "GetInfo", pb.Empty())) for r in replicas]])
        if errors:
            raise SyncFailed(f"weight sync plan: {next(iter(errors.values()))}",
                             str(errors[self.trainer]) if self.trainer in errors else None,
                             {r: str(e) for r, e in errors.items() if r is not self.trainer})
        tinfo, rinfos = infos[self.trainer], [infos[r] for r in replicas]
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

    def _prepare(self, replicas: list[Rollout]) -> None:
        plans = self._plan(replicas, self.ipc)
        errors = self._join(plans, replicas)
        if errors and plans[0].transport == "cuda_ipc" and any("could not map the trainer's memory" in str(e)
                                                                for e in errors.values()):
            # a member failed to map the trainer's memory (processes in separate containers without a shared
            # IPC namespace, for one): nothing changed, so the same members join a broadcast group instead
            log.warning("weight sync over cuda_ipc failed to join, using a broadcast group instead: %s",
                        next(iter(errors.values())))
            self.ipc = False
            plans = self._plan(replicas, ipc=False)
            errors = self._join(plans, replicas)
        if errors:
            raise SyncFailed(f"building the weight-sync group failed: {next(iter(errors.values()))}",
                             str(errors[self.trainer]) if self.trainer in errors else None,
                             {r: str(e) for r, e in errors.items() if r is not self.trainer})
        self.group_id, self._members = plans[0].group_id, list(replicas)
        self.kind = plans[0].backend or plans[0].transport
        log.info("weight-sync group %s: trainer + %d replicas over %s", self.group_id, len(replicas), self.kind)

    def _join(self, plans: list[pb.WeightSyncPlan], replicas: list[Rollout]) -> dict:
        """Every member joins the planned group at once; the errors by member."""
        members = [self.trainer, *replicas]
        return concurrently([(m, functools.partial(m.call, "PrepareWeightSync", plan, "weight_sync"))
                             for m, plan in zip(members, plans)])[1]

    def _sync(self, version: int) -> dict[str, float]:
        start = time.perf_counter()
        replicas = list(self.rollouts.replicas)
        if self.group_id is None or self._members != replicas:
            self._prepare(replicas)
        request = pb.WeightSyncRequest(group_id=self.group_id, version=version)
        results, errors = concurrently(
            [(self.trainer, functools.partial(self.trainer.call, "SendWeights", request, "weight_sync")),
             *[(r, functools.partial(r.call, "ReceiveWeights", request, "weight_sync")) for r in replicas]])
        failed = {r: str(e) for r, e in errors.items() if r is not self.trainer}
        if errors:   # the new weights are committed only where every member received them
            for r in replicas:
                try:
                    r.call("AbortWeights", request)
                except StepError:   # the replica may be the one that died
                    pass
            first = errors.get(self.trainer) or next(iter(errors.values()))
            raise SyncFailed(f"weight sync to version {version} failed; replicas keep their old version: {first}",
                             str(errors[self.trainer]) if self.trainer in errors else None, failed)
        commit_start = time.perf_counter()
        commits, commit_errors = concurrently(
            [(r, functools.partial(r.call, "CommitWeights", request, "weight_sync")) for r in replicas])
        wrong = {r: f"committed version {c.version} instead of {version}" for r, c in commits.items()
                 if c.version != version}
        self.rollouts.drop({**{r: str(e) for r, e in commit_errors.items()}, **wrong})
        serving = [r for r in replicas if r in commits and r not in wrong]
        if not serving:   # a commit is each replica's own: those that failed have left
            raise StepError(f"weight sync to version {version}: no replica committed it: "
                            f"{next(iter(commit_errors.values()), 'every replica committed another version')}")
        end = time.perf_counter()
        send = results[self.trainer]
        return {"sync/seconds": end - start, "sync/bytes": float(send.bytes), "sync/send_seconds": send.seconds,
                "sync/receive_seconds": max(results[r].seconds for r in replicas),
                "sync/commit_seconds": end - commit_start, "sync/replicas": float(len(serving))}
