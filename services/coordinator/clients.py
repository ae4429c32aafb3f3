"""The coordinator's view of its workers: fan-out generation with retries across rollout replicas,
and the trainer's RPCs. Retries and deadlines live here, beside the loop, not in it.

Every call has a deadline (runtime_args.rpc_timeout_s.*); a worker that fails or stops answering
raises StepError naming the worker, the call and, on a deadline, the key that set it.
"""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import grpc
import torch

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import rollout_pb2 as rpb
from rlgrid.v1 import rollout_pb2_grpc, trainer_pb2_grpc
from rlgrid.v1 import trainer_pb2 as tpb
from services.common import batches
from services.common.config import RpcTimeouts
from services.common.rpc import MAX_MESSAGE_ENV, make_channel
from services.common.tensors import from_wire, ids_to_wire

log = logging.getLogger(__name__)


class StepError(RuntimeError):
    """A step cannot complete; the message says why and what to change. `metrics` holds what the
    step measured before it failed (e.g. the agreement check's difference), reported with the failure."""

    def __init__(self, message: str, metrics: dict[str, float] | None = None):
        super().__init__(message)
        self.metrics = metrics or {}


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


def describe_failure(worker: str, method: str, exc: grpc.RpcError, timeout: float, key: str) -> str:
    """What went wrong with one call, naming the worker (and the deadline's key when it ran out)."""
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (f"{worker} did not answer {method} within {timeout:g} s (runtime_args.rpc_timeout_s.{key}): "
                f"it is hung, overloaded or unreachable")
    return f"{worker}: {method} failed: {exc.code().name}: {exc.details()}"


