"""One trainer service on two ranks (torchrun, FSDP2 over gloo): the same step as one rank, and a
GRPO run whose weights reach the rollout replica from the sharded model."""
import json

import pytest
import torch

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import coordinator_pb2_grpc, trainer_pb2_grpc
from rlgrid.v1 import trainer_pb2 as tpb
from services.common import batches
from services.common.batches import TrainSequence
from services.common.config import config_to_yaml, load_config
from services.common.tensors import from_wire
from services.common.tiny_model import build_tiny_model
from services.coordinator.local import LocalCluster
from tests.conftest import TINY_WORDS
from tests.integration.cluster import TEST_WORKER_SECRET
from tests.integration.conftest import demo_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory):
    d = tmp_path_factory.mktemp("ranks")
    cluster = LocalCluster(str(d / "logs"), roots=[str(tmp_path_factory.getbasetemp())],
                           worker_secret=TEST_WORKER_SECRET)
    coord, trainer2, _ = cluster.deploy(str(d / "state"), trainer_nproc=2)
    trainer1 = cluster.start("trainer-1rank", "services.trainer", "--device", "cpu")   # not registered
    cluster.wait_healthy(trainer1)
    yield {"coord": coord, "trainer2": trainer2, "trainer1": trainer1, "dir": d, "cluster": cluster}
    cluster.stop_all()


def _step(seed: int, padded: bool = False) -> list[batches.MicroBatch]:
    """Five micro-batches (odd, so one rank gets a zero-loss filler) of random sequences."""
    g = torch.Generator().manual_seed(seed)
    seqs = [TrainSequence(torch.randint(3, 15, (3,), generator=g).tolist(),
                          torch.randint(3, 15, (int(torch.randint(2, 8, (), generator=g)),), generator=g).tolist(),
                          (-torch.rand(8, generator=g) - 1).tolist(), float(torch.randn((), generator=g)), 0)
            for _ in range(10)]
    for s in seqs:
        s.response_logprobs = s.response_logprobs[: len(s.response_ids)]
    total = sum(len(s.response_ids) for s in seqs)
    return [batches.make_micro_batch(seqs[i: i + 2], num_global_tokens=total, temperature=1.0, padded=padded)
            for i in range(0, 10, 2)]


def test_two_ranks_train_like_one(two_rank, toy):
    cfg = load_config(overrides=[f"models.policy.load={toy['model']}", "models.policy_trainer.optimizer.lr=0.01",
                                 "models.policy_trainer.optimizer.weight_decay=0.0"])
    setup = pb.SetupRequest(run_id="equivalence", config_yaml=config_to_yaml(cfg))
    stubs = [trainer_pb2_grpc.TrainerServiceStub(two_rank["cluster"].channel(two_rank[k])) for k in ("trainer1", "trainer2")]
    infos = [s.Setup(setup) for s in stubs]
    assert [i.world_size for i in infos] == [1, 2]
    probe = batches.to_proto(_step(99)[0])
    before = [from_wire(s.ComputeLogProbs(probe).logprobs) for s in stubs]
    torch.testing.assert_close(before[0], before[1], atol=1e-6, rtol=0)   # same seeded init
    for seed, padded in ((1, False), (2, True)):   # packed rows, then padded micro-batches (packing=False)
        step = [batches.to_proto(mb) for mb in _step(seed, padded)]
        one, two = (dict(s.Train(iter(step)).values) for s in stubs)
        assert two["ranks"] == 2 and two["micro_batches"] == 6 and one["micro_batches"] == 5   # + one filler
        for key in ("loss", "pg_loss", "entropy", "grad_norm"):
            assert abs(one[key] - two[key]) < 1e-5 * max(1.0, abs(one[key])), (key, one[key], two[key])
    after = [from_wire(s.ComputeLogProbs(probe).logprobs) for s in stubs]
    assert (after[0] - before[0]).abs().max() > 1e-3, "the steps moved the weights"
    torch.testing.assert_close(after[0], after[1], atol=1e-5, rtol=0)

    # DCP reshards: saved by the 2-rank trainer, loaded by the 1-rank one (after it drifted away)
    path = str(two_rank["dir"] / "ckpt-2ranks")
    stubs[1].SaveCheckpoint(tpb.CheckpointRequest(path=path, extra_json='{"episode": 7}'))
    stubs[0].Train(iter([batches.to_proto(mb) for mb in _step(3)]))
    drifted = from_wire(stubs[0].ComputeLogProbs(probe).logprobs)
    assert (drifted - after[1]).abs().max() > 1e-3
    loaded = stubs[0].LoadCheckpoint(tpb.CheckpointRequest(path=path))
    assert loaded.step == 2 and json.loads(loaded.extra_json) == {"episode": 7}
    torch.testing.assert_close(from_wire(stubs[0].ComputeLogProbs(probe).logprobs), after[1], atol=1e-6, rtol=0)
    # and the optimizer state came along: the next step is the same on both
    step = [batches.to_proto(mb) for mb in _step(4)]
    one, two = (dict(s.Train(iter(step)).values) for s in stubs)
    assert abs(one["grad_norm"] - two["grad_norm"]) < 1e-5 * max(1.0, two["grad_norm"])
    torch.testing.assert_close(*(from_wire(s.ComputeLogProbs(probe).logprobs) for s in stubs), atol=1e-5, rtol=0)


