"""Every RPC of every service fuzzed after Setup, with a weight-sync group in place: hostile
PackedBatch, Generate, weight-sync and Setup messages (seeded random mutations plus handcrafted
cases). Expected: no UNKNOWN / INTERNAL (nor a crash), health still SERVING, and nothing changed: the
trainer's step and weights, each replica's version and weights, the sync group, the coordinator's runs."""
import random
import socket
from collections import Counter

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import rollout_pb2 as rpb
from rlgrid.v1 import trainer_pb2 as tpb
from services.common import batches
from services.common.batches import TrainSequence
from services.common.config import config_to_yaml, load_config
from services.common.tensors import ids_to_wire, to_wire
from services.common.weight_sync import Rendezvous
from services.coordinator.clients import RolloutPool, TrainerClient
from services.coordinator.sync import WeightSync
from tests.integration.cluster import TEST_WORKER_SECRET
from tests.integration.conftest import demo_overrides

pytestmark = pytest.mark.slow
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE}
DTYPES = [v.number for v in pb.DType.DESCRIPTOR.values] + [99, -1]
HOSTILE_FLOATS = [float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 1e-30, 3e38, -3e38]
HOSTILE_INTS = [-1, 0, -(1 << 31), (1 << 31) - 1]


class Tally:
    """Calls a method, records its status code; a forbidden code fails the test with the case."""

    def __init__(self):
        self.codes: Counter = Counter()

    def __call__(self, name: str, fn, *args, **kwargs):
        try:
            result = fn(*args, timeout=30, **kwargs)
            if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
                list(result)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            assert code not in FORBIDDEN, f"{name}: {code.name}: {exc.details()}"
        self.codes[(name, code.name)] += 1


@pytest.fixture(scope="module")
def deployment(services, toy, demo_yaml, tmp_path_factory):
    """Trainer and replicas set up, synced to version 1 by the coordinator's own WeightSync."""
    cfg = load_config(demo_yaml, demo_overrides(toy, str(tmp_path_factory.mktemp("fuzz")), **{
        "runtime_args.rpc_timeout_s.weight_sync": 30, "runtime_args.rpc_timeout_s.control": 5}))
    limits = dict(max_message_mb=64, timeouts=cfg.runtime_args.rpc_timeout_s)
    trainer = TrainerClient(services.trainer.address, **limits, secret=TEST_WORKER_SECRET)
    pool = RolloutPool([r.address for r in services.rollouts], **limits, retries=0,
                       max_sequences=cfg.runtime_args.sample_per_episode,
                       secrets={r.address: TEST_WORKER_SECRET for r in services.rollouts})
    setup = pb.SetupRequest(run_id="fuzz", config_yaml=config_to_yaml(cfg))
    trainer.call("Setup", setup, "setup")
    pool.call_all("Setup", setup, "setup")
    sync = WeightSync(Rendezvous("127.0.0.1"), trainer, pool, bucket_mb=1)
    sync.sync(1)
    return cfg, trainer, pool, sync


def good_batch(version: int = 0) -> pb.PackedBatch:
    seqs = [TrainSequence([4, 5], [6, 7, 1], [-1.0, -2.0, -0.5], 1.0, version),
            TrainSequence([5, 9], [9, 9], [-2.0, -2.0], -1.0, version)]
    return batches.to_proto(batches.make_micro_batch(seqs, num_global_tokens=5, temperature=1.0))


TENSORS = ["input_ids", "cu_seqlens", "loss_mask", "old_logprobs", "advantages", "versions",
           "proximal_logprobs"]   # unset in good_batch: any proximal logprobs are refused without tis_cap


