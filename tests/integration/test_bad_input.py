"""Bad input gets a clear status naming the field, changes nothing, and the service keeps serving."""
import grpc
import pytest
import torch

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import rollout_pb2 as rpb
from services.common import batches
from services.common.batches import TrainSequence
from services.common.rpc import make_channel
from services.common.tensors import ids_to_wire, to_wire
from tests.integration.cluster import expect_rpc_error
from tests.integration.conftest import demo_overrides

pytestmark = pytest.mark.slow
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def set_up(services, toy, demo_yaml, tmp_path_factory):
    """Trainer and rollouts set up for the toy model (as a run would do)."""
    from services.common.config import config_to_yaml, load_config
    out = str(tmp_path_factory.mktemp("bad"))
    cfg = load_config(demo_yaml, demo_overrides(toy, out))
    setup = pb.SetupRequest(run_id="bad-input", config_yaml=config_to_yaml(cfg))
    services.trainer_stub().Setup(setup)
    for i in range(2):
        services.rollout_stub(i).Setup(setup)
    return services


def good_batch() -> batches.MicroBatch:
    seqs = [TrainSequence([5, 6], [7, 8, 1], [-1.0, -1.0, -1.0], 1.0, 0),
            TrainSequence([5, 9], [9, 9], [-2.0, -2.0], -1.0, 0)]
    return batches.make_micro_batch(seqs, num_global_tokens=5, temperature=1.0)


def malformed(**changes) -> pb.PackedBatch:
    msg = batches.to_proto(good_batch())
    for field, value in changes.items():
        if isinstance(value, pb.Tensor):
            getattr(msg, field).CopyFrom(value)
        else:
            setattr(msg, field, value)
    return msg


CASES = {
    "short loss_mask": (dict(loss_mask=to_wire(torch.ones(3, dtype=torch.uint8))), "loss_mask"),
    "float input_ids": (dict(input_ids=to_wire(torch.zeros(9))), "input_ids"),
    "negative shape": (dict(advantages=pb.Tensor(dtype=pb.FLOAT32, shape=[-9], data=b"")), "advantages"),
    "huge shape": (dict(old_logprobs=pb.Tensor(dtype=pb.FLOAT32, shape=[1 << 40], data=b"")), "old_logprobs"),
    "bytes mismatch": (dict(input_ids=pb.Tensor(dtype=pb.INT32, shape=[9], data=b"\0" * 7)), "input_ids"),
    "bad cu_seqlens": (dict(cu_seqlens=to_wire(torch.tensor([0, 6, 5, 9], dtype=torch.int32))), "cu_seqlens"),
    "token out of vocab": (dict(input_ids=to_wire(torch.full((9,), 10_000, dtype=torch.int32))), "input_ids"),
    "too few global tokens": (dict(num_global_tokens=1), "num_global_tokens"),
}


def test_malformed_packed_batch_changes_nothing(set_up):
    trainer = set_up.trainer_stub()
    probe = batches.to_proto(good_batch())
    before_lp = trainer.ComputeLogProbs(probe).logprobs.data
    before_step = trainer.GetInfo(pb.Empty()).step
    for name, (changes, field) in CASES.items():
        msg = malformed(**changes)
        expect_rpc_error(lambda: trainer.Train(iter([batches.to_proto(good_batch()), msg])), INVALID, field)
        if field in ("input_ids", "cu_seqlens"):   # the fields ComputeLogProbs reads
            expect_rpc_error(lambda: trainer.ComputeLogProbs(msg), INVALID, field)
    assert trainer.GetInfo(pb.Empty()).step == before_step, "a refused step must not step the optimizer"
    assert trainer.ComputeLogProbs(probe).logprobs.data == before_lp, "weights must be unchanged"


def test_empty_train_stream_is_refused(set_up):
    expect_rpc_error(lambda: set_up.trainer_stub().Train(iter([])), INVALID, "no micro-batches")


def test_bad_generate_requests(set_up):
    rollout = set_up.rollout_stub(0)
    version = rollout.GetInfo(pb.Empty()).policy_version
    prompt = rpb.Prompt(group_id="g-0", prompt_ids=ids_to_wire([3, 4]))
    ok = pb.SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=4)

    def gen(sampling=ok, n=2, prompts=(prompt,)):
        return lambda: rollout.Generate(rpb.GenerateRequest(prompts=list(prompts), sampling=sampling, n=n))

    def with_(**kw):
        s = pb.SamplingParams()
        s.CopyFrom(ok)
        for k, v in kw.items():
            setattr(s, k, v)
        return s
    expect_rpc_error(gen(with_(temperature=-1.0)), INVALID, "models.policy.temperature")
    expect_rpc_error(gen(with_(top_p=1.5)), INVALID, "models.policy.top_p")
    expect_rpc_error(gen(with_(top_k=0)), INVALID, "models.policy.top_k")
    expect_rpc_error(gen(with_(max_tokens=0)), INVALID, "max_response_tokens_length")
    expect_rpc_error(gen(n=0), INVALID, "num_inference_per_prompt")
    expect_rpc_error(gen(prompts=()), INVALID, "prompts")
    bad_ids = rpb.Prompt(group_id="g-0", prompt_ids=ids_to_wire([3, 99_999]))
    expect_rpc_error(gen(prompts=(bad_ids,)), INVALID, "prompts[0].prompt_ids")
    float_ids = rpb.Prompt(group_id="g-0", prompt_ids=to_wire(torch.zeros(2)))
    expect_rpc_error(gen(prompts=(float_ids,)), INVALID, "prompts[0].prompt_ids")
    # still serving, same version
    samples = list(gen()())
    assert len(samples) == 2 and all(s.policy_version == version for s in samples)


