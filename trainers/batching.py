"""Trajectory records -> right-padded tensors, and row selections of them (the trainer's micro-batches).

Rows are right-padded: position t of every row is the t-th token of its episode, exactly the position
the inference engine gave it, so the model's default position ids (0..T-1) match the rollout's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from alp_agents.errors import TrajectoryError
from alp_agents.trajectory import Trajectory


@dataclass(frozen=True)
class Batch:
    """Episodes as right-padded tensors; row i is episode i."""

    input_ids: Tensor
    """(N, T) long: the token ids, `pad_token_id` after the end of each episode."""
    attention_mask: Tensor
    """(N, T) long: 1 on the episode's tokens, 0 on padding."""
    loss_mask: Tensor
    """(N, T) bool: the trajectory's loss mask (sampled tokens only); False on padding."""
    infer_logprobs: Tensor
    """(N, T) float32: the engine's log-prob of each sampled token, 0.0 elsewhere."""
    rewards: Tensor
    """(N,) float32: each episode's reward."""
    group_ids: Tensor
    """(N,) long: episodes of the same group share a number (groups numbered by first appearance)."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: Tensor) -> Batch:
        """The episodes at `index`, with the padding none of them needs trimmed off."""
        length = max(int(self.attention_mask[index].sum(-1).max()), 1)
        return Batch(
            input_ids=self.input_ids[index, :length],
            attention_mask=self.attention_mask[index, :length],
            loss_mask=self.loss_mask[index, :length],
            infer_logprobs=self.infer_logprobs[index, :length],
            rewards=self.rewards[index],
            group_ids=self.group_ids[index],
        )


def void_turn_mask(trajectory: Trajectory) -> list[bool]:
    """True on the sampled tokens of the episode's void turns (neither a valid tool call nor an answer).

    Turn k's sampled tokens are the k-th block of `turn.num_sampled_tokens` ones of the loss mask,
    counted in order: they need not be contiguous in the token ids (a template token the loop
    inserts inside a turn has mask 0 and is skipped).
    """
    owner: list[bool] = []  # owner[j]: is the j-th loss-mask one in a void turn
    for turn in trajectory.turns:
        owner += [turn.void] * turn.num_sampled_tokens
    ones = trajectory.num_sampled_tokens
    if len(owner) > ones:
        raise TrajectoryError(
            f"the turns of this trajectory sampled {len(owner)} tokens in all but its loss mask has only {ones} ones: "
            "each turn's num_sampled_tokens must count its tokens with loss mask 1"
        )
    owner += [False] * (ones - len(owner))  # ones no turn claims are never void
    it = iter(owner)
    return [bool(m) and next(it) for m in trajectory.loss_mask]


def right_pad(rows: Sequence[Sequence[float]], *, value: float = 0, dtype: torch.dtype) -> torch.Tensor:
    """Rows of different lengths as one (len(rows), longest row) tensor of `dtype`, each row padded on the right with `value`."""
    padded = torch.full((len(rows), max((len(row) for row in rows), default=1) or 1), value, dtype=dtype)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return padded


def collate(
    trajectories: Sequence[Trajectory],
    *,
    pad_token_id: int = 0,
    device: torch.device | str | None = None,
    mask_void_turns: bool = False,
) -> Batch:
    """Stack trajectories into one right-padded Batch on `device`; `mask_void_turns` drops void turns from the loss mask."""
    if not trajectories:
        raise TrajectoryError("cannot train on an empty list of trajectories")
    for i, trajectory in enumerate(trajectories):
        if trajectory.loss_mask and trajectory.loss_mask[0] == 1:
            raise TrajectoryError(
                f"trajectory {i} has loss_mask[0] = 1: the first token has no context to be scored; "
                "episodes start with a prompt whose tokens are masked"
            )
    input_ids = right_pad([t.token_ids for t in trajectories], value=pad_token_id, dtype=torch.long)
    attention_mask = right_pad([[1] * len(t.token_ids) for t in trajectories], dtype=torch.long)
    loss_mask = right_pad([t.loss_mask for t in trajectories], dtype=torch.bool)
    if mask_void_turns:
        loss_mask &= ~right_pad([void_turn_mask(t) for t in trajectories], dtype=torch.bool)
    infer_logprobs = torch.where(loss_mask, right_pad([t.infer_logprobs for t in trajectories], dtype=torch.float32), 0.0)
    numbering = {g: i for i, g in enumerate(dict.fromkeys(t.group_id for t in trajectories))}
    return Batch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        loss_mask=loss_mask.to(device),
        infer_logprobs=infer_logprobs.to(device),
        rewards=torch.tensor([t.reward for t in trajectories], dtype=torch.float32, device=device),
        group_ids=torch.tensor([numbering[t.group_id] for t in trajectories], dtype=torch.long, device=device),
    )
