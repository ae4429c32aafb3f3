"""Several hosts, for real, on one machine: each service in its own network namespace with its own
address on a bridge (tests/integration/netns.py), started from docker/compose.cpu.yaml as its
containers run (the launcher adds --advertise with the namespace's address, every service binds
0.0.0.0 with the auth token, weights go over gloo on each namespace's eth0). Links are cut mid-step
and restored. Skipped, with the reason, where this machine allows no network namespaces."""
import json
import os
import time

import pytest

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import coordinator_pb2_grpc
from services.common.faults import FAULT_DIR_ENV
from services.common.rpc import make_channel
from tests.integration import netns
from tests.integration.watch import RunWatcher, arm, reached, release

pytestmark = pytest.mark.slow
TOKEN = "hosts-test-token"
SAMPLES = 32
SLACK_S = 30   # process wake-ups and retries on a loaded 2-core machine, on top of a deadline
DEADLINES = {"runtime_args.rpc_timeout_s.generate": 10, "runtime_args.rpc_timeout_s.train": 10,
             "runtime_args.rpc_timeout_s.logprobs": 10, "runtime_args.rpc_timeout_s.weight_sync": 10,
             "runtime_args.rpc_timeout_s.checkpoint": 20, "runtime_args.rpc_timeout_s.control": 3,
             "runtime_args.rpc_timeout_s.setup": 60}
RUN = {"runtime_args.sample_per_episode": SAMPLES, "runtime_args.train_global_batch_size": 16, **DEADLINES}


class Deployment:
    def __init__(self, project: netns.ComposeProject, workdir: str):
        self.project, self.hosts = project, project.hosts
        self.coordinator = project.up("coordinator")
        project.wait_serving(self.coordinator, 50050)
        self.faults = {}
        self.trainer = self.up("trainer", workdir)
        self.rollouts = [self.up("rollout", workdir) for _ in range(2)]   # docker compose --scale rollout=2
        for host, port in [(self.trainer, 50051), *[(r, 50052) for r in self.rollouts]]:
            project.wait_serving(host, port)
        self.address = {self.trainer.name: f"{self.trainer.ip}:50051",
                        **{r.name: f"{r.ip}:50052" for r in self.rollouts}}
        self.wait_registered(set(self.address.values()))

    def up(self, service: str, workdir: str) -> netns.Host:
        faults = os.path.join(workdir, f"faults-{service}-{len(self.faults)}")
        host = self.project.up(service, env={FAULT_DIR_ENV: faults})   # test-only: fault points armed by tests
        self.faults[host.name] = faults
        return host

    def coord(self):
        return coordinator_pb2_grpc.CoordinatorServiceStub(make_channel(f"{self.coordinator.ip}:50050",
                                                                        auth_token=TOKEN))

    def wait_registered(self, addresses: set[str], timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not addresses <= {w.address for w in self.coord().ListWorkers(pb.Empty()).workers}:
            assert time.monotonic() < deadline, f"not registered: {addresses}"
            time.sleep(0.5)

    def start_run(self, **overrides) -> tuple[cpb.RunInfo, RunWatcher]:
        run = self.coord().StartRun(cpb.StartRunRequest(
            config_path="configs/demo_cpu.yaml", overrides=[f"{k}={v}" for k, v in {**RUN, **overrides}.items()]))
        return run, RunWatcher(self.coord(), run.run_id)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"no network namespaces on this machine: {reason}")
    workdir = str(tmp_path_factory.mktemp("hosts"))
    hosts = netns.Hosts(os.path.join(workdir, "logs"))
    try:
        project = netns.ComposeProject(hosts, workdir, env={"RLGRID_AUTH_TOKEN": TOKEN})
        yield Deployment(project, workdir)
    finally:
        hosts.close()


