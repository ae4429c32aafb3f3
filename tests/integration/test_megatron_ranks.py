"""backend=megatron on two trainer ranks (torchrun, gloo): TP=2 with sequence parallelism, EP=2 and
PP=2 (megatron's 1F1B schedule over gloo point-to-point) train like one rank; a checkpoint saved at TP=2
(EP=2, PP=2) resumes at TP=1 (EP=1, PP=1), and one saved at PP=1 at PP=2; the weight sync of a PP=2
trainer (each stage's layers sent to rank 0) delivers the one-rank trainer's tensors; a GRPO run with a
TP=2 trainer and the built-in rollout engine, weights synced from the shards every step.

fp32 throughout. Before training the layouts agree to 1e-6; after steps to 1e-4 (a TP split sums the
matmuls' partial products in another order, ~1e-7, and AdamW at lr 0.01 on a random-init model
amplifies such differences in small gradients)."""
import json
import os
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import coordinator_pb2_grpc, trainer_pb2_grpc
from rlgrid.v1 import trainer_pb2 as tpb
from services.common import batches, weight_sync
from services.common.config import config_to_yaml, load_config
from services.common.tensors import from_wire
from services.common.tiny_model import build_tiny_model
from services.coordinator.local import LocalCluster
from tests.conftest import TINY_WORDS
from tests.integration.cluster import TEST_WORKER_SECRET
from tests.integration.conftest import demo_overrides
from tests.integration.test_trainer_ranks import _step

pytestmark = pytest.mark.slow
MEGATRON = "models.policy_trainer.backend=megatron"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("megatron-ranks")
    cluster = LocalCluster(str(d / "logs"), roots=[str(tmp_path_factory.getbasetemp())],
                           worker_secret=TEST_WORKER_SECRET)
    coord, trainer2, _ = cluster.deploy(str(d / "state"), trainer_nproc=2)
    trainer1 = cluster.start("trainer-1rank", "services.trainer", "--device", "cpu")   # not registered
    cluster.wait_healthy(trainer1)
    stubs = [trainer_pb2_grpc.TrainerServiceStub(cluster.channel(p)) for p in (trainer1, trainer2)]
    yield {"coord": coord, "stubs": stubs, "dir": d, "trainer": trainer2, "cluster": cluster}
    cluster.stop_all()


def _setup(stub, run_id: str, overrides: list[str]):
    return stub.Setup(pb.SetupRequest(run_id=run_id, config_yaml=config_to_yaml(load_config(overrides=overrides))))


def _logprobs(stub, probe) -> torch.Tensor:
    return from_wire(stub.ComputeLogProbs(probe).logprobs)


def _version(stub) -> int:
    """The trainer's step: the policy version its next samples must carry."""
    return stub.GetInfo(pb.Empty()).step


def _train_alike(stubs, seeds, keys=("loss", "pg_loss", "kl", "entropy", "grad_norm")):
    for seed in seeds:
        version = _version(stubs[0])
        step = [batches.to_proto(mb) for mb in _step(seed, version=version)]
        one, two = (dict(s.Train(iter(step)).values) for s in stubs)
        assert two["ranks"] == 2
        tol = 1e-5 if version == 0 else 1e-4   # the docstring's bounds: untrained, then after AdamW steps
        for key in keys:
            assert abs(one[key] - two[key]) < tol * max(1.0, abs(one[key])), (seed, key, one[key], two[key])
    return one


def _reshard_to_one_rank(ranks, stubs, probe, name: str) -> None:
    """Saved by the two-rank layout, loaded by the one-rank trainer after it drifted: same weights, and
    the optimizer state came along (the next step is the same on both)."""
    path = str(ranks["dir"] / name)
    stubs[1].SaveCheckpoint(tpb.CheckpointRequest(path=path, extra_json='{"episode": 3}'))
    saved = _logprobs(stubs[1], probe)
    stubs[0].Train(iter([batches.to_proto(mb) for mb in _step(31, version=_version(stubs[0]))]))
    assert (_logprobs(stubs[0], probe) - saved).abs().max() > 1e-3
    loaded = stubs[0].LoadCheckpoint(tpb.CheckpointRequest(path=path))
    assert json.loads(loaded.extra_json) == {"episode": 3}
    torch.testing.assert_close(_logprobs(stubs[0], probe), saved, atol=1e-6, rtol=0)
    _train_alike(stubs, [32], keys=("loss", "grad_norm"))
    torch.testing.assert_close(*(_logprobs(s, probe) for s in stubs), atol=1e-4, rtol=0)


