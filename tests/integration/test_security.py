"""The attacks of issue 10, each against real servers (docs/security.md): the file stays unread, the
variable unresolved, the path refused, the secret required, the TLS link working and a plaintext
client refused. Every refused call leaves the services serving and their state unchanged."""
import ipaddress
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import coordinator_pb2_grpc, rollout_pb2_grpc, trainer_pb2_grpc
from rlgrid.v1 import rollout_pb2 as rpb
from rlgrid.v1 import trainer_pb2 as tpb
from services.common import batches, weight_sync
from services.common.config import RpcTimeouts, config_to_yaml, load_config
from services.common.rpc import AUTH_ENV, ClientTLS, make_channel
from services.common.tensors import ids_to_wire
from services.coordinator.clients import RolloutPool, TrainerClient
from services.coordinator.local import LocalCluster, free_port
from services.coordinator.sync import WeightSync
from tests.certs import make_local_tls
from tests.integration.cluster import ROOT, TEST_WORKER_SECRET, expect_rpc_error
from tests.integration.conftest import demo_overrides
from tests.integration.test_bad_input import good_batch

pytestmark = pytest.mark.slow
INVALID, DENIED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED
MARK = "MARK-7f3a-do-not-echo"


@pytest.fixture(scope="module")
def outside():
    """A directory outside every root of the test services (a sibling of pytest's base temp dir)."""
    d = tempfile.mkdtemp(prefix="rlgrid-outside-")
    with open(os.path.join(d, "secret.yaml"), "w") as f:
        f.write(f"runtime_args:\n  exp_name: {MARK}\n{MARK}_key: {MARK}\n")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def trainer_set_up(services, toy, demo_yaml, tmp_path_factory):
    cfg = load_config(demo_yaml, demo_overrides(toy, str(tmp_path_factory.mktemp("sec"))))
    services.trainer_stub().Setup(pb.SetupRequest(run_id="security", config_yaml=config_to_yaml(cfg)))
    services.rollout_stub(0).Setup(pb.SetupRequest(run_id="security", config_yaml=config_to_yaml(cfg)))
    return services


def _no_echo(message: str) -> None:
    assert MARK not in message and "root:x" not in message and "/bin/bash" not in message, message


