"""Packing variable-length samples into trainer rows (micro-batches)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

MAX_TOKEN_IN_PACKING_KEY = "models.policy_trainer.max_token_in_packing"


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack samples into bins of at most ``capacity`` tokens, best-fit-decreasing.

    Samples are placed longest first (ties: lower index first). Each goes into
    the open bin whose remaining space is the smallest that still fits it (ties:
    the bin opened first); if none fits, a new bin is opened. The result is
    deterministic.

    Args:
        lengths: token count of every sample.
        capacity: maximum total tokens per bin
            (``models.policy_trainer.max_token_in_packing``).

    Returns:
        Bins in the order they were opened, each a list of sample indices in the
        order they were placed. Every index appears in exactly one bin.

    Raises:
        ValueError: if ``capacity <= 0`` or a sample's length is ``<= 0`` or
            exceeds ``capacity``.
    """
    if capacity <= 0:
        raise ValueError(f"{MAX_TOKEN_IN_PACKING_KEY} must be > 0, got capacity {capacity}")
    for index, length in enumerate(lengths):
        if length <= 0:
            raise ValueError(
                f"sample {index} has length {length} (capacity {capacity}, "
                f"{MAX_TOKEN_IN_PACKING_KEY}): every sample must have at least one token"
            )
        if length > capacity:
            raise ValueError(
                f"sample {index} has length {length} > capacity {capacity}: raise "
                f"{MAX_TOKEN_IN_PACKING_KEY} to at least {length} or shorten prompts/responses"
            )

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Open bins as (remaining space, bin index), kept sorted: the first entry
    # >= (length, -1) is the tightest bin that fits, earliest-opened on ties.
    free: list[tuple[int, int]] = []
    for index in order:
        length = lengths[index]
        pos = bisect.bisect_left(free, (length, -1))
        if pos == len(free):
            bins.append([index])
            bisect.insort(free, (capacity - length, len(bins) - 1))
        else:
            remaining, bin_index = free.pop(pos)
            bins[bin_index].append(index)
            bisect.insort(free, (remaining - length, bin_index))
    return bins


def fixed_size_batches(n: int, micro_batch_size: int) -> list[list[int]]:
    """Split indices ``0..n-1`` into consecutive chunks of ``micro_batch_size``.

    The fallback when packing is disabled; the last chunk may be shorter.

    Raises:
        ValueError: if ``n < 0`` or ``micro_batch_size <= 0``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
    return [list(range(start, min(start + micro_batch_size, n))) for start in range(0, n, micro_batch_size)]


def _lengths_tensor(seq_lens: Sequence[int]) -> torch.Tensor:
    lens = torch.as_tensor(list(seq_lens), dtype=torch.int64)
    if lens.dim() != 1:
        raise ValueError(f"seq_lens must be a flat sequence of lengths, got shape {tuple(lens.shape)}")
    if (lens < 0).any():
        raise ValueError(f"seq_lens must be non-negative, got {lens.tolist()}")
    return lens


def position_ids_for(seq_lens: Sequence[int]) -> torch.Tensor:
    """Position ids of a packed row: ``0..len-1`` for every sequence, concatenated.

    Returns a flat int64 tensor of ``sum(seq_lens)`` elements, e.g.
    ``[3, 2] -> [0, 1, 2, 0, 1]``.
    """
    lens = _lengths_tensor(seq_lens)
    return positions_from_cu_seqlens(cu_seqlens_for(lens.tolist()), int(lens.sum()))


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """The same positions from a row's boundaries (``cu_seqlens_for``), on their device and without
    reading them back to the host: `total` is ``cu_seqlens[-1]``, which the caller knows."""
    cu = cu_seqlens.long()
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=total)
    return torch.arange(total, device=cu.device) - starts


def cu_seqlens_for(seq_lens: Sequence[int]) -> torch.Tensor:
    """Cumulative sequence boundaries for varlen attention.

    Returns int32 ``[n + 1]``: ``[0, l0, l0 + l1, ...]``, e.g. ``[3, 2] -> [0, 3, 5]``.
    """
    lens = _lengths_tensor(seq_lens)
    cu = torch.zeros(lens.numel() + 1, dtype=torch.int64)
    torch.cumsum(lens, 0, out=cu[1:])
    return cu.to(torch.int32)