def test_tp2_with_sequence_parallel_trains_like_one_rank_and_resumes_at_tp1(ranks, toy):
    stubs = ranks["stubs"]
    base = [f"models.policy.load={toy['model']}", MEGATRON, "models.policy_trainer.optimizer.lr=0.01",
            "models.policy_trainer.optimizer.weight_decay=0.0", "models.policy_trainer.kl_coef=0.1"]
    assert _setup(stubs[0], "tp1", base).world_size == 1
    info = _setup(stubs[1], "tp2", base + ["models.policy_trainer.tensor_model_parallel_size=2",
                                           "models.policy_trainer.sequence_parallel=True"])
    assert info.world_size == 2 and info.backend == "megatron"
    probe = batches.to_proto(_step(99)[0])
    before = [_logprobs(s, probe) for s in stubs]
    torch.testing.assert_close(before[0], before[1], atol=1e-6, rtol=0)   # the same seeded init, sharded
    last = _train_alike(stubs, [1, 2])
    assert last["kl"] > 0
    after = [_logprobs(s, probe) for s in stubs]
    assert (after[0] - before[0]).abs().max() > 1e-3
    torch.testing.assert_close(after[0], after[1], atol=1e-4, rtol=0)
    _reshard_to_one_rank(ranks, stubs, probe, "ckpt-tp2")


def test_ep2_trains_like_one_rank_and_resumes_at_ep1(ranks, tmp_path):
    """Qwen3-MoE with its experts dealt to two ranks (each rank a data-parallel replica of the rest), with
    grouped-GEMM experts, against one rank with the per-expert loop."""
    stubs = ranks["stubs"]
    moe = build_tiny_model(str(tmp_path / "moe"), TINY_WORDS, arch="qwen3_moe", seed=3)
    base = [f"models.policy.load={moe}", MEGATRON, "models.policy_trainer.optimizer.lr=0.01",
            "models.policy_trainer.optimizer.weight_decay=0.0", "models.policy_trainer.kl_coef=0.1"]
    _setup(stubs[0], "ep1", base)
    _setup(stubs[1], "ep2", base + ["models.policy_trainer.expert_model_parallel_size=2",
                                    "models.policy_trainer.groupgemm=True"])
    probe = batches.to_proto(_step(98)[0])
    torch.testing.assert_close(*(_logprobs(s, probe) for s in stubs), atol=1e-6, rtol=0)
    _train_alike(stubs, [7, 8])
    torch.testing.assert_close(*(_logprobs(s, probe) for s in stubs), atol=1e-4, rtol=0)
    _reshard_to_one_rank(ranks, stubs, probe, "ckpt-ep2")


def _received(stub) -> list[tuple[str, torch.Tensor]]:
    """What a weight-sync receiver (this process, rank 1 of a gloo group) gets from the trainer's SendWeights."""
    rendezvous = weight_sync.Rendezvous("127.0.0.1", bind_host="127.0.0.1")
    plan = pb.WeightSyncPlan(group_id=rendezvous.new_group_id(), transport="broadcast", backend="gloo",
                             rendezvous_host="127.0.0.1", rendezvous_port=rendezvous.port, world_size=2, rank=1,
                             params=stub.GetInfo(pb.Empty()).params, bucket_bytes=1 << 12, timeout_s=60,
                             secret=rendezvous.new_secret())
    joined: dict = {}
    thread = threading.Thread(target=lambda: joined.update(t=weight_sync.connect(plan, torch.device("cpu"))))
    thread.start()
    sender = pb.WeightSyncPlan()
    sender.CopyFrom(plan)
    sender.rank = 0
    stub.PrepareWeightSync(sender)
    thread.join(timeout=60)
    transport, got = joined["t"], []
    thread = threading.Thread(target=lambda: got.extend((n, t.clone()) for n, t in transport.receive()))
    thread.start()
    stub.SendWeights(pb.WeightSyncRequest(group_id=plan.group_id, version=1))
    thread.join(timeout=60)
    transport.close()
    assert [n for n, _ in got] == [p.name for p in plan.params]
    return got


def _synced_alike(stubs, atol: float) -> None:
    one, two = (_received(s) for s in stubs)
    assert [n for n, _ in two] == [n for n, _ in one]
    for (name, a), (_, b) in zip(one, two):
        torch.testing.assert_close(b, a, atol=atol, rtol=0, msg=name)


