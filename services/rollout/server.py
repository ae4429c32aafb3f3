"""The rollout service: gRPC adapter over one Engine, plus the receiving end of weight sync.

    python -m services.rollout --port 50052 --coordinator localhost:50050
"""
from __future__ import annotations

import logging
import math
import threading
import time

import torch

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import rollout_pb2 as rpb
from rlgrid.v1 import rollout_pb2_grpc
from services.common import faults, weight_sync
from services.common.config import TEMPERATURE_RANGE, RLConfig, load_config
from services.common.logs import setup_logging
from services.common.paths import Roots, roots_from_args
from services.common.rpc import (
    FailedPrecondition,
    InsecureServer,
    InvalidArgument,
    Server,
    handle_errors,
    server_options,
    time_limit,
)
from services.common.security import Transport, transport_from_args
from services.common.tensors import from_wire, to_wire
from services.common.worker import start_worker, worker_device, worker_parser
from services.rollout.engine import Engine, Sampling
from services.rollout.engines import build_engine

log = logging.getLogger("rollout")


MAX_STOP_TOKENS = 1024   # stop_token_ids per request; a run's models.policy.stop_token_ids are a handful


def sampling_from_proto(s: pb.SamplingParams, cfg: RLConfig, vocab_size: int) -> Sampling:
    """Validates sampling params against the run this replica is set up for; errors name the request
    field and the config key behind it. Temperature 0 asks for greedy decoding (evaluation does)."""
    p = cfg.models.policy
    lo, hi = TEMPERATURE_RANGE
    if not (math.isfinite(s.temperature) and (s.temperature == 0 or lo <= s.temperature <= hi)):
        raise InvalidArgument(f"sampling.temperature must be 0 (greedy) or a number in [{lo}, {hi}] "
                              f"(models.policy.temperature), "
                              f"got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise InvalidArgument(f"sampling.top_p must be in (0, 1] (models.policy.top_p), got {s.top_p}")
    if s.top_k == 0 or s.top_k < -1:
        raise InvalidArgument(f"sampling.top_k must be -1 (off) or >= 1 (models.policy.top_k), got {s.top_k}")
    if not 1 <= s.max_tokens <= p.max_response_tokens_length:
        raise InvalidArgument(f"sampling.max_tokens must be in [1, {p.max_response_tokens_length}] "
                              f"(models.policy.max_response_tokens_length of the run set up), got {s.max_tokens}")
    if len(s.stop_token_ids) > MAX_STOP_TOKENS or any(not 0 <= t < vocab_size for t in s.stop_token_ids):
        raise InvalidArgument(f"sampling.stop_token_ids must hold at most {MAX_STOP_TOKENS} token ids in "
                              f"[0, {vocab_size}) (models.policy.stop_token_ids)")
    return Sampling(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
                    stop_token_ids=tuple(s.stop_token_ids), seed=s.seed)


def check_generate_size(request: rpb.GenerateRequest, cfg: RLConfig, context_length: int) -> None:
    """Bounds a request by the run this replica is set up for, before any prompt is decoded or any
    memory reserved: samples per prompt, samples per call (one episode's at most) and prompt lengths
    (models.policy.max_prompt_tokens_length, and the model's context less max_tokens)."""
    ra, p = cfg.runtime_args, cfg.models.policy
    n, count = request.n, len(request.prompts)
    if not 1 <= n <= ra.num_inference_per_prompt:
        raise InvalidArgument(f"n must be in [1, {ra.num_inference_per_prompt}] (runtime_args.num_inference_per_prompt "
                              f"of the run set up), got {n}")
    if count == 0:
        raise InvalidArgument("prompts is empty")
    if count * n > ra.sample_per_episode:
        raise InvalidArgument(f"prompts x n = {count} x {n} is more than one episode's {ra.sample_per_episode} samples "
                              f"(runtime_args.sample_per_episode of the run set up); split the request")
    longest = p.max_prompt_tokens_length
    if context_length:
        longest = min(longest, context_length - request.sampling.max_tokens)
    for i, prompt in enumerate(request.prompts):
        shape = list(prompt.prompt_ids.shape)
        if len(shape) != 1 or not 1 <= shape[0] <= longest:
            raise InvalidArgument(f"prompts[{i}].prompt_ids must be 1-d with 1 to {longest} tokens "
                                  f"(models.policy.max_prompt_tokens_length={p.max_prompt_tokens_length}, model context "
                                  f"{context_length or 'unknown'} less sampling.max_tokens), got shape {shape[:4]}")


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, address: str, device: torch.device, *, model_roots: Roots | None = None):
        """`model_roots`: where Setup may load a model from (None: anywhere; `serve` passes --model-root)."""
        self.address = address
        self.model_roots = model_roots
        self.device = device
        self.engine: Engine | None = None
        self.cfg: RLConfig | None = None   # the run the engine is set up for: Generate's bounds
        self.run_id = ""
        self._config_key: tuple | None = None
        self._setup_lock = threading.Lock()
        self.max_message_mb = 0   # the server's, once serving (GetInfo reports it)

    def _engine(self) -> Engine:
        if self.engine is None:
            raise FailedPrecondition("rollout engine is not set up; the coordinator calls Setup when a run starts")
        return self.engine

    @handle_errors
    def Setup(self, request, context):
        faults.point("setup")
        cfg = load_config(request.config_yaml)
        p = cfg.models.policy
        if self.model_roots:
            self.model_roots.confine(p.load, "models.policy.load")
        # everything build_engine reads: a run that changes any of it gets a new engine
        key = (p.engine, p.load, p.dtype, p.max_num_seqs, p.tensor_model_parallel_size, p.gpu_memory_utilization,
               p.enforce_eager, p.max_prompt_tokens_length + p.max_response_tokens_length, cfg.runtime_args.seed,
               p.enable_sleep_mode)
        with self._setup_lock:
            engine = self.engine
            if self._config_key != key or engine is None:
                log.info("setting up %s engine for %s", p.engine, p.load)
                engine = build_engine(cfg, self.device)   # the old engine serves until this succeeds
            check_context(cfg, engine.info().context_length)
            engine.wake_up()   # a run starts awake, whatever the previous one left
            self.engine, self._config_key, self.cfg = engine, key, cfg   # nothing changed until here
            self.run_id = request.run_id
        return self._info()

    @handle_errors
    def Generate(self, request, context):
        engine, cfg = self._engine(), self.cfg
        info = engine.info()
        sampling = sampling_from_proto(request.sampling, cfg, info.vocab_size)
        check_generate_size(request, cfg, info.context_length)
        prompts = [from_wire(p.prompt_ids, f"prompts[{i}].prompt_ids", dtype=torch.int32, ndim=1).tolist()
                   for i, p in enumerate(request.prompts)]
        counters = [0] * len(prompts)
        # never longer than the run's own deadline for it, whoever calls (a slow reader holds a stream slot)
        with time_limit(context, cfg.runtime_args.rpc_timeout_s.generate):
            keys = [p.group_id or str(i) for i, p in enumerate(request.prompts)]   # seeds follow the prompt
            for g in engine.generate(prompts, sampling, request.n, keys):
                if not context.is_active():
                    return
                prompt = request.prompts[g.prompt_index]
                k = counters[g.prompt_index]
                counters[g.prompt_index] += 1
                yield pb.Sample(
                    sample_id=f"{prompt.group_id or g.prompt_index}/{k}", group_id=prompt.group_id,
                    prompt_ids=prompt.prompt_ids,
                    response_ids=to_wire(torch.tensor(g.response_ids, dtype=torch.int32)),
                    response_logprobs=to_wire(torch.tensor(g.logprobs, dtype=torch.float32)),
                    finish_reason=pb.STOP if g.finish_reason == "stop" else pb.LENGTH,
                    policy_version=g.policy_version, replica=self.address)
                if sum(counters) == 1:
                    faults.point("generate")   # mid-stream: one sample is out, the rest are not

    @handle_errors
    def PrepareWeightSync(self, request, context):
        engine = self._engine()
        weight_sync.check_plan(request)
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
        weight_sync.check_member(request, engine.device)
        weight_sync.check_plan_secret(request)   # before the current group is left: a refusal changes nothing
        faults.point("prepare")
        engine.join_weight_sync(request)
        log.info("joined weight-sync group %s as rank %d/%d", request.group_id, request.rank, request.world_size)
        return pb.Empty()

    def _member(self, request: pb.WeightSyncRequest) -> Engine:
        """The engine, when the request names the weight-sync group it is in and a valid version."""
        engine = self._engine()
        if not request.group_id or engine.weight_sync_group != request.group_id:
            raise FailedPrecondition(f"not a member of weight-sync group {request.group_id!r}; "
                                     f"call PrepareWeightSync first")
        if request.version < 0:
            raise InvalidArgument(f"version must be >= 0, got {request.version}")
        return engine

    @handle_errors
    def ReceiveWeights(self, request, context):
        engine = self._member(request)
        faults.point("receive")
        start = time.perf_counter()
        nbytes = engine.receive_weights(request.version)
        return pb.WeightSyncReply(version=request.version, bytes=nbytes, seconds=time.perf_counter() - start)

    @handle_errors
    def CommitWeights(self, request, context):
        start = time.perf_counter()
        engine = self._member(request)
        faults.point("commit")
        version = engine.commit_weights(request.version)
        return pb.WeightSyncReply(version=version, seconds=time.perf_counter() - start)

    @handle_errors
    def AbortWeights(self, request, context):
        self._member(request).abort_weights()
        return pb.Empty()

    @handle_errors
    def Sleep(self, request, context):
        engine = self._engine()
        if request.level not in (1, 2):
            raise InvalidArgument(f"level must be 1 (KV cache dropped, weights kept in host memory) or 2 (weights "
                                  f"dropped too; a weight sync must commit before the next Generate), got {request.level}")
        start = time.perf_counter()
        engine.sleep(request.level)
        log.info("asleep at level %d in %.3f s", request.level, time.perf_counter() - start)
        return pb.MemoryReport(**engine.memory())

    @handle_errors
    def WakeUp(self, request, context):
        engine = self._engine()
        engine.wake_up(tuple(request.tags))
        return pb.MemoryReport(**engine.memory())

    @handle_errors
    def GetInfo(self, request, context):
        faults.point("info")
        return self._info()

    def _info(self) -> rpb.RolloutInfo:
        if self.engine is None:
            return rpb.RolloutInfo(device=str(self.device), max_message_mb=self.max_message_mb)
        i = self.engine.info()
        return rpb.RolloutInfo(engine=i.engine, model=i.model, policy_version=self.engine.version, device=i.device,
                               params=weight_sync.specs_to_wire(i.params), vocab_size=i.vocab_size,
                               eos_token_id=i.eos_token_id, dtype=i.dtype, run_id=self.run_id,
                               sync_ranks=i.sync_ranks, gpu_uuids=i.gpu_uuids, max_message_mb=self.max_message_mb,
                               sleep_level=self.engine.sleep_level, weights_valid=self.engine.weights_valid)


