"""The trainer service: gRPC adapter over one TrainerBackend, plus the sending end of weight sync.

    python -m services.trainer --port 50051 --coordinator localhost:50050
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import trainer_pb2 as tpb
from rlgrid.v1 import trainer_pb2_grpc
from services.common import batches, weight_sync
from services.common.config import load_config
from services.common.logs import setup_logging
from services.common.paths import Roots, add_root_args, roots_from_args
from services.common.rpc import (
    FailedPrecondition,
    InsecureServer,
    InvalidArgument,
    ResourceExhausted,
    Server,
    handle_errors,
)
from services.common.security import Transport, transport_from_args
from services.common.tensors import to_wire
from services.common.worker import start_worker, worker_device, worker_parser
from services.trainer import checkpoint
from services.trainer.backend import TrainerBackend
from services.trainer.backends.fsdp import OutOfMemoryGuidance
from services.trainer.checkpoint import CheckpointRefused
from services.trainer.ranks import TrainerRanks

log = logging.getLogger("trainer")


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Rank 0's gRPC face; every backend call goes through TrainerRanks to all ranks."""

    def __init__(self, ranks: TrainerRanks, *, output_roots: Roots | None = None, model_roots: Roots | None = None):
        """`output_roots`: where checkpoint paths may point; `model_roots`: where Setup may load a model
        from (None: anywhere; `serve` always passes the --output-root / --model-root roots)."""
        self.ranks = ranks
        self.output_roots, self.model_roots = output_roots, model_roots
        self.device = ranks.device
        self.run_id = ""
        self._lock = threading.Lock()  # one of Train / ComputeLogProbs / SendWeights / Setup at a time

    @property
    def backend(self) -> TrainerBackend | None:
        return self.ranks.backend

    def _backend(self) -> TrainerBackend:
        if self.ranks.backend is None:
            raise FailedPrecondition("trainer is not set up; the coordinator calls Setup when a run starts")
        return self.ranks.backend

    def _path(self, path: str) -> str:
        """A checkpoint path of a request, confined to the trainer's --output-root."""
        if not path:
            raise InvalidArgument("path is empty")
        return self.output_roots.confine(path, "path") if self.output_roots else path

    @handle_errors
    def Setup(self, request, context):
        cfg = load_config(request.config_yaml)   # a bad config is refused before any rank acts on it
        if self.model_roots:
            self.model_roots.confine(cfg.models.policy_trainer.load, "models.policy_trainer.load")
        with self._lock:
            log.info("setting up %s backend for %s on %d rank(s) (run %s)", cfg.models.policy_trainer.backend,
                     cfg.models.policy_trainer.load, self.ranks.world, request.run_id)
            self._leave_weight_sync()
            self.ranks.run("setup", request.config_yaml)   # a new run starts from fresh weights
            self.run_id = request.run_id
        return self._info()

    @handle_errors
    def Train(self, request_iterator, context):
        backend = self._backend()
        # the whole step is decoded and checked before any rank computes: bad input changes nothing
        micro_batches = [batches.from_proto(msg, vocab_size=backend.vocab_size) for msg in request_iterator]
        if not micro_batches:
            raise InvalidArgument("Train received no micro-batches")
        with self._lock:
            try:
                metrics = self.ranks.run("train", payload=micro_batches)
            except OutOfMemoryGuidance as exc:
                raise ResourceExhausted(str(exc)) from exc
        return tpb.StepMetrics(step=backend.step, values=metrics)

    @handle_errors
    def ComputeLogProbs(self, request, context):
        backend = self._backend()
        batch = batches.from_proto(request, vocab_size=backend.vocab_size, for_training=False)
        with self._lock:
            return tpb.LogProbs(logprobs=to_wire(self.ranks.run("logprobs", batch)))

    @handle_errors
    def PrepareWeightSync(self, request, context):
        backend = self._backend()
        if request.rank != 0:
            raise InvalidArgument(f"the trainer sends as rank 0, plan says rank {request.rank}")
        mine = [(p.name, p.shape) for p in backend.param_specs()]
        theirs = [(p.name, p.shape) for p in weight_sync.specs_from_wire(request.params)]
        if mine != theirs:
            diff = next(((a, b) for a, b in zip(mine, theirs) if a != b), (len(mine), len(theirs)))
            raise InvalidArgument(f"params do not match the trainer's model (first difference: {diff})")
        weight_sync.check_plan_secret(request)   # before the current group is left: a refusal changes nothing
        self._leave_weight_sync()
        self.ranks.transport = weight_sync.connect(request, self.device)   # only rank 0 is a member
        log.info("joined weight-sync group %s as sender, world size %d", request.group_id, request.world_size)
        return pb.Empty()

    def _leave_weight_sync(self) -> None:
        if self.ranks.transport is not None:
            self.ranks.transport.close()
            self.ranks.transport = None

    @handle_errors
    def SendWeights(self, request, context):
        self._backend()
        transport = self.ranks.transport
        if transport is None or transport.plan.group_id != request.group_id:
            raise FailedPrecondition(f"not a member of weight-sync group {request.group_id!r}; "
                                     f"call PrepareWeightSync first")
        with self._lock:
            start = time.perf_counter()
            sent = self.ranks.run("send_weights")
        return pb.WeightSyncReply(version=request.version, bytes=sent, seconds=time.perf_counter() - start)

    @handle_errors
    def SaveCheckpoint(self, request, context):
        self._backend()
        path = self._path(request.path)
        extra = json.loads(request.extra_json) if request.extra_json else {}
        with self._lock:
            start = time.perf_counter()
            self.ranks.run("save", path, extra)
        return tpb.CheckpointReply(path=request.path, seconds=time.perf_counter() - start)

    @handle_errors
    def ExportHF(self, request, context):
        self._backend()
        path = self._path(request.path)
        with self._lock:
            start = time.perf_counter()
            self.ranks.run("export_hf", path)
        return tpb.CheckpointReply(path=request.path, seconds=time.perf_counter() - start, step=self.backend.step)

    @handle_errors
    def LoadCheckpoint(self, request, context):
        backend = self._backend()
        path = self._path(request.path)
        try:   # refused here, before any rank is asked to load
            checkpoint.verified_metadata(path, checkpoint.read_meta(path))
        except CheckpointRefused as exc:
            raise InvalidArgument(f"path: {exc}; runtime_args.resume_from must name a checkpoint-<episode> directory "
                                  f"rlgrid wrote") from None
        with self._lock:
            start = time.perf_counter()
            extra = self.ranks.run("load", path)
        return tpb.CheckpointReply(path=request.path, seconds=time.perf_counter() - start, step=backend.step,
                                   extra_json=json.dumps(extra))

    @handle_errors
    def GetInfo(self, request, context):
        return self._info()

    def _info(self) -> tpb.TrainerInfo:
        b = self.ranks.backend
        if b is None:
            return tpb.TrainerInfo(device=str(self.device), world_size=self.ranks.world)
        cfg = getattr(b, "cfg", None)
        return tpb.TrainerInfo(backend=cfg.models.policy_trainer.backend if cfg else "", step=b.step,
                               model=cfg.models.policy_trainer.load if cfg else "", world_size=self.ranks.world,
                               device=str(self.device), params=weight_sync.specs_to_wire(b.param_specs()),
                               run_id=self.run_id, gpu_uuids=weight_sync.gpu_uuids(b.device))