def _serving(channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


# ---- 1. paths --------------------------------------------------------------------------------------

def test_config_path_is_read_only_from_the_config_dir(services, outside):
    coord = services.coord()
    runs = len(coord.ListRuns(pb.Empty()).runs)
    config_dir = os.path.join(ROOT, "configs")
    for path in ("/etc/passwd", os.path.join(outside, "secret.yaml"), "../../../../../../../../etc/passwd",
                 os.path.relpath(os.path.join(outside, "secret.yaml"), config_dir),
                 "configs/../../../../../../../../etc/passwd"):
        msg = expect_rpc_error(lambda: coord.StartRun(cpb.StartRunRequest(config_path=path)), INVALID,
                               "config_path", config_dir, "--config-dir", "absolute paths")
        _no_echo(msg)
    assert len(coord.ListRuns(pb.Empty()).runs) == runs


def test_run_paths_stay_inside_the_roots(services, toy, demo_yaml, outside, tmp_path):
    coord = services.coord()
    runs = len(coord.ListRuns(pb.Empty()).runs)
    os.symlink(outside, tmp_path / "link")   # inside a root, pointing out of it
    base = os.path.realpath(tmp_path.parent)   # pytest's base temp dir: a root of the test services
    cases = {
        "runtime_args.output_dir": ([os.path.join(outside, "run"), f"{base}/../escape/run", str(tmp_path / "link" / "run")],
                                    "--output-root"),
        "runtime_args.resume_from": ([outside, str(tmp_path / "link")], "--output-root"),
        "runtime_args.data_path": (["/etc/passwd", os.path.join(outside, "secret.yaml")], "--data-root"),
        "models.policy.load": ([outside, str(tmp_path / "link")], "--model-root"),
    }
    for key, (values, flag) in cases.items():
        for value in values:
            overrides = demo_overrides(toy, str(tmp_path / "ok"), **{key: value})
            msg = expect_rpc_error(lambda: coord.StartRun(cpb.StartRunRequest(config_yaml=demo_yaml,
                                                                              overrides=overrides)),
                                   INVALID, key, flag, "symlinks followed", base)
            _no_echo(msg)
            assert outside not in msg
    assert os.listdir(outside) == ["secret.yaml"], "nothing may be written outside the output root"
    assert not os.path.exists(f"{base}/../escape")
    assert len(coord.ListRuns(pb.Empty()).runs) == runs


def test_trainer_checkpoint_paths_stay_inside_its_root(trainer_set_up, outside, tmp_path):
    trainer = trainer_set_up.trainer_stub()
    probe = batches.to_proto(good_batch())
    before, step = trainer.ComputeLogProbs(probe).logprobs.data, trainer.GetInfo(pb.Empty()).step
    for rpc in ("SaveCheckpoint", "ExportHF", "LoadCheckpoint"):
        for path in (os.path.join(outside, "ckpt"), str(tmp_path / ".." / ".." / ".." / "escape-ckpt")):
            expect_rpc_error(lambda: getattr(trainer, rpc)(tpb.CheckpointRequest(path=path)), INVALID,
                             "path is outside the allowed roots", "--output-root")
    assert os.listdir(outside) == ["secret.yaml"]

    # a checkpoint inside the root, copied out: refused there, loadable inside
    good = str(tmp_path / "checkpoint-1")
    trainer.SaveCheckpoint(tpb.CheckpointRequest(path=good, extra_json=json.dumps({"episode": 1})))
    shutil.copytree(good, os.path.join(outside, "copy"))
    expect_rpc_error(lambda: trainer.LoadCheckpoint(tpb.CheckpointRequest(path=os.path.join(outside, "copy"))),
                     INVALID, "--output-root")
    shutil.rmtree(os.path.join(outside, "copy"))

    # the same checkpoint with a crafted .metadata (the pickle DCP would unpickle): refused unread
    marker = str(tmp_path / "payload-ran")
    evil = str(tmp_path / "evil")
    shutil.copytree(good, evil)
    with open(os.path.join(evil, ".metadata"), "wb") as f:
        f.write(pickle.dumps(_Mkdir(marker)))
    expect_rpc_error(lambda: trainer.LoadCheckpoint(tpb.CheckpointRequest(path=evil)), INVALID,
                     "does not match the digest", "rlgrid_meta.json")
    assert not os.path.exists(marker), "the crafted .metadata was unpickled by the trainer"
    assert trainer.GetInfo(pb.Empty()).step == step and trainer.ComputeLogProbs(probe).logprobs.data == before
    assert trainer.LoadCheckpoint(tpb.CheckpointRequest(path=good)).step == step
    assert _serving(trainer_set_up.cluster.channel(trainer_set_up.trainer))


class _Mkdir:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


# ---- 2. config is data ------------------------------------------------------------------------------

def test_interpolation_is_never_resolved(services, toy, demo_yaml, tmp_path):
    coord = services.coord()
    runs = len(coord.ListRuns(pb.Empty()).runs)
    secret = os.environ["PATH"]   # what ${oc.env:PATH} would leak from the coordinator's environment
    for key in ("runtime_args.exp_name", "models.policy.load"):
        overrides = demo_overrides(toy, str(tmp_path)) + [f"{key}=${{oc.env:PATH}}"]
        msg = expect_rpc_error(lambda: coord.StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=overrides)),
                               INVALID, key, "interpolation")
        assert secret not in msg
    text = demo_yaml.replace("toy_echo", "${oc.env:PATH}")
    msg = expect_rpc_error(lambda: coord.StartRun(cpb.StartRunRequest(config_yaml=text,
                                                                      overrides=demo_overrides(toy, str(tmp_path)))),
                           INVALID, "'models.reward.name'", "line", "interpolation")
    assert secret not in msg
    assert len(coord.ListRuns(pb.Empty()).runs) == runs
    assert all(secret not in r.config_yaml for r in coord.ListRuns(pb.Empty()).runs)


def test_setup_parses_config_the_same_safe_way(trainer_set_up):
    """A Setup config with interpolation is refused by the service itself and its setup keeps serving."""
    trainer, rollout = trainer_set_up.trainer_stub(), trainer_set_up.rollout_stub(0)
    probe = batches.to_proto(good_batch())
    before = trainer.ComputeLogProbs(probe).logprobs.data
    bad = "runtime_args:\n  exp_name: ${oc.env:PATH}\n"
    for stub in (trainer, rollout):
        msg = expect_rpc_error(lambda: stub.Setup(pb.SetupRequest(run_id="x", config_yaml=bad)), INVALID,
                               "'runtime_args.exp_name'", "interpolation")
        assert os.environ["PATH"] not in msg
    assert trainer.ComputeLogProbs(probe).logprobs.data == before


