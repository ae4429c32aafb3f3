"""Rollout replicas join and leave a running run. One run on two steady replicas; a third one (the
victim) joins mid-run, then dies inside each phase in turn (a test-only fault point kills it at an exact
moment of a call: services/common/faults.py), is restarted, and joins again with the current weights.
Through all of it the run goes on: every step trains on exactly one episode's samples, the policy
version advances by the optimizer steps taken, every replica serves the trainer's weights."""
import os
import signal
import subprocess

import pytest

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import coordinator_pb2_grpc, rollout_pb2_grpc, trainer_pb2_grpc
from services.common.faults import FAULT_DIR_ENV
from services.coordinator.local import LocalCluster, free_port
from tests.integration.cluster import TEST_WORKER_SECRET
from tests.integration.conftest import demo_overrides
from tests.integration.watch import RunWatcher, arm, reached, release

pytestmark = pytest.mark.slow
SAMPLES = 32
SETTINGS = {"runtime_args.num_episode": 100000, "runtime_args.sample_per_episode": SAMPLES,   # stopped by the test
            "runtime_args.train_global_batch_size": 16,
            "runtime_args.rpc_timeout_s.weight_sync": 10, "runtime_args.rpc_timeout_s.control": 5,
            "runtime_args.rpc_timeout_s.generate": 60, "runtime_args.rpc_timeout_s.setup": 120}


class Victim:
    """The replica that joins, dies and comes back, always on the same port (one address)."""

    def __init__(self, cluster: LocalCluster, coordinator: str, fault_dir: str):
        self.cluster, self.coordinator, self.fault_dir = cluster, coordinator, fault_dir
        self.port = free_port()
        self.address = f"localhost:{self.port}"
        self.proc = None
        self.starts = 0

    def start(self, fault: tuple[str, str, int] | None = None) -> None:
        """(Re)starts it; `fault`: (point, action, nth) armed before it starts."""
        if self.proc is not None:
            self.cluster.stop(self.proc)   # a process that killed itself is only forgotten
        if fault:
            arm(self.fault_dir, *fault)
        self.starts += 1
        self.proc = self.cluster.start(f"victim{self.starts}", "services.rollout", "--coordinator", self.coordinator,
                                       "--device", "cpu", port=self.port, env={FAULT_DIR_ENV: self.fault_dir})

    def dead(self) -> bool:
        """Whether it exited (the coordinator may see its sockets close a moment before it is reaped)."""
        try:
            self.proc.popen.wait(timeout=10)
            return True
        except subprocess.TimeoutExpired:
            return False


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = tmp_path_factory.mktemp("membership")
    cluster = LocalCluster(str(d / "logs"), roots=[str(tmp_path_factory.getbasetemp())],
                           worker_secret=TEST_WORKER_SECRET)
    try:
        coordinator = cluster.start("coordinator", "services.coordinator", "--state-dir", str(d / "state"))
        cluster.wait_healthy(coordinator)
        trainer_faults = str(d / "faults-trainer")
        trainer = cluster.start("trainer", "services.trainer", "--coordinator", coordinator.address, "--device", "cpu",
                                env={FAULT_DIR_ENV: trainer_faults})
        steady = [cluster.start(f"rollout{i}", "services.rollout", "--coordinator", coordinator.address,
                                "--device", "cpu") for i in range(2)]
        for proc in [trainer, *steady]:
            cluster.wait_healthy(proc)
        victim = Victim(cluster, coordinator.address, str(d / "faults-victim"))
        yield cluster, coordinator, trainer, trainer_faults, steady, victim
    finally:
        cluster.stop_all()


