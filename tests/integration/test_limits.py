"""No client can exhaust the servers: streams are bounded, Generate and Train are bounded by the run
set up before any memory is reserved, a refused Setup changes nothing, the message limit is the
receiver's too, and a reward stuck on a model's output is cut off. All against real service processes."""
import os
import threading
import time

import grpc
import pytest
import torch

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import coordinator_pb2_grpc, trainer_pb2_grpc
from rlgrid.v1 import rollout_pb2 as rpb
from services.common import batches
from services.common.batches import TrainSequence
from services.common.config import config_to_yaml, load_config
from services.common.rpc import make_channel
from services.common.tensors import ids_to_wire, to_wire
from services.common.tiny_model import build_tiny_model
from services.coordinator.clients import StepError, TrainerClient
from tests.integration.cluster import TEST_WORKER_SECRET, expect_rpc_error
from tests.integration.conftest import demo_overrides

pytestmark = pytest.mark.slow
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def run_cfg(toy, demo_yaml, tmp_path_factory):
    return load_config(demo_yaml, demo_overrides(toy, str(tmp_path_factory.mktemp("limits"))))


@pytest.fixture(scope="module")
def set_up(services, run_cfg):
    """Trainer and rollouts set up for the demo config (as a run would do)."""
    setup = pb.SetupRequest(run_id="limits", config_yaml=config_to_yaml(run_cfg))
    services.trainer_stub().Setup(setup)
    for i in range(len(services.rollouts)):
        services.rollout_stub(i).Setup(setup)
    return services


def step_batch(version: int, n: int = 2) -> batches.MicroBatch:
    """A valid micro-batch of one optimizer step for the demo config, samples of `version`."""
    seqs = [TrainSequence([4, 5], [6, 7, 1], [-1.0, -2.0, -0.5], 1.0 - 2 * (i % 2), version) for i in range(n)]
    return batches.make_micro_batch(seqs, num_global_tokens=3 * n, temperature=1.0)


def test_64_watch_streams_leave_registration_and_listing_answering(services, toy, demo_yaml, tmp_path):
    """Each open stream holds a server thread. 64 WatchRun streams on a run that waits for workers:
    at most --max-streams stay open, the rest are refused at once, and RegisterWorker / ListWorkers
    still answer within 1 s."""
    coordinator = services.cluster.start("coordinator-streams", "services.coordinator", "--state-dir",
                                         str(tmp_path / "state"), "--max-streams", "8")
    try:
        services.cluster.wait_healthy(coordinator)
        coord = coordinator_pb2_grpc.CoordinatorServiceStub(make_channel(coordinator.address))
        run = coord.StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=demo_overrides(toy, str(tmp_path))))
        assert run.state == cpb.PENDING   # no workers registered here: the run waits, and so do its watchers
        opened, refused, lock = [], [], threading.Lock()

        def watch():
            call = coord.WatchRun(cpb.WatchRunRequest(run_id=run.run_id), timeout=120)
            try:
                next(call)   # the PENDING event: the stream is open and now holds a thread
                with lock:
                    opened.append(call)
                for _ in call:
                    pass
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    with lock:
                        refused.append(exc.details())
        threads = [threading.Thread(target=watch, daemon=True) for _ in range(64)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while len(opened) + len(refused) < 64 and time.time() < deadline:
            time.sleep(0.1)
        assert (len(opened), len(refused)) == (8, 56), (len(opened), len(refused))
        assert "--max-streams" in refused[0]
        for replica in services.rollouts:   # real workers: a registration is checked with the worker (GetInfo)
            start = time.perf_counter()
            coord.RegisterWorker(cpb.WorkerInfo(kind=cpb.ROLLOUT, address=replica.address, secret=TEST_WORKER_SECRET),
                                 timeout=1)
            listed = coord.ListWorkers(pb.Empty(), timeout=1)
            assert time.perf_counter() - start < 1.0
        assert len(listed.workers) == len(services.rollouts)
        coord.StopRun(cpb.RunRef(run_id=run.run_id), timeout=1)   # the run ends: every open stream finishes
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads)
        events = list(coord.WatchRun(cpb.WatchRunRequest(run_id=run.run_id), timeout=10))   # slots are free again
        assert events[-1].state == cpb.STOPPED
    finally:
        services.cluster.stop(coordinator)