def hostile_tensor(rng: random.Random, msg: pb.Tensor, vocab: int) -> pb.Tensor:
    """A copy of `msg` made invalid in one way: dtype, shape, byte count or values."""
    out = pb.Tensor()
    out.CopyFrom(msg)
    kind = rng.choice(["dtype", "shape", "bytes", "values"])
    if kind == "dtype":
        out.dtype = rng.choice([d for d in DTYPES if d != msg.dtype])
    elif kind == "shape":
        n = msg.shape[0] if msg.shape else 1
        out.shape[:] = rng.choice([[-1], [1 << 40], [1 << 62], [], [2, 3], [n + 1], [-n], [0]])
    elif kind == "bytes":
        size = rng.choice([0, 1, 3, len(msg.data) - 1, len(msg.data) + 1, len(msg.data) + 4])
        out.data = bytes(rng.getrandbits(8) for _ in range(max(size, 0)))
    else:
        from services.common.tensors import TensorError, from_wire
        try:
            t = from_wire(msg).clone()
        except TensorError:   # already hostile: make it more so
            out.dtype = 99
            return out
        if t.numel() == 0:
            out.shape[:] = [-1]
            return out
        i = rng.randrange(t.numel())
        if t.is_floating_point():
            t.view(-1)[i] = rng.choice(HOSTILE_FLOATS[:3] + [3e38, -3e38, 5.0])
        elif t.dtype == torch.uint8:
            t.view(-1)[i] = rng.choice([2, 255])
        elif t.dtype == torch.int32:
            t.view(-1)[i] = rng.choice([-1, vocab, (1 << 31) - 1])
        else:
            t.view(-1)[i] = rng.choice([-1, 1 << 62])
        out.CopyFrom(to_wire(t))
    return out


def hostile_batch(rng: random.Random, vocab: int, version: int) -> pb.PackedBatch:
    """A batch with one to three hostile changes; the first alone makes it invalid for Train."""
    msg = good_batch(version)
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(TENSORS + ["temperature", "num_global_tokens"])
        if field == "temperature":
            msg.temperature = rng.choice(HOSTILE_FLOATS + [0.5])
        elif field == "num_global_tokens":
            msg.num_global_tokens = rng.choice([-1, 0, 1, 1 << 62])
        else:
            getattr(msg, field).CopyFrom(hostile_tensor(rng, getattr(msg, field), vocab))
    msg.padded, msg.step = rng.random() < 0.5, rng.choice([0, -1, 1 << 62])   # neither matters alone
    return msg


def hostile_generate(rng: random.Random, vocab: int, cfg) -> rpb.GenerateRequest:
    """A request with hostile changes; some may stay valid (then they are served, which is fine)."""
    ra = cfg.runtime_args
    req = rpb.GenerateRequest(n=2, sampling=pb.SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=4,
                                                              seed=rng.randrange(1 << 30)))
    req.prompts.extend(rpb.Prompt(group_id=f"g-{i}", prompt_ids=ids_to_wire([4, 5, 6])) for i in range(2))
    s, first = req.sampling, rpb.Prompt()   # (protobuf copies on assignment: mutate the request's own fields)
    first.CopyFrom(req.prompts[0])
    for _ in range(rng.randint(1, 3)):
        what = rng.choice(["temperature", "top_p", "top_k", "max_tokens", "stop", "n", "count", "prompt", "group"])
        if what == "temperature":
            s.temperature = rng.choice(HOSTILE_FLOATS)
        elif what == "top_p":
            s.top_p = rng.choice([float("nan"), 0.0, -1.0, 1.5, float("inf")])
        elif what == "top_k":
            s.top_k = rng.choice([0, -2, -(1 << 31)])
        elif what == "max_tokens":
            s.max_tokens = rng.choice(HOSTILE_INTS + [cfg.models.policy.max_response_tokens_length + 1])
        elif what == "stop":
            s.stop_token_ids[:] = rng.choice([[-1], [vocab], [1] * 5000, [(1 << 31) - 1]])
        elif what == "n":
            req.n = rng.choice(HOSTILE_INTS + [ra.num_inference_per_prompt + 1])
        elif what == "count":
            del req.prompts[:]
            req.prompts.extend([first] * rng.choice([0, ra.sample_per_episode + 1]))
        elif what == "prompt" and req.prompts:
            p = req.prompts[rng.randrange(len(req.prompts))]
            if rng.random() < 0.5:
                p.prompt_ids.CopyFrom(hostile_tensor(rng, p.prompt_ids, vocab))
            else:
                p.prompt_ids.CopyFrom(ids_to_wire(rng.choice([[], [4] * 40_000, [vocab, 4], [-5]])))
        elif what == "group" and req.prompts:
            req.prompts[0].group_id = rng.choice(["", "x" * 10_000, "\x00\xff", "-1"])
    return req


