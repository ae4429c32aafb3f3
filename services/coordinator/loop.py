"""The GRPO loop, start to end of a run. Every step is one call into a named module; retries and
deadlines (clients.py), replicas joining and leaving (membership.py), restarts (recovery.py),
persistence (runs.py), reward time limits (reward_pool.py) and metrics (steps.py) live beside it."""
from __future__ import annotations

import os
from dataclasses import dataclass

from services.common.config import RLConfig
from services.coordinator.advantages import group_normalized_advantages
from services.coordinator.clients import RolloutPool, TrainerClient
from services.coordinator.data import PromptSampler, load_jsonl
from services.coordinator.membership import Membership
from services.coordinator.reward_pool import RewardPool
from services.coordinator.runs import Run
from services.coordinator.steps import (
    Timer,
    check_versions,
    encode_prompts,
    logprob_agreement,
    optimizer_steps,
    sampling_params,
    score,
    step_metrics,
    to_sequences,
)
from services.coordinator.sync import WeightSync


@dataclass
class RunContext:
    cfg: RLConfig
    run: Run
    tokenizer: object
    trainer: TrainerClient
    rollouts: RolloutPool
    membership: Membership
    sync: WeightSync
    reward: RewardPool


def run_grpo(ctx: RunContext) -> None:
    cfg, run, ra = ctx.cfg, ctx.run, ctx.cfg.runtime_args
    n = ra.num_inference_per_prompt
    prompts = encode_prompts(ctx.tokenizer, load_jsonl(ra.data_path), cfg.models.policy.max_prompt_tokens_length)
    if prompts.dropped:
        run.log(f"skipped {prompts.dropped} prompts longer than models.policy.max_prompt_tokens_length")
    version, done, position = 0, 0, 0
    if ra.resume_from:                          # model, optimizer, episode and data position
        version, saved = ctx.trainer.load_checkpoint(ra.resume_from)
        done, position = saved["episode"], saved["data_position"]
        run.log(f"resumed from {ra.resume_from}: episode {done}, policy version {version}")
    sampler = PromptSampler(prompts.records, ra.sample_per_episode // n, seed=ra.seed, shuffle=ra.data_shuffle,
                            position=position)
    run.log(ctx.reward.describe())
    ctx.sync.sync(version)                      # every replica starts from the trainer's weights

    for step in range(done + 1, ra.num_episode + 1):
        run.control_point()                     # pause / stop land between steps
        timer = Timer()
        records = sampler.next_batch()
        with timer("rollout"):
            samples = ctx.rollouts.generate([prompts.ids[r.index] for r in records],
                                            sampling_params(cfg, seed=ra.seed * 100_003 + step), n, tag=str(step))
        check_versions(samples, version, step)
        with timer("agreement"):
            agreement = logprob_agreement(ctx.trainer, samples, k=ra.agreement_samples,
                                          threshold=ra.logprob_diff_threshold, temperature=cfg.models.policy.temperature)
        with timer("reward"):
            rewards, reward_timeouts = score(ctx.reward, ctx.tokenizer, samples, records)
        advantages = group_normalized_advantages(rewards, n)
        with timer("train"):
            train = [ctx.trainer.train(mbs) for mbs in optimizer_steps(to_sequences(samples, advantages), cfg, step)]
        version += len(train)
        with timer("sync"):
            ctx.membership.admit()              # replicas set up since the last step join: they get these weights
            synced = ctx.sync.sync(version)
        run.record_step(step, step_metrics(samples, rewards, reward_timeouts, train, agreement, synced, timer,
                                           ctx.rollouts.counters()))
        if ra.save_episode_interval and step % ra.save_episode_interval == 0:
            checkpoint = os.path.join(run.run_dir, f"checkpoint-{step}")
            ctx.trainer.save_checkpoint(checkpoint, step, sampler.position)
            if cfg.models.policy_trainer.save_hf:
                ctx.trainer.export_hf(os.path.join(checkpoint, "hf"))
