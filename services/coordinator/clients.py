"""The coordinator's view of its workers: fan-out generation with retries across rollout replicas,
and the trainer's RPCs. Retries live here, beside the loop, not in it."""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import rollout_pb2 as rpb
from rlgrid.v1 import rollout_pb2_grpc, trainer_pb2_grpc
from rlgrid.v1 import trainer_pb2 as tpb
from services.common import batches
from services.common.rpc import make_channel
from services.common.tensors import from_wire, ids_to_wire

log = logging.getLogger(__name__)


class StepError(RuntimeError):
    """A step cannot complete; the message says why and what to change."""


@dataclass
class GenSample:
    group: int                 # index of the prompt in this step's batch
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: int
    version: int
    replica: str


def decode_sample(msg: pb.Sample) -> GenSample:
    return GenSample(group=int(msg.group_id.rsplit("-", 1)[-1]),
                     prompt_ids=from_wire(msg.prompt_ids, "prompt_ids").tolist(),
                     response_ids=from_wire(msg.response_ids, "response_ids").tolist(),
                     logprobs=from_wire(msg.response_logprobs, "response_logprobs").tolist(),
                     finish_reason=msg.finish_reason, version=msg.policy_version, replica=msg.replica)


class Rollout:
    def __init__(self, address: str, max_message_mb: int, secret: str = ""):
        self.address = address
        channel = make_channel(address, max_message_mb=max_message_mb, worker_secret=secret or None)
        self.stub = rollout_pb2_grpc.RolloutServiceStub(channel)


class RolloutPool:
    """Every registered rollout replica; prompts are spread evenly across them."""

    def __init__(self, addresses: list[str], *, max_message_mb: int, retries: int,
                 secrets: dict[str, str] | None = None):
        """`secrets`: each replica's worker secret (from its registration), sent with every call."""
        if not addresses:
            raise StepError("no rollout service is registered; start one with --coordinator pointing here")
        self.replicas = [Rollout(a, max_message_mb, (secrets or {}).get(a, "")) for a in addresses]
        self.retries = retries
        self.discarded = 0   # samples of groups cut short by a failed replica (reported, then regenerated)

    def call_all(self, method: str, request, timeout: float | None = None) -> list:
        """Calls `method` on every replica concurrently; raises the first failure after all return."""
        with ThreadPoolExecutor(len(self.replicas)) as pool:
            futures = [pool.submit(getattr(r.stub, method), request, timeout=timeout) for r in self.replicas]
            return [f.result() for f in futures]

    def generate(self, prompts: list[list[int]], sampling: pb.SamplingParams, n: int, tag: str) -> list[GenSample]:
        """n samples for every prompt, grouped by prompt; a replica that fails mid-stream has its
        unfinished groups regenerated on the others (up to `retries` times)."""
        done: dict[int, list[GenSample]] = {}
        todo = list(range(len(prompts)))
        healthy = list(self.replicas)
        for attempt in range(self.retries + 1):
            shards = [todo[i::len(healthy)] for i in range(len(healthy))]
            with ThreadPoolExecutor(len(healthy)) as pool:
                futures = {pool.submit(self._generate_on, r, shard, prompts, sampling, n, tag): r
                           for r, shard in zip(healthy, shards) if shard}
                failed = []
                for fut, replica in futures.items():
                    groups, error = fut.result()
                    for g, samples in groups.items():
                        if len(samples) == n:
                            done[g] = samples
                        else:
                            self.discarded += len(samples)
                    if error is not None:
                        log.warning("rollout %s failed (%s); %s", replica.address, error,
                                    "retrying its prompts elsewhere" if attempt < self.retries else "no retries left")
                        failed.append((replica, error))
            todo = [g for g in range(len(prompts)) if g not in done]
            dead = {f[0] for f in failed}
            healthy = [r for r in healthy if r not in dead] or healthy
            self.drop(dead)
            if not todo:
                return [s for g in range(len(prompts)) for s in done[g]]
        raise StepError(f"generation failed for {len(todo)} prompts after {self.retries + 1} attempts "
                        f"(runtime_args.step_retries={self.retries}): {failed[-1][1] if failed else 'incomplete'}")

    def drop(self, replicas) -> None:
        """Forgets failed replicas (never the last one); the weight sync then rebuilds its group."""
        keep = [r for r in self.replicas if r not in replicas]
        if keep and len(keep) < len(self.replicas):
            log.warning("dropping rollout replicas %s", [r.address for r in self.replicas if r not in keep])
            self.replicas = keep

    def unreachable(self, timeout: float = 5.0) -> list[Rollout]:
        dead = []
        for r in self.replicas:
            try:
                r.stub.GetInfo(pb.Empty(), timeout=timeout)
            except grpc.RpcError:
                dead.append(r)
        return dead

    @staticmethod
    def _generate_on(replica: Rollout, shard: list[int], prompts, sampling, n, tag):
        request = rpb.GenerateRequest(sampling=sampling, n=n, prompts=[
            rpb.Prompt(group_id=f"{tag}-{g}", prompt_ids=ids_to_wire(prompts[g])) for g in shard])
        groups: dict[int, list[GenSample]] = {}
        try:
            for msg in replica.stub.Generate(request):
                s = decode_sample(msg)
                groups.setdefault(s.group, []).append(s)
        except grpc.RpcError as exc:
            return groups, f"{exc.code().name}: {exc.details()}"
        return groups, None


class TrainerClient:
    def __init__(self, address: str, max_message_mb: int, secret: str = ""):
        """`secret`: the trainer's worker secret (from its registration), sent with every call."""
        self.address = address
        self.max_bytes = max_message_mb * 1024 * 1024
        channel = make_channel(address, max_message_mb=max_message_mb, worker_secret=secret or None)
        self.stub = trainer_pb2_grpc.TrainerServiceStub(channel)

    def _encode(self, mb: batches.MicroBatch) -> pb.PackedBatch:
        msg = batches.to_proto(mb)
        if msg.ByteSize() > self.max_bytes:
            raise StepError(f"a packed micro-batch of {mb.num_tokens} tokens is {msg.ByteSize()} bytes, over the "
                            f"gRPC limit runtime_args.grpc_max_message_mb={self.max_bytes >> 20}; lower "
                            f"models.policy_trainer.max_token_in_packing or raise the limit")
        return msg

    def train(self, micro_batches: list[batches.MicroBatch]) -> dict[str, float]:
        encoded = [self._encode(mb) for mb in micro_batches]   # refuse before anything is sent
        reply = self.stub.Train(iter(encoded))
        return dict(reply.values)

    def logprobs(self, mb: batches.MicroBatch) -> torch.Tensor:
        return from_wire(self.stub.ComputeLogProbs(self._encode(mb)).logprobs, "logprobs")

    def save_checkpoint(self, path: str, episode: int, data_position: int) -> None:
        extra = {"episode": episode, "data_position": data_position}
        self.stub.SaveCheckpoint(tpb.CheckpointRequest(path=path, extra_json=json.dumps(extra)))

    def export_hf(self, path: str) -> None:
        self.stub.ExportHF(tpb.CheckpointRequest(path=path))

    def load_checkpoint(self, path: str) -> tuple[int, dict]:
        """(optimizer steps, what save_checkpoint stored) of the checkpoint now loaded."""
        reply = self.stub.LoadCheckpoint(tpb.CheckpointRequest(path=path))
        return reply.step, json.loads(reply.extra_json or "{}")
