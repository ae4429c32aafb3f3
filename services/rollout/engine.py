"""The rollout engine interface. The built-in engine (transformers) implements it; vLLM will be a
second backend of this same interface, selected by models.policy.engine."""
from __future__ import annotations

import abc
import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from rlgrid.v1 import common_pb2 as pb
from services.common import weight_sync
from services.common.memory import memory_report
from services.common.rpc import FailedPrecondition, InvalidArgument
from services.common.weight_sync import ParamMeta

WAKE_TAGS = ("weights", "kv_cache")   # what a sleep releases and a wake-up brings back (vLLM's tags)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0     # 0 = greedy (argmax); logprobs then of softmax(logits)
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0  # 0: not reproducible


def prompt_seeds(seed: int, count: int, keys: Sequence[str] | None = None) -> list[int]:
    """One sampling seed for each of `count` prompts, from the request's seed and the prompt's key (its
    group id; by default its position in the request): a
    prompt's samples then depend on the seed, the prompt and the weights only, never on which
    replica, call or batch it landed in, so a step redone on another set of replicas (after a
    restart, a retry or a join) draws the same samples. Seed 0: fresh random seeds. 62 bits: vLLM
    seeds a prompt's n samples with seed + j."""
    keys = [str(i) for i in range(count)] if keys is None else keys
    if not seed:
        return [secrets.randbits(62) or 1 for _ in keys]
    return [int.from_bytes(hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest(), "little") >> 2 or 1
            for key in keys]


@dataclass
class Generation:
    """One response to one prompt."""
    prompt_index: int
    response_ids: list[int]
    logprobs: list[float]        # log p(token) under softmax(logits / temperature), unfiltered by top-k/top-p
    finish_reason: str           # "stop" or "length"
    policy_version: int


@dataclass
class EngineInfo:
    engine: str
    model: str
    device: str
    dtype: str
    vocab_size: int
    eos_token_id: int
    params: list[ParamMeta] = field(default_factory=list)
    sync_ranks: int = 1   # ranks this replica takes in a weight-sync group (one per receiving process)
    gpu_uuids: list[str] = field(default_factory=list)   # the GPUs of those processes ([] on CPU)
    context_length: int = 0   # most tokens (prompt + response) one sequence may hold; 0 = unknown


class Engine(abc.ABC):
    """Generates with the serving weights; receives new weights in two phases (stage, commit); gives its
    memory up while the trainer runs on the same GPU (sleep, wake_up).

    Weight-sync membership lives here too: by default the service process itself joins the group
    and stages what it receives (the built-in engine). An engine whose weights live in other
    processes (vLLM's workers) overrides join/receive so each of those processes joins instead.
    """

    device: torch.device
    _transport: weight_sync.WeightTransport | None = None
    sleep_level: int = 0         # 0 awake, else the level of the sleep it is in
    weights_valid: bool = True   # False from a level-2 sleep until a weight sync commits
    asleep: frozenset[str] = frozenset()   # WAKE_TAGS a sleep released and no wake-up brought back yet

    def check_serving(self) -> None:
        """Raises FailedPrecondition unless the engine can generate now."""
        if self.asleep:
            raise FailedPrecondition(f"this replica is asleep (Sleep level {self.sleep_level}): call WakeUp first "
                                     f"(still asleep: {', '.join(sorted(self.asleep))})")
        if not self.weights_valid:
            raise FailedPrecondition("this replica dropped its weights in a level-2 Sleep and no weight sync has "
                                     "committed since: sync the weights (PrepareWeightSync, ReceiveWeights, "
                                     "CommitWeights) before it generates")

    def check_awake(self, what: str) -> None:
        """Raises FailedPrecondition while the weights are asleep (`what` needs them)."""
        if "weights" in self.asleep:
            raise FailedPrecondition(f"this replica is asleep (Sleep level {self.sleep_level}): call WakeUp before "
                                     f"{what}")

    def _woken(self, tags: Sequence[str]) -> frozenset[str]:
        """The tags of a wake-up (all when none) that are still asleep; refuses unknown tags."""
        unknown = sorted(set(tags) - set(WAKE_TAGS))
        if unknown:
            raise InvalidArgument(f"tags: unknown {unknown}; use {list(WAKE_TAGS)} (none = both)")
        return frozenset(tags or WAKE_TAGS) & self.asleep

    def _after_wake(self, woken: frozenset[str]) -> None:
        self.asleep -= woken
        if not self.asleep:
            self.sleep_level = 0

    def join_weight_sync(self, plan: pb.WeightSyncPlan) -> None:
        """Joins the group as `plan.rank` (.. + sync_ranks - 1); blocks until every member joined.
        The old group is left only once the new one is joined: a join that fails changes nothing."""
        transport = weight_sync.connect(plan, self.device)
        self.leave_weight_sync()
        self._transport = transport

    def leave_weight_sync(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    @property
    def weight_sync_group(self) -> str | None:
        return self._transport.plan.group_id if self._transport is not None else None

    def receive_weights(self, version: int) -> int:
        """Receives a full set of weights from the group into staging; returns bytes received."""
        if self._transport is None:
            raise RuntimeError("not in a weight-sync group")
        nbytes = 0

        def counted():
            nonlocal nbytes
            for name, tensor in self._transport.receive():
                nbytes += tensor.numel() * tensor.element_size()
                yield name, tensor
        self.stage_weights(counted(), version)
        return nbytes

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], sampling: Sampling, n: int,
                 keys: Sequence[str] | None = None) -> Iterator[Generation]:
        """Yields n generations per prompt, as they complete; all from one policy version. With
        sampling.seed set, sample j of a prompt draws from prompt_seeds(seed, len(prompts), keys) (keys default
        to the prompts' positions): the same wherever the prompt is generated."""

    @abc.abstractmethod
    def stage_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Stages named tensors; generation keeps using the serving weights until commit.
        The tensors stay valid until the next stage_weights call (the weight-sync transport owns
        them), so engines may keep references instead of copying."""

    @abc.abstractmethod
    def commit_weights(self, version: int) -> int:
        """Atomically makes the staged weights the serving ones; returns the serving version."""

    @abc.abstractmethod
    def abort_weights(self) -> None:
        """Drops staged weights."""

    @abc.abstractmethod
    def sleep(self, level: int) -> None:
        """Releases memory for another process on the GPU: level 1 drops the KV cache (and CUDA graphs)
        and moves the weights to host memory; level 2 drops the weights too (`weights_valid` turns False
        until a commit). Staged weights are dropped. Idempotent; a deeper level deepens the sleep."""

    @abc.abstractmethod
    def wake_up(self, tags: Sequence[str] = ()) -> None:
        """Brings back what sleep released, by WAKE_TAGS (none = all; level 2: the memory, not the
        weights). Idempotent."""

    def memory(self) -> dict[str, float]:
        """`services.common.memory.memory_report` of the process(es) holding the engine's GPU memory."""
        return memory_report(self.device)

    @property
    @abc.abstractmethod
    def version(self) -> int: ...

    @abc.abstractmethod
    def info(self) -> EngineInfo: ...
