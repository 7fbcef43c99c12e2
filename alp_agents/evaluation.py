"""Rollout statistics: accuracy (avg@k, pass@k), turns, tool use, errors, truncation, lengths.

Pure functions of Trajectory records, shared by `alp eval` and the training loop's metrics. An
episode is correct when its environment said so at the end (`Trajectory.correct`).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

from pydantic import BaseModel

from alp_agents.trajectory import Trajectory, group_by_id

TRUNCATED = ("max_turns", "max_tokens", "context")
"""Finish reasons that mean the episode ran out of a budget rather than ending on its own."""


class RolloutStats(BaseModel):
    """Summary of a batch of episodes. Rates are fractions in [0, 1]."""

    episodes: int
    """Number of episodes, failed ones included."""
    tasks: int
    """Number of distinct groups (task x batch)."""
    avg_at_k: float
    """Mean correctness over all successful episodes (avg@k with k samples per task)."""
    pass_at_k: float
    """Fraction of tasks solved by at least one of k samples (unbiased estimator, k = samples per task)."""
    k: int
    """Samples per task used for pass@k (the smallest group size)."""
    mean_reward: float
    """Mean episode reward over successful episodes."""
    mean_turns: float
    """Assistant turns per episode."""
    tool_calls_per_episode: float
    """Tool calls per episode."""
    tool_error_rate: float
    """Failed tool calls / tool calls (malformed, unknown tool, invalid arguments, tool raised or timed out,
    a sandboxed program that failed or hit a limit)."""
    void_turn_rate: float
    """Turns with neither a valid tool call nor an answer / turns."""
    truncation_rate: float
    """Episodes ended by a budget (turns, tokens per turn, context) / successful episodes."""
    failure_rate: float
    """Episodes that failed with an error / episodes."""
    tokens_per_episode: float
    """Total tokens (prompt, turns, tool output) per episode."""
    sampled_tokens_per_episode: float
    """Tokens sampled by the policy per episode (the ones that carry loss)."""


def is_correct(trajectory: Trajectory) -> bool:
    """Whether the environment graded the episode's final answer correct."""
    return bool(trajectory.correct)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def rollout_stats(trajectories: Sequence[Trajectory]) -> RolloutStats:
    """Summarise episodes; failed ones count in failure_rate and as incorrect for pass@k, nowhere else."""
    ok = [t for t in trajectories if t.finish_reason != "error"]
    groups = group_by_id(trajectories)
    k = min((len(g) for g in groups.values()), default=0)
    turns = [turn for t in ok for turn in t.turns]
    tool_calls = sum(t.num_tool_calls for t in ok)
    return RolloutStats(
        episodes=len(trajectories),
        tasks=len(groups),
        avg_at_k=_mean([float(is_correct(t)) for t in ok]),
        pass_at_k=_mean([pass_at_k(len(g), sum(map(is_correct, g)), k) for g in groups.values()]) if k else 0.0,
        k=k,
        mean_reward=_mean([t.reward for t in ok]),
        mean_turns=_mean([len(t.turns) for t in ok]),
        tool_calls_per_episode=tool_calls / max(len(ok), 1),
        tool_error_rate=sum(t.num_tool_errors for t in ok) / max(tool_calls, 1),
        void_turn_rate=sum(turn.void for turn in turns) / max(len(turns), 1),
        truncation_rate=_mean([float(t.finish_reason in TRUNCATED) for t in ok]),
        failure_rate=(len(trajectories) - len(ok)) / max(len(trajectories), 1),
        tokens_per_episode=_mean([len(t.token_ids) for t in ok]),
        sampled_tokens_per_episode=_mean([t.num_sampled_tokens for t in ok]),
    )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
