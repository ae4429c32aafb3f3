"""Held-out evaluation (runtime_args.eval_data_path): before the first episode, every
runtime_args.eval_episode_interval episodes and after the last, the rollout pool answers every held-out
prompt once greedily and once at the training temperature (models.policy.temperature), and the run's
reward scores the answers.

Metrics (one row per evaluation in metrics.jsonl, also in WatchRun/GetRun, the plot and TensorBoard):

* ``eval/accuracy``: fraction of prompts whose greedy answer earns full credit (reward >= 1);
* ``eval/reward_mean``, ``eval/response_length`` (tokens), ``eval/truncated_frac``: of the greedy answers;
* ``eval/sampled/...``: the same four at the training temperature (one sample per prompt, the same seed
  at every evaluation, so two evaluations differ by the model only);
* ``eval/reward_timeouts`` (and ``eval/sampled/...``): answers whose reward hit models.reward.timeout_s
  (scored 0);
* ``eval/prompts``, ``eval/policy_version``, ``time/eval``.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

from rlgrid.v1 import common_pb2 as pb
from services.common.config import RLConfig
from services.coordinator.clients import GenSample, RolloutPool
from services.coordinator.data import PromptRecord, load_jsonl
from services.coordinator.reward_pool import RewardPool
from services.coordinator.runs import Run
from services.coordinator.steps import EncodedPrompts, encode_prompts, sampling_params, score

FULL_CREDIT = 1.0
"""A response counts as correct when its reward reaches this (the math reward gives 0 or 1)."""

MODES = {"": True, "sampled/": False}
"""Metric prefix after ``eval/`` -> greedy decoding."""


@dataclass
class EvalSample:
    """One held-out answer, as written to ``runs/<run_id>/eval/step-<n>.jsonl``."""
    index: int          # the record's position in the eval file
    mode: str           # "greedy" or "sampled"
    response: str
    reward: float
    tokens: int
    truncated: bool


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: list[EvalSample]


def answer_metrics(rewards: list[float], lengths: list[int], truncated: list[bool], prefix: str) -> dict[str, float]:
    """accuracy, reward mean, mean response length and truncated fraction of one set of answers."""
    n = len(rewards)
    if n == 0 or not n == len(lengths) == len(truncated):
        raise ValueError(f"answer_metrics needs equally many rewards, lengths and flags (> 0), got "
                         f"{len(rewards)}, {len(lengths)}, {len(truncated)}")
    return {f"eval/{prefix}accuracy": sum(r >= FULL_CREDIT for r in rewards) / n,
            f"eval/{prefix}reward_mean": statistics.fmean(rewards),
            f"eval/{prefix}response_length": statistics.fmean(lengths),
            f"eval/{prefix}truncated_frac": sum(truncated) / n}


def is_due(step: int, *, first: int, last: int, interval: int) -> bool:
    """Evaluate at the run's first point (before training, or at the resumed step), every `interval` steps
    (0 = never in between) and after the last step."""
    return step == first or step == last or (interval > 0 and step % interval == 0)


class Evaluation:
    """The held-out prompts of a run, encoded once, and when and how to evaluate the policy on them."""

    def __init__(self, cfg: RLConfig, tokenizer, reward: RewardPool, prompts: EncodedPrompts | None, first_step: int):
        self.cfg, self.tokenizer, self.reward, self.prompts = cfg, tokenizer, reward, prompts
        self.first_step = first_step
        # one fixed seed: every evaluation samples with the same random numbers
        self.seed = cfg.runtime_args.seed * 100_003 + 77_777

    @classmethod
    def from_config(cls, cfg: RLConfig, tokenizer, reward: RewardPool, first_step: int) -> "Evaluation":
        """The run's evaluation; one that never runs when runtime_args.eval_data_path is empty."""
        ra = cfg.runtime_args
        prompts = None
        if ra.eval_data_path:
            records = load_jsonl(ra.eval_data_path, key="runtime_args.eval_data_path")
            prompts = encode_prompts(tokenizer, records, cfg.models.policy.max_prompt_tokens_length,
                                     key="runtime_args.eval_data_path")
        return cls(cfg, tokenizer, reward, prompts, first_step)

    def due(self, step: int) -> bool:
        ra = self.cfg.runtime_args
        return self.prompts is not None and is_due(step, first=self.first_step, last=ra.num_episode,
                                                   interval=ra.eval_episode_interval)

    def at(self, step: int, run: Run, rollouts: RolloutPool) -> None:
        """Evaluates and records the result in `run` when `step` is an evaluation point (once: a run that a
        restart resumed at an evaluated step keeps that evaluation)."""
        if not self.due(step) or run.evaluated(step):
            return
        dropped = self.prompts.dropped
        run.log(f"evaluating {len(self.prompts.records)} held-out prompts after step {step}"
                + (f" ({dropped} longer than models.policy.max_prompt_tokens_length skipped)" if dropped else ""))
        result = self.run(rollouts, step)
        run.record_eval(step, result.metrics, [dataclasses.asdict(s) for s in result.samples])

    def run(self, rollouts: RolloutPool, step: int) -> EvalResult:
        """Generates and scores every held-out prompt, greedily and at the training temperature."""
        start = time.perf_counter()
        records: list[PromptRecord] = self.prompts.records
        ids = [self.prompts.ids[r.index] for r in records]
        metrics: dict[str, float] = {}
        samples: list[EvalSample] = []
        versions: set[int] = set()
        for prefix, greedy in MODES.items():
            generated: list[GenSample] = rollouts.generate(ids, sampling_params(self.cfg, self.seed, greedy=greedy),
                                                           1, tag=f"eval{step}{'g' if greedy else 's'}")
            scores, timeouts = score(self.reward, self.tokenizer, generated, records)
            rewards = scores.tolist()
            truncated = [s.finish_reason == pb.LENGTH for s in generated]
            lengths = [len(s.response_ids) for s in generated]
            metrics.update(answer_metrics(rewards, lengths, truncated, prefix))
            metrics[f"eval/{prefix}reward_timeouts"] = float(timeouts)   # scored 0 at models.reward.timeout_s
            texts = self.tokenizer.batch_decode([s.response_ids for s in generated], skip_special_tokens=True)
            samples += [EvalSample(records[s.group].index, "greedy" if greedy else "sampled", text, r, n, t)
                        for s, text, r, n, t in zip(generated, texts, rewards, lengths, truncated)]
            versions |= {s.version for s in generated}
        metrics.update({"eval/prompts": float(len(records)), "eval/policy_version": float(min(versions)),
                        "time/eval": time.perf_counter() - start})
        return EvalResult(metrics, samples)