# ---- 4. only registered members steer a worker or join a sync ----------------------------------------

def _plan_for(rollout, rendezvous_port: int, secret: str = "") -> pb.WeightSyncPlan:
    info = rollout.GetInfo(pb.Empty())   # open to anyone: the attacker learns the parameter specs
    return pb.WeightSyncPlan(group_id="ws-attacker", transport="broadcast", backend="gloo",
                             rendezvous_host="127.0.0.1", rendezvous_port=rendezvous_port, world_size=2, rank=1,
                             params=info.params, bucket_bytes=1 << 20, timeout_s=5, secret=secret)


def test_steering_a_worker_needs_its_secret(trainer_set_up):
    services = trainer_set_up
    rollout_address = services.rollouts[0].address
    version = services.rollout_stub(0).GetInfo(pb.Empty()).policy_version
    for secret in (None, "a-guess"):
        rollout = services.rollout_stub(0, worker_secret=secret)
        trainer = services.trainer_stub(worker_secret=secret)
        # today's attack: point a replica's PrepareWeightSync at one's own rendezvous
        plan = _plan_for(services.rollout_stub(0, worker_secret=None), free_port(), secret="x")
        calls = [lambda: rollout.PrepareWeightSync(plan), lambda: rollout.Setup(pb.SetupRequest(run_id="x")),
                 lambda: rollout.CommitWeights(pb.WeightSyncRequest(version=version + 1)),
                 lambda: rollout.Generate(rpb.GenerateRequest(n=1, prompts=[rpb.Prompt(prompt_ids=ids_to_wire([3]))],
                                                              sampling=pb.SamplingParams(temperature=1, top_p=1,
                                                                                         top_k=-1, max_tokens=2))),
                 lambda: rollout.Sleep(rpb.SleepRequest(level=2)), lambda: rollout.WakeUp(rpb.WakeUpRequest()),
                 lambda: trainer.Offload(pb.Empty()), lambda: trainer.Onload(pb.Empty()),
                 lambda: trainer.Train(iter([batches.to_proto(good_batch())])),
                 lambda: trainer.SaveCheckpoint(tpb.CheckpointRequest(path="/tmp/x")),
                 lambda: trainer.Setup(pb.SetupRequest(run_id="x"))]
        for call in calls:
            msg = expect_rpc_error(call, DENIED, "only the coordinator it registered with")
            assert TEST_WORKER_SECRET not in msg
    assert services.rollout_stub(0).GetInfo(pb.Empty()).policy_version == version
    # nobody can register someone else's address under a secret of their own
    coord = services.coord()
    expect_rpc_error(lambda: coord.RegisterWorker(cpb.WorkerInfo(kind=cpb.ROLLOUT, address=rollout_address,
                                                                 secret="attacker's")), DENIED, "did not accept")
    expect_rpc_error(lambda: coord.RegisterWorker(cpb.WorkerInfo(kind=cpb.ROLLOUT, address=rollout_address)),
                     INVALID, "secret is empty")
    assert all(not w.secret for w in coord.ListWorkers(pb.Empty()).workers), "ListWorkers must not reveal secrets"
    # and a plan without the per-sync secret is refused even from the coordinator's side
    expect_rpc_error(lambda: services.rollout_stub(0).PrepareWeightSync(_plan_for(services.rollout_stub(0), 1)),
                     INVALID, "no secret")


