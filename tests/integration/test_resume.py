"""A run resumed from its checkpoint continues exactly: the same samples, rewards and losses as the
run that was never interrupted."""
import os

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlgrid.v1 import coordinator_pb2 as cpb
from services.common import batches
from services.common.batches import TrainSequence, make_micro_batch
from services.common.tensors import from_wire
from tests.integration.cluster import expect_rpc_error
from tests.integration.conftest import demo_overrides

pytestmark = pytest.mark.slow
SIZES = {"runtime_args.sample_per_episode": 32, "runtime_args.train_global_batch_size": 16}


def test_resumed_run_continues_exactly(services, toy, demo_yaml, tmp_path):
    coord = services.coord()
    whole = demo_overrides(toy, str(tmp_path / "a"), **SIZES, **{"runtime_args.num_episode": 4,
                                                                 "runtime_args.save_episode_interval": 2,
                                                                 "models.policy_trainer.save_hf": True})
    run = coord.StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=whole))
    info, events = services.run_to_end(run.run_id)
    assert info.state == cpb.FINISHED, info.error
    uninterrupted = {e.step: e.metrics for e in events if e.metrics}
    checkpoint = os.path.join(info.output_dir, "runs", run.run_id, "checkpoint-2")
    check_hf_export(services, os.path.join(info.output_dir, "runs", run.run_id, "checkpoint-4", "hf"))

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


def check_hf_export(services, hf_dir: str) -> None:
    """checkpoint-4/hf holds the trainer's final weights: transformers loads it and gives the
    trainer's logprobs."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert AutoTokenizer.from_pretrained(hf_dir)("echo a").input_ids
    seq = TrainSequence([5, 3], [4, 4, 6, 1], [-1.0] * 4, 0.0, 0)
    mb = make_micro_batch([seq], num_global_tokens=4, temperature=1.0)
    trainer = from_wire(services.trainer_stub().ComputeLogProbs(batches.to_proto(mb)).logprobs)
    with torch.no_grad():
        logits = model(mb.input_ids[None]).logits[0]
    ours = torch.log_softmax(logits, -1)[:-1].gather(-1, mb.input_ids[1:, None])[:, 0]
    torch.testing.assert_close(ours[1:], trainer[2:], atol=1e-5, rtol=0)   # response tokens