def test_generate_is_bounded_before_anything_is_reserved(set_up, run_cfg):
    rollout = set_up.rollout_stub(0)
    version = rollout.GetInfo(pb.Empty()).policy_version
    p, ra = run_cfg.models.policy, run_cfg.runtime_args
    ok = pb.SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=4, seed=3)
    prompt = rpb.Prompt(group_id="g-0", prompt_ids=ids_to_wire([3, 4]))

    def gen(prompts=(prompt,), n=2, **sampling):
        s = pb.SamplingParams()
        s.CopyFrom(ok)
        for k, v in sampling.items():
            if isinstance(v, list):
                getattr(s, k)[:] = v
            else:
                setattr(s, k, v)
        return lambda: rollout.Generate(rpb.GenerateRequest(prompts=list(prompts), sampling=s, n=n), timeout=10)

    def refused(call, *needles):
        start = time.perf_counter()
        expect_rpc_error(call, INVALID, *needles)
        return time.perf_counter() - start
    # the attacks of the issue: each answered at once, nothing generated
    assert refused(gen(max_tokens=1_000_000_000), "sampling.max_tokens", "max_response_tokens_length") < 2
    long_prompt = rpb.Prompt(group_id="g-0", prompt_ids=ids_to_wire([3] * 40_000))
    assert refused(gen(prompts=(long_prompt,)), "prompts[0].prompt_ids", "max_prompt_tokens_length") < 2
    refused(gen(temperature=float("inf")), "sampling.temperature")
    refused(gen(temperature=float("nan")), "sampling.temperature")
    refused(gen(temperature=1e-30), "sampling.temperature")
    refused(gen(n=ra.num_inference_per_prompt + 1), "runtime_args.num_inference_per_prompt")
    refused(gen(n=10**9), "runtime_args.num_inference_per_prompt")
    too_many = [prompt] * (ra.sample_per_episode // ra.num_inference_per_prompt + 1)
    refused(gen(prompts=too_many, n=ra.num_inference_per_prompt), "runtime_args.sample_per_episode")
    at_limit = rpb.Prompt(group_id="g-0", prompt_ids=ids_to_wire([3] * p.max_prompt_tokens_length))
    refused(gen(prompts=(at_limit,), max_tokens=p.max_response_tokens_length + 1), "sampling.max_tokens")
    refused(gen(stop_token_ids=[10**6]), "sampling.stop_token_ids")
    refused(gen(stop_token_ids=[1] * 5000), "sampling.stop_token_ids")
    two_d = rpb.Prompt(group_id="g-0", prompt_ids=pb.Tensor(dtype=pb.INT32, shape=[1 << 40, 2], data=b""))
    refused(gen(prompts=(two_d,)), "prompts[0].prompt_ids")
    # the largest request the run allows is served, by the same version
    full = [at_limit] * (ra.sample_per_episode // ra.num_inference_per_prompt)
    samples = list(gen(prompts=full, n=ra.num_inference_per_prompt, max_tokens=p.max_response_tokens_length)())
    assert len(samples) == ra.sample_per_episode and {s.policy_version for s in samples} == {version}


def test_train_refuses_out_of_range_loss_values(set_up):
    trainer = set_up.trainer_stub()
    step = trainer.GetInfo(pb.Empty()).step
    probe = batches.to_proto(step_batch(step))
    before = trainer.ComputeLogProbs(probe).logprobs.data

    def variant(**changes):
        msg = batches.to_proto(step_batch(step))
        for name, value in changes.items():
            if isinstance(value, pb.Tensor):
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg
    ids_len = len(batches.to_proto(step_batch(step)).input_ids.data) // 4
    adv = torch.zeros(ids_len)
    adv[2:5] = 3e38
    nan_lp = torch.zeros(ids_len)
    nan_lp[2:5] = float("nan")
    cases = [
        (variant(temperature=0.0), "temperature"),
        (variant(temperature=float("inf")), "temperature"),
        (variant(temperature=0.5), "models.policy.temperature"),   # not the run's: its logprobs mean nothing
        (variant(advantages=to_wire(adv)), "advantages"),
        (variant(old_logprobs=to_wire(nan_lp)), "old_logprobs"),
        (variant(num_global_tokens=1 << 40), "num_global_tokens"),
        (batches.to_proto(step_batch(step + 1)), "versions"),      # a version the trainer has not reached
    ]
    if step >= 2:   # demo: 2 optimizer steps per episode; older samples are refused
        cases.append((batches.to_proto(step_batch(step - 2)), "versions"))
    for msg, field in cases:
        expect_rpc_error(lambda: trainer.Train(iter([msg]), timeout=30), INVALID, field)
    # one step's stream cannot grow without bound: 65 micro-batches of one sequence > 64 samples a step
    one = batches.make_micro_batch([TrainSequence([4], [6], [-1.0], 1.0, step)], num_global_tokens=65, temperature=1.0)
    flood = [batches.to_proto(one)] * 65
    expect_rpc_error(lambda: trainer.Train(iter(flood), timeout=30), INVALID, "runtime_args.train_global_batch_size")
    assert trainer.GetInfo(pb.Empty()).step == step, "a refused step must not step the optimizer"
    assert trainer.ComputeLogProbs(probe).logprobs.data == before, "weights must be unchanged"


def test_refused_setup_leaves_the_current_setup_serving(set_up, run_cfg, tmp_path):
    trainer, rollout = set_up.trainer_stub(), set_up.rollout_stub(0)
    info = trainer.GetInfo(pb.Empty())
    bad_load = load_config(config_to_yaml(run_cfg), [f"models.policy_trainer.load={tmp_path}"])
    dense_groupgemm = load_config(config_to_yaml(run_cfg), ["models.policy_trainer.groupgemm=True"])
    for cfg, needle in ((bad_load, "models.policy_trainer.load"), (dense_groupgemm, "groupgemm")):
        expect_rpc_error(lambda: trainer.Setup(pb.SetupRequest(run_id="bad", config_yaml=config_to_yaml(cfg))),
                         INVALID, needle)
    expect_rpc_error(lambda: trainer.Setup(pb.SetupRequest(run_id="bad", config_yaml="models: [")), INVALID)
    after = trainer.GetInfo(pb.Empty())
    assert (after.run_id, after.step, after.model) == (info.run_id, info.step, info.model)
    reply = trainer.Train(iter([batches.to_proto(step_batch(info.step))]), timeout=60)   # still set up
    assert reply.step == info.step + 1

    version = rollout.GetInfo(pb.Empty()).policy_version
    too_long = load_config(config_to_yaml(run_cfg), ["models.policy.max_response_tokens_length=600",
                                                     "models.policy_trainer.max_token_in_packing=1024"])
    expect_rpc_error(lambda: rollout.Setup(pb.SetupRequest(run_id="bad", config_yaml=config_to_yaml(too_long))),
                     INVALID, "max_response_tokens_length", "context")
    expect_rpc_error(lambda: rollout.Setup(pb.SetupRequest(run_id="bad", config_yaml="runtime_args: 3")), INVALID)
    info = rollout.GetInfo(pb.Empty())
    assert (info.run_id, info.policy_version) == ("limits", version)
    request = rpb.GenerateRequest(prompts=[rpb.Prompt(group_id="g-0", prompt_ids=ids_to_wire([3, 4]))], n=2,
                                  sampling=pb.SamplingParams(temperature=1.0, top_p=1.0, top_k=-1,
                                                             max_tokens=run_cfg.models.policy.max_response_tokens_length))
    assert len(list(rollout.Generate(request, timeout=30))) == 2   # the old engine and its bounds serve on


def test_message_limit_is_the_receivers_too(services, run_cfg):
    """A trainer started with --max-message-mb 1: the coordinator's client learns it from GetInfo and
    refuses a larger micro-batch before sending, naming the trainer and the setting."""
    trainer = services.cluster.start("trainer-1mib", "services.trainer", "--device", "cpu", "--max-message-mb", "1")
    try:
        services.cluster.wait_healthy(trainer)
        client = TrainerClient(trainer.address, max_message_mb=64, timeouts=run_cfg.runtime_args.rpc_timeout_s,
                               secret=TEST_WORKER_SECRET)
        assert client.handshake().max_message_mb == 1 and client.max_message_mb == 1
        client.call("Setup", pb.SetupRequest(run_id="mib", config_yaml=config_to_yaml(run_cfg)), "setup")
        big = TrainSequence([4] * 50_000, [6] * 50_000, [-1.0] * 50_000, 1.0, 0)   # ~1.3 MB on the wire
        mb = batches.make_micro_batch([big], num_global_tokens=50_000, temperature=1.0)
        with pytest.raises(StepError) as info:
            client.train([mb])
        assert "1 MiB" in str(info.value) and trainer.address in str(info.value) and "--max-message-mb" in str(info.value)
        # what a sender with only its own limit sends, the receiver refuses: the mismatch the handshake removes
        raw = trainer_pb2_grpc.TrainerServiceStub(make_channel(trainer.address, max_message_mb=64,
                                                               worker_secret=TEST_WORKER_SECRET))
        expect_rpc_error(lambda: raw.Train(iter([batches.to_proto(mb)]), timeout=30), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert client.train([step_batch(0)])["tokens"] > 0   # what fits is trained
    finally:
        services.cluster.stop(trainer)


PATHOLOGICAL = r"\boxed{9^{9^{9^{9}}}}"   # sympy evaluates the power tower in C, holding the GIL, for minutes


def test_a_pathological_model_output_does_not_stall_the_loop(services, demo_yaml, tmp_path):
    """A model whose outputs contain a power tower, scored by math-verify: each such sample is cut off
    at models.reward.timeout_s, scores 0, is counted, and the run goes on."""
    model = build_tiny_model(str(tmp_path / "model"), ["echo", "x", PATHOLOGICAL], with_weights=False)
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "echo x", "ground_truth": "1"}\n' * 8)
    overrides = [f"runtime_args.data_path={data}", f"models.policy.load={model}",
                 f"runtime_args.output_dir={tmp_path / 'out'}", "runtime_args.num_episode=2",
                 "runtime_args.sample_per_episode=8", "runtime_args.num_inference_per_prompt=4",
                 "runtime_args.train_global_batch_size=8", "models.reward.name=math", "models.reward.timeout_s=2",
                 "models.reward.num_workers=2"]
    coord = services.coord()
    run = coord.StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=overrides))
    info, events = services.run_to_end(run.run_id, timeout=300)
    assert info.state == cpb.FINISHED, info.error
    assert any("math-verify's own timeout is off" in e.message for e in events)
    steps = [e.metrics for e in events if e.metrics]
    assert len(steps) == 2
    assert sum(m["reward/timeouts"] for m in steps) > 0, "the random model writes the power tower"
    for m in steps:
        assert m["reward/mean"] == 0.0
        # 8 samples on 2 workers at 2 s each at worst, plus a worker's restart: never minutes
        assert m["time/reward"] < 4 * 2 + 30, m["time/reward"]
    assert os.path.isdir(info.output_dir)


def test_a_stalled_train_stream_is_cut_off_at_the_runs_deadline(set_up, run_cfg):
    """A caller that opens Train and never finishes sending holds a stream slot only until the run's
    runtime_args.rpc_timeout_s.train, whatever deadline it set itself (here none)."""
    trainer = set_up.trainer_stub()
    cfg = load_config(config_to_yaml(run_cfg), ["runtime_args.rpc_timeout_s.train=3"])
    trainer.Setup(pb.SetupRequest(run_id="stall", config_yaml=config_to_yaml(cfg)))
    release = threading.Event()

    def stalled():
        yield batches.to_proto(step_batch(0))
        release.wait(120)
    start = time.perf_counter()
    try:
        expect_rpc_error(lambda: trainer.Train(stalled()), grpc.StatusCode.CANCELLED)
    finally:
        release.set()
    assert time.perf_counter() - start < 3 + 20
    assert trainer.GetInfo(pb.Empty()).step == 0
    assert trainer.Train(iter([batches.to_proto(step_batch(0))]), timeout=60).step == 1   # and serves on
