"""The GRPO loop, start to end of a run. Every step is one call into a named module; retries and
deadlines (clients.py), replicas joining and leaving (membership.py), restarts (recovery.py),
persistence (runs.py), reward time limits (reward_pool.py), metrics (steps.py, overlap.py), held-out
evaluation (evaluation.py), where memory lives (placement.py) and how far rollout runs ahead of
training (producer.py) live beside it."""
from __future__ import annotations

import os
from dataclasses import dataclass

from services.common.config import RLConfig
from services.coordinator.advantages import group_normalized_advantages
from services.coordinator.clients import RolloutPool, TrainerClient
from services.coordinator.data import PromptSampler, load_jsonl
from services.coordinator.evaluation import Evaluation
from services.coordinator.membership import Membership
from services.coordinator.overlap import Activity
from services.coordinator.placement import choose_placement
from services.coordinator.producer import Batch, RolloutProducer
from services.coordinator.reward_pool import RewardPool
from services.coordinator.runs import Run
from services.coordinator.steps import (
    Timer,
    add_proximal_logprobs,
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
    evaluation = Evaluation.from_config(cfg, ctx.tokenizer, ctx.reward, first_step=done)
    placement = choose_placement(cfg, ctx.trainer, ctx.rollouts)
    run.log(placement.describe())
    activity = Activity()
    with placement.sync():
        ctx.sync.sync(version)                  # every replica starts from the trainer's weights

    def evaluate(step: int) -> None:            # held-out prompts, never while the producer generates
        if evaluation.due(step):
            with placement.rollout():
                evaluation.at(step, run, ctx.rollouts)

    evaluate(done)                              # the starting point of the curves

    def rollout(step: int, served: int) -> Batch:   # on the producer's thread, up to off_policy_steps ahead
        timer = Timer()
        records = sampler.next_batch()
        with timer("rollout"), activity("rollout"), placement.rollout():
            samples = ctx.rollouts.generate([prompts.ids[r.index] for r in records],
                                            sampling_params(cfg, seed=ra.seed * 100_003 + step), n, tag=str(step))
        with timer("reward"):
            rewards, reward_timeouts = score(ctx.reward, ctx.tokenizer, samples, records)
        return Batch(step, served, records, samples, rewards, reward_timeouts, sampler.position, timer.seconds)

    steps = range(done + 1, ra.num_episode + 1)
    with RolloutProducer(rollout, steps, ahead=ra.off_policy_steps, version=version, activity=activity) as producer:
        for step in steps:
            run.control_point()                 # pause / stop land between steps
            timer = Timer()
            batch = producer.next()
            lag = check_versions(batch, version, cfg)
            with activity("trainer"), placement.train():
                with timer("agreement"):
                    agreement = logprob_agreement(ctx.trainer, batch.samples, k=ra.agreement_samples,
                                                  threshold=ra.logprob_diff_threshold,
                                                  temperature=cfg.models.policy.temperature, trainer_version=version)
                advantages = group_normalized_advantages(batch.rewards, n)
                train_steps = optimizer_steps(to_sequences(batch.samples, advantages), cfg, step)
                with timer("proximal_logprobs"):    # truncated importance sampling only
                    add_proximal_logprobs(ctx.trainer, train_steps, cfg)
                with timer("train"):
                    train = [ctx.trainer.train(mbs) for mbs in train_steps]
            version += len(train)
            with producer.between_batches(serving=version), timer("sync"), activity("sync"), placement.sync():
                ctx.membership.admit()          # replicas set up since the last step join: they get these weights
                synced = ctx.sync.sync(version)
            run.record_step(step, step_metrics(batch, lag, train, agreement, synced, timer, activity,
                                               ctx.rollouts.counters()) | placement.metrics())
            evaluate(step)                      # every runtime_args.eval_episode_interval and after the last step
            if ra.save_episode_interval and step % ra.save_episode_interval == 0:
                checkpoint = os.path.join(run.run_dir, f"checkpoint-{step}")
                with activity("trainer"), placement.train():
                    ctx.trainer.save_checkpoint(checkpoint, step, batch.data_position)
                    if cfg.models.policy_trainer.save_hf:
                        ctx.trainer.export_hf(os.path.join(checkpoint, "hf"))
