"""Optimizer and learning-rate schedule from `models.policy_trainer.optimizer`, the same for every backend."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from services.common.config import RLConfig


def total_steps(cfg: RLConfig) -> int:
    """Optimizer steps in the whole run."""
    r = cfg.runtime_args
    return r.num_episode * (r.sample_per_episode // r.train_global_batch_size)


def lr_factor(step: int, cfg: RLConfig) -> float:
    """Multiplier of `lr` at optimizer step `step` (0-based): linear warmup over `lr_warmup_iters`, then
    constant, or a linear / cosine decay to `min_lr` reached at `lr_decay_iters` (0 = the whole run)."""
    o = cfg.models.policy_trainer.optimizer
    warmup = o.lr_warmup_iters
    if step < warmup:
        return (step + 1) / warmup
    if o.lr_decay_style == "constant":
        return 1.0
    end = o.lr_decay_iters or total_steps(cfg)
    progress = min(1.0, (step - warmup) / max(1, end - warmup))
    shape = 1.0 - progress if o.lr_decay_style == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    floor = o.min_lr / o.lr
    return floor + (1.0 - floor) * shape


IMPLEMENTATIONS = ("fused", "foreach")


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: RLConfig, implementation: str = "fused"
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its schedule. `implementation`: "fused" (one kernel over all parameters per step, on
    CUDA and CPU; the default) or "foreach" (torch's default on CUDA: a few multi-tensor kernels per
    state); bench/trainer.py measures both. Same math, same state."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"AdamW implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    o = cfg.models.policy_trainer.optimizer
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                  weight_decay=o.weight_decay, fused=implementation == "fused",
                                  foreach=implementation == "foreach")
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