def check_context(cfg: RLConfig, context_length: int) -> None:
    p = cfg.models.policy
    if context_length and p.max_prompt_tokens_length + p.max_response_tokens_length > context_length:
        raise InvalidArgument(f"models.policy.max_prompt_tokens_length + models.policy.max_response_tokens_length = "
                              f"{p.max_prompt_tokens_length + p.max_response_tokens_length} is more than the model's "
                              f"context of {context_length} tokens ({p.load}); lower them")


def serve(port: int, *, host: str = "localhost", advertise: str | None = None, coordinator: str | None = None,
          config_path: str | None = None, device: str | None = None, model_roots: Roots | None = None,
          transport: Transport = Transport(), options: dict | None = None) -> tuple[Server, RolloutServicer]:
    dev = worker_device(device)
    servicer = RolloutServicer("", dev, model_roots=model_roots)
    if config_path:   # the operator's own file, not a client's: not confined
        cfg = load_config(path=config_path)
        engine = build_engine(cfg, dev)
        check_context(cfg, engine.info().context_length)
        servicer.engine, servicer.cfg = engine, cfg
    server, servicer.address = start_worker(
        cpb.ROLLOUT, (rollout_pb2_grpc.add_RolloutServiceServicer_to_server, servicer,
                      rpb.DESCRIPTOR.services_by_name["RolloutService"].full_name),
        host=host, port=port, advertise=advertise, coordinator=coordinator, device=dev, transport=transport,
        options=options)
    servicer.max_message_mb = server.max_message_mb
    return server, servicer


def main() -> None:
    parser = worker_parser("rollout", 50052)
    parser.add_argument("--config", help="YAML to set the engine up at start (else the run's Setup does)")
    args = parser.parse_args()
    setup_logging("rollout")
    transport = transport_from_args(parser, args)
    try:
        server, _ = serve(args.port, host=args.host, advertise=args.advertise, coordinator=args.coordinator,
                          config_path=args.config, device=args.device,
                          model_roots=roots_from_args(args, "--model-root"), transport=transport,
                          options=server_options(args))
    except InsecureServer as exc:
        raise SystemExit(f"rollout: {exc}") from None
    server.wait()


if __name__ == "__main__":
    main()