class Worker:
    """One trainer or rollout service: a stub whose calls all carry a deadline and whose errors name it.
    The message limit is the smallest of the coordinator's and the worker's own (learnt from GetInfo)."""

    kind = "worker"
    stub_class: Callable = None

    def __init__(self, address: str, *, max_message_mb: int, timeouts: RpcTimeouts, secret: str = ""):
        """`secret`: the worker's secret (from its registration), sent with every call."""
        self.address, self.timeouts, self.secret = address, timeouts, secret or None
        self.max_message_mb = max_message_mb
        self.stub = self._stub()

    def _stub(self):
        return self.stub_class(make_channel(self.address, max_message_mb=self.max_message_mb,
                                            worker_secret=self.secret))

    @property
    def name(self) -> str:
        return f"{self.kind} {self.address}"

    def call(self, method: str, request, key: str = "control"):
        timeout = getattr(self.timeouts, key)
        try:
            return getattr(self.stub, method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise StepError(describe_failure(self.name, method, exc, timeout, key)) from exc

    def handshake(self):
        """GetInfo; narrows the message limit to the worker's when that is smaller. Returns the info."""
        info = self.call("GetInfo", pb.Empty())
        if 0 < info.max_message_mb < self.max_message_mb:
            log.info("%s accepts messages up to %d MiB: the coordinator sends no more to it", self.name,
                     info.max_message_mb)
            self.max_message_mb = info.max_message_mb
            self.stub = self._stub()
        return info


class Rollout(Worker):
    kind = "rollout replica"
    stub_class = rollout_pb2_grpc.RolloutServiceStub


class RolloutPool:
    """The rollout replicas a run uses now; prompts are spread evenly across them. One Generate call asks
    for at most `max_sequences` samples (runtime_args.sample_per_episode, the bound replicas enforce).

    Replicas leave through `drop` (a call to them failed: they died, hung, restarted or lost their link)
    and join through `add` (membership.Membership decides who, at step boundaries); both are reported
    to the run, so WatchRun shows them."""

    def __init__(self, addresses: list[str], *, max_message_mb: int, retries: int, timeouts: RpcTimeouts,
                 max_sequences: int, report: Callable[[str], None] = log.warning,
                 secrets: dict[str, str] | None = None, run_id: str = ""):
        """`secrets`: each replica's worker secret (from its registration), sent with every call.
        `run_id`: the run the replicas are set up for; a replica that answers for another (it restarted)
        counts as lost. "" checks nothing."""
        self.limits = dict(max_message_mb=max_message_mb, timeouts=timeouts)
        self.replicas = [self.connect(a, (secrets or {}).get(a, "")) for a in addresses]
        self.retries, self.timeouts, self.max_sequences = retries, timeouts, max_sequences
        self.report, self.run_id = report, run_id
        self.discarded = 0   # samples of groups cut short by a failed replica (reported, then regenerated)
        self.joined = self.left = 0
        self.left_at: dict[str, float] = {}   # address -> time.monotonic() it was dropped

    def connect(self, address: str, secret: str = "") -> Rollout:
        return Rollout(address, **self.limits, secret=secret)

    def add(self, replica: Rollout, note: str = "") -> None:
        """`replica` (set up for this run) takes part from the next weight sync on."""
        self.replicas = [*self.replicas, replica]
        self.joined += 1
        self._event(f"rollout replica joined: {replica.address}{note}; {len(self.replicas)} in the run")

    def drop(self, failures: dict[Rollout, str]) -> None:
        """Removes replicas from the run, each with why; the weight sync then rebuilds its group."""
        gone = [r for r in self.replicas if r in failures]
        if not gone:
            return
        for r in gone:   # before they leave the list: membership then never sees them as new
            self.left_at[r.address] = time.monotonic()
        self.replicas = [r for r in self.replicas if r not in failures]
        for r in gone:
            self.left += 1
            self._event(f"rollout replica left: {r.address}: {failures[r]}; {len(self.replicas)} in the run")

    def _event(self, message: str) -> None:
        """A join or leave: to the run's events (WatchRun) and the coordinator's log."""
        log.info("%s", message)
        self.report(message)

    def counters(self) -> dict[str, float]:
        """Run totals for the step metrics."""
        return {"rollout/discarded_samples_total": float(self.discarded),   # cut short by a failed replica
                "rollout/joined_total": float(self.joined), "rollout/left_total": float(self.left)}

    def call_all(self, method: str, request, key: str = "control") -> list:
        """Calls `method` on every replica concurrently; raises the first failure after all return."""
        with ThreadPoolExecutor(max(1, len(self.replicas))) as pool:
            futures = [pool.submit(r.call, method, request, key) for r in self.replicas]
            return [f.result() for f in futures]

    def unhealthy(self) -> dict[Rollout, str]:
        """Replicas that do not answer GetInfo within runtime_args.rpc_timeout_s.control, or that answer
        for another run than this one (they restarted), each with why."""
        def probe(r: Rollout) -> str | None:
            try:
                info = r.call("GetInfo", pb.Empty())
            except StepError as exc:
                return str(exc)
            if self.run_id and info.run_id != self.run_id:
                return f"{r.name} is no longer set up for this run (it restarted)"
            return None
        with ThreadPoolExecutor(max(1, len(self.replicas))) as pool:
            found = dict(zip(self.replicas, pool.map(probe, self.replicas)))
        return {r: why for r, why in found.items() if why is not None}

    def generate(self, prompts: list[list[int]], sampling: pb.SamplingParams, n: int, tag: str) -> list[GenSample]:
        """n samples for every prompt, grouped by prompt; a replica that fails mid-stream (or misses
        its deadline) leaves the run and its unfinished groups are regenerated on the others (up to
        `retries` times). Groups it cut short are discarded whole (counted), never trained on."""
        done: dict[int, list[GenSample]] = {}
        todo = list(range(len(prompts)))
        failed: list[str] = []
        for attempt in range(self.retries + 1):
            healthy = list(self.replicas)
            if not healthy:
                break
            shards = [todo[i::len(healthy)] for i in range(len(healthy))]
            with ThreadPoolExecutor(len(healthy)) as pool:
                futures = {pool.submit(self._generate_on, r, shard, prompts, sampling, n, tag): r
                           for r, shard in zip(healthy, shards) if shard}
                dead: dict[Rollout, str] = {}
                for fut, replica in futures.items():
                    groups, error = fut.result()
                    for g, samples in groups.items():
                        if len(samples) == n:
                            done[g] = samples
                        else:
                            self.discarded += len(samples)
                    if error is not None:
                        self.report(f"{error}; " + ("retrying its prompts elsewhere" if attempt < self.retries
                                                    else "no retries left"))
                        dead[replica] = error
                        failed.append(error)
            self.drop(dead)
            todo = [g for g in range(len(prompts)) if g not in done]
            if not todo:
                return [s for g in range(len(prompts)) for s in done[g]]
        left = "" if self.replicas else "; no rollout replica is left in the run"
        raise StepError(f"generation failed for {len(todo)} prompts after {self.retries + 1} attempts "
                        f"(runtime_args.step_retries={self.retries}){left}: {failed[-1] if failed else 'incomplete'}")

    def _generate_on(self, replica: Rollout, shard: list[int], prompts, sampling, n, tag):
        """Generates the shard's groups on one replica, at most max_sequences samples per call."""
        groups: dict[int, list[GenSample]] = {}
        per_call = max(1, self.max_sequences // n)
        timeout = self.timeouts.generate
        for start in range(0, len(shard), per_call):
            request = rpb.GenerateRequest(sampling=sampling, n=n, prompts=[
                rpb.Prompt(group_id=f"{tag}-{g}", prompt_ids=ids_to_wire(prompts[g]))
                for g in shard[start: start + per_call]])
            try:
                for msg in replica.stub.Generate(request, timeout=timeout):
                    s = decode_sample(msg)
                    groups.setdefault(s.group, []).append(s)
            except grpc.RpcError as exc:
                return groups, describe_failure(replica.name, "Generate", exc, timeout, "generate")
        return groups, None

class TrainerClient(Worker):
    kind = "trainer"
    stub_class = trainer_pb2_grpc.TrainerServiceStub

    def _encode(self, mb: batches.MicroBatch) -> pb.PackedBatch:
        msg = batches.to_proto(mb)
        if msg.ByteSize() > self.max_message_mb << 20:
            raise StepError(f"a packed micro-batch of {mb.num_tokens} tokens is {msg.ByteSize()} bytes, over the "
                            f"gRPC message limit of {self.max_message_mb} MiB (the smaller of the coordinator's and "
                            f"{self.name}'s --max-message-mb / {MAX_MESSAGE_ENV}); lower "
                            f"models.policy_trainer.max_token_in_packing or start both with a larger limit")
        return msg

    def train(self, micro_batches: list[batches.MicroBatch]) -> dict[str, float]:
        encoded = [self._encode(mb) for mb in micro_batches]   # refuse before anything is sent
        reply = self.call("Train", iter(encoded), "train")
        return dict(reply.values)

    def logprobs(self, mb: batches.MicroBatch) -> torch.Tensor:
        return from_wire(self.call("ComputeLogProbs", self._encode(mb), "logprobs").logprobs, "logprobs")

    def save_checkpoint(self, path: str, episode: int, data_position: int) -> None:
        extra = {"episode": episode, "data_position": data_position}
        self.call("SaveCheckpoint", tpb.CheckpointRequest(path=path, extra_json=json.dumps(extra)), "checkpoint")

    def export_hf(self, path: str) -> None:
        self.call("ExportHF", tpb.CheckpointRequest(path=path), "checkpoint")

    def load_checkpoint(self, path: str) -> tuple[int, dict]:
        """(optimizer steps, what save_checkpoint stored) of the checkpoint now loaded."""
        reply = self.call("LoadCheckpoint", tpb.CheckpointRequest(path=path), "checkpoint")
        return reply.step, json.loads(reply.extra_json or "{}")
