"""GRPO advantages per group, against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from alp_agents.errors import TrajectoryError
from alp_agents.trainers import grpo_advantages


def test_each_group_is_centred_and_scaled_by_its_own_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 3.0])
    result = grpo_advantages(rewards, ["a", "a", "a", "a", "b", "b"])
    std_a = math.sqrt(4 * 0.25 / 3)  # sample std of [1, 0, 0, 1]
    std_b = math.sqrt(2 * 1.0 / 1)  # sample std of [5, 3]
    expected = [0.5 / (std_a + 1e-6), -0.5 / (std_a + 1e-6)] * 2
    expected = [expected[0], expected[1], expected[1], expected[0], 1 / (std_b + 1e-6), -1 / (std_b + 1e-6)]
    torch.testing.assert_close(result.advantages, torch.tensor(expected))
    assert (result.num_groups, result.num_constant_groups) == (2, 0)


def test_groups_with_equal_rewards_give_exact_zeros_and_are_counted():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 7.0])
    result = grpo_advantages(rewards, torch.tensor([0, 0, 0, 1, 1, 2]))
    assert result.advantages[:3].tolist() == [0.0, 0.0, 0.0]
    assert result.advantages[5].item() == 0.0  # a single episode is a constant group
    assert result.advantages[3] > 0 > result.advantages[4]
    assert (result.num_groups, result.num_constant_groups) == (3, 2)


def test_without_std_normalisation_advantages_are_mean_centred_rewards():
    result = grpo_advantages(torch.tensor([3.0, 1.0, 2.0, 10.0]), ["x", "x", "x", "y"], normalize_std=False)
    torch.testing.assert_close(result.advantages, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_interleaved_string_and_tensor_ids_agree():
    rewards = torch.tensor([1.0, 4.0, 0.0, 2.0])
    by_name = grpo_advantages(rewards, ["p", "q", "p", "q"])
    by_number = grpo_advantages(rewards, torch.tensor([7, 3, 7, 3]))
    torch.testing.assert_close(by_name.advantages, by_number.advantages)


def test_invalid_rewards_or_ids_are_reported():
    with pytest.raises(TrajectoryError, match=r"episodes \[1\]"):
        grpo_advantages(torch.tensor([1.0, float("nan")]), ["a", "a"])
    with pytest.raises(ValueError, match="one id per episode"):
        grpo_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0]))
