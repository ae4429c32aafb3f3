"""Every call between services has a deadline: a replica that stops answering (SIGSTOP) is dropped
within it, a trainer that stops answering fails the run within it; each with a message naming the
service and the key. Never a hang."""
import os
import signal
import time
from contextlib import contextmanager

import pytest

from rlgrid.v1 import coordinator_pb2 as cpb
from tests.integration.conftest import demo_overrides

pytestmark = pytest.mark.slow
DEADLINES = {"runtime_args.rpc_timeout_s.generate": 4, "runtime_args.rpc_timeout_s.train": 4,
             "runtime_args.rpc_timeout_s.logprobs": 4, "runtime_args.rpc_timeout_s.weight_sync": 6,
             "runtime_args.rpc_timeout_s.control": 2, "runtime_args.rpc_timeout_s.checkpoint": 6}
SLACK_S = 30   # a loaded 2-core CI machine: process wake-ups and retries on top of the deadline itself


@contextmanager
def stopped(proc):
    """The service process is frozen (SIGSTOP) inside the block: it accepts connections, answers nothing."""
    os.killpg(proc.popen.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(proc.popen.pid, signal.SIGCONT)


def watch_until_step(services, run_id: str, step: int):
    """Follows WatchRun until `step` is recorded; returns the open stream and the events so far."""
    stream = services.coord().WatchRun(cpb.WatchRunRequest(run_id=run_id), timeout=600)
    events = []
    for e in stream:
        events.append(e)
        assert e.state not in (cpb.FAILED, cpb.STOPPED), e.message
        if e.metrics and e.step >= step:
            return stream, events
    raise AssertionError(f"run ended before step {step}")


def test_a_hung_replica_is_dropped_within_the_deadline(services, toy, demo_yaml, tmp_path):
    overrides = demo_overrides(toy, str(tmp_path), **DEADLINES, **{"runtime_args.num_episode": 6})
    run = services.coord().StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=overrides))
    stream, events = watch_until_step(services, run.run_id, 2)
    hung = services.rollouts[1]
    with stopped(hung):
        start = time.monotonic()
        for e in stream:
            events.append(e)
            if e.metrics:   # the first step recorded after the hang: it waited at most one deadline
                assert time.monotonic() - start < 6 + 2 + SLACK_S
                break
        events += list(stream)
    info = services.coord().GetRun(cpb.RunRef(run_id=run.run_id))
    assert info.state == cpb.FINISHED, info.error
    messages = [e.message for e in events]
    named = [m for m in messages if f"rollout replica {hung.address} did not answer" in m]
    assert named and "runtime_args.rpc_timeout_s." in named[0], messages
    assert any(m.startswith(f"rollout replica left: {hung.address}") for m in messages), messages
    steps = [e.metrics for e in events if e.metrics]
    assert [m["rollout/replicas"] for m in steps[:2]] == [2, 2] and steps[-1]["rollout/replicas"] == 1
    assert all(m["agreement/max_abs_diff"] < 1e-3 for m in steps)
    services.wait_workers()   # it answers again and re-registers


def test_a_hung_trainer_fails_the_run_within_the_deadline(services, toy, demo_yaml, tmp_path):
    overrides = demo_overrides(toy, str(tmp_path), **DEADLINES, **{"runtime_args.num_episode": 50})
    run = services.coord().StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=overrides))
    stream, _ = watch_until_step(services, run.run_id, 1)
    with stopped(services.trainer):
        start = time.monotonic()
        events = list(stream)
        elapsed = time.monotonic() - start
    info = services.coord().GetRun(cpb.RunRef(run_id=run.run_id))
    assert info.state == cpb.FAILED and events[-1].state == cpb.FAILED
    # the longest deadline a step can wait on the trainer (weight sync), then an abort round to the replicas
    assert elapsed < 6 + 2 + SLACK_S, elapsed
    assert f"trainer {services.trainer.address} did not answer" in info.error, info.error
    assert "runtime_args.rpc_timeout_s." in info.error
    services.wait_workers()