def hostile_plan(rng: random.Random, plan: pb.WeightSyncPlan, closed_port: int) -> pb.WeightSyncPlan:
    """The real plan with one to three hostile fields (ranks, sizes, backends, params, rendezvous)."""
    out = pb.WeightSyncPlan()
    out.CopyFrom(plan)
    for _ in range(rng.randint(1, 3)):
        what = rng.choice(["rank", "world", "backend", "transport", "bucket", "timeout", "params", "port", "group"])
        if what == "rank":
            out.rank = rng.choice([-1, plan.world_size, 1 << 30, -(1 << 31)])
        elif what == "world":
            out.world_size = rng.choice([0, -1, 1, 1 << 30])
        elif what == "backend":
            out.backend = rng.choice(["", "mpi", "nccl\x00"])
        elif what == "transport":
            out.transport = rng.choice(["evil", "cuda_ipc", "x" * 1000])
        elif what == "bucket":
            out.bucket_bytes = rng.choice([0, -1, 1 << 50])
        elif what == "timeout":
            out.timeout_s = rng.choice([0, -5, (1 << 31) - 1])
        elif what == "params":
            choice = rng.choice(["empty", "name", "shape", "dtype", "extra"])
            if choice == "empty" or not out.params:
                del out.params[:]
            elif choice == "extra":
                out.params.add(name="evil.weight", dtype=pb.FLOAT32, shape=[1 << 40])
            else:
                p = out.params[rng.randrange(len(out.params))]
                if choice == "name":
                    p.name = "nope"
                elif choice == "shape":
                    p.shape[:] = rng.choice([[-1], [1 << 62], [], [3, 3, 3]])
                else:
                    p.dtype = rng.choice([0, 99, pb.INT8])
        elif what == "port":
            out.rendezvous_port = rng.choice([0, -1, 70000])
        elif what == "group":
            out.group_id = rng.choice(["", "x" * 10_000])
    if out == plan:   # every field landed back on its value: point it at a rendezvous nobody serves
        out.rendezvous_port, out.timeout_s = closed_port, 1
    return out


HOSTILE_YAML = [
    "", "\x00\x01\x02", "models: [", "runtime_args: 3", "[[[[[[[[[[]]]]]]]]]]" * 50, "a: " + "[" * 5000,
    "runtime_args:\n  num_episode: -1\n", "models:\n  policy:\n    temperature: .nan\n",
    "models:\n  policy_trainer:\n    load: /nonexistent\n", "models:\n  policy:\n    load: /etc\n",
    "runtime_args:\n  seed: ${oc.env:HOME}\n", "unknown_section:\n  x: 1\n",
    "a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b]\n"
    "d: &d [*c, *c, *c, *c, *c, *c, *c, *c]\ne: [*d, *d, *d, *d, *d, *d, *d, *d]\n",
    "runtime_args:\n  seed: 1\n" + "#" * (2 << 20),   # 2 MiB: refused before it is parsed
]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot(services, trainer, pool, probe):
    coord = services.coord()
    return {"trainer_step": trainer.call("GetInfo", pb.Empty()).step,
            "trainer_logprobs": trainer.call("ComputeLogProbs", probe, "logprobs").logprobs.data,
            "versions": [r.call("GetInfo", pb.Empty()).policy_version for r in pool.replicas],
            "generated": [[(s.response_ids.data, s.response_logprobs.data) for s in r.stub.Generate(
                rpb.GenerateRequest(prompts=[rpb.Prompt(group_id="s-0", prompt_ids=ids_to_wire([4, 5]))], n=2,
                                    sampling=pb.SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=8,
                                                               seed=11)), timeout=30)] for r in pool.replicas],
            "runs": len(coord.ListRuns(pb.Empty()).runs),
            # this cluster's own workers (one another test left behind may expire meanwhile)
            "workers": sorted(w.address for w in coord.ListWorkers(pb.Empty()).workers
                              if w.address in {services.trainer.address, *(r.address for r in services.rollouts)})}