def test_weight_sync_outside_a_group_is_refused(set_up):
    rollout = set_up.rollout_stub(0)
    version = rollout.GetInfo(pb.Empty()).policy_version
    req = pb.WeightSyncRequest(group_id="no-such-group", version=version + 1)
    expect_rpc_error(lambda: rollout.ReceiveWeights(req), grpc.StatusCode.FAILED_PRECONDITION, "no-such-group")
    expect_rpc_error(lambda: rollout.CommitWeights(req), grpc.StatusCode.FAILED_PRECONDITION, "no-such-group")
    expect_rpc_error(lambda: rollout.AbortWeights(req), grpc.StatusCode.FAILED_PRECONDITION, "no-such-group")
    expect_rpc_error(lambda: set_up.trainer_stub().SendWeights(req), grpc.StatusCode.FAILED_PRECONDITION)
    bad_plan = pb.WeightSyncPlan(group_id="x", rank=1, world_size=2, backend="gloo", rendezvous_host="localhost",
                                 rendezvous_port=1, bucket_bytes=1 << 20, timeout_s=5,
                                 params=[pb.ParamSpec(name="nope", dtype=pb.FLOAT32, shape=[2])])
    expect_rpc_error(lambda: rollout.PrepareWeightSync(bad_plan), INVALID, "params", "models.policy.load")
    assert rollout.GetInfo(pb.Empty()).policy_version == version


def test_coordinator_bad_requests(services, toy, demo_yaml, tmp_path):
    coord = services.coord()
    runs_before = len(coord.ListRuns(pb.Empty()).runs)
    expect_rpc_error(lambda: coord.GetRun(cpb.RunRef(run_id="nope")), NOT_FOUND, "nope")
    expect_rpc_error(lambda: coord.StopRun(cpb.RunRef(run_id="nope")), NOT_FOUND)
    expect_rpc_error(lambda: coord.WatchRun(cpb.WatchRunRequest(run_id="nope")), NOT_FOUND)
    expect_rpc_error(lambda: coord.StartRun(cpb.StartRunRequest()), INVALID, "config")
    typo = demo_overrides(toy, str(tmp_path)) + ["models.policy_trainer.max_tokens_in_packing=64"]
    expect_rpc_error(lambda: coord.StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=typo)), INVALID,
                     "max_tokens_in_packing", "did you mean 'models.policy_trainer.max_token_in_packing'")
    uneven = demo_overrides(toy, str(tmp_path), **{"runtime_args.sample_per_episode": 30})
    expect_rpc_error(lambda: coord.StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=uneven)), INVALID,
                     "runtime_args.sample_per_episode", "runtime_args.num_inference_per_prompt")
    no_data = demo_overrides(toy, str(tmp_path), **{"runtime_args.data_path": "/nonexistent.jsonl"})
    expect_rpc_error(lambda: coord.StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=no_data)), INVALID,
                     "runtime_args.data_path")
    no_model = demo_overrides(toy, str(tmp_path), **{"models.policy.load": str(tmp_path)})
    expect_rpc_error(lambda: coord.StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=no_model)), INVALID,
                     "models.policy.load")
    expect_rpc_error(lambda: coord.RegisterWorker(cpb.WorkerInfo(kind=cpb.ROLLOUT, address="nohostport")), INVALID,
                     "address")
    assert len(coord.ListRuns(pb.Empty()).runs) == runs_before, "refused requests create no run"


def test_auth_token_required(services, tmp_path):
    """With RLGRID_AUTH_TOKEN set, every RPC but health needs it."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from rlgrid.v1 import coordinator_pb2_grpc
    proc = services.cluster.start("coordinator-auth", "services.coordinator", "--state-dir", str(tmp_path),
                                  env={"RLGRID_AUTH_TOKEN": "s3cret"})
    try:
        services.cluster.wait_healthy(proc)   # health needs no token
        bare = coordinator_pb2_grpc.CoordinatorServiceStub(make_channel(proc.address, auth_token=""))
        expect_rpc_error(lambda: bare.ListRuns(pb.Empty()), grpc.StatusCode.UNAUTHENTICATED, "RLGRID_AUTH_TOKEN")
        expect_rpc_error(lambda: bare.WatchRun(cpb.WatchRunRequest(run_id="x")), grpc.StatusCode.UNAUTHENTICATED)
        wrong = coordinator_pb2_grpc.CoordinatorServiceStub(make_channel(proc.address, auth_token="nope"))
        expect_rpc_error(lambda: wrong.ListRuns(pb.Empty()), grpc.StatusCode.UNAUTHENTICATED)
        good = coordinator_pb2_grpc.CoordinatorServiceStub(make_channel(proc.address, auth_token="s3cret"))
        assert list(good.ListRuns(pb.Empty()).runs) == []
        with grpc.insecure_channel(proc.address) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        services.cluster.stop(proc)
