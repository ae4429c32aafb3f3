"""The named pieces the GRPO loop calls: prompt encoding, scoring, batching, agreement, metrics."""
from __future__ import annotations

import contextlib
import itertools
import statistics
import time
from dataclasses import dataclass

import torch

from rlgrid.v1 import common_pb2 as pb
from services.common.batches import (
    MIN_OLD_LOGPROB,
    MicroBatch,
    TrainSequence,
    make_micro_batch,
    split_into_micro_batches,
)
from services.common.config import RLConfig
from services.coordinator.clients import GenSample, StepError, TrainerClient
from services.coordinator.data import PromptRecord
from services.coordinator.overlap import Activity
from services.coordinator.producer import Batch
from services.coordinator.reward_pool import RewardPool

# how the extremes of optimizer steps combine (the trainer's loss metrics named *_min / *_max)
EXTREMES = {"_min": min, "_max": max}


@dataclass
class EncodedPrompts:
    records: list[PromptRecord]
    ids: dict[int, list[int]]   # record.index -> prompt token ids
    dropped: int                # prompts longer than models.policy.max_prompt_tokens_length (reported)


def encode_prompts(tokenizer, records: list[PromptRecord], max_len: int,
                   key: str = "runtime_args.data_path") -> EncodedPrompts:
    """Tokenizes every record once (chat template for message prompts when the tokenizer has one)."""
    ids, kept = {}, []
    for r in records:
        if isinstance(r.prompt, list):
            if getattr(tokenizer, "chat_template", None):
                out = tokenizer.apply_chat_template(r.prompt, add_generation_prompt=True, tokenize=True)
                tokens = list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
            else:
                tokens = tokenizer("\n".join(m["content"] for m in r.prompt)).input_ids
        else:
            tokens = tokenizer(r.prompt).input_ids
        if 0 < len(tokens) <= max_len:
            ids[r.index] = tokens
            kept.append(r)
    if not kept:
        raise StepError(f"every prompt of {key} is empty or longer than models.policy.max_prompt_tokens_length="
                        f"{max_len}")
    return EncodedPrompts(kept, ids, len(records) - len(kept))


def sampling_params(cfg: RLConfig, seed: int, greedy: bool = False) -> pb.SamplingParams:
    """The run's sampling settings (models.policy.*); greedy=True asks for argmax decoding (temperature 0)."""
    p = cfg.models.policy
    return pb.SamplingParams(temperature=0.0 if greedy else p.temperature, top_p=p.top_p, top_k=p.top_k,
                             max_tokens=p.max_response_tokens_length, stop_token_ids=list(p.stop_token_ids),
                             seed=seed)


