"""Packed sample batches: what the coordinator sends the trainer, and how the trainer checks it.

A micro-batch lays its sequences end to end (prompt + response each); per-token tensors are
aligned with the flat token row. `loss_mask` is 1 on response tokens, whose predecessor is always
in the same sequence, so no loss term ever reads across a sequence boundary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from rlgrid.v1 import common_pb2 as pb
from services.common.config import TEMPERATURE_RANGE, RLConfig
from services.common.packing import (
    best_fit_decreasing,
    cu_seqlens_for,
    fixed_size_batches,
)
from services.common.tensors import from_wire, to_wire

# Upper bound on tokens in one micro-batch accepted from the wire (1M tokens); larger is a bug.
MAX_TOKENS_PER_BATCH = 1 << 20
# Loss inputs the trainer accepts. A sampled token's logprob is never below -50 in practice (it was
# drawn with probability e^-50); with that floor and |advantage| <= 1e3 the PPO ratio exp(new - old)
# times the advantage stays finite in float32 (e^50 * 1e3 ~ 5e24), summed over a million tokens too.
# Group-normalised advantages are at most sqrt(group size).
MIN_OLD_LOGPROB = -50.0
MAX_ABS_ADVANTAGE = 1e3


@dataclass
class TrainSequence:
    """One sample as the trainer needs it."""
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    advantage: float
    version: int

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor      # int64 [T]
    seq_lens: list[int]
    loss_mask: torch.Tensor      # bool [T]
    old_logprobs: torch.Tensor   # float32 [T]
    advantages: torch.Tensor     # float32 [T]
    versions: torch.Tensor       # int64 [S]
    num_global_tokens: int
    temperature: float = 1.0
    padded: bool = False
    step: int = 0
    # float32 [T]: the trainer's logprobs before the episode's first optimizer step (truncated importance
    # sampling, models.policy_trainer.tis_cap); None in that first step, whose own forward has them
    proximal_logprobs: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def make_micro_batch(seqs: Sequence[TrainSequence], *, num_global_tokens: int, temperature: float,
                     padded: bool = False, step: int = 0) -> MicroBatch:
    ids, mask, old, adv = [], [], [], []
    for s in seqs:
        p, r = len(s.prompt_ids), len(s.response_ids)
        ids += s.prompt_ids + s.response_ids
        mask += [False] * p + [True] * r
        old += [0.0] * p + list(s.response_logprobs)
        adv += [0.0] * p + [s.advantage] * r
    return MicroBatch(input_ids=torch.tensor(ids, dtype=torch.int64), seq_lens=[s.length for s in seqs],
                      loss_mask=torch.tensor(mask, dtype=torch.bool), old_logprobs=torch.tensor(old, dtype=torch.float32),
                      advantages=torch.tensor(adv, dtype=torch.float32),
                      versions=torch.tensor([s.version for s in seqs], dtype=torch.int64),
                      num_global_tokens=num_global_tokens, temperature=temperature, padded=padded, step=step)


def split_into_micro_batches(seqs: Sequence[TrainSequence], *, packing: bool, max_token_in_packing: int,
                             micro_batch_size: int, temperature: float, step: int = 0) -> list[MicroBatch]:
    """Packing on: best-fit-decreasing rows of at most max_token_in_packing tokens.
    Packing off: runtime_args.train_micro_batch_size sequences per (padded) micro-batch."""
    num_global = sum(len(s.response_ids) for s in seqs)
    if packing:
        groups = best_fit_decreasing([s.length for s in seqs], max_token_in_packing)
    else:
        groups = fixed_size_batches(len(seqs), micro_batch_size)
    return [make_micro_batch([seqs[i] for i in g], num_global_tokens=num_global, temperature=temperature,
                             padded=not packing, step=step) for g in groups]


def to_proto(mb: MicroBatch) -> pb.PackedBatch:
    msg = pb.PackedBatch(
        input_ids=to_wire(mb.input_ids.to(torch.int32)), cu_seqlens=to_wire(cu_seqlens_for(mb.seq_lens)),
        loss_mask=to_wire(mb.loss_mask.to(torch.uint8)), old_logprobs=to_wire(mb.old_logprobs),
        advantages=to_wire(mb.advantages), versions=to_wire(mb.versions), num_global_tokens=mb.num_global_tokens,
        temperature=mb.temperature, padded=mb.padded, step=mb.step)
    if mb.proximal_logprobs is not None:
        msg.proximal_logprobs.CopyFrom(to_wire(mb.proximal_logprobs))
    return msg


def from_proto(msg: pb.PackedBatch, *, vocab_size: int | None = None, for_training: bool = True) -> MicroBatch:
    """Decodes and validates a PackedBatch; raises ValueError naming the offending field."""
    ids = from_wire(msg.input_ids, "input_ids", dtype=torch.int32, ndim=1).long()
    t = ids.numel()
    if t == 0:
        raise ValueError("input_ids is empty")
    if t > MAX_TOKENS_PER_BATCH:
        raise ValueError(f"input_ids has {t} tokens, more than {MAX_TOKENS_PER_BATCH} per micro-batch; "
                         f"lower models.policy_trainer.max_token_in_packing")
    if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"input_ids has token ids outside [0, {vocab_size})")
    cu = from_wire(msg.cu_seqlens, "cu_seqlens", dtype=torch.int32, ndim=1).long()
    if cu.numel() < 2 or cu[0] != 0 or cu[-1] != t or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise strictly from 0 to len(input_ids)={t}, got {cu.tolist()[:8]}")
    seq_lens = (cu[1:] - cu[:-1]).tolist()
    lo, hi = TEMPERATURE_RANGE
    if not (math.isfinite(msg.temperature) and lo <= msg.temperature <= hi):
        raise ValueError(f"temperature must be a number in [{lo}, {hi}] (models.policy.temperature), "
                         f"got {msg.temperature}")
    if not for_training:
        zeros = torch.zeros(t)
        return MicroBatch(ids, seq_lens, zeros.bool(), zeros, zeros, torch.zeros(len(seq_lens), dtype=torch.int64),
                          1, msg.temperature, msg.padded, msg.step)
    per_token = {}
    fields = [("loss_mask", torch.uint8), ("old_logprobs", torch.float32), ("advantages", torch.float32)]
    if msg.HasField("proximal_logprobs"):
        fields.append(("proximal_logprobs", torch.float32))
    for field, dtype in fields:
        tensor = from_wire(getattr(msg, field), field, dtype=dtype, ndim=1)
        if tensor.numel() != t:
            raise ValueError(f"{field} has {tensor.numel()} entries, input_ids has {t}")
        per_token[field] = tensor
    old, adv, prox = per_token["old_logprobs"], per_token["advantages"], per_token.get("proximal_logprobs")
    if not bool(torch.isfinite(old).all() and torch.isfinite(adv).all()):
        raise ValueError("old_logprobs and advantages must be finite")
    versions = from_wire(msg.versions, "versions", dtype=torch.int64, ndim=1)
    if versions.numel() != len(seq_lens):
        raise ValueError(f"versions has {versions.numel()} entries, cu_seqlens describes {len(seq_lens)} sequences")
    if bool((versions < 0).any()):
        raise ValueError("versions must be >= 0 (policy versions of the samples)")
    if not set(per_token["loss_mask"].unique().tolist()) <= {0, 1}:
        raise ValueError("loss_mask must hold only 0 and 1")
    mask = per_token["loss_mask"].bool()
    if bool(old[~mask].any() or adv[~mask].any()):
        raise ValueError("old_logprobs and advantages must be 0 off the loss mask")
    if bool((old[mask] < MIN_OLD_LOGPROB).any() or (old[mask] > 1e-4).any()):
        raise ValueError(f"old_logprobs must be log-probabilities in [{MIN_OLD_LOGPROB}, 0] on the loss mask "
                         f"(the rollout's logprobs of sampled tokens)")
    # the trainer's own logprobs, bounded like the rollout's: the PPO ratio exp(new - proximal) stays finite
    if prox is not None and not bool(torch.isfinite(prox).all() and not prox[~mask].any()
                                     and (prox[mask] >= MIN_OLD_LOGPROB).all() and (prox[mask] <= 1e-4).all()):
        raise ValueError(f"proximal_logprobs must be finite log-probabilities in [{MIN_OLD_LOGPROB}, 0] on the loss "
                         f"mask and 0 off it (the trainer's logprobs before the episode's first optimizer step)")
    if bool((adv.abs() > MAX_ABS_ADVANTAGE).any()):
        raise ValueError(f"advantages must be within +-{MAX_ABS_ADVANTAGE:g} (group-normalised advantages are at most "
                         f"sqrt(runtime_args.num_inference_per_prompt))")
    starts = cu[:-1]
    if bool(mask[starts].any()):
        raise ValueError("loss_mask is set on the first token of a sequence, which has no prediction")
    if msg.num_global_tokens < int(mask.sum()) or msg.num_global_tokens <= 0:
        raise ValueError(f"num_global_tokens={msg.num_global_tokens} is smaller than this batch's "
                         f"{int(mask.sum())} loss tokens")
    return MicroBatch(ids, seq_lens, mask, old, adv, versions, int(msg.num_global_tokens), msg.temperature,
                      msg.padded, msg.step, prox)


@dataclass(frozen=True)
class BatchLimits:
    """What one run's batches may hold, from the config the trainer is set up with and its step."""
    temperature: float           # models.policy.temperature: the logprobs' temperature
    max_sequence: int            # tokens of one sample (prompt + response)
    max_tokens: int              # tokens of one training micro-batch
    max_sequences: int           # sequences of one training micro-batch
    max_step_tokens: int         # tokens of one Train call (one optimizer step) or ComputeLogProbs call
    max_step_sequences: int      # sequences of one Train call: runtime_args.train_global_batch_size
    max_loss_tokens: int         # num_global_tokens: loss tokens of one optimizer step
    versions: tuple[int, int]    # oldest and newest policy version a trained sample may carry
    off_policy_steps: int = 0    # runtime_args.off_policy_steps: how many episodes older the oldest may be
    tis: bool = False            # truncated importance sampling on: proximal_logprobs may come

    @classmethod
    def of(cls, cfg: RLConfig, step: int) -> BatchLimits:
        ra, p, t = cfg.runtime_args, cfg.models.policy, cfg.models.policy_trainer
        sample = p.max_prompt_tokens_length + p.max_response_tokens_length
        gbs = ra.train_global_batch_size
        # an episode's samples are generated by one version and train over its optimizer steps; with
        # off_policy_steps = d they were generated up to d episodes before the trainer's episode began
        lag = (ra.off_policy_steps + 1) * (ra.sample_per_episode // gbs) - 1
        return cls(temperature=p.temperature, max_sequence=sample,
                   max_tokens=t.max_token_in_packing if t.packing else ra.train_micro_batch_size * sample,
                   max_sequences=gbs if t.packing else ra.train_micro_batch_size, max_step_tokens=gbs * sample,
                   max_step_sequences=gbs,
                   max_loss_tokens=gbs * p.max_response_tokens_length, versions=(max(step - lag, 0), step),
                   off_policy_steps=ra.off_policy_steps, tis=t.tis_cap is not None)

    def check_step(self, tokens: int, sequences: int) -> None:
        """Tokens and sequences of one call: at most one optimizer step's."""
        if tokens > self.max_step_tokens or sequences > self.max_step_sequences:
            raise ValueError(f"{tokens} tokens in {sequences} sequences are more than one optimizer step holds "
                             f"({self.max_step_sequences} sequences: runtime_args.train_global_batch_size, of at most "
                             f"{self.max_sequence} tokens each)")

    def check(self, mb: MicroBatch, *, for_training: bool = True) -> None:
        """Raises ValueError naming the field and the config key when `mb` is outside the run's bounds."""
        if abs(mb.temperature - self.temperature) > 1e-6 * max(1.0, self.temperature):
            raise ValueError(f"temperature={mb.temperature:g} is not the run's models.policy.temperature="
                             f"{self.temperature:g}, which the rollout's logprobs were sampled at")
        if max(mb.seq_lens) > self.max_sequence:
            raise ValueError(f"a sequence of {max(mb.seq_lens)} tokens is longer than models.policy."
                             f"max_prompt_tokens_length + max_response_tokens_length = {self.max_sequence}")
        if not for_training:
            self.check_step(mb.num_tokens, len(mb.seq_lens))
            return
        if mb.num_tokens > self.max_tokens or len(mb.seq_lens) > self.max_sequences:
            raise ValueError(f"a micro-batch of {mb.num_tokens} tokens in {len(mb.seq_lens)} sequences is larger than "
                             f"the run's ({self.max_tokens} tokens, {self.max_sequences} sequences: "
                             f"models.policy_trainer.max_token_in_packing, runtime_args.train_micro_batch_size)")
        if mb.num_global_tokens > self.max_loss_tokens:
            raise ValueError(f"num_global_tokens={mb.num_global_tokens} is more than one optimizer step can hold "
                             f"(runtime_args.train_global_batch_size x models.policy.max_response_tokens_length = "
                             f"{self.max_loss_tokens})")
        oldest, newest = self.versions
        if bool((mb.versions < oldest).any() or (mb.versions > newest).any()):
            raise ValueError(f"versions {sorted(set(mb.versions.tolist()))[:4]} are outside [{oldest}, {newest}]: "
                             f"samples of policy versions older than runtime_args.off_policy_steps="
                             f"{self.off_policy_steps} episodes before the current one (or newer than the trainer's "
                             f"step {newest}) are refused")
        if mb.proximal_logprobs is not None and not self.tis:
            raise ValueError("proximal_logprobs are given but models.policy_trainer.tis_cap is not set: they serve "
                             "only truncated importance sampling")