def test_fuzz_every_rpc_after_setup(services, deployment):
    cfg, trainer, pool, sync = deployment
    rng = random.Random(0)
    call = Tally()
    vocab = pool.replicas[0].call("GetInfo", pb.Empty()).vocab_size
    probe = good_batch()
    before = snapshot(services, trainer, pool, probe)
    step = before["trainer_step"]
    plan = sync._plan(list(pool.replicas))[0]   # a real plan, as the coordinator would hand it out (a fresh group id, unused)
    port = closed_port()
    t, rollouts, coord = trainer.stub, [r.stub for r in pool.replicas], services.coord()

    for _ in range(120):
        stream = [good_batch(step)] * rng.randint(0, 2) + [hostile_batch(rng, vocab, step)]
        rng.shuffle(stream)
        call("Train", t.Train, iter(stream))
    call("Train", t.Train, iter([]))
    for _ in range(80):
        call("ComputeLogProbs", t.ComputeLogProbs, hostile_batch(rng, vocab, step))
    for _ in range(120):
        call("Generate", rng.choice(rollouts).Generate, hostile_generate(rng, vocab, cfg))
    for member, rank in [(t, 0), *[(r, 1 + i) for i, r in enumerate(rollouts)]]:
        own = pb.WeightSyncPlan()
        own.CopyFrom(plan)
        own.rank = rank
        for _ in range(25):
            call("PrepareWeightSync", member.PrepareWeightSync, hostile_plan(rng, own, port))
        unreachable = pb.WeightSyncPlan()
        unreachable.CopyFrom(own)
        unreachable.rendezvous_port, unreachable.timeout_s = port, 1   # valid, but nobody is there
        call("PrepareWeightSync", member.PrepareWeightSync, unreachable)
    for request in [pb.WeightSyncRequest(group_id=g, version=v) for g in ["", "nope", "x" * 10_000, sync.group_id]
                    for v in [-1, 0, 1 << 62]]:
        call("SendWeights", t.SendWeights, request) if request.group_id != sync.group_id else None
        for r in rollouts:
            if request.group_id != sync.group_id:   # the live group's Receive would wait for a sender
                call("ReceiveWeights", r.ReceiveWeights, request)
            call("CommitWeights", r.CommitWeights, request)
            call("AbortWeights", r.AbortWeights, request)
    for text in HOSTILE_YAML:
        for member in [t, *rollouts]:
            call("Setup", member.Setup, pb.SetupRequest(run_id="evil", config_yaml=text))
        call("StartRun", coord.StartRun, cpb.StartRunRequest(config_yaml=text))
    for path in ["", "/", "/nonexistent", "\x00", "x" * 5000]:
        call("LoadCheckpoint", t.LoadCheckpoint, tpb.CheckpointRequest(path=path))
    for extra in ["{", "[1]", "3", "null"]:   # never written: the request is refused before any file is
        call("SaveCheckpoint", t.SaveCheckpoint, tpb.CheckpointRequest(path="", extra_json=extra))
        call("SaveCheckpoint", t.SaveCheckpoint, tpb.CheckpointRequest(path="/nonexistent/ckpt", extra_json=extra))
    call("ExportHF", t.ExportHF, tpb.CheckpointRequest(path=""))
    for overrides in [["x"], ["=1"], ["runtime_args.seed=1=2"], ["a.b.c.d=1"] * 100, ["models.policy.load=" + "x" * 9999]]:
        call("StartRun", coord.StartRun, cpb.StartRunRequest(overrides=overrides))
    for run_id in ["", "nope", "\x00", "x" * 10_000]:
        for name in ("GetRun", "PauseRun", "ResumeRun", "StopRun"):
            call(name, getattr(coord, name), cpb.RunRef(run_id=run_id))
        call("WatchRun", coord.WatchRun, cpb.WatchRunRequest(run_id=run_id, from_step=rng.choice([-1, 1 << 62])))
    hostile_workers = [cpb.WorkerInfo(kind=99, address="a:1"), cpb.WorkerInfo(kind=cpb.ROLLOUT, address=""),
                       cpb.WorkerInfo(kind=cpb.TRAINER, address="host:port"),
                       cpb.WorkerInfo(kind=cpb.ROLLOUT, address=":")]
    for info in hostile_workers:
        call("RegisterWorker", coord.RegisterWorker, info)
    registered = {w.address for w in coord.ListWorkers(pb.Empty()).workers}
    assert not registered & {w.address for w in hostile_workers}, registered
    for stub in [t, *rollouts]:
        call("GetInfo", stub.GetInfo, pb.Empty())

    codes = Counter(code for (_, code) in call.codes.elements())
    assert codes["INVALID_ARGUMENT"] > 300, codes   # most were refused as the caller's error
    for proc in [services.coordinator, services.trainer, *services.rollouts]:
        with grpc.insecure_channel(proc.address) as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
    assert snapshot(services, trainer, pool, probe) == before, "a hostile call changed state"
    group = sync.group_id
    sync.sync(2)   # the weight-sync group survived every hostile plan: it syncs without being rebuilt
    assert sync.group_id == group
    assert [r.call("GetInfo", pb.Empty()).policy_version for r in pool.replicas] == [2] * len(pool.replicas)
