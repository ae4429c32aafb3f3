"""Real service processes on localhost for the integration tests (shared per session)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import coordinator_pb2_grpc, rollout_pb2_grpc, trainer_pb2_grpc
from services.coordinator.local import ROOT, LocalCluster, Proc

__all__ = ["ROOT", "Services", "start_services", "expect_rpc_error"]


@dataclass
class Services:
    """The shared deployment: one coordinator, one trainer, two rollout replicas."""
    cluster: LocalCluster
    coordinator: Proc
    trainer: Proc
    rollouts: list[Proc]

    def coord(self):
        return coordinator_pb2_grpc.CoordinatorServiceStub(self.cluster.channel(self.coordinator))

    def trainer_stub(self, **kwargs):
        """The trainer, steered with its worker secret (as the coordinator does) unless kwargs say otherwise."""
        return trainer_pb2_grpc.TrainerServiceStub(self.cluster.channel(self.trainer, **kwargs))

    def rollout_stub(self, i: int, **kwargs):
        return rollout_pb2_grpc.RolloutServiceStub(self.cluster.channel(self.rollouts[i], **kwargs))

    def wait_workers(self, timeout: float = 60.0) -> None:
        want = {self.trainer.address, *(r.address for r in self.rollouts)}
        deadline = time.time() + timeout
        while time.time() < deadline:
            have = {w.address for w in self.coord().ListWorkers(pb.Empty()).workers}
            if want <= have:
                return
            time.sleep(0.2)
        raise RuntimeError(f"workers did not register: want {want}, have {have}")

    def start_extra_rollout(self, name: str):
        """One more replica for a single test (it registers with the coordinator before this returns);
        the test stops it, and the coordinator drops it from the worker list once it is silent."""
        extra = self.cluster.start(name, "services.rollout", "--coordinator", self.coordinator.address,
                                   "--device", "cpu")
        self.cluster.wait_healthy(extra)
        self.rollouts.append(extra)
        try:
            self.wait_workers()
        finally:
            self.rollouts.remove(extra)
        return extra

    def run_to_end(self, run_id: str, timeout: float = 300.0) -> tuple[cpb.RunInfo, list[cpb.RunEvent]]:
        events = list(self.coord().WatchRun(cpb.WatchRunRequest(run_id=run_id), timeout=timeout))
        return self.coord().GetRun(cpb.RunRef(run_id=run_id)), events


TEST_WORKER_SECRET = "integration-test-worker-secret"


def start_services(log_dir: str, state_dir: str, replicas: int = 2, roots: list[str] = ()) -> Services:
    """`roots`: where client-named paths may point (besides nothing: the services' defaults are replaced)."""
    cluster = LocalCluster(log_dir, roots=list(roots), worker_secret=TEST_WORKER_SECRET)
    services = Services(cluster, *cluster.deploy(state_dir, replicas))
    services.wait_workers()
    return services


def expect_rpc_error(fn, code: grpc.StatusCode, *needles: str) -> str:
    """Calls fn, asserts it fails with `code` and a message containing every needle."""
    try:
        result = fn()
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    except grpc.RpcError as exc:
        assert exc.code() == code, f"expected {code}, got {exc.code()}: {exc.details()}"
        for needle in needles:
            assert needle in exc.details(), f"{needle!r} not in {exc.details()!r}"
        return exc.details()
    raise AssertionError(f"expected {code}, call succeeded")