def test_the_cpu_compose_demo_runs_across_hosts(deployment):
    """compose.cpu.yaml's demo container, on a host of its own, runs the demo on the others."""
    d = deployment
    workers = {w.address: w for w in d.coord().ListWorkers(pb.Empty()).workers}
    ips = {address.split(":")[0] for address in workers}
    assert len(ips) == 3 and all(ip.startswith(d.hosts.subnet + ".") for ip in ips), workers   # one host each
    demo = d.project.up("demo", extra=["runtime_args.num_episode=4"])
    proc = demo.procs[0]
    proc.wait(timeout=900)
    log = d.project.log_tail(demo, 200)
    assert "summary: mean training reward" in log, log
    run_id = log.split("run ", 1)[1].split(":", 1)[0]
    info = d.coord().GetRun(cpb.RunRef(run_id=run_id))
    assert info.state == cpb.FINISHED, info.error
    assert info.output_dir.startswith(d.project.mounts["/output"]), "the run's outputs went to the /output volume"
    with open(os.path.join(info.output_dir, "runs", run_id, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    for s in steps:   # both replicas generated, on weights that came over gloo between the namespaces
        assert s["rollout/replicas"] == 2 and s["sync/replicas"] == 2 and s["sync/bytes"] > 0
        assert s["agreement/max_abs_diff"] < 1e-3


def test_a_replica_cut_off_mid_step_is_dropped_and_rejoins_when_its_link_returns(deployment):
    d = deployment
    victim = d.rollouts[1]
    address = d.address[victim.name]
    run, watch = d.start_run(**{"runtime_args.num_episode": 100000})
    try:
        at = watch.step(2)
        arm(d.faults[victim.name], "generate", "pause")   # inside its next Generate, one sample out
        reached(d.faults[victim.name], "generate")
        d.hosts.cut(victim)
        cut = time.monotonic()
        release(d.faults[victim.name], "generate")
        left = watch.message(f"rollout replica left: {address}", start=at)
        dropped_after = time.monotonic() - cut
        assert dropped_after < DEADLINES["runtime_args.rpc_timeout_s.generate"] + SLACK_S, dropped_after
        assert "runtime_args.rpc_timeout_s.generate" in watch.events[left].message
        finished = watch.wait_for(lambda e: bool(e.metrics), start=left, what="the step it was cut in")
        assert watch.events[finished].metrics["rollout/replicas"] == 1   # completed on the other replica

        d.hosts.restore(victim)   # it registers again, is set up and joins with the current weights
        joined = watch.message(f"rollout replica joined: {address}", start=finished, timeout=180)
        back = watch.wait_for(lambda e: bool(e.metrics) and e.metrics["rollout/replicas"] == 2, start=joined,
                              what="a step on both replicas again")
        assert watch.events[back].metrics["agreement/max_abs_diff"] < 1e-3
        d.coord().StopRun(cpb.RunRef(run_id=run.run_id))
        watch.wait_for(lambda e: e.state == cpb.STOPPED, start=back, what="STOPPED")
    finally:
        d.hosts.restore(victim)
        watch.close()
    steps = watch.steps()
    assert sorted(steps) == list(range(1, max(steps) + 1))
    for step, m in steps.items():   # no prompt lost or trained twice, every optimizer step once
        assert m["rollout/samples"] == SAMPLES and m["rollout/policy_version"] == 2 * (step - 1), step
        assert m["agreement/max_abs_diff"] < 1e-3, step
    assert steps[max(steps)]["rollout/discarded_samples_total"] >= 1   # the sample it sent before the cut
    d.wait_registered(set(d.address.values()))


def test_a_trainer_cut_off_fails_the_run_within_its_deadline(deployment):
    d = deployment
    run, watch = d.start_run(**{"runtime_args.num_episode": 100000})
    try:
        at = watch.step(2)
        d.hosts.cut(d.trainer)
        cut = time.monotonic()
        end = watch.wait_for(lambda e: e.state in (cpb.FAILED, cpb.FINISHED, cpb.STOPPED), start=at,
                             what="the run's end", timeout=300)
        elapsed = time.monotonic() - cut
    finally:
        d.hosts.restore(d.trainer)
        watch.close()
    info = d.coord().GetRun(cpb.RunRef(run_id=run.run_id))
    assert info.state == cpb.FAILED and watch.events[end].state == cpb.FAILED
    # the longest deadline a step waits on the trainer, then a probe of it
    assert elapsed < 10 + 3 + SLACK_S, elapsed
    assert f"trainer {d.address[d.trainer.name]} did not answer" in info.error, info.error
    assert "runtime_args.rpc_timeout_s." in info.error
    d.wait_registered(set(d.address.values()))


def test_a_trainer_cut_off_and_back_resumes_the_run_from_its_checkpoint(deployment):
    """With runtime_args.trainer_restarts the run waits for its trainer, named in an event, instead of
    failing; once the link is back the trainer registers again and the run resumes from its checkpoint."""
    d = deployment
    run, watch = d.start_run(**{"runtime_args.num_episode": 6, "runtime_args.save_episode_interval": 2,
                                "runtime_args.trainer_restarts": 1, "runtime_args.trainer_restart_wait_s": 240})
    try:
        at = watch.step(3)
        d.hosts.cut(d.trainer)
        lost = watch.message("trainer lost", start=at, timeout=120)
        assert "checkpoint-2 (episode 2)" in watch.events[lost].message, watch.events[lost].message
        assert d.coord().GetRun(cpb.RunRef(run_id=run.run_id)).state == cpb.RUNNING
        d.hosts.restore(d.trainer)
        watch.message(f"trainer {d.address[d.trainer.name]} registered: resuming", start=lost, timeout=180)
        end = watch.wait_for(lambda e: e.state in (cpb.FINISHED, cpb.FAILED), start=lost, what="the end")
    finally:
        d.hosts.restore(d.trainer)
        watch.close()
    info = d.coord().GetRun(cpb.RunRef(run_id=run.run_id))
    assert watch.events[end].state == cpb.FINISHED, info.error
    with open(os.path.join(info.output_dir, "runs", run.run_id, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    assert [s["rollout/policy_version"] for s in steps] == [0, 2, 4, 6, 8, 10]