def test_a_rendezvous_joiner_without_the_sync_secret_never_meets_the_group(trainer_set_up):
    """An attacker that knows the group id races the trainer for rank 0 on the coordinator's store: it
    never meets the group, and the replica receives the trainer's weights."""
    services = trainer_set_up
    rendezvous = weight_sync.Rendezvous("127.0.0.1", bind_host="127.0.0.1")
    rendezvous.new_group_id = lambda: "ws-known-to-the-attacker"
    limits = dict(max_message_mb=64, timeouts=RpcTimeouts())
    trainer = TrainerClient(services.trainer.address, **limits, secret=TEST_WORKER_SECRET)
    pool = RolloutPool([services.rollouts[0].address], **limits, retries=0, max_sequences=64,
                       secrets={services.rollouts[0].address: TEST_WORKER_SECRET})
    version = pool.replicas[0].stub.GetInfo(pb.Empty()).policy_version + 1000
    attacker: dict = {}

    def join_as_rank_0():
        plan = _plan_for(pool.replicas[0].stub, rendezvous.port, secret="guessed")
        plan.group_id, plan.rank, plan.rendezvous_host, plan.timeout_s = "ws-known-to-the-attacker", 0, "127.0.0.1", 8
        start = time.monotonic()
        try:
            weight_sync.connect(plan, torch.device("cpu"))
            attacker["joined"] = True
        except Exception as exc:  # noqa: BLE001 - the expected outcome
            attacker["error"], attacker["seconds"] = exc, time.monotonic() - start

    thread = threading.Thread(target=join_as_rank_0)
    thread.start()
    time.sleep(1.0)   # the attacker is waiting at the rendezvous first
    metrics = WeightSync(rendezvous, trainer, pool, bucket_mb=1).sync(version)
    thread.join(timeout=60)
    assert "joined" not in attacker and attacker["seconds"] >= 7, attacker
    assert metrics["sync/bytes"] > 0
    replica = pool.replicas[0].stub
    assert replica.GetInfo(pb.Empty()).policy_version == version
    # the replica serves the trainer's weights: its logprobs of a sample are the trainer's
    prompt = rpb.Prompt(group_id="g-0", prompt_ids=ids_to_wire([5, 3]))
    sample = next(iter(replica.Generate(rpb.GenerateRequest(
        prompts=[prompt], n=1, sampling=pb.SamplingParams(temperature=1, top_p=1, top_k=-1, max_tokens=4, seed=1)))))
    from services.common.tensors import from_wire
    response = from_wire(sample.response_ids).tolist()
    seq = batches.TrainSequence([5, 3], response, from_wire(sample.response_logprobs).tolist(), 0.0, 0)
    mb = batches.make_micro_batch([seq], num_global_tokens=len(response), temperature=1.0)
    ours = from_wire(trainer.stub.ComputeLogProbs(batches.to_proto(mb)).logprobs)[2:]
    theirs = from_wire(sample.response_logprobs)
    assert (ours - theirs).abs().max() < 1e-3


# ---- 3. transport ------------------------------------------------------------------------------------

def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket of process `pid`."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:   # LISTEN
                    hexaddr, hexport = cols[1].split(":")
                    raw = bytes.fromhex(hexaddr)
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    addr = ipaddress.ip_address(words)
                    if addr.version == 6 and addr.ipv4_mapped:
                        addr = addr.ipv4_mapped
                    found.append((str(addr), int(hexport, 16)))
    return found


@pytest.fixture(scope="module")
def lone_coordinator(tmp_path_factory, demo_yaml, outside):
    """A coordinator alone, with its own config dir (one good config, one symlink out) and metrics."""
    d = tmp_path_factory.mktemp("lone")
    configs = d / "configs"
    configs.mkdir()
    (configs / "ok.yaml").write_text(demo_yaml)
    os.symlink(os.path.join(outside, "secret.yaml"), configs / "evil.yaml")
    cluster = LocalCluster(str(d / "logs"), roots=[str(tmp_path_factory.getbasetemp())])
    metrics_port = free_port()
    proc = cluster.start("coordinator-lone", "services.coordinator", "--state-dir", str(d / "state"),
                         "--config-dir", str(configs), "--metrics-port", str(metrics_port))
    cluster.wait_healthy(proc)
    yield cluster, proc, metrics_port
    cluster.stop_all()


def test_config_dir_symlinks_out_are_refused(lone_coordinator, toy, tmp_path):
    cluster, proc, _ = lone_coordinator
    coord = coordinator_pb2_grpc.CoordinatorServiceStub(cluster.channel(proc))
    msg = expect_rpc_error(lambda: coord.StartRun(cpb.StartRunRequest(config_path="evil.yaml")), INVALID,
                           "--config-dir", "symlinks")
    _no_echo(msg)
    run = coord.StartRun(cpb.StartRunRequest(config_path="ok.yaml", overrides=demo_overrides(toy, str(tmp_path))))
    assert run.state == cpb.PENDING and str(tmp_path) in run.output_dir   # no workers: it waits
    coord.StopRun(cpb.RunRef(run_id=run.run_id))


def test_the_coordinator_listens_on_loopback_only(lone_coordinator):
    """gRPC, the weight-sync TCPStore and Prometheus all bind the configured host (default loopback)."""
    cluster, proc, metrics_port = lone_coordinator
    listening = _listening(proc.popen.pid)
    ports = {port for _, port in listening}
    grpc_port = int(proc.address.rsplit(":", 1)[1])
    assert {grpc_port, metrics_port} <= ports and len(ports) >= 3, listening   # + the rendezvous store
    assert all(addr in ("127.0.0.1", "::1") for addr, _ in listening), listening


