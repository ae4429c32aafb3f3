"""No silent keys: every schema key is read by the services, or setting it is refused naming it.

A coordinator, a trainer and a rollout service run in this process (the same servers as always, so
their reads can be traced), and two real runs go through them: one that checkpoints, one that resumes
from it. Every read of a config attribute from services/ code other than config.py itself (whose
validation reads everything) counts as consumed. Each key never read must be refused, when set to
something other than its default, by load_config or by the trainer's or rollout's Setup.
"""
import dataclasses
import os
import sys
import time
import typing

import grpc
import pytest

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import coordinator_pb2_grpc, rollout_pb2_grpc, trainer_pb2_grpc
from services.common import config as config_module
from services.common.config import RLConfig, config_to_yaml, load_config, valid_keys
from services.common.rpc import make_channel
from services.common.worker import WORKER_SECRET_ENV
from tests.integration.cluster import ROOT, TEST_WORKER_SECRET
from tests.integration.conftest import demo_overrides

pytestmark = pytest.mark.slow


SERVICES = os.path.join(ROOT, "services") + os.sep
CONFIG_PY = os.path.abspath(config_module.__file__)


def _schema(cls: type = RLConfig, prefix: str = "") -> dict[type, str]:
    """Each config dataclass -> its dotted prefix (each appears once in the tree)."""
    out = {cls: prefix}
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(_schema(tp, f"{prefix}{name}."))
    return out


class ReadTrace:
    """Records `section.key` for every read of a config field by services/ code outside config.py."""

    def __init__(self):
        self.reads: set[str] = set()
        self.prefixes = _schema()
        self.fields = {cls: {f.name for f in dataclasses.fields(cls)} for cls in self.prefixes}

    def __enter__(self):
        trace = self

        def traced(obj, name, _get=object.__getattribute__):
            cls = type(obj)
            if name in trace.fields.get(cls, ()):
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(SERVICES) and os.path.abspath(caller) != CONFIG_PY:
                    trace.reads.add(trace.prefixes[cls] + name)
            return _get(obj, name)
        for cls in self.prefixes:
            cls.__getattribute__ = traced
        return self

    def __exit__(self, *exc):
        for cls in self.prefixes:
            del cls.__getattribute__


def _other_value(key: str):
    """A valid non-default value for `key` (for the refusal check)."""
    default = config_module._get(RLConfig(), key)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 2
    if isinstance(default, float):
        return default / 2 if default else 1e-7
    if isinstance(default, list):
        return [1]
    return "other"


def _wait(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline
        time.sleep(0.2)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """Coordinator, trainer and rollout servers in this process, registered with each other."""
    from services.common.paths import Roots
    from services.coordinator.confine import DEFAULT_CONFIG_DIR, RunRoots
    from services.coordinator.server import serve as coordinator
    from services.rollout.server import serve as rollout
    from services.trainer.server import serve as trainer
    state = tmp_path_factory.mktemp("walk-state")
    tmp = [str(tmp_path_factory.getbasetemp())]   # the toy files and every output live in pytest's temp dir
    roots = {flag: Roots.of(flag, tmp) for flag in ("--output-root", "--data-root", "--model-root")}
    coord_server, _ = coordinator(0, host="127.0.0.1", state_dir=str(state), roots=RunRoots(
        DEFAULT_CONFIG_DIR, roots["--output-root"], roots["--data-root"], roots["--model-root"]))
    address = f"127.0.0.1:{coord_server.port}"
    os.environ[WORKER_SECRET_ENV] = TEST_WORKER_SECRET   # read by both workers at start
    try:
        servers = [coord_server,
                   trainer(0, host="127.0.0.1", coordinator=address, device="cpu",
                           output_roots=roots["--output-root"], model_roots=roots["--model-root"])[0],
                   rollout(0, host="127.0.0.1", coordinator=address, device="cpu", model_roots=roots["--model-root"])[0]]
    finally:
        del os.environ[WORKER_SECRET_ENV]
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(make_channel(address))
    _wait(lambda: len(stub.ListWorkers(pb.Empty()).workers) == 2)
    yield stub, [f"127.0.0.1:{s.port}" for s in servers]
    for s in servers:
        s.stop(0)


def _run(stub, config_yaml: str, overrides: list[str]) -> cpb.RunInfo:
    run = stub.StartRun(cpb.StartRunRequest(config_yaml=config_yaml, overrides=overrides))
    list(stub.WatchRun(cpb.WatchRunRequest(run_id=run.run_id), timeout=300))
    info = stub.GetRun(cpb.RunRef(run_id=run.run_id))
    assert info.state == cpb.FINISHED, info.error
    return info


def test_every_key_is_read_or_refused(in_process, toy, demo_yaml, tmp_path):
    stub, (_, trainer_address, rollout_address) = in_process
    base = demo_overrides(toy, str(tmp_path), **{
        "runtime_args.sample_per_episode": 16, "runtime_args.train_global_batch_size": 16,
        "models.policy_trainer.kl_coef": 0.01, "models.policy_trainer.entropy_coef": 0.001,
        "runtime_args.save_episode_interval": 1, "models.policy_trainer.save_hf": True,
        "models.reward.timeout_s": 30})
    with ReadTrace() as trace:
        first = _run(stub, demo_yaml, base + ["runtime_args.num_episode=1"])
        checkpoint = os.path.join(first.output_dir, "runs", first.run_id, "checkpoint-1")
        _run(stub, demo_yaml, base + ["runtime_args.num_episode=2", f"runtime_args.resume_from={checkpoint}"])
    unread = [k for k in valid_keys() if k not in trace.reads]
    assert len(set(valid_keys()) & trace.reads) > 50, sorted(trace.reads)   # the trace saw the runs

    setup = {"trainer": trainer_pb2_grpc.TrainerServiceStub(make_channel(trainer_address,
                                                                          worker_secret=TEST_WORKER_SECRET)),
             "rollout": rollout_pb2_grpc.RolloutServiceStub(make_channel(rollout_address,
                                                                         worker_secret=TEST_WORKER_SECRET))}
    silent = []
    for key in unread:
        overrides = base + [f"{key}={_other_value(key)}"]
        try:
            cfg = load_config(demo_yaml, overrides)
        except config_module.ConfigError as exc:
            if key in str(exc):
                continue
            raise
        refused = False
        for name, service in setup.items():   # refused at Setup, where the model is known (e.g. groupgemm)
            try:
                service.Setup(pb.SetupRequest(run_id="walk", config_yaml=config_to_yaml(cfg)), timeout=120)
            except grpc.RpcError as exc:
                refused |= exc.code() == grpc.StatusCode.INVALID_ARGUMENT and key in exc.details()
        if not refused:   # refused when the run starts, where the services' GPUs are known (e.g. placement)
            run = stub.StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=overrides))
            list(stub.WatchRun(cpb.WatchRunRequest(run_id=run.run_id), timeout=300))
            info = stub.GetRun(cpb.RunRef(run_id=run.run_id))
            refused = info.state == cpb.FAILED and info.step == 0 and key in info.error
        if not refused:
            silent.append(key)
    assert not silent, f"keys accepted and never read (consume them or refuse them where they do not apply): {silent}"