@pytest.mark.timeout(1500)   # seven service starts; on a loaded 2-core machine each takes up to a minute
def test_replicas_join_leave_in_every_phase_and_rejoin(deployment, toy, demo_yaml, tmp_path):
    cluster, coordinator, trainer, trainer_faults, steady, victim = deployment
    coord = coordinator_pb2_grpc.CoordinatorServiceStub(cluster.channel(coordinator))
    _wait_registered(coord, {trainer.address, *(p.address for p in steady)})
    run = coord.StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=demo_overrides(
        toy, str(tmp_path), **SETTINGS)))
    watch = RunWatcher(coord, run.run_id)
    try:
        at = watch.step(1)
        assert watch.events[at].metrics["rollout/replicas"] == 2

        # a replica started mid-run joins at a step boundary, with the current weights, then gets work
        victim.start()
        at = _works(watch, _joined(watch, victim, at))
        left = {}
        # it dies inside each phase; every time the run goes on, and it comes back
        arm(victim.fault_dir, "generate", "kill", 1)
        left["generate"] = at = _left(watch, victim, at)
        for phase in ("receive", "commit"):   # its second: the sync after the first step it generated in
            victim.start((phase, "kill", 2))
            left[phase] = at = _left(watch, victim, _joined(watch, victim, at))
            _works(watch, at)   # that step's samples are its own too

        # killed while its join's Setup runs (a call outside any step), then while the group is built for it
        victim.start(("setup", "kill", 1))
        left["setup"] = at = watch.message(f"rollout replica {victim.address} could not join the run", start=at)
        victim.start(("prepare", "kill", 1))
        left["prepare"] = at = _left(watch, victim, _joined(watch, victim, at))

        # killed while the coordinator is inside the agreement check (the trainer's ComputeLogProbs, paused)
        victim.start()
        at = _works(watch, _joined(watch, victim, at))
        arm(trainer_faults, "logprobs", "pause")
        reached(trainer_faults, "logprobs")
        os.killpg(victim.proc.popen.pid, signal.SIGKILL)
        release(trainer_faults, "logprobs")
        left["agreement"] = at = _left(watch, victim, at)

        # and it comes back once more, serving the weights of the step it joins at
        victim.start()
        at = _works(watch, _joined(watch, victim, at))
        coord.StopRun(cpb.RunRef(run_id=run.run_id))
        watch.wait_for(lambda e: e.state == cpb.STOPPED, what="STOPPED", start=at)
    finally:
        watch.close()

    steps = watch.steps()
    assert sorted(steps) == list(range(1, max(steps) + 1)), "a step is missing or recorded twice"
    for step, m in steps.items():
        assert m["rollout/samples"] == SAMPLES, (step, m["rollout/samples"])   # no prompt lost or doubled
        assert m["rollout/policy_version"] == 2 * (step - 1), step                # every optimizer step once
        assert m["agreement/max_abs_diff"] < 1e-3, step                           # every replica in sync
        assert 2 <= m["sync/replicas"] <= 3 and m["rollout/replicas"] <= 3
    last = steps[max(steps)]
    assert last["rollout/left_total"] == 5 and last["rollout/joined_total"] == 6   # + the failed setup
    assert last["rollout/discarded_samples_total"] > 0, "the generate kill cut a group short"
    messages = [e.message for e in watch.events]
    assert sum(f"rollout replica joined: {victim.address}" in m for m in messages) == 6
    for phase, index in left.items():
        assert victim.address in watch.events[index].message, phase
    rollout = rollout_pb2_grpc.RolloutServiceStub(cluster.channel(victim.proc))
    trainer_stub = trainer_pb2_grpc.TrainerServiceStub(cluster.channel(trainer))
    assert rollout.GetInfo(pb.Empty()).policy_version == trainer_stub.GetInfo(pb.Empty()).step == 2 * max(steps)


def _joined(watch: RunWatcher, victim: Victim, start: int) -> int:
    return watch.message(f"rollout replica joined: {victim.address}", start=start, timeout=300)


def _left(watch: RunWatcher, victim: Victim, start: int) -> int:
    at = watch.message(f"rollout replica left: {victim.address}", start=start)
    assert victim.dead(), "the fault point did not fire: the replica left alive"
    return at


def _works(watch: RunWatcher, start: int) -> int:
    """The first step from `start` on that three replicas generated."""
    return watch.wait_for(lambda e: bool(e.metrics) and e.metrics["rollout/replicas"] == 3, start=start,
                          what="a step on three replicas")


def _wait_registered(coord, addresses: set[str], timeout: float = 120.0) -> None:
    import time
    deadline = time.time() + timeout
    while not addresses <= {w.address for w in coord.ListWorkers(pb.Empty()).workers}:
        assert time.time() < deadline, f"workers did not register: {addresses}"
        time.sleep(0.2)
