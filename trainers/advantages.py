"""GRPO advantages: each episode's reward relative to the other episodes sampled for the same task."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from alp_agents.errors import TrajectoryError


class GroupAdvantages(NamedTuple):
    """Advantages of a batch, and how many of its groups carried no signal."""

    advantages: Tensor
    """(N,) one advantage per episode."""
    num_groups: int
    """Number of distinct group ids in the batch."""
    num_constant_groups: int
    """Groups whose rewards are all equal (a single episode included): their advantages are exactly 0."""


def grpo_advantages(
    rewards: Tensor, group_ids: Tensor | Sequence[Hashable], *, eps: float = 1e-6, normalize_std: bool = True
) -> GroupAdvantages:
    """A_i = (R_i - mean_g) / (std_g + eps), over the episodes i of each group g (Dr. GRPO: without the std).

    std_g is the sample standard deviation (Bessel's correction, like torch.std and verl). A group
    whose rewards are all equal gives exactly zero advantages, and is counted. `group_ids` are any
    hashable ids (the trajectories' string `group_id`) or an integer tensor.
    """
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise TrajectoryError(f"rewards of episodes {bad} are not finite; every episode needs a finite reward")
    if not isinstance(group_ids, Tensor):
        numbering = {g: i for i, g in enumerate(dict.fromkeys(group_ids))}
        group_ids = torch.tensor([numbering[g] for g in group_ids], device=rewards.device)
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids has shape {tuple(group_ids.shape)} but rewards has {tuple(rewards.shape)}: one id per episode")
    _, group, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)  # (N,), (G,)
    G = len(counts)
    mean = torch.zeros(G, dtype=rewards.dtype, device=rewards.device).index_add_(0, group, rewards) / counts
    centered = rewards - mean[group]  # (N,)
    highest = torch.full((G,), -torch.inf, dtype=rewards.dtype, device=rewards.device).scatter_reduce(0, group, rewards, "amax")
    lowest = torch.full((G,), torch.inf, dtype=rewards.dtype, device=rewards.device).scatter_reduce(0, group, rewards, "amin")
    constant = highest == lowest  # (G,)
    advantages = centered
    if normalize_std:
        variance = torch.zeros(G, dtype=rewards.dtype, device=rewards.device).index_add_(0, group, centered**2)
        std = (variance / (counts - 1).clamp(min=1)).sqrt()  # (G,)
        advantages = centered / (std[group] + eps)
    advantages = torch.where(constant[group], 0.0, advantages)
    return GroupAdvantages(advantages, num_groups=G, num_constant_groups=int(constant.sum()))
