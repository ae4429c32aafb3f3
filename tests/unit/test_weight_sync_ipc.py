"""The cuda_ipc weight-sync transport's protocol, run for real on the CPU: three processes, the buffer in
host shared memory instead of GPU memory (the CUDA handle export itself needs a GPU:
bench/gpu_colocated.py runs it there). Also how the coordinator picks it, and who may join."""
from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback
from types import SimpleNamespace as Info

import pytest
import torch

from rlgrid.v1 import common_pb2 as pb
from services.common.rpc import InvalidArgument
from services.common.weight_sync import (
    ParamMeta,
    Rendezvous,
    check_member,
    check_plan,
    choose_transport,
    connect,
    flat_layout,
    group_prefix,
    specs_to_wire,
)
from tests.unit.test_weight_sync import PARAMS, _bytes, _expected_tensors

SECRET = "ipc-unit-test-secret"


def _plan(rdzv: Rendezvous, group_id: str, rank: int, params=PARAMS, world_size: int = 3) -> pb.WeightSyncPlan:
    return pb.WeightSyncPlan(group_id=group_id, transport="cuda_ipc", backend="", rendezvous_host=rdzv.host,
                             rendezvous_port=rdzv.port, world_size=world_size, rank=rank,
                             params=specs_to_wire(params), bucket_bytes=1024, timeout_s=60, secret=SECRET)


def _member(plan_bytes: bytes, transfers: int, results) -> None:
    """Rank 0 sends `transfers` sets (the k-th is the expected tensors times k), then one whose first name
    is wrong; receivers take as many and record what they got and how their extra receive failed."""
    plan = pb.WeightSyncPlan.FromString(plan_bytes)
    try:
        transport = connect(plan, torch.device("cpu"))
        report = {"kind": type(transport.memory).__name__}
        if plan.rank == 0:
            tensors = _expected_tensors()
            report["sent"], report["send_errors"] = [], []
            for k in range(1, transfers + 1):
                # fp32 masters on the sender: the transport casts to the plan's dtype as it packs
                items = [(p.name, (tensors[p.name].float() * k)) for p in PARAMS]
                try:
                    report["sent"].append(transport.send(iter(items)))
                except Exception as exc:  # noqa: BLE001 - reported to the parent
                    report["send_errors"].append(f"{type(exc).__name__}: {exc}")
            wrong = [("not.a.param", tensors[PARAMS[0].name])] + [(p.name, tensors[p.name]) for p in PARAMS[1:]]
            start = time.perf_counter()
            try:
                transport.send(iter(wrong))
            except ValueError as exc:
                report["wrong_name"] = (str(exc), time.perf_counter() - start)
        else:
            report["received"] = []
            for _ in range(transfers):
                try:
                    report["received"].append([(n, str(t.dtype), tuple(t.shape), _bytes(t))
                                               for n, t in transport.receive()])
                except Exception as exc:  # noqa: BLE001
                    report["received"].append(f"{type(exc).__name__}: {exc}")
            start = time.perf_counter()
            try:
                list(transport.receive())
            except Exception as exc:  # noqa: BLE001
                report["after_wrong_name"] = (f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
        transport.close()
        results.put((plan.rank, report))
    except BaseException:  # noqa: BLE001 - report to the parent instead of hanging it
        results.put((plan.rank, {"error": traceback.format_exc()}))


def _run_group(plans: list[pb.WeightSyncPlan], transfers: int) -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(p.SerializeToString(), transfers, results), daemon=True)
             for p in plans]
    for proc in procs:
        proc.start()
    reports = {}
    try:
        for _ in procs:
            try:
                rank, report = results.get(timeout=120)
            except queue.Empty:
                pytest.fail(f"members did not report in time; exit codes {[p.exitcode for p in procs]}")
            assert "error" not in report, f"rank {rank} failed:\n{report['error']}"
            reports[rank] = report
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return reports