def serve(port: int, *, host: str = "localhost", advertise: str | None = None, coordinator: str | None = None,
          device: str | None = None, output_roots: Roots | None = None, model_roots: Roots | None = None,
          transport: Transport = Transport()) -> tuple[Server, TrainerServicer]:
    """Rank 0 only; the other ranks of a torchrun launch call TrainerRanks.follow() instead."""
    dev = worker_device(device)
    servicer = TrainerServicer(TrainerRanks(dev), output_roots=output_roots, model_roots=model_roots)
    server, _ = start_worker(cpb.TRAINER, (trainer_pb2_grpc.add_TrainerServiceServicer_to_server, servicer,
                                           tpb.DESCRIPTOR.services_by_name["TrainerService"].full_name),
                             host=host, port=port, advertise=advertise, coordinator=coordinator, device=dev,
                             transport=transport)
    return server, servicer


def main() -> None:
    """`python -m services.trainer ...` is one rank; `torchrun --nproc-per-node N -m services.trainer ...`
    is N ranks (one per GPU) behind rank 0's gRPC server."""
    parser = worker_parser("trainer", 50051)
    add_root_args(parser, "--output-root")
    args = parser.parse_args()
    setup_logging("trainer")
    if int(os.environ.get("RANK", "0")) > 0:
        TrainerRanks(worker_device(args.device)).follow()
        return
    transport = transport_from_args(parser, args)
    try:
        server, _ = serve(args.port, host=args.host, advertise=args.advertise, coordinator=args.coordinator,
                          device=args.device, output_roots=roots_from_args(args, "--output-root"),
                          model_roots=roots_from_args(args, "--model-root"), transport=transport)
    except InsecureServer as exc:
        raise SystemExit(f"trainer: {exc}") from None
    server.wait()


if __name__ == "__main__":
    main()
