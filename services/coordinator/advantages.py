"""GRPO advantages: rewards normalised within each prompt's group of samples."""

from __future__ import annotations

import torch

GROUP_SIZE_KEY = "runtime_args.num_inference_per_prompt"


def group_normalized_advantages(
    rewards: torch.Tensor, group_size: int, *, eps: float = 1e-6, scale_by_std: bool = True
) -> torch.Tensor:
    """Group-relative advantages of GRPO.

    ``rewards`` is 1-D and ordered group by group: elements
    ``[k * group_size, (k + 1) * group_size)`` are the samples of prompt ``k``.
    Each reward becomes ``(r - group mean) / (group std + eps)``, where std is
    the population standard deviation (``unbiased=False``, divisor
    ``group_size``); with ``scale_by_std=False`` it is just ``r - group mean``.
    A group whose rewards are all equal gets exactly zero advantages (no NaN and
    no rounding residue).

    Args:
        rewards: [N] scalar reward per sample, N divisible by ``group_size``.
        group_size: samples per prompt (``runtime_args.num_inference_per_prompt``).
        eps: added to the std to avoid division by zero.
        scale_by_std: divide by the group std (Dr. GRPO-style runs turn this off).

    Returns:
        [N] advantages, floating point (integer rewards become float32).

    Raises:
        ValueError: if ``rewards`` is not 1-D, ``group_size <= 0`` or N is not
            divisible by ``group_size``.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size <= 0:
        raise ValueError(f"{GROUP_SIZE_KEY} (group_size) must be > 0, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"{rewards.numel()} rewards are not divisible into groups of {group_size}: "
            f"every prompt must have exactly {GROUP_SIZE_KEY}={group_size} samples"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    groups = rewards.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centered = centered / (groups.std(dim=1, correction=0, keepdim=True) + eps)
    constant = (groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True))
    return torch.where(constant, torch.zeros_like(centered), centered).view(-1)