def test_pp2_trains_like_one_rank_syncs_its_stages_and_resumes_at_pp1(ranks, toy):
    """Two pipeline stages (one layer each; 1F1B over five packed micro-batches, KL and entropy in the loss)
    against one rank: metrics, logprobs, the weights a receiver gets; then checkpoints across PP sizes."""
    stubs = ranks["stubs"]
    base = [f"models.policy.load={toy['model']}", MEGATRON, "models.policy_trainer.optimizer.lr=0.01",
            "models.policy_trainer.optimizer.weight_decay=0.0", "models.policy_trainer.kl_coef=0.1",
            "models.policy_trainer.entropy_coef=0.01"]
    _setup(stubs[0], "pp1", base)
    _setup(stubs[1], "pp2", base + ["models.policy_trainer.pipeline_model_parallel_size=2"])
    _synced_alike(stubs, atol=0)   # the same weights, every stage's layers under their global names
    probe = batches.to_proto(_step(97)[0])
    before = [_logprobs(s, probe) for s in stubs]
    torch.testing.assert_close(before[0], before[1], atol=1e-6, rtol=0)
    last = _train_alike(stubs, [3, 4], keys=("loss", "pg_loss", "kl", "entropy", "grad_norm", "micro_batches"))
    assert last["kl"] > 0 and last["micro_batches"] == 5
    after = [_logprobs(s, probe) for s in stubs]
    assert (after[0] - before[0]).abs().max() > 1e-3
    torch.testing.assert_close(after[0], after[1], atol=1e-4, rtol=0)
    _synced_alike(stubs, atol=1e-4)
    # ExportHF at PP=2: a directory transformers loads, with the trainer's weights
    hf_dir = str(ranks["dir"] / "hf-pp2")
    stubs[1].ExportHF(tpb.CheckpointRequest(path=hf_dir))
    _assert_hf_matches(hf_dir, stubs[1])
    _reshard_to_one_rank(ranks, stubs, probe, "ckpt-pp2")
    # and back: a one-rank checkpoint resumes on the two stages
    path = str(ranks["dir"] / "ckpt-pp1")
    stubs[0].SaveCheckpoint(tpb.CheckpointRequest(path=path, extra_json="{}"))
    stubs[1].LoadCheckpoint(tpb.CheckpointRequest(path=path))
    torch.testing.assert_close(*(_logprobs(s, probe) for s in stubs), atol=1e-6, rtol=0)
    _train_alike(stubs, [33], keys=("loss", "grad_norm"))


def test_pp2_with_qwen3_moe_trains_like_one_rank(ranks, tmp_path):
    """Qwen3-MoE split into two stages (its experts whole on each), against one rank."""
    stubs = ranks["stubs"]
    moe = build_tiny_model(str(tmp_path / "moe"), TINY_WORDS, arch="qwen3_moe", seed=4)
    base = [f"models.policy.load={moe}", MEGATRON, "models.policy_trainer.optimizer.lr=0.01",
            "models.policy_trainer.optimizer.weight_decay=0.0", "models.policy_trainer.kl_coef=0.1"]
    _setup(stubs[0], "moe-pp1", base)
    _setup(stubs[1], "moe-pp2", base + ["models.policy_trainer.pipeline_model_parallel_size=2"])
    probe = batches.to_proto(_step(96)[0])
    torch.testing.assert_close(*(_logprobs(s, probe) for s in stubs), atol=1e-6, rtol=0)
    _train_alike(stubs, [5, 6])
    torch.testing.assert_close(*(_logprobs(s, probe) for s in stubs), atol=1e-4, rtol=0)
    _synced_alike(stubs, atol=1e-4)   # experts fused per layer, as transformers holds them


def test_grpo_run_with_a_tp2_megatron_trainer(ranks, toy, demo_yaml):
    coord = coordinator_pb2_grpc.CoordinatorServiceStub(ranks["cluster"].channel(ranks["coord"]))
    overrides = demo_overrides(toy, str(ranks["dir"] / "out"), **{
        "runtime_args.num_episode": 2, "runtime_args.sample_per_episode": 32, "runtime_args.train_global_batch_size": 16,
        "models.policy_trainer.backend": "megatron", "models.policy_trainer.tensor_model_parallel_size": 2,
        "runtime_args.save_episode_interval": 2, "models.policy_trainer.save_hf": True})
    run = coord.StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=overrides))
    events = list(coord.WatchRun(cpb.WatchRunRequest(run_id=run.run_id), timeout=300))
    info = coord.GetRun(cpb.RunRef(run_id=run.run_id))
    assert info.state == cpb.FINISHED, info.error
    steps = [e.metrics for e in events if e.metrics]
    assert [m["rollout/policy_version"] for m in steps] == [0, 2]
    assert all(m["train/ranks"] == 2 for m in steps)
    for m in steps:   # the replica serves exactly what the TP shards hold, after every sync
        assert m["agreement/max_abs_diff"] < 1e-3, m["agreement/max_abs_diff"]
        for key in ("train/loss", "train/kl", "train/entropy", "train/grad_norm", "sync/bytes"):
            assert key in m, key
    # save_hf on this backend: the checkpoint's hf/ is a directory transformers loads, in the final weights
    _assert_hf_matches(os.path.join(info.output_dir, "runs", run.run_id, "checkpoint-2", "hf"),
                       trainer_pb2_grpc.TrainerServiceStub(ranks["cluster"].channel(ranks["trainer"])))


def _assert_hf_matches(hf_dir: str, stub) -> None:
    """`hf_dir` is a directory transformers loads, whose logprobs are the trainer's."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    assert model.config.model_type == "qwen3"
    probe = batches.make_micro_batch([batches.TrainSequence([5, 3], [4, 4, 6, 1], [-1.0] * 4, 0.0, 0)],
                                     num_global_tokens=4, temperature=1.0)
    trainer = _logprobs(stub, batches.to_proto(probe))
    with torch.no_grad():
        logits = model(probe.input_ids[None]).logits[0]
    ours = torch.log_softmax(logits, -1)[:-1].gather(-1, probe.input_ids[1:, None])[:, 0]
    torch.testing.assert_close(ours, trainer[1:], atol=1e-5, rtol=0)