def check_versions(batch: Batch, trainer_version: int, cfg: RLConfig) -> int:
    """Every sample must come from the version the replicas were synced to before its batch began
    (one of another version is refused), and that version may be at most runtime_args.off_policy_steps
    episodes behind the trainer's. Returns the lag in optimizer steps."""
    ra = cfg.runtime_args
    stale = [s for s in batch.samples if s.version != batch.version]
    if stale:
        replicas = sorted({f"{s.replica} (version {s.version})" for s in stale})
        raise StepError(f"step {batch.step}: {len(stale)} samples carry another policy version than {batch.version}, "
                        f"the one synced before they were generated; refused. From {', '.join(replicas)}: a replica "
                        f"missed a weight sync (e.g. it restarted with its initial weights)",
                        {"rollout/stale_samples": float(len(stale))})
    lag, bound = trainer_version - batch.version, ra.off_policy_steps * (ra.sample_per_episode // ra.train_global_batch_size)
    if not 0 <= lag <= bound:
        raise StepError(f"step {batch.step}: samples of policy version {batch.version} are {lag} optimizer steps behind "
                        f"the trainer's version {trainer_version}; runtime_args.off_policy_steps={ra.off_policy_steps} "
                        f"allows {bound}; refused", {"rollout/policy_lag": float(lag)})
    return lag


def score(rewards: RewardPool, tokenizer, samples: list[GenSample], records: list[PromptRecord]
          ) -> tuple[torch.Tensor, int]:
    """Rewards of the samples, and how many timed out (scored 0)."""
    texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
    scores, timeouts = rewards.score([(text, records[s.group].ground_truth) for text, s in zip(texts, samples)])
    return torch.tensor(scores, dtype=torch.float32), timeouts


def to_sequences(samples: list[GenSample], advantages: torch.Tensor) -> list[TrainSequence]:
    return [TrainSequence(s.prompt_ids, s.response_ids, s.logprobs, float(a), s.version)
            for s, a in zip(samples, advantages.tolist()) if s.response_ids]


def optimizer_steps(seqs: list[TrainSequence], cfg: RLConfig, step: int) -> list[list[MicroBatch]]:
    """runtime_args.train_global_batch_size samples per optimizer step, each split into micro-batches."""
    ra, t = cfg.runtime_args, cfg.models.policy_trainer
    size = ra.train_global_batch_size
    return [split_into_micro_batches(seqs[i: i + size], packing=t.packing, max_token_in_packing=t.max_token_in_packing,
                                     micro_batch_size=ra.train_micro_batch_size,
                                     temperature=cfg.models.policy.temperature, step=step)
            for i in range(0, len(seqs), size) if seqs[i: i + size]]


def add_proximal_logprobs(trainer: TrainerClient, steps: list[list[MicroBatch]], cfg: RLConfig) -> None:
    """Truncated importance sampling (models.policy_trainer.tis_cap): the micro-batches of every optimizer
    step after the episode's first get the trainer's logprobs of their tokens under its weights now,
    before the first step (which computes them in its own forward). Nothing without tis_cap."""
    if cfg.models.policy_trainer.tis_cap is None:
        return
    for mb in (mb for mbs in steps[1:] for mb in mbs):
        lp = trainer.logprobs(mb).clamp(MIN_OLD_LOGPROB, 0.0)   # the bounds the trainer accepts (batches.py)
        mb.proximal_logprobs = torch.where(mb.loss_mask, lp, torch.zeros_like(lp))


def logprob_agreement(trainer: TrainerClient, samples: list[GenSample], *, k: int, threshold: float,
                      temperature: float, trainer_version: int) -> float | None:
    """Max |trainer logprob - rollout logprob| over the response tokens of k samples; fails the step
    above runtime_args.logprob_diff_threshold. None when the samples are of an older version than the
    trainer's (off-policy steps): its weights are not theirs, so there is nothing to compare."""
    if k <= 0:   # runtime_args.agreement_samples=0 turns the check off
        return 0.0
    if any(s.version != trainer_version for s in samples):
        return None
    by_replica: dict[str, list[GenSample]] = {}
    for s in samples:
        if s.response_ids:
            by_replica.setdefault(s.replica, []).append(s)
    # round-robin over replicas, so every replica's weights are checked every step
    spread = [s for row in itertools.zip_longest(*by_replica.values()) for s in row if s is not None]
    chosen = spread[:max(k, len(by_replica))]
    if not chosen:
        return 0.0
    mb = make_micro_batch([TrainSequence(s.prompt_ids, s.response_ids, s.logprobs, 0.0, s.version) for s in chosen],
                          num_global_tokens=1, temperature=temperature)
    diff = float((trainer.logprobs(mb) - mb.old_logprobs)[mb.loss_mask].abs().max())
    if diff > threshold:
        raise StepError(f"logprob agreement check failed: max |trainer - rollout| = {diff:.4g} over {len(chosen)} "
                        f"samples of policy version {chosen[0].version} from {sorted(by_replica)}, above "
                        f"runtime_args.logprob_diff_threshold={threshold}; the replicas do not serve the trainer's "
                        f"weights (or the dtypes differ)", {"agreement/max_abs_diff": diff})
    return diff


class Timer:
    """Seconds of a step's named phases, and the step's wall time since the timer was made."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[f"time/{name}"] = time.perf_counter() - start


def step_metrics(batch: Batch, lag: int, train: list[dict[str, float]], agreement: float | None,
                 sync: dict[str, float], timer: Timer, activity: Activity, pool: dict[str, float]) -> dict[str, float]:
    """`pool`: the rollout pool's run totals (RolloutPool.counters)."""
    samples, rewards = batch.samples, batch.rewards
    lengths = [len(s.response_ids) for s in samples]
    merged: dict[str, float] = {}
    for m in train:   # sums over optimizer steps for counters, extremes by min / max, means for the rest
        for k, v in m.items():
            extreme = EXTREMES.get(k[k.rfind("_"):])
            merged[k] = extreme(merged.get(k, v), v) if extreme else merged.get(k, 0.0) + v
    means = {f"train/{k}": (v if k in ("tokens", "micro_batches", "seconds") or k[k.rfind("_"):] in EXTREMES
                            else v / len(train))
             for k, v in merged.items()}
    end = time.perf_counter()
    checked = {} if agreement is None else {"agreement/max_abs_diff": agreement}
    return {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "reward/timeouts": float(batch.reward_timeouts),   # samples over models.reward.timeout_s, scored 0
            "response_length/mean": statistics.fmean(lengths), "response_length/max": float(max(lengths)),
            "response/truncated_frac": sum(s.finish_reason == pb.LENGTH for s in samples) / len(samples),
            "rollout/policy_version": float(batch.version),
            "rollout/policy_lag": float(lag),   # optimizer steps the trainer was ahead when it trained them
            "rollout/replicas": float(len({s.replica for s in samples})),   # replicas that generated this step
            "rollout/samples": float(len(samples)), **pool,
            "rollout/tokens_per_s": sum(lengths) / max(batch.seconds.get("time/rollout", 0.0), 1e-9),
            **checked, **means, **sync, **batch.seconds, **timer.seconds, "time/step": end - timer.start,
            **activity.report(timer.start, end)}
