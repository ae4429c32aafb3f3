"""Weight sync: one interface, moving a versioned set of named tensors trainer -> rollout.

Control plane (gRPC, in the services): the coordinator hands every member a WeightSyncPlan (group
id, rendezvous, ranks, parameter specs, bucket size); the trainer's SendWeights and every
replica's ReceiveWeights run concurrently; replicas stage what they receive and make it the
serving version only on CommitWeights, so a replica serves the old or the new version, never a mix.

Data plane (here): a `WeightTransport` chosen by `plan.transport`. The only one today is
"broadcast": a torch.distributed process group (NCCL on GPU, gloo on CPU) made directly on a
TCPStore the coordinator hosts, separate from the trainer's own FSDP group, joining the sender
(rank 0) and every replica. Tensors travel in flat byte buckets of `plan.bucket_bytes`, double
buffered so packing bucket i+1 overlaps the transfer of bucket i.

Later transports register in TRANSPORTS without touching callers: callers only ever call
`connect(plan, device)`, then `send(named_tensors)` on the sender or iterate `receive()` on a
receiver. CUDA IPC for colocated rollout/trainer fits behind the same pair (handles instead of
bytes), and several trainer ranks sending their own shards fits as a transport whose sender side
is entered by every trainer rank (`send` is called on all of them; each pushes what it owns).
"""
from __future__ import annotations

import abc
import datetime
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from rlgrid.v1 import common_pb2 as pb
from services.common.rpc import FailedPrecondition, InvalidArgument
from services.common.tensors import torch_dtype, wire_dtype

_ALIGN = 64  # byte offset alignment inside a bucket, so any dtype view of a slice is aligned


@dataclass(frozen=True)
class ParamMeta:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def specs_to_wire(params: Iterable[ParamMeta]) -> list[pb.ParamSpec]:
    return [pb.ParamSpec(name=p.name, dtype=wire_dtype(p.dtype), shape=list(p.shape)) for p in params]


def specs_from_wire(specs: Iterable[pb.ParamSpec]) -> list[ParamMeta]:
    return [ParamMeta(s.name, torch_dtype(s.dtype), tuple(s.shape)) for s in specs]


@dataclass(frozen=True)
class Bucket:
    """Parameters laid out in one flat byte buffer: (param index, byte offset) pairs."""
    entries: tuple[tuple[int, int], ...]
    nbytes: int