def test_meta_init_and_groupgemm_on_two_ranks(two_rank, tmp_path):
    """A Qwen3-MoE loaded by meta_init on two ranks (each reads only its experts' rows) with GroupGEMM
    and a KL reference equals the plain full load with the per-expert loop on one rank."""
    moe = build_tiny_model(str(tmp_path / "moe"), TINY_WORDS, arch="qwen3_moe", seed=3)
    base = [f"models.policy.load={moe}", "models.policy_trainer.optimizer.lr=0.01", "models.policy_trainer.kl_coef=0.1",
            "models.policy_trainer.optimizer.weight_decay=0.0"]
    stubs = [trainer_pb2_grpc.TrainerServiceStub(two_rank["cluster"].channel(two_rank[k])) for k in ("trainer1", "trainer2")]
    stubs[0].Setup(pb.SetupRequest(run_id="full-load", config_yaml=config_to_yaml(load_config(overrides=base))))
    meta = load_config(overrides=base + ["models.policy_trainer.meta_init=True", "models.policy_trainer.groupgemm=True"])
    stubs[1].Setup(pb.SetupRequest(run_id="meta-init", config_yaml=config_to_yaml(meta)))
    probe = batches.to_proto(_step(98)[0])
    torch.testing.assert_close(*(from_wire(s.ComputeLogProbs(probe).logprobs) for s in stubs), atol=1e-5, rtol=0)
    for seed in (7, 8):   # the second step sees a policy that moved away from the reference
        step = [batches.to_proto(mb) for mb in _step(seed)]
        one, two = (dict(s.Train(iter(step)).values) for s in stubs)
        for key in ("loss", "kl", "grad_norm"):
            assert abs(one[key] - two[key]) < 1e-5 * max(1.0, abs(one[key])), (key, one[key], two[key])
    assert one["kl"] > 1e-6


def test_grpo_run_on_a_two_rank_trainer(two_rank, toy, demo_yaml):
    coord = coordinator_pb2_grpc.CoordinatorServiceStub(two_rank["cluster"].channel(two_rank["coord"]))
    overrides = demo_overrides(toy, str(two_rank["dir"] / "out"), **{"runtime_args.num_episode": 3,
                                                                      "runtime_args.sample_per_episode": 32,
                                                                      "runtime_args.train_global_batch_size": 16})
    run = coord.StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=overrides))
    events = list(coord.WatchRun(cpb.WatchRunRequest(run_id=run.run_id), timeout=300))
    info = coord.GetRun(cpb.RunRef(run_id=run.run_id))
    assert info.state == cpb.FINISHED, info.error
    steps = [e.metrics for e in events if e.metrics]
    assert all(m["train/ranks"] == 2 for m in steps)
    # the replica serves exactly what the sharded trainer holds
    assert all(m["agreement/max_abs_diff"] < 1e-3 for m in steps), [m["agreement/max_abs_diff"] for m in steps]
    assert [m["rollout/policy_version"] for m in steps] == [0, 2, 4]
