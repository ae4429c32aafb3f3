"""Tests for services.coordinator.advantages."""

import pytest
import torch

from services.coordinator.advantages import group_normalized_advantages


def test_zero_mean_unit_std_per_group():
    torch.manual_seed(0)
    rewards = torch.randn(4 * 8)
    adv = group_normalized_advantages(rewards, 8).view(4, 8)
    torch.testing.assert_close(adv.mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(adv.std(1, correction=0), torch.ones(4), atol=1e-4, rtol=0)


def test_known_values_population_std():
    adv = group_normalized_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2, eps=0.0)
    # group [1, 0]: mean 0.5, population std 0.5 → [1, -1]
    assert adv.tolist() == [1.0, -1.0, -1.0, 1.0]
    centered = group_normalized_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, 8.0]), 3, scale_by_std=False)
    torch.testing.assert_close(centered, torch.tensor([1.0, -1.0, 0.0, -3.0, 0.0, 3.0]))


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_constant_group_gives_zeros(scale_by_std):
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.5, 7.0, 7.0, 7.0])
    adv = group_normalized_advantages(rewards, 3, scale_by_std=scale_by_std)
    assert not torch.isnan(adv).any()
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert adv[6:].tolist() == [0.0, 0.0, 0.0]
    assert (adv[3:6] != 0).any()


def test_wrong_length_raises_naming_key():
    with pytest.raises(ValueError, match=r"runtime_args\.num_inference_per_prompt"):
        group_normalized_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match=r"runtime_args\.num_inference_per_prompt"):
        group_normalized_advantages(torch.zeros(4), 0)


def test_integer_rewards_become_float():
    adv = group_normalized_advantages(torch.tensor([1, 0, 0, 0]), 4)
    assert adv.is_floating_point()
    assert adv[0] > 0 and (adv[1:] < 0).all()
