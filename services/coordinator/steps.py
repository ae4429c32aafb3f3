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
    MicroBatch,
    TrainSequence,
    make_micro_batch,
    split_into_micro_batches,
)
from services.common.config import RLConfig
from services.coordinator.clients import GenSample, StepError, TrainerClient
from services.coordinator.data import PromptRecord
from services.coordinator.reward_pool import RewardPool


@dataclass
class EncodedPrompts:
    records: list[PromptRecord]
    ids: dict[int, list[int]]   # record.index -> prompt token ids
    dropped: int                # prompts longer than models.policy.max_prompt_tokens_length (reported)


def encode_prompts(tokenizer, records: list[PromptRecord], max_len: int) -> EncodedPrompts:
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
        raise StepError(f"every prompt is empty or longer than models.policy.max_prompt_tokens_length={max_len}")
    return EncodedPrompts(kept, ids, len(records) - len(kept))


def sampling_params(cfg: RLConfig, seed: int) -> pb.SamplingParams:
    p = cfg.models.policy
    return pb.SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                             max_tokens=p.max_response_tokens_length, stop_token_ids=list(p.stop_token_ids),
                             seed=seed)


def check_versions(samples: list[GenSample], version: int, step: int) -> None:
    """Every sample must come from the weights just synced: one of another version is refused."""
    stale = [s for s in samples if s.version != version]
    if stale:
        replicas = sorted({f"{s.replica} (version {s.version})" for s in stale})
        raise StepError(f"step {step}: {len(stale)} samples carry another policy version than {version}, the one "
                        f"just synced; refused. From {', '.join(replicas)}: a replica missed a weight sync "
                        f"(e.g. it restarted with its initial weights)", {"rollout/stale_samples": float(len(stale))})


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


def logprob_agreement(trainer: TrainerClient, samples: list[GenSample], *, k: int, threshold: float,
                      temperature: float) -> float:
    """Max |trainer logprob - rollout logprob| over the response tokens of k samples; fails the step
    above runtime_args.logprob_diff_threshold."""
    if k <= 0:   # runtime_args.agreement_samples=0 turns the check off
        return 0.0
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
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[f"time/{name}"] = time.perf_counter() - start


def step_metrics(samples: list[GenSample], rewards: torch.Tensor, reward_timeouts: int, train: list[dict[str, float]],
                 agreement: float, sync: dict[str, float], timer: Timer, pool: dict[str, float]) -> dict[str, float]:
    """`pool`: the rollout pool's run totals (RolloutPool.counters)."""
    lengths = [len(s.response_ids) for s in samples]
    merged: dict[str, float] = {}
    for m in train:   # sums over optimizer steps for counters, means for the rest
        for k, v in m.items():
            merged[k] = merged.get(k, 0.0) + v
    means = {f"train/{k}": (v if k in ("tokens", "micro_batches", "seconds") else v / len(train))
             for k, v in merged.items()}
    total = sum(timer.seconds.values())
    return {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "reward/timeouts": float(reward_timeouts),   # samples over models.reward.timeout_s, scored 0
            "response_length/mean": statistics.fmean(lengths), "response_length/max": float(max(lengths)),
            "response/truncated_frac": sum(s.finish_reason == pb.LENGTH for s in samples) / len(samples),
            "rollout/policy_version": float(min(s.version for s in samples)),
            "rollout/replicas": float(len({s.replica for s in samples})),   # replicas that generated this step
            "rollout/samples": float(len(samples)), **pool,
            "rollout/tokens_per_s": sum(lengths) / max(timer.seconds.get("time/rollout", 0.0), 1e-9),
            "agreement/max_abs_diff": agreement, **means, **sync, **timer.seconds, "time/step": total}
