"""GRPO end to end with models.policy.engine=vllm: real coordinator, trainer and a vLLM rollout
service as processes; then bad input against that service; then the same run with the Megatron-core
trainer, whose weights reach vLLM through the same sync."""
import json
import os

import grpc
import pytest

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import coordinator_pb2_grpc, rollout_pb2_grpc, trainer_pb2_grpc
from rlgrid.v1 import rollout_pb2 as rpb
from services.common.config import config_to_yaml, load_config
from services.common.tensors import ids_to_wire
from services.common.tiny_model import build_tiny_model
from services.coordinator.data import make_toy_dataset, toy_vocabulary
from services.coordinator.local import ROOT, LocalCluster
from tests.integration.cluster import TEST_WORKER_SECRET, expect_rpc_error

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm-e2e")
    cluster = LocalCluster(str(d / "logs"), roots=[str(d)], worker_secret=TEST_WORKER_SECRET)
    coord, trainer, (rollout,) = cluster.deploy(str(d / "state"), rollout_env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    model = build_tiny_model(str(d / "model"), toy_vocabulary(), hidden=128, heads=2, kv_heads=1, head_dim=64,
                             intermediate=256, seed=0)   # vLLM loads weights, so the directory has them
    data = make_toy_dataset(str(d / "toy.jsonl"), n=64)
    with open(os.path.join(ROOT, "configs", "demo_cpu.yaml")) as f:
        yaml = f.read()
    overrides = [f"runtime_args.data_path={data}", f"models.policy.load={model}", f"runtime_args.output_dir={d}/out",
                 "models.policy.engine=vllm", "runtime_args.num_episode=2", "runtime_args.sample_per_episode=32",
                 "runtime_args.train_global_batch_size=16"]
    yield {"cluster": cluster, "coord": coord, "trainer": trainer, "rollout": rollout, "yaml": yaml,
           "overrides": overrides, "model": model}
    cluster.stop_all()


def test_grpo_steps_with_vllm_engine(deployment):
    _grpo_steps_into_vllm(deployment, [])


def _grpo_steps_into_vllm(deployment, overrides):
    coord = coordinator_pb2_grpc.CoordinatorServiceStub(deployment["cluster"].channel(deployment["coord"]))
    run = coord.StartRun(cpb.StartRunRequest(config_yaml=deployment["yaml"],
                                             overrides=deployment["overrides"] + overrides))
    events = list(coord.WatchRun(cpb.WatchRunRequest(run_id=run.run_id), timeout=600))
    info = coord.GetRun(cpb.RunRef(run_id=run.run_id))
    assert info.state == cpb.FINISHED, info.error
    steps = [e.metrics for e in events if e.metrics]
    assert [m["rollout/policy_version"] for m in steps] == [0, 2], "samples carry the synced version"
    assert all(m["agreement/max_abs_diff"] < 1e-3 for m in steps), [m["agreement/max_abs_diff"] for m in steps]
    rollout = rollout_pb2_grpc.RolloutServiceStub(deployment["cluster"].channel(deployment["rollout"]))
    rinfo = rollout.GetInfo(pb.Empty())
    assert rinfo.engine == "vllm" and rinfo.policy_version == 4


def test_bad_input_to_the_vllm_service(deployment):
    rollout = rollout_pb2_grpc.RolloutServiceStub(deployment["cluster"].channel(deployment["rollout"]))
    before = rollout.GetInfo(pb.Empty())
    assert before.engine == "vllm"
    prompt = rpb.Prompt(group_id="g-0", prompt_ids=ids_to_wire([3, 4]))
    filtered = pb.SamplingParams(temperature=1.0, top_p=0.9, top_k=-1, max_tokens=4)
    expect_rpc_error(lambda: rollout.Generate(rpb.GenerateRequest(prompts=[prompt], sampling=filtered, n=2)),
                     grpc.StatusCode.INVALID_ARGUMENT, "models.policy.top_p")
    oov = rpb.Prompt(group_id="g-0", prompt_ids=ids_to_wire([3, 10 ** 6]))
    ok = pb.SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=4)
    expect_rpc_error(lambda: rollout.Generate(rpb.GenerateRequest(prompts=[oov], sampling=ok, n=2)),
                     grpc.StatusCode.INVALID_ARGUMENT, "prompts[0].prompt_ids")
    # a model vLLM cannot load: refused, and the loaded engine keeps serving
    bad = os.path.join(os.path.dirname(deployment["model"]), "bad-model")
    build_tiny_model(bad, ["a", "b"], head_dim=64)
    with open(os.path.join(bad, "config.json")) as f:
        config = json.load(f)
    config["architectures"] = ["NoSuchModelForCausalLM"]
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(config, f)
    cfg = load_config(deployment["yaml"], deployment["overrides"] + [f"models.policy.load={bad}"])
    expect_rpc_error(lambda: rollout.Setup(pb.SetupRequest(run_id="bad", config_yaml=config_to_yaml(cfg))),
                     grpc.StatusCode.INVALID_ARGUMENT, "models.policy.load")
    samples = list(rollout.Generate(rpb.GenerateRequest(prompts=[prompt], sampling=ok, n=2)))
    assert len(samples) == 2 and all(s.policy_version == before.policy_version for s in samples)
    assert rollout.GetInfo(pb.Empty()).model == before.model
    # the coordinator refuses the same unsupported sampling before anything runs
    coord = coordinator_pb2_grpc.CoordinatorServiceStub(deployment["cluster"].channel(deployment["coord"]))
    expect_rpc_error(lambda: coord.StartRun(cpb.StartRunRequest(
        config_yaml=deployment["yaml"], overrides=deployment["overrides"] + ["models.policy.top_p=0.9"])),
        grpc.StatusCode.INVALID_ARGUMENT, "models.policy.top_p", "engine=vllm")


def test_grpo_steps_with_a_megatron_trainer_into_vllm(deployment):
    """backend=megatron: its weights, renamed to HF's, load into vLLM's model and the agreement check
    passes after every sync, as with FSDP."""
    _grpo_steps_into_vllm(deployment, ["models.policy_trainer.backend=megatron"])
    trainer = trainer_pb2_grpc.TrainerServiceStub(deployment["cluster"].channel(deployment["trainer"]))
    assert trainer.GetInfo(pb.Empty()).backend == "megatron"