def test_ipc_group_moves_every_transfer_bit_exact_and_fails_fast():
    rdzv = Rendezvous("127.0.0.1", bind_host="127.0.0.1")
    group = rdzv.new_group_id()
    reports = _run_group([_plan(rdzv, group, r) for r in range(3)], transfers=2)

    _, nbytes = flat_layout(PARAMS)
    assert reports[0]["kind"] == "_HostMemory"
    assert reports[0]["sent"] == [nbytes, nbytes] and not reports[0]["send_errors"]
    expected = _expected_tensors()
    for rank in (1, 2):
        for k, got in enumerate(reports[rank]["received"], start=1):
            assert [n for n, *_ in got] == [p.name for p in PARAMS]
            for (name, dtype, shape, data), p in zip(got, PARAMS):
                assert dtype == str(p.dtype) and shape == p.shape
                assert data == _bytes((expected[name].float() * k).to(p.dtype)), f"rank {rank} transfer {k}: {name}"
        # the sender's failure (a name the plan does not have) reaches every receiver at once, not after
        # the group's 60 s timeout
        message, seconds = reports[rank]["after_wrong_name"]
        assert "FailedPrecondition" in message and "not.a.param" in message and seconds < 30, (message, seconds)
    message, _ = reports[0]["wrong_name"]
    assert "not.a.param" in message and PARAMS[0].name in message

    # the store outlives the group: each completed transfer's keys are gone
    store = torch.distributed.PrefixStore(group_prefix(_plan(rdzv, group, 0)), rdzv.store)
    assert not store.check(["buffer/1"]) and not store.check(["buffer/2"]) and not store.check(["ack/2/1"])


def test_a_receiver_that_cannot_take_the_weights_fails_the_send_at_once():
    rdzv = Rendezvous("127.0.0.1", bind_host="127.0.0.1")
    group = rdzv.new_group_id()
    other = [ParamMeta(p.name, p.dtype, p.shape if i else (3, 4)) for i, p in enumerate(PARAMS)]   # fewer bytes
    plans = [_plan(rdzv, group, 0), _plan(rdzv, group, 1), _plan(rdzv, group, 2, params=other)]
    start = time.perf_counter()
    reports = _run_group(plans, transfers=1)
    assert time.perf_counter() - start < 60   # well inside the 60 s the sender would otherwise wait
    (error,) = reports[0]["send_errors"]
    assert "FailedPrecondition" in error and "rank(s) [2]" in error and "bytes" in error, error
    assert isinstance(reports[1]["received"][0], list)   # the other replica got its copy
    assert "FailedPrecondition" in reports[2]["received"][0]


def test_cuda_ipc_plans_are_for_gpu_members_only():
    rdzv = Rendezvous("127.0.0.1", bind_host="127.0.0.1")
    plan = _plan(rdzv, rdzv.new_group_id(), 1)
    check_plan(plan)
    with pytest.raises(InvalidArgument, match="share one GPU; this member is on cpu"):
        check_member(plan, torch.device("cpu"))
    check_member(pb.WeightSyncPlan(transport="broadcast"), torch.device("cpu"))
    plan.backend = "gloo"
    with pytest.raises(InvalidArgument, match="backend must be empty with transport cuda_ipc"):
        check_plan(plan)


def test_the_coordinator_picks_cuda_ipc_only_when_every_replica_shares_the_trainers_gpu():
    trainer = Info(device="cuda:0", gpu_uuids=["GPU-a"])
    transport, backend, why = choose_transport(trainer, [Info(device="cuda:0", gpu_uuids=["GPU-a"])])
    assert (transport, backend) == ("cuda_ipc", "") and "GPU-a" in why
    assert choose_transport(trainer, [Info(device="cuda:0", gpu_uuids=["GPU-a"])] * 2)[:2] == ("cuda_ipc", "")
    # one replica elsewhere, a TP replica half on the trainer's GPU, a CPU trainer: a broadcast, as before
    assert choose_transport(trainer, [Info(device="cuda:0", gpu_uuids=["GPU-a"]),
                                      Info(device="cuda:0", gpu_uuids=["GPU-b"])])[:2] == ("broadcast", "gloo")
    assert choose_transport(trainer, [Info(device="cuda:0", gpu_uuids=["GPU-a", "GPU-b"])])[:2] == \
        ("broadcast", "gloo")
    assert choose_transport(trainer, [Info(device="cuda:0", gpu_uuids=["GPU-b"])]) == ("broadcast", "nccl", "")
    assert choose_transport(Info(device="cpu", gpu_uuids=[]), [Info(device="cpu", gpu_uuids=[])])[:2] == \
        ("broadcast", "gloo")
