"""A run resumed from its checkpoint continues exactly: the same samples, rewards and losses as the
run that was never interrupted."""
import os

import grpc
import pytest

from rlgrid.v1 import coordinator_pb2 as cpb
from tests.integration.cluster import expect_rpc_error
from tests.integration.conftest import demo_overrides

pytestmark = pytest.mark.slow
SIZES = {"runtime_args.sample_per_episode": 32, "runtime_args.train_global_batch_size": 16}


def test_resumed_run_continues_exactly(services, toy, demo_yaml, tmp_path):
    coord = services.coord()
    whole = demo_overrides(toy, str(tmp_path / "a"), **SIZES, **{"runtime_args.num_episode": 4,
                                                                 "runtime_args.save_episode_interval": 2})
    run = coord.StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=whole))
    info, events = services.run_to_end(run.run_id)
    assert info.state == cpb.FINISHED, info.error
    uninterrupted = {e.step: e.metrics for e in events if e.metrics}
    checkpoint = os.path.join(info.output_dir, "runs", run.run_id, "checkpoint-2")

    resumed_cfg = demo_overrides(toy, str(tmp_path / "b"), **SIZES, **{"runtime_args.num_episode": 4,
                                                                       "runtime_args.resume_from": checkpoint})
    run_b = coord.StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=resumed_cfg))
    info_b, events_b = services.run_to_end(run_b.run_id)
    assert info_b.state == cpb.FINISHED, info_b.error
    resumed = {e.step: e.metrics for e in events_b if e.metrics}
    assert sorted(resumed) == [3, 4], "a resumed run starts after the checkpoint's episode"
    for step in (3, 4):
        a, b = uninterrupted[step], resumed[step]
        assert b["rollout/policy_version"] == a["rollout/policy_version"] == 2 * (step - 1)
        assert b["reward/mean"] == a["reward/mean"] and b["response_length/mean"] == a["response_length/mean"]
        for key in ("train/loss", "train/grad_norm", "train/entropy"):
            assert abs(a[key] - b[key]) < 1e-5 * max(1.0, abs(a[key])), (step, key, a[key], b[key])


def test_resume_from_a_non_checkpoint_is_refused(services, toy, demo_yaml, tmp_path):
    bad = demo_overrides(toy, str(tmp_path), **{"runtime_args.resume_from": str(tmp_path)})
    expect_rpc_error(lambda: services.coord().StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=bad)),
                     grpc.StatusCode.INVALID_ARGUMENT, "runtime_args.resume_from")
