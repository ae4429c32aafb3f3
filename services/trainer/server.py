"""The trainer service: gRPC adapter over one TrainerBackend, plus the sending end of weight sync.

    python -m services.trainer --port 50051 --coordinator localhost:50050
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time

import grpc

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import trainer_pb2 as tpb
from rlgrid.v1 import trainer_pb2_grpc
from services.common import batches, faults, weight_sync
from services.common.config import RLConfig, load_config
from services.common.logs import setup_logging
from services.common.memory import memory_report
from services.common.paths import Roots, add_root_args, roots_from_args
from services.common.rpc import (
    FailedPrecondition,
    InsecureServer,
    InvalidArgument,
    ResourceExhausted,
    RpcError,
    Server,
    handle_errors,
    server_options,
    time_limit,
)
from services.common.security import Transport, transport_from_args
from services.common.tensors import to_wire
from services.common.worker import start_worker, worker_device, worker_parser
from services.trainer import checkpoint
from services.trainer.backend import TrainerBackend
from services.trainer.backends.fsdp import OutOfMemoryGuidance
from services.trainer.checkpoint import CheckpointRefused
from services.trainer.ranks import TrainerRanks, backend_class

log = logging.getLogger("trainer")


class SetupAborted(RpcError):
    """Building the new setup failed after the old one was released (two models need not fit)."""

    code = grpc.StatusCode.ABORTED


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Rank 0's gRPC face; every backend call goes through TrainerRanks to all ranks."""

    def __init__(self, ranks: TrainerRanks, *, output_roots: Roots | None = None, model_roots: Roots | None = None):
        """`output_roots`: where checkpoint paths may point; `model_roots`: where Setup may load a model
        from (None: anywhere; `serve` always passes the --output-root / --model-root roots)."""
        self.ranks = ranks
        self.output_roots, self.model_roots = output_roots, model_roots
        self.device = ranks.device
        self.run_id = ""
        self.cfg: RLConfig | None = None   # the run set up: the bounds of what Train accepts
        self.max_message_mb = 0            # the server's, once serving (GetInfo reports it)
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
        # A bad config is refused before any rank acts on it: everything that can be checked without
        # building is, and the current setup keeps serving until then.
        cfg = load_config(request.config_yaml)
        if self.model_roots:
            self.model_roots.confine(cfg.models.policy_trainer.load, "models.policy_trainer.load")
        backend_class(cfg).check(cfg, self.ranks.world)
        if cfg.models.policy_trainer.offload and self.device.type != "cuda":
            raise InvalidArgument(f"models.policy_trainer.offload=True moves GPU memory to the host; this trainer runs "
                                  f"on {self.device}, whose memory is the host's: remove it")
        with self._lock:
            log.info("setting up %s backend for %s on %d rank(s) (run %s)", cfg.models.policy_trainer.backend,
                     cfg.models.policy_trainer.load, self.ranks.world, request.run_id)
            self._leave_weight_sync()
            self.cfg = None
            try:
                self.ranks.run("setup", request.config_yaml)   # a new run starts from fresh weights
            except Exception as exc:  # noqa: BLE001 - the old setup is gone: not a refusal that changed nothing
                raise SetupAborted(f"building the trainer for {cfg.models.policy_trainer.load} failed after the "
                                   f"previous setup was released: {type(exc).__name__}: {exc}") from exc
            self.cfg, self.run_id = cfg, request.run_id
        return self._info()

    def _set_up(self) -> tuple[TrainerBackend, RLConfig, batches.BatchLimits]:
        """The backend, the run it is set up for, and the bounds of what it accepts now."""
        backend, cfg = self._backend(), self.cfg
        if cfg is None:   # a Setup is under way
            raise FailedPrecondition("trainer is being set up; retry when its Setup has returned")
        return backend, cfg, batches.BatchLimits.of(cfg, backend.step)

    @handle_errors
    def Train(self, request_iterator, context):
        backend, cfg, limits = self._set_up()
        # The whole step is decoded and checked before any rank computes: bad input changes nothing.
        # The stream is bounded as it arrives: no more micro-batches or tokens than one step holds.
        micro_batches, tokens, sequences = [], 0, 0
        with time_limit(context, cfg.runtime_args.rpc_timeout_s.train):   # a stalled sender is cut off
            for msg in request_iterator:
                mb = batches.from_proto(msg, vocab_size=backend.vocab_size)
                limits.check(mb)
                micro_batches.append(mb)
                tokens, sequences = tokens + mb.num_tokens, sequences + len(mb.seq_lens)
                limits.check_step(tokens, sequences)
        if not micro_batches:
            raise InvalidArgument("Train received no micro-batches")
        if len({mb.num_global_tokens for mb in micro_batches}) > 1 or \
                sum(int(mb.loss_mask.sum()) for mb in micro_batches) != micro_batches[0].num_global_tokens:
            raise InvalidArgument("num_global_tokens must be the same in every micro-batch and equal the step's loss "
                                  "tokens (the loss is a mean over the optimizer step's tokens)")
        if len({mb.proximal_logprobs is None for mb in micro_batches}) > 1:
            raise InvalidArgument("proximal_logprobs must come with every micro-batch of the step or with none (one "
                                  "optimizer step's weights computed them, or its own forward does)")
        faults.point("train")
        with self._lock:
            try:
                metrics = self.ranks.run("train", payload=micro_batches)
            except OutOfMemoryGuidance as exc:
                raise ResourceExhausted(str(exc)) from exc
        return tpb.StepMetrics(step=backend.step, values=metrics)

    @handle_errors
    def ComputeLogProbs(self, request, context):
        backend, _, limits = self._set_up()
        batch = batches.from_proto(request, vocab_size=backend.vocab_size, for_training=False)
        limits.check(batch, for_training=False)
        faults.point("logprobs")
        with self._lock:
            return tpb.LogProbs(logprobs=to_wire(self.ranks.run("logprobs", batch)))

    @handle_errors
    def PrepareWeightSync(self, request, context):
        backend = self._backend()
        weight_sync.check_plan(request)
        if request.rank != 0:
            raise InvalidArgument(f"the trainer sends as rank 0, plan says rank {request.rank}")
        mine = [(p.name, p.shape) for p in backend.param_specs()]
        wire = weight_sync.specs_from_wire(request.params)
        if any(not p.dtype.is_floating_point for p in wire):
            raise InvalidArgument("params: wire dtypes must be floating point (the rollout engine's dtype, "
                                  "models.policy.dtype)")
        theirs = [(p.name, p.shape) for p in wire]
        if mine != theirs:
            diff = next(((a, b) for a, b in zip(mine, theirs) if a != b), (len(mine), len(theirs)))
            raise InvalidArgument(f"params do not match the trainer's model (first difference: {diff})")
        weight_sync.check_member(request, self.device)
        weight_sync.check_plan_secret(request)   # before anything else: a refusal changes nothing
        transport = weight_sync.connect(request, self.device)   # only rank 0 is a member
        self._leave_weight_sync()   # the old group only once the new one is joined: a failed join changes nothing
        self.ranks.transport = transport
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
        faults.point("send")
        with self._lock:
            start = time.perf_counter()
            sent = self.ranks.run("send_weights")
        return pb.WeightSyncReply(version=request.version, bytes=sent, seconds=time.perf_counter() - start)

    @handle_errors
    def SaveCheckpoint(self, request, context):
        self._backend()
        path = self._path(request.path)
        extra = json.loads(request.extra_json) if request.extra_json else {}
        if not isinstance(extra, dict):
            raise InvalidArgument("extra_json must be a JSON object (the coordinator's state to restore with it)")
        faults.point("save")
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
    def Offload(self, request, context):
        _, cfg, _ = self._set_up()
        if not cfg.models.policy_trainer.offload:
            raise FailedPrecondition("this run keeps the trainer's state on the GPU: set "
                                     "models.policy_trainer.offload=True to let it move to host memory during rollout")
        with self._lock:
            start = time.perf_counter()
            self.ranks.run("offload")
            log.info("offloaded to host memory in %.3f s", time.perf_counter() - start)
        return pb.MemoryReport(**memory_report(self.device))

    @handle_errors
    def Onload(self, request, context):
        self._set_up()
        with self._lock:
            self.ranks.run("onload")
        return pb.MemoryReport(**memory_report(self.device))

    @handle_errors
    def GetInfo(self, request, context):
        return self._info()

    def _info(self) -> tpb.TrainerInfo:
        b = self.ranks.backend
        if b is None:
            return tpb.TrainerInfo(device=str(self.device), world_size=self.ranks.world,
                                   max_message_mb=self.max_message_mb)
        cfg = getattr(b, "cfg", None)
        return tpb.TrainerInfo(backend=cfg.models.policy_trainer.backend if cfg else "", step=b.step,
                               model=cfg.models.policy_trainer.load if cfg else "", world_size=self.ranks.world,
                               device=str(self.device), params=weight_sync.specs_to_wire(b.param_specs()),
                               run_id=self.run_id, gpu_uuids=weight_sync.gpu_uuids(b.device),
                               max_message_mb=self.max_message_mb, offloaded=b.offloaded)


def serve(port: int, *, host: str = "localhost", advertise: str | None = None, coordinator: str | None = None,
          device: str | None = None, output_roots: Roots | None = None, model_roots: Roots | None = None,
          transport: Transport = Transport(), options: dict | None = None) -> tuple[Server, TrainerServicer]:
    """Rank 0 only; the other ranks of a torchrun launch call TrainerRanks.follow() instead."""
    dev = worker_device(device)
    servicer = TrainerServicer(TrainerRanks(dev), output_roots=output_roots, model_roots=model_roots)
    server, _ = start_worker(cpb.TRAINER, (trainer_pb2_grpc.add_TrainerServiceServicer_to_server, servicer,
                                           tpb.DESCRIPTOR.services_by_name["TrainerService"].full_name),
                             host=host, port=port, advertise=advertise, coordinator=coordinator, device=dev,
                             transport=transport, options=options)
    servicer.max_message_mb = server.max_message_mb
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
                          model_roots=roots_from_args(args, "--model-root"), transport=transport,
                          options=server_options(args))
    except InsecureServer as exc:
        raise SystemExit(f"trainer: {exc}") from None
    server.wait()


if __name__ == "__main__":
    main()