def plan_buckets(params: list[ParamMeta], bucket_bytes: int) -> list[Bucket]:
    """Greedy, in parameter order; a parameter larger than bucket_bytes gets a bucket of its own.

    Sender and receivers compute the same layout from the same plan, so only bytes travel.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive (runtime_args.weight_sync_bucket_mb), got {bucket_bytes}")
    buckets, entries, offset = [], [], 0
    for i, p in enumerate(params):
        start = -(-offset // _ALIGN) * _ALIGN
        if entries and start + p.nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(entries), offset))
            entries, start = [], 0
        entries.append((i, start))
        offset = start + p.nbytes
    if entries:
        buckets.append(Bucket(tuple(entries), offset))
    return buckets


class WeightTransport(abc.ABC):
    """One member's end of a weight-sync group."""

    def __init__(self, plan: pb.WeightSyncPlan, device: torch.device):
        self.plan = plan
        self.device = device
        self.params = specs_from_wire(plan.params)
        self.rank = plan.rank

    @abc.abstractmethod
    def send(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Sender: pushes the named tensors, in plan order, to every receiver. Returns bytes sent."""

    @abc.abstractmethod
    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Receiver: yields (name, tensor) in plan order, in the plan's dtype. The transport owns
        the memory: a yielded tensor stays valid until the next receive() on this transport, so an
        engine may stage it without copying and copy it into its weights on commit."""

    def close(self) -> None:
        """Releases the group's resources."""


class BroadcastTransport(WeightTransport):
    """torch.distributed broadcast from rank 0 over a group built directly on the coordinator's TCPStore."""

    def __init__(self, plan: pb.WeightSyncPlan, device: torch.device):
        super().__init__(plan, device)
        timeout = datetime.timedelta(seconds=plan.timeout_s or 300)
        check_plan_secret(plan)
        store = dist.TCPStore(plan.rendezvous_host, plan.rendezvous_port, is_master=False, timeout=timeout)
        store = dist.PrefixStore(group_prefix(plan), store)
        if plan.backend == "nccl":
            self.pg = dist.ProcessGroupNCCL(store, plan.rank, plan.world_size, dist.ProcessGroupNCCL.Options())
        elif plan.backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, plan.rank, plan.world_size, timeout)
        else:
            raise ValueError(f"weight sync backend must be 'nccl' or 'gloo', got {plan.backend!r}")
        self.buffer_device = device if plan.backend == "nccl" else torch.device("cpu")
        self.buckets = plan_buckets(self.params, plan.bucket_bytes)
        self._buffers: list[torch.Tensor] = []     # sender: two bucket buffers, packed alternately
        self._received: torch.Tensor | None = None  # receiver: every bucket end to end
        # The first collective also completes NCCL's lazy communicator setup on every rank.
        self._broadcast(torch.zeros(1, dtype=torch.uint8, device=self.buffer_device)).wait()

    def _broadcast(self, buf: torch.Tensor):
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        return self.pg.broadcast([buf], opts)

    def send(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        it = iter(tensors)
        if not self._buffers:
            largest = max((b.nbytes for b in self.buckets), default=0)
            self._buffers = [torch.empty(largest, dtype=torch.uint8, device=self.buffer_device) for _ in range(2)]
        pending: list = [None, None]
        sent = 0
        for b, bucket in enumerate(self.buckets):
            slot = b % 2
            if pending[slot] is not None:
                pending[slot].wait()
            buf = self._buffers[slot][: bucket.nbytes]
            for idx, offset in bucket.entries:
                meta = self.params[idx]
                name, tensor = next(it, (None, None))
                if tensor is None:
                    raise ValueError(f"weight sync: the sender ran out of tensors before {meta.name}")
                if name != meta.name or tuple(tensor.shape) != meta.shape:
                    raise ValueError(f"weight sync: expected {meta.name} {list(meta.shape)}, got {name} "
                                     f"{list(tensor.shape)}; sender and plan disagree")
                # one kernel casts and packs straight into the bucket
                self._view(buf, offset, meta).copy_(tensor.detach())
            pending[slot] = self._broadcast(buf)
            sent += bucket.nbytes
        for work in pending:
            if work is not None:
                work.wait()
        if self.buffer_device.type == "cuda":
            torch.cuda.synchronize(self.buffer_device)
        return sent

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        if not self.buckets:
            return
        starts = [0]
        for bucket in self.buckets:
            starts.append(starts[-1] + -(-bucket.nbytes // _ALIGN) * _ALIGN)
        if self._received is None:   # broadcasts land in place: no bucket-to-staging copy
            self._received = torch.empty(starts[-1], dtype=torch.uint8, device=self.buffer_device)
        works = [self._broadcast(self._received[starts[b]: starts[b] + bucket.nbytes])
                 for b, bucket in enumerate(self.buckets)]
        for b, bucket in enumerate(self.buckets):
            works[b].wait()
            if self.buffer_device.type == "cuda":
                torch.cuda.current_stream(self.buffer_device).synchronize()
            buf = self._received[starts[b]: starts[b] + bucket.nbytes]
            for idx, offset in bucket.entries:
                yield self.params[idx].name, self._view(buf, offset, self.params[idx])

    @staticmethod
    def _view(buf: torch.Tensor, offset: int, meta: ParamMeta) -> torch.Tensor:
        return buf[offset: offset + meta.nbytes].view(meta.dtype).view(meta.shape)

    def close(self) -> None:
        if hasattr(self.pg, "shutdown"):
            try:
                self.pg.shutdown()
            except Exception:  # noqa: BLE001 - best effort on a group being torn down
                pass


TRANSPORTS: dict[str, type[WeightTransport]] = {"broadcast": BroadcastTransport}


def gpu_uuids(device: torch.device) -> list[str]:
    """The physical GPU behind `device` (CUDA_VISIBLE_DEVICES renumbers them per process), [] on CPU."""
    if device.type != "cuda":
        return []
    return [str(torch.cuda.get_device_properties(device).uuid)]


def choose_backend(trainer, replicas: list) -> tuple[str, str]:
    """The group's backend from the members' GetInfo replies (`device`, `gpu_uuids`): NCCL when every
    member is on a GPU and no two of the group's processes share one (NCCL allows one rank per GPU:
    a trainer and a replica colocated on one GPU), else gloo through host memory. Returns
    (backend, why it is gloo; "" for NCCL)."""
    members = [trainer, *replicas]
    if not all(m.device.startswith("cuda") for m in members):
        return "gloo", "a member is on the CPU"
    name = lambda i: "the trainer" if i == 0 else f"replica {i - 1}"   # noqa: E731
    owner: dict[str, int] = {}
    for i, m in enumerate(members):
        for uuid in m.gpu_uuids:
            if uuid in owner:
                return "gloo", (f"{name(owner[uuid])} and {name(i)} share GPU {uuid}; NCCL allows one rank per GPU, "
                                f"so the weights go through host memory")
            owner[uuid] = i
    return "nccl", ""


# Bounds of a plan's fields: anything outside is refused before a member acts on it.
MAX_WORLD_SIZE = 4096
MAX_BUCKET_BYTES = 16 << 30
MAX_TIMEOUT_S = 86400
MAX_GROUP_ID_CHARS = 128


def check_plan(plan: pb.WeightSyncPlan) -> None:
    """Refuses a plan with a field out of range (InvalidArgument naming it); checks nothing about the
    member's own model (each member compares `params` with its own)."""
    problems = []
    if not 0 < len(plan.group_id) <= MAX_GROUP_ID_CHARS:
        problems.append(f"group_id must have 1 to {MAX_GROUP_ID_CHARS} characters")
    if (plan.transport or "broadcast") not in TRANSPORTS:
        problems.append(f"transport must be one of {sorted(TRANSPORTS)}")
    if plan.backend not in ("nccl", "gloo"):
        problems.append("backend must be 'nccl' or 'gloo'")
    if not plan.rendezvous_host or not 0 < plan.rendezvous_port < 65536:
        problems.append("rendezvous_host must be set and rendezvous_port in [1, 65535]")
    if not 2 <= plan.world_size <= MAX_WORLD_SIZE:
        problems.append(f"world_size must be in [2, {MAX_WORLD_SIZE}] (the sender and at least one replica)")
    if not 0 <= plan.rank < max(plan.world_size, 1):
        problems.append("rank must be in [0, world_size)")
    if not 0 < plan.bucket_bytes <= MAX_BUCKET_BYTES:
        problems.append(f"bucket_bytes must be in [1, {MAX_BUCKET_BYTES}] (runtime_args.weight_sync_bucket_mb)")
    if not 0 < plan.timeout_s <= MAX_TIMEOUT_S:
        problems.append(f"timeout_s must be in [1, {MAX_TIMEOUT_S}] (runtime_args.rpc_timeout_s.weight_sync)")
    if not plan.params:
        problems.append("params is empty")
    if problems:
        raise InvalidArgument("weight-sync plan refused: " + "; ".join(problems))


def connect(plan: pb.WeightSyncPlan, device: torch.device) -> WeightTransport:
    """Joins the group described by `plan` (blocks until every member joined, at most plan.timeout_s).
    A rendezvous that cannot be reached, or members that do not all join, is FailedPrecondition.
    Services check a plan they are handed with `check_plan` first."""
    try:
        cls = TRANSPORTS[plan.transport or "broadcast"]
    except KeyError:
        raise ValueError(f"unknown weight-sync transport {plan.transport!r}; known: {sorted(TRANSPORTS)}") from None
    try:
        return cls(plan, device)
    except (RuntimeError, TimeoutError) as exc:   # torch's DistNetworkError / DistStoreError are RuntimeErrors
        raise FailedPrecondition(f"could not join weight-sync group {plan.group_id!r} at {plan.rendezvous_host}:"
                                 f"{plan.rendezvous_port} as rank {plan.rank} of {plan.world_size} within "
                                 f"{plan.timeout_s} s: {type(exc).__name__}") from exc


def check_plan_secret(plan: pb.WeightSyncPlan) -> None:
    if not plan.secret:
        raise ValueError("the weight-sync plan has no secret: only the coordinator's plans (which carry one) "
                         "join a group")


def group_prefix(plan: pb.WeightSyncPlan) -> str:
    """Where a group's rendezvous keys live in the store: under its id and its secret, so a joiner that
    knows only the id (logged, sent in SendWeights/ReceiveWeights) never meets the group."""
    return f"{plan.group_id}/{plan.secret}"


class Rendezvous:
    """The coordinator's TCPStore that weight-sync groups rendezvous on (one per coordinator). It
    listens on `bind_host` only (the coordinator's --host): torch's TCPStore would listen on every
    interface, so it is handed a socket bound here."""

    def __init__(self, advertise_host: str, bind_host: str = "localhost"):
        family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        self._socket = socket.create_server((bind_host, 0), family=family, backlog=256)   # the store listens on it
        self.store = dist.TCPStore(bind_host, self._socket.getsockname()[1], is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=300), master_listen_fd=self._socket.fileno())
        self.host, self.port = advertise_host, self.store.port

    def new_group_id(self) -> str:
        return f"ws-{time.time_ns()}"

    @staticmethod
    def new_secret() -> str:
        return secrets.token_hex(16)
