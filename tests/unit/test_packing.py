"""Tests for services.common.packing."""

import random

import pytest
import torch

from services.common.packing import (
    best_fit_decreasing,
    cu_seqlens_for,
    fixed_size_batches,
    position_ids_for,
)


def _check_partition(bins, lengths, capacity):
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    for b in bins:
        assert b and sum(lengths[i] for i in b) <= capacity


def test_bins_respect_capacity():
    lengths = [7, 3, 9, 1, 5, 5, 2, 8, 4, 6]
    bins = best_fit_decreasing(lengths, 10)
    _check_partition(bins, lengths, 10)


def test_bfd_optimal_known_case():
    # 6+4, 5+5, 3+3+2+2 → 3 bins of exactly 10 (sum = 30)
    lengths = [2, 5, 3, 6, 4, 5, 3, 2]
    bins = best_fit_decreasing(lengths, 10)
    assert len(bins) == 3
    assert sorted(sum(lengths[i] for i in b) for b in bins) == [10, 10, 10]
    # exact expected placement: longest first, tightest fit, ties by index
    assert bins == [[3, 4], [1, 5], [2, 6, 0, 7]]


def test_best_fit_picks_tightest_bin_not_first():
    # 7 → bin0 (room 3); 4 → bin1 (room 6); 4 → bin1 (room 2); the 1 goes to the tightest
    # bin, bin1 (room 2), not the first one that fits (bin0, room 3) as first-fit would.
    assert best_fit_decreasing([7, 4, 4, 1], 10) == [[0], [1, 2, 3]]
    # ties in remaining space go to the bin opened first
    assert best_fit_decreasing([6, 6, 4], 10) == [[0, 2], [1]]


def test_deterministic_and_tie_break_by_index():
    lengths = [4, 4, 4, 4, 4]
    first = best_fit_decreasing(lengths, 8)
    assert first == [[0, 1], [2, 3], [4]]
    assert all(best_fit_decreasing(lengths, 8) == first for _ in range(5))
    rng = random.Random(0)
    rand = [rng.randint(1, 50) for _ in range(200)]
    assert best_fit_decreasing(rand, 64) == best_fit_decreasing(list(rand), 64)


def test_too_long_sample_raises_naming_key():
    with pytest.raises(ValueError, match=r"models\.policy_trainer\.max_token_in_packing") as exc:
        best_fit_decreasing([3, 17, 2], 16)
    assert "17" in str(exc.value) and "16" in str(exc.value)


@pytest.mark.parametrize("bad", [0, -3])
def test_non_positive_length_raises_naming_key(bad):
    with pytest.raises(ValueError, match=r"models\.policy_trainer\.max_token_in_packing"):
        best_fit_decreasing([3, bad], 16)


def test_empty_input():
    assert best_fit_decreasing([], 8) == []
    assert fixed_size_batches(0, 4) == []


def test_position_ids_and_cu_seqlens():
    pos = position_ids_for([3, 1, 2])
    assert pos.dtype == torch.int64
    assert pos.tolist() == [0, 1, 2, 0, 0, 1]
    cu = cu_seqlens_for([3, 1, 2])
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 4, 6]
    assert position_ids_for([]).tolist() == [] and cu_seqlens_for([]).tolist() == [0]


def test_fixed_size_batches_cover_each_index_once():
    batches = fixed_size_batches(10, 3)
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert sorted(i for b in batches for i in b) == list(range(10))
    with pytest.raises(ValueError):
        fixed_size_batches(10, 0)


def test_property_random_lengths_each_index_once():
    rng = random.Random(1234)
    for _ in range(200):
        capacity = rng.randint(1, 100)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(0, 60))]
        bins = best_fit_decreasing(lengths, capacity)
        _check_partition(bins, lengths, capacity)
        # never worse than the trivial lower bound by more than BFD's guarantee (11/9 OPT + 1)
        lower = -(-sum(lengths) // capacity)
        assert len(bins) <= 11 * lower / 9 + 1
