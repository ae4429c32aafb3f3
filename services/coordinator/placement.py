"""Placement: where the trainer and the rollout replicas hold their memory, as a policy that the loop
calls at fixed points (around each rollout, each training phase and each weight sync), never as
branches inside the loop.

- `disaggregated`: each side keeps its memory all run long (separate GPUs, or CPU); the hooks do
  nothing. Rollout and training may then overlap (runtime_args.off_policy_steps > 0).
- `colocated`: trainer and replicas share GPUs and take turns: the engines release their memory
  while the trainer works, and the trainer moves its state to host while the engines generate.
- `auto` (runtime_args.placement): colocated when a GPU the trainer reports in GetInfo is also a
  replica's and the loop is synchronous; disaggregated otherwise (always on CPU, where no GPU is
  shared).

The colocated hooks act through `PlacementActions`; `ServiceActions` calls the services' RPCs for
them (rollout Sleep / WakeUp, trainer Offload / Onload, under runtime_args.rpc_timeout_s.memory) and
keeps the memory each call reports, which the loop adds to the step's metrics.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Protocol, Sequence

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import rollout_pb2 as rpb
from services.common.config import RLConfig, RpcTimeouts
from services.coordinator.clients import RolloutPool, StepError, TrainerClient


class PlacementActions(Protocol):
    """What colocated placement asks of the services; each call returns once every service did it."""

    def sleep_rollouts(self) -> None:
        """Every replica releases its engine's memory (KV cache, CUDA graphs; weights where the
        engine can restore them on wake-up)."""

    def wake_rollouts(self, tags: Sequence[str]) -> None:
        """Every replica reacquires memory, by vLLM's tags: "weights" (before a weight sync lands in
        them) and "kv_cache" (before generating)."""

    def offload_trainer(self) -> None:
        """The trainer moves its parameters and optimizer state to host memory."""

    def onload_trainer(self) -> None:
        """The trainer brings them back to its GPUs."""


class NoActions:
    """The actions of services that hold nothing to hand over (CPU), or lack the RPCs to do it."""

    def sleep_rollouts(self) -> None:
        pass

    def wake_rollouts(self, tags: Sequence[str]) -> None:
        pass

    def offload_trainer(self) -> None:
        pass

    def onload_trainer(self) -> None:
        pass


class ServiceActions:
    """PlacementActions through the services' RPCs. Engines sleep at level 2 (the weight sync after
    training refills the weights, so nothing is copied to host); the trainer offloads only when
    models.policy_trainer.offload lets it, and vLLM replicas sleep only with
    models.policy.enable_sleep_mode (otherwise that side keeps its memory, as the log says)."""

    SLEEP_LEVEL = 2

    def __init__(self, cfg: RLConfig, trainer: TrainerClient, rollouts: RolloutPool):
        self.trainer, self.rollouts = trainer, rollouts
        self.offload = cfg.models.policy_trainer.offload
        self.sleep = cfg.models.policy.engine != "vllm" or cfg.models.policy.enable_sleep_mode
        self.reports: dict[str, float] = {}

    def describe(self) -> str:
        kept = ([] if self.sleep else ["the engines keep theirs (models.policy.enable_sleep_mode=False)"]) + \
               ([] if self.offload else ["the trainer keeps its state (models.policy_trainer.offload=False)"])
        return "; ".join(kept)

    def _record(self, phase: str, reports: Sequence[pb.MemoryReport]) -> None:
        if reports:   # the replicas' largest; the device's count is shared by everyone on it
            self.reports.update({f"memory/{phase}_peak_gib": max(r.peak_allocated_gib for r in reports),
                                 f"memory/{phase}_device_used_gib": max(r.device_used_gib for r in reports)})

    def sleep_rollouts(self) -> None:
        if self.sleep:   # the generation phase's peak, then what the GPU holds once they released it
            self._record("rollout", self.rollouts.call_all("Sleep", rpb.SleepRequest(level=self.SLEEP_LEVEL),
                                                           key="memory"))

    def wake_rollouts(self, tags: Sequence[str]) -> None:
        if self.sleep:
            self.rollouts.call_all("WakeUp", rpb.WakeUpRequest(tags=list(tags)), key="memory")

    def offload_trainer(self) -> None:
        if self.offload:   # the trainer's peak since its last report (training and the sync)
            self._record("trainer", [self.trainer.call("Offload", pb.Empty(), key="memory")])

    def onload_trainer(self) -> None:
        if self.offload:
            self.trainer.call("Onload", pb.Empty(), key="memory")


class Placement:
    """Disaggregated placement, and the hooks every placement has: context managers the loop wraps
    around the rollout of a batch, the trainer's work of a step, and each weight sync."""

    name = "disaggregated"

    def __init__(self, actions: PlacementActions, why: str):
        self.actions, self.why = actions, why

    def describe(self) -> str:
        return f"placement {self.name}: {self.why}"

    def metrics(self) -> dict[str, float]:
        """Memory the services reported at the last handover (colocated with ServiceActions)."""
        return dict(getattr(self.actions, "reports", {}))

    @contextlib.contextmanager
    def rollout(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def train(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def sync(self) -> Iterator[None]:
        yield


class Colocated(Placement):
    """Trainer and engines take turns on the same GPUs. Per step: the trainer's state goes to host and
    the engines take their KV cache back, they generate, they release their memory, the trainer comes
    back and trains (the agreement check's forward included), the engines take their weights back
    for the sync. A failed phase fails the run, so nothing is restored after one."""

    name = "colocated"

    def describe(self) -> str:
        kept = (self.actions.describe() if isinstance(self.actions, ServiceActions) else
                "no memory is handed over" if isinstance(self.actions, NoActions) else "")
        return super().describe() + (f" ({kept})" if kept else "")

    @contextlib.contextmanager
    def rollout(self) -> Iterator[None]:
        self.actions.offload_trainer()
        self.actions.wake_rollouts(("kv_cache",))
        yield
        self.actions.sleep_rollouts()

    @contextlib.contextmanager
    def train(self) -> Iterator[None]:
        self.actions.onload_trainer()
        yield

    @contextlib.contextmanager
    def sync(self) -> Iterator[None]:
        self.actions.wake_rollouts(("weights",))   # the update is received into the engine's weights
        yield


def decide(placement: str, off_policy_steps: int, trainer_gpus: Sequence[str],
           replica_gpus: Sequence[Sequence[str]]) -> tuple[str, str]:
    """(colocated | disaggregated, why) for runtime_args.placement and the GPU UUIDs the services report."""
    shared = sorted(set(trainer_gpus) & {u for gpus in replica_gpus for u in gpus})
    if placement == "colocated":
        if not shared:
            raise StepError("runtime_args.placement=colocated, but the trainer and the rollout replicas share no GPU "
                            f"(trainer: {list(trainer_gpus) or 'CPU'}, replicas: "
                            f"{[list(g) or 'CPU' for g in replica_gpus]}); use disaggregated or auto")
        return "colocated", f"runtime_args.placement=colocated; the trainer shares GPUs {shared} with replicas"
    if placement == "disaggregated":
        return "disaggregated", "runtime_args.placement=disaggregated"
    if not shared:
        return "disaggregated", "runtime_args.placement=auto, and the trainer shares no GPU with a replica"
    if off_policy_steps > 0:
        return "disaggregated", (f"runtime_args.placement=auto: the trainer shares GPUs {shared} with replicas, but "
                                 f"runtime_args.off_policy_steps={off_policy_steps} overlaps them, so each keeps its "
                                 f"memory")
    return "colocated", f"runtime_args.placement=auto, and the trainer shares GPUs {shared} with replicas"


# keys that only colocated placement reads, and whether a config sets them (a disaggregated run refuses them)
COLOCATED_ONLY = {
    "runtime_args.rpc_timeout_s.memory": lambda c: c.runtime_args.rpc_timeout_s.memory != RpcTimeouts().memory,
    "models.policy_trainer.offload": lambda c: c.models.policy_trainer.offload,
    "models.policy.enable_sleep_mode": lambda c: c.models.policy.enable_sleep_mode,
}


def choose_placement(cfg: RLConfig, trainer: TrainerClient, rollouts: RolloutPool,
                     actions: PlacementActions | None = None) -> Placement:
    """The run's placement, from the GPUs the set-up services report (GetInfo). A disaggregated run
    refuses the keys only colocated placement reads (the run fails at its start, naming them)."""
    trainer_gpus = trainer.call("GetInfo", pb.Empty()).gpu_uuids
    replica_gpus = [info.gpu_uuids for info in rollouts.call_all("GetInfo", pb.Empty())]
    kind, why = decide(cfg.runtime_args.placement, cfg.runtime_args.off_policy_steps, trainer_gpus, replica_gpus)
    unused = [key for key, is_set in COLOCATED_ONLY.items() if is_set(cfg)]
    if kind == "disaggregated" and unused:
        raise StepError(f"{', '.join(unused)} apply only to colocated placement (trainer and replicas taking turns "
                        f"on shared GPUs), and this run is disaggregated ({why}); leave them at their defaults")
    return (Colocated if kind == "colocated" else Placement)(actions or ServiceActions(cfg, trainer, rollouts), why)