def test_an_open_bind_needs_a_token_or_an_explicit_opt_out(services, tmp_path):
    cluster = services.cluster
    proc = cluster.start("coordinator-open", "services.coordinator", "--state-dir", str(tmp_path / "a"),
                         "--host", "0.0.0.0", env={AUTH_ENV: ""})
    assert proc.popen.wait(timeout=120) != 0
    log = proc.log_tail()
    assert AUTH_ENV in log and "--insecure-no-auth" in log and "refusing to serve on 0.0.0.0" in log
    cluster.procs.remove(proc)
    proc = cluster.start("coordinator-insecure", "services.coordinator", "--state-dir", str(tmp_path / "b"),
                         "--host", "0.0.0.0", "--insecure-no-auth", env={AUTH_ENV: ""})
    try:
        cluster.wait_healthy(proc)
        assert "NO authentication" in proc.log_tail()
    finally:
        cluster.stop(proc)


def tls_readme_block() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        match = re.search(r"<!-- grpcurl-tls-commands.*?-->\s*```bash\n(.*?)```", f.read(), re.S)
    assert match, "README lost its TLS grpcurl block"
    return match.group(1)


def test_a_cluster_over_tls(toy, demo_yaml, tmp_path_factory, tmp_path):
    """Coordinator, trainer and rollout over TLS (mutual between the coordinator and its workers), with
    a token: a run finishes; plaintext and certificate-less clients are refused; the README's grpcurl
    lines with -cacert work as written."""
    token = "tls-test-token"
    tls = make_local_tls(str(tmp_path / "certs"))
    cluster = LocalCluster(str(tmp_path / "logs"), roots=[str(tmp_path_factory.getbasetemp())],
                           worker_secret=TEST_WORKER_SECRET, tls=tls, env={AUTH_ENV: token})
    try:
        coord_proc, trainer_proc, (rollout_proc,) = cluster.deploy(str(tmp_path / "state"), replicas=1)
        coord = coordinator_pb2_grpc.CoordinatorServiceStub(cluster.channel(coord_proc, auth_token=token))
        deadline = time.time() + 60
        while len(coord.ListWorkers(pb.Empty()).workers) < 2:
            assert time.time() < deadline, "workers did not register over TLS"
            time.sleep(0.2)
        overrides = demo_overrides(toy, str(tmp_path / "out"), **{"runtime_args.num_episode": 2,
                                                                  "runtime_args.sample_per_episode": 16,
                                                                  "runtime_args.train_global_batch_size": 16})
        run = coord.StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=overrides))
        events = list(coord.WatchRun(cpb.WatchRunRequest(run_id=run.run_id), timeout=300))
        info = coord.GetRun(cpb.RunRef(run_id=run.run_id))
        assert info.state == cpb.FINISHED, info.error
        assert [e.metrics["agreement/max_abs_diff"] < 1e-3 for e in events if e.metrics] == [True, True]

        plain = coordinator_pb2_grpc.CoordinatorServiceStub(make_channel(coord_proc.address, auth_token=token))
        expect_rpc_error(lambda: plain.ListRuns(pb.Empty(), timeout=10), grpc.StatusCode.UNAVAILABLE)
        for proc, stub in ((trainer_proc, trainer_pb2_grpc.TrainerServiceStub),
                           (rollout_proc, rollout_pb2_grpc.RolloutServiceStub)):
            no_cert = stub(make_channel(proc.address, auth_token=token, worker_secret=TEST_WORKER_SECRET,
                                        tls=ClientTLS(tls.ca)))   # TLS, token and secret, but no client certificate
            expect_rpc_error(lambda: no_cert.GetInfo(pb.Empty(), timeout=10), grpc.StatusCode.UNAVAILABLE)
            assert stub(cluster.channel(proc, auth_token=token)).GetInfo(pb.Empty(), timeout=10).device == "cpu"

        venv_bin = os.path.dirname(sys.executable)
        script = tls_readme_block().replace("localhost:50050", coord_proc.address).replace("certs/ca.pem", tls.ca)
        env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", AUTH_ENV: token}
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        assert "rlgrid.v1.CoordinatorService" in out.stdout and '"kind": "TRAINER"' in out.stdout
        plaintext = subprocess.run(["grpcurl", "-plaintext", "-H", f"authorization: Bearer {token}",
                                    coord_proc.address, "list"], capture_output=True, text=True, timeout=60, env=env)
        assert plaintext.returncode != 0
    finally:
        cluster.stop_all()
