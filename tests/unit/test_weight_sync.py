"""Tests for services.common.weight_sync: bucket planning and a real 3-process gloo broadcast group."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback

import pytest
import torch

from rlgrid.v1 import common_pb2 as pb
from services.common.weight_sync import (
    ParamMeta,
    Rendezvous,
    connect,
    plan_buckets,
    specs_from_wire,
    specs_to_wire,
)

ALIGN = 64


def _meta(i: int, shape, dtype=torch.float32) -> ParamMeta:
    return ParamMeta(f"p{i}", dtype, tuple(shape))


def _check_layout(params, buckets, bucket_bytes):
    order = [idx for b in buckets for idx, _ in b.entries]
    assert order == list(range(len(params)))  # every parameter once, in plan order
    for b in buckets:
        assert b.entries
        end = 0
        for idx, offset in b.entries:
            assert offset % ALIGN == 0
            assert offset >= end  # no overlap with the previous entry
            end = offset + params[idx].nbytes
        assert b.nbytes == end
        if len(b.entries) > 1:
            assert b.nbytes <= bucket_bytes
        else:
            assert b.entries[0][1] == 0


def test_param_meta_nbytes():
    assert ParamMeta("a", torch.bfloat16, (3, 5)).nbytes == 30
    assert ParamMeta("a", torch.float64, ()).nbytes == 8
    assert ParamMeta("a", torch.int8, (0, 7)).nbytes == 0


def test_plan_buckets_respects_size_and_alignment():
    g = torch.Generator().manual_seed(0)
    params = []
    for i in range(40):
        shape = tuple(int(x) for x in torch.randint(1, 20, (int(torch.randint(1, 3, (1,), generator=g)),),
                                                    generator=g))
        params.append(_meta(i, shape, [torch.float32, torch.bfloat16, torch.int8][i % 3]))
    bucket_bytes = 1000
    buckets = plan_buckets(params, bucket_bytes)
    _check_layout(params, buckets, bucket_bytes)
    assert len(buckets) > 3
    # greedy: a bucket is closed only when the next parameter would not have fit into it
    for prev, nxt in zip(buckets, buckets[1:]):
        first = params[nxt.entries[0][0]]
        aligned_end = -(-prev.nbytes // ALIGN) * ALIGN
        assert aligned_end + first.nbytes > bucket_bytes


def test_plan_buckets_exact_packing_of_aligned_params():
    params = [_meta(i, (16,)) for i in range(8)]  # 64 bytes each
    buckets = plan_buckets(params, 256)
    assert [b.entries for b in buckets] == [((0, 0), (1, 64), (2, 128), (3, 192)),
                                            ((4, 0), (5, 64), (6, 128), (7, 192))]
    assert [b.nbytes for b in buckets] == [256, 256]


def test_plan_buckets_unaligned_params_are_padded_to_64():
    params = [_meta(0, (3,), torch.int8), _meta(1, (1,), torch.float64), _meta(2, (65,), torch.uint8)]
    (bucket,) = plan_buckets(params, 4096)
    assert bucket.entries == ((0, 0), (1, 64), (2, 128))
    assert bucket.nbytes == 128 + 65


def test_plan_buckets_oversize_param_gets_its_own_bucket():
    params = [_meta(0, (10,)), _meta(1, (1000,)), _meta(2, (10,)), _meta(3, (10,))]
    buckets = plan_buckets(params, 256)
    _check_layout(params, buckets, 256)
    assert [tuple(i for i, _ in b.entries) for b in buckets] == [(0,), (1,), (2, 3)]
    assert buckets[1].nbytes == 4000 and buckets[1].entries == ((1, 0),)


def test_plan_buckets_is_deterministic():
    params = [_meta(i, (i % 7 + 1, 3), torch.bfloat16 if i % 2 else torch.float32) for i in range(25)]
    a = plan_buckets(params, 300)
    b = plan_buckets(list(params), 300)
    c = plan_buckets([ParamMeta(p.name, p.dtype, p.shape) for p in params], 300)
    assert a == b == c


def test_plan_buckets_rejects_nonpositive_size():
    with pytest.raises(ValueError, match="bucket"):
        plan_buckets([_meta(0, (1,))], 0)


def test_specs_wire_round_trip():
    params = [ParamMeta("a.weight", torch.bfloat16, (4, 8)), ParamMeta("b", torch.float32, ()),
              ParamMeta("c", torch.int64, (0,))]
    wire = specs_to_wire(params)
    assert [s.dtype for s in wire] == [pb.BFLOAT16, pb.FLOAT32, pb.INT64]
    assert specs_from_wire(wire) == params


# ---- a real gloo group over 3 processes -----------------------------------------------------------

BUCKET_BYTES = 1024
PARAMS = [
    ParamMeta("embed.weight", torch.float32, (12, 8)),      # 384 B
    ParamMeta("layer.0.norm", torch.bfloat16, (7,)),        # 14 B, unaligned
    ParamMeta("layer.0.proj", torch.bfloat16, (16, 20)),    # 640 B
    ParamMeta("layer.1.big", torch.float32, (30, 20)),      # 2400 B > bucket: alone
    ParamMeta("layer.1.bias", torch.float32, (5,)),
    ParamMeta("layer.1.scale", torch.bfloat16, (3, 3, 3)),
    ParamMeta("head.weight", torch.float32, (8, 12)),
]


def _expected_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2024)
    out = {}
    for p in PARAMS:
        t = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        flat = t.view(-1)
        if flat.numel() >= 4:  # bit patterns a lossy path would not preserve
            flat[:4] = torch.tensor([float("nan"), -0.0, float("inf"), 1e-40 if p.dtype == torch.float32 else 1e-39])
        out[p.name] = t
    return out


def _bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().view(-1).view(torch.uint8).tolist())


def _plan(rdzv_host: str, rdzv_port: int, group_id: str, rank: int) -> pb.WeightSyncPlan:
    return pb.WeightSyncPlan(group_id=group_id, transport="broadcast", backend="gloo", rendezvous_host=rdzv_host,
                             rendezvous_port=rdzv_port, world_size=3, rank=rank, params=specs_to_wire(PARAMS),
                             bucket_bytes=BUCKET_BYTES, timeout_s=60, secret="unit-test-secret")


def _member(plan_bytes: bytes, results) -> None:
    """One member of the group (spawned). Reports (rank, payload) or (rank, 'error', traceback)."""
    plan = pb.WeightSyncPlan.FromString(plan_bytes)
    try:
        transport = connect(plan, torch.device("cpu"))
        if plan.rank == 0:
            tensors = _expected_tensors()
            # the trainer holds fp32 masters: the transport casts to the plan's dtype (exact for these values)
            upcast = dict(tensors, **{"layer.0.proj": tensors["layer.0.proj"].float()})
            sent = transport.send((p.name, upcast[p.name]) for p in PARAMS)
            errors = {}
            # A sender/plan mismatch on the first parameter raises before anything is broadcast.
            wrong_name = [("not.a.param", tensors[PARAMS[0].name])] + [(p.name, tensors[p.name]) for p in PARAMS[1:]]
            wrong_shape = [(PARAMS[0].name, tensors[PARAMS[0].name].reshape(8, 12))] + \
                          [(p.name, tensors[p.name]) for p in PARAMS[1:]]
            for label, items in (("name", wrong_name), ("shape", wrong_shape)):
                try:
                    transport.send(iter(items))
                    errors[label] = None
                except ValueError as exc:
                    errors[label] = str(exc)
            results.put((0, {"sent": sent, "errors": errors}))
        else:
            received = []
            for name, tensor in transport.receive():
                received.append((name, str(tensor.dtype), tuple(tensor.shape), _bytes(tensor)))
            results.put((plan.rank, {"received": received}))
        transport.close()
    except BaseException:  # noqa: BLE001 - report to the parent instead of hanging it
        results.put((plan.rank, "error", traceback.format_exc()))


def test_broadcast_group_over_three_processes():
    rdzv = Rendezvous("127.0.0.1", bind_host="127.0.0.1")
    group_id = rdzv.new_group_id()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    env_backup = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # inherited by the spawned members: stay on loopback
    procs = []
    try:
        for rank in range(3):
            proc = ctx.Process(target=_member, args=(_plan(rdzv.host, rdzv.port, group_id, rank).SerializeToString(),
                                                     results), daemon=True)
            proc.start()
            procs.append(proc)
        reports = {}
        for _ in range(3):
            try:
                item = results.get(timeout=90)
            except queue.Empty:
                pytest.fail(f"weight-sync members did not report in time; exit codes {[p.exitcode for p in procs]}")
            if len(item) == 3:
                pytest.fail(f"rank {item[0]} failed:\n{item[2]}")
            reports[item[0]] = item[1]
        for proc in procs:
            proc.join(timeout=30)
    finally:
        if env_backup is None:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)
        else:
            os.environ["GLOO_SOCKET_IFNAME"] = env_backup
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)

    buckets = plan_buckets(PARAMS, BUCKET_BYTES)
    assert len(buckets) >= 3  # the transfer really spans several (double-buffered) buckets
    assert reports[0]["sent"] == sum(b.nbytes for b in buckets)

    expected = _expected_tensors()
    for rank in (1, 2):
        got = reports[rank]["received"]
        assert [name for name, *_ in got] == [p.name for p in PARAMS]
        for (name, dtype, shape, data), p in zip(got, PARAMS):
            assert dtype == str(p.dtype) and shape == p.shape, name
            assert data == _bytes(expected[name]), f"rank {rank}: {name} is not bit-identical"

    errors = reports[0]["errors"]
    assert errors["name"] is not None and "not.a.param" in errors["name"] and PARAMS[0].name in errors["name"]
    assert errors["shape"] is not None and "[8, 12]" in errors["shape"]


def test_sender_with_too_few_tensors_raises_value_error():
    rdzv = Rendezvous("127.0.0.1", bind_host="127.0.0.1")
    plan = pb.WeightSyncPlan(group_id=rdzv.new_group_id(), transport="broadcast", backend="gloo",
                             rendezvous_host=rdzv.host, rendezvous_port=rdzv.port, world_size=1, rank=0,
                             params=specs_to_wire(PARAMS), bucket_bytes=BUCKET_BYTES, timeout_s=30,
                             secret=rdzv.new_secret())
    transport = connect(plan, torch.device("cpu"))  # a group of one: the sender alone
    try:
        tensors = _expected_tensors()
        assert transport.send((p.name, tensors[p.name]) for p in PARAMS) == sum(
            b.nbytes for b in plan_buckets(PARAMS, BUCKET_BYTES))
        with pytest.raises(ValueError, match=PARAMS[-1].name):
            transport.send((p.name, tensors[p.name]) for p in PARAMS[:-1])
    finally:
        transport.close()


def test_connect_rejects_unknown_transport():
    with pytest.raises(ValueError, match="transport"):
        connect(pb.WeightSyncPlan(transport="carrier-pigeon"), torch.device("cpu"))


def test_colocated_members_sync_over_gloo_and_separate_gpus_over_nccl():
    """NCCL refuses two ranks of one group on one GPU: a trainer and a replica sharing a GPU (found by
    the GPUs' UUIDs, which CUDA_VISIBLE_DEVICES does not renumber) get gloo, with the reason."""
    from types import SimpleNamespace as Info

    from services.common.weight_sync import choose_backend
    trainer = Info(device="cuda:0", gpu_uuids=["GPU-a"])
    assert choose_backend(trainer, [Info(device="cuda:0", gpu_uuids=["GPU-b"]),
                                    Info(device="cuda:0", gpu_uuids=["GPU-c", "GPU-d"])]) == ("nccl", "")
    backend, why = choose_backend(trainer, [Info(device="cuda:0", gpu_uuids=["GPU-b"]),
                                            Info(device="cuda:0", gpu_uuids=["GPU-c", "GPU-a"])])
    assert backend == "gloo" and "the trainer and replica 1 share GPU GPU-a" in why
    backend, why = choose_backend(trainer, [Info(device="cuda:0", gpu_uuids=["GPU-b"]),
                                            Info(device="cuda:0", gpu_uuids=["GPU-b"])])
    assert backend == "gloo" and "replica 0 and replica 1 share GPU GPU-b" in why
    assert choose_backend(Info(device="cpu", gpu_uuids=[]), [Info(device="cuda:0", gpu_uuids=["GPU-b"])])[0] == "gloo"


def test_gpu_uuids_are_empty_on_cpu():
    from services.common.weight_sync import gpu_uuids
    assert gpu_uuids(torch.device("cpu")) == []


def test_rendezvous_listens_on_its_bind_host_only():
    """torch's TCPStore would listen on every interface; the coordinator's listens on --host."""
    rdzv = Rendezvous("127.0.0.1", bind_host="127.0.0.1")
    port = f"{rdzv.port:04X}"
    with open("/proc/net/tcp") as f:
        v4 = [line.split()[1] for line in f.readlines()[1:] if line.split()[3] == "0A"]
    with open("/proc/net/tcp6") as f:
        v6 = [line.split()[1] for line in f.readlines()[1:] if line.split()[3] == "0A"]
    assert f"0100007F:{port}" in v4 and not any(a.endswith(f":{port}") for a in v6), (v4, v6)
    assert rdzv.new_secret() != rdzv.new_secret() and len(rdzv.new_secret()) == 32


def test_a_plan_without_a_secret_is_refused():
    rdzv = Rendezvous("127.0.0.1", bind_host="127.0.0.1")
    plan = pb.WeightSyncPlan(group_id=rdzv.new_group_id(), transport="broadcast", backend="gloo",
                             rendezvous_host=rdzv.host, rendezvous_port=rdzv.port, world_size=1, rank=0,
                             params=specs_to_wire(PARAMS), bucket_bytes=BUCKET_BYTES, timeout_s=30)
    with pytest.raises(ValueError, match="no secret"):
        connect(plan, torch.device("cpu"))
