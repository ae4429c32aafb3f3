"""A run outlives its trainer and its coordinator. A run that never stopped is the reference; then
the same run once more with the trainer killed mid-step and restarted, and once more with the
coordinator and one of the two replicas killed mid-step and restarted. Each resumes from its last
checkpoint by itself, redoes the steps after it, and ends with the reference's samples and losses,
step for step, whichever replicas generate them: nothing is trained on twice in the run's history and
no episode is skipped."""
import json
import os
import signal
import time

import pytest

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import coordinator_pb2_grpc
from services.common.faults import FAULT_DIR_ENV
from services.coordinator.local import LocalCluster, Proc, free_port
from tests.integration.cluster import TEST_WORKER_SECRET
from tests.integration.conftest import demo_overrides
from tests.integration.watch import RunWatcher, arm, reached, release

pytestmark = pytest.mark.slow
EPISODES = 5
SETTINGS = {"runtime_args.num_episode": EPISODES, "runtime_args.sample_per_episode": 32,
            "runtime_args.train_global_batch_size": 16, "runtime_args.save_episode_interval": 2,
            "runtime_args.rpc_timeout_s.control": 5}
EXACT = ("reward/mean", "response_length/mean", "rollout/policy_version", "train/tokens")
CLOSE = ("train/loss", "train/grad_norm", "train/entropy", "train/pg_loss")


class Deployment:
    def __init__(self, root: str, roots: list[str]):
        self.cluster = LocalCluster(os.path.join(root, "logs"), roots=roots, worker_secret=TEST_WORKER_SECRET)
        self.state, self.faults = os.path.join(root, "state"), os.path.join(root, "faults-trainer")
        self.port, self.trainer_port = free_port(), free_port()
        self.coordinator = self.start_coordinator()
        self.trainer = self.start_trainer()
        self.rollouts = [self.start_rollout(i) for i in range(2)]
        for proc in [self.trainer, *self.rollouts]:
            self.cluster.wait_healthy(proc)

    def start_rollout(self, i: int) -> Proc:
        return self.cluster.start(f"rollout{i}", "services.rollout", "--coordinator", f"localhost:{self.port}",
                                  "--device", "cpu")

    def start_coordinator(self) -> Proc:
        proc = self.cluster.start("coordinator", "services.coordinator", "--state-dir", self.state, port=self.port)
        self.cluster.wait_healthy(proc)
        return proc

    def start_trainer(self) -> Proc:
        return self.cluster.start("trainer", "services.trainer", "--coordinator", f"localhost:{self.port}",
                                  "--device", "cpu", port=self.trainer_port, env={FAULT_DIR_ENV: self.faults})

    def coord(self):
        return coordinator_pb2_grpc.CoordinatorServiceStub(self.cluster.channel(self.coordinator))

    def wait_registered(self, timeout: float = 120.0) -> None:
        want = {self.trainer.address, *(r.address for r in self.rollouts)}
        deadline = time.time() + timeout
        while not want <= {w.address for w in self.coord().ListWorkers(pb.Empty()).workers}:
            assert time.time() < deadline, "workers did not register"
            time.sleep(0.2)

    def kill(self, proc: Proc) -> None:
        os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(timeout=30)
        self.cluster.stop(proc)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = Deployment(str(tmp_path_factory.mktemp("restarts")), [str(tmp_path_factory.getbasetemp())])
    try:
        d.wait_registered()
        yield d
    finally:
        d.cluster.stop_all()


@pytest.fixture(scope="module")
def reference(deployment, toy, demo_yaml, tmp_path_factory):
    """Per-step metrics of the run that never stopped."""
    run = deployment.coord().StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=demo_overrides(
        toy, str(tmp_path_factory.mktemp("reference")), **SETTINGS)))
    watch = RunWatcher(deployment.coord(), run.run_id)
    watch.wait_for(lambda e: e.state == cpb.FINISHED, what="FINISHED")
    return _history(deployment.coord().GetRun(cpb.RunRef(run_id=run.run_id)))


def test_a_restarted_trainer_resumes_the_run_from_its_last_checkpoint(deployment, reference, toy, demo_yaml, tmp_path):
    d = deployment
    run = d.coord().StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=demo_overrides(
        toy, str(tmp_path), **SETTINGS, **{"runtime_args.trainer_restarts": 1,
                                           "runtime_args.trainer_restart_wait_s": 300})))
    watch = RunWatcher(d.coord(), run.run_id)
    watch.step(3)
    arm(d.faults, "logprobs", "pause")   # step 4's agreement check: after checkpoint-2, before any training
    reached(d.faults, "logprobs")
    d.kill(d.trainer)
    d.trainer = d.start_trainer()        # the same service, restarted: it registers again
    lost = watch.message("trainer lost")
    assert "checkpoint-2 (episode 2); step 3 is redone" in watch.events[lost].message, watch.events[lost].message
    watch.message(f"trainer {d.trainer.address} registered: resuming the run on it", start=lost)
    end = watch.wait_for(lambda e: e.state in (cpb.FINISHED, cpb.FAILED), what="the end", start=lost)
    info = d.coord().GetRun(cpb.RunRef(run_id=run.run_id))
    assert watch.events[end].state == cpb.FINISHED, info.error
    assert [e.step for e in watch.events[lost:] if e.metrics] == [3, 4, 5]
    _assert_same(_history(info), reference)


def test_a_restarted_coordinator_resumes_its_running_run(deployment, reference, toy, demo_yaml, tmp_path):
    d = deployment
    d.wait_registered()
    run = d.coord().StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=demo_overrides(
        toy, str(tmp_path), **SETTINGS)))
    watch = RunWatcher(d.coord(), run.run_id)
    watch.step(3)
    arm(d.faults, "logprobs", "pause")   # the coordinator dies inside step 4, and a replica with it
    reached(d.faults, "logprobs")
    d.kill(d.coordinator)
    d.kill(d.rollouts[1])
    release(d.faults, "logprobs")
    d.coordinator = d.start_coordinator()   # same port and state dir; the workers register again
    info = d.coord().GetRun(cpb.RunRef(run_id=run.run_id))
    assert info.state in (cpb.PENDING, cpb.RUNNING, cpb.FINISHED) and not info.error, info
    watch = RunWatcher(d.coord(), run.run_id)
    resumed = watch.message("the coordinator restarted: the run resumes from")
    assert "checkpoint-2 (episode 2)" in watch.events[resumed].message
    # the redone steps start on one replica and the other joins on the way: samples follow the prompt,
    # not the replica, so they are still the reference's
    d.rollouts[1] = d.start_rollout(1)
    end = watch.wait_for(lambda e: e.state in (cpb.FINISHED, cpb.FAILED), what="the end", start=resumed)
    info = d.coord().GetRun(cpb.RunRef(run_id=run.run_id))
    assert watch.events[end].state == cpb.FINISHED, info.error
    assert [e.step for e in watch.events[resumed:] if e.metrics] == [3, 4, 5]
    _assert_same(_history(info), reference)


def _history(info: cpb.RunInfo) -> dict[int, dict]:
    """metrics.jsonl of a run: one record per step, as the run's history keeps them."""
    with open(os.path.join(info.output_dir, "runs", info.run_id, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(1, EPISODES + 1)), "a step is missing or recorded twice"
    return {r["step"]: r for r in rows}


def _assert_same(history: dict[int, dict], reference: dict[int, dict]) -> None:
    for step, want in reference.items():
        got = history[step]
        for key in EXACT:
            assert got[key] == want[key], (step, key, got[key], want[key])
        for key in CLOSE:
            assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), (step, key, got[key], want[key])
