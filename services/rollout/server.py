"""The rollout service: gRPC adapter over one Engine, plus the receiving end of weight sync.

    python -m services.rollout --port 50052 --coordinator localhost:50050
"""
from __future__ import annotations

import logging
import threading
import time

import torch

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import rollout_pb2 as rpb
from rlgrid.v1 import rollout_pb2_grpc
from services.common import weight_sync
from services.common.config import load_config
from services.common.logs import setup_logging
from services.common.rpc import (
    FailedPrecondition,
    InvalidArgument,
    Server,
    handle_errors,
)
from services.common.tensors import from_wire, to_wire
from services.common.worker import start_worker, worker_device, worker_parser
from services.rollout.engine import Engine, Sampling
from services.rollout.engines import build_engine

log = logging.getLogger("rollout")


def sampling_from_proto(s: pb.SamplingParams) -> Sampling:
    """Validates sampling params; errors name the request field and the config key behind it."""
    if not s.temperature >= 0:   # 0 = greedy (the coordinator's evaluation asks for it)
        raise InvalidArgument(f"sampling.temperature must be > 0 (models.policy.temperature), or 0 for greedy; "
                              f"got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise InvalidArgument(f"sampling.top_p must be in (0, 1] (models.policy.top_p), got {s.top_p}")
    if s.top_k == 0 or s.top_k < -1:
        raise InvalidArgument(f"sampling.top_k must be -1 (off) or >= 1 (models.policy.top_k), got {s.top_k}")
    if s.max_tokens < 1:
        raise InvalidArgument(f"sampling.max_tokens must be >= 1 (models.policy.max_response_tokens_length), "
                              f"got {s.max_tokens}")
    return Sampling(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
                    stop_token_ids=tuple(s.stop_token_ids), seed=s.seed)


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, address: str, device: torch.device, engine: Engine | None = None):
        self.address = address
        self.device = device
        self.engine = engine
        self.run_id = ""
        self._config_key: tuple | None = None
        self._setup_lock = threading.Lock()

    def _engine(self) -> Engine:
        if self.engine is None:
            raise FailedPrecondition("rollout engine is not set up; the coordinator calls Setup when a run starts")
        return self.engine

    @handle_errors
    def Setup(self, request, context):
        cfg = load_config(request.config_yaml)
        p = cfg.models.policy
        # everything build_engine reads: a run that changes any of it gets a new engine
        key = (p.engine, p.load, p.dtype, p.max_num_seqs, p.tensor_model_parallel_size, p.gpu_memory_utilization,
               p.enforce_eager, p.max_prompt_tokens_length + p.max_response_tokens_length, cfg.runtime_args.seed)
        with self._setup_lock:
            if self._config_key != key or self.engine is None:
                log.info("setting up %s engine for %s", p.engine, p.load)
                engine = build_engine(cfg, self.device)   # the old engine serves until this succeeds
                self.engine, self._config_key = engine, key
            self.run_id = request.run_id
        return self._info()

    @handle_errors
    def Generate(self, request, context):
        engine = self._engine()
        sampling = sampling_from_proto(request.sampling)
        if request.n < 1:
            raise InvalidArgument(f"n must be >= 1 (runtime_args.num_inference_per_prompt), got {request.n}")
        if not request.prompts:
            raise InvalidArgument("prompts is empty")
        prompts = [from_wire(p.prompt_ids, f"prompts[{i}].prompt_ids", dtype=torch.int32, ndim=1).tolist()
                   for i, p in enumerate(request.prompts)]
        counters = [0] * len(prompts)
        for g in engine.generate(prompts, sampling, request.n):
            if not context.is_active():
                return
            prompt = request.prompts[g.prompt_index]
            k = counters[g.prompt_index]
            counters[g.prompt_index] += 1
            yield pb.Sample(
                sample_id=f"{prompt.group_id or g.prompt_index}/{k}", group_id=prompt.group_id,
                prompt_ids=prompt.prompt_ids, response_ids=to_wire(torch.tensor(g.response_ids, dtype=torch.int32)),
                response_logprobs=to_wire(torch.tensor(g.logprobs, dtype=torch.float32)),
                finish_reason=pb.STOP if g.finish_reason == "stop" else pb.LENGTH,
                policy_version=g.policy_version, replica=self.address)

    @handle_errors
    def PrepareWeightSync(self, request, context):
        engine = self._engine()
        last = request.rank + engine.info().sync_ranks - 1
        if request.rank < 1 or last >= request.world_size:
            raise InvalidArgument(f"rank must be in [1, world_size) for a rollout replica (it takes "
                                  f"{engine.info().sync_ranks} ranks), got {request.rank} of {request.world_size}")
        mine = {p.name: p for p in engine.info().params}
        theirs = weight_sync.specs_from_wire(request.params)
        for spec in theirs:
            own = mine.get(spec.name)
            if own is None or own.shape != spec.shape or own.dtype != spec.dtype:
                raise InvalidArgument(f"params: {spec.name} {list(spec.shape)} {spec.dtype} does not match this "
                                      f"replica's model ({own and list(own.shape)} {own and own.dtype}); trainer "
                                      f"and rollout must load the same architecture (models.policy.load)")
        if len(theirs) != len(mine):
            raise InvalidArgument(f"params: plan has {len(theirs)} parameters, this replica's model {len(mine)}")
        engine.join_weight_sync(request)
        log.info("joined weight-sync group %s as rank %d/%d", request.group_id, request.rank, request.world_size)
        return pb.Empty()

    @handle_errors
    def ReceiveWeights(self, request, context):
        engine = self._engine()
        if engine.weight_sync_group != request.group_id:
            raise FailedPrecondition(f"not a member of weight-sync group {request.group_id!r}; "
                                     f"call PrepareWeightSync first")
        start = time.perf_counter()
        nbytes = engine.receive_weights(request.version)
        return pb.WeightSyncReply(version=request.version, bytes=nbytes, seconds=time.perf_counter() - start)

    @handle_errors
    def CommitWeights(self, request, context):
        start = time.perf_counter()
        version = self._engine().commit_weights(request.version)
        return pb.WeightSyncReply(version=version, seconds=time.perf_counter() - start)

    @handle_errors
    def AbortWeights(self, request, context):
        self._engine().abort_weights()
        return pb.Empty()

    @handle_errors
    def GetInfo(self, request, context):
        return self._info()

    def _info(self) -> rpb.RolloutInfo:
        if self.engine is None:
            return rpb.RolloutInfo(device=str(self.device))
        i = self.engine.info()
        return rpb.RolloutInfo(engine=i.engine, model=i.model, policy_version=self.engine.version, device=i.device,
                               params=weight_sync.specs_to_wire(i.params), vocab_size=i.vocab_size,
                               eos_token_id=i.eos_token_id, dtype=i.dtype, run_id=self.run_id,
                               sync_ranks=i.sync_ranks, gpu_uuids=i.gpu_uuids)


def serve(port: int, *, host: str = "0.0.0.0", advertise: str | None = None, coordinator: str | None = None,
          config_path: str | None = None, device: str | None = None) -> tuple[Server, RolloutServicer]:
    dev = worker_device(device)
    servicer = RolloutServicer("", dev)
    if config_path:
        servicer.engine = build_engine(load_config(path=config_path), dev)
    server, servicer.address = start_worker(
        cpb.ROLLOUT, (rollout_pb2_grpc.add_RolloutServiceServicer_to_server, servicer,
                      rpb.DESCRIPTOR.services_by_name["RolloutService"].full_name),
        host=host, port=port, advertise=advertise, coordinator=coordinator, device=dev)
    return server, servicer


def main() -> None:
    parser = worker_parser("rollout", 50052)
    parser.add_argument("--config", help="YAML to set the engine up at start (else the run's Setup does)")
    args = parser.parse_args()
    setup_logging("rollout")
    server, _ = serve(args.port, host=args.host, advertise=args.advertise, coordinator=args.coordinator,
                      config_path=args.config, device=args.device)
    server.wait()


if __name__ == "__main__":
    main()
