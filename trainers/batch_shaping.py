"""Batch shaping between rollouts and the update: dynamic sampling and overlong episodes (DAPO, arXiv 2503.14476).

Pure functions over Trajectory lists (copies in, copies out: nothing given is mutated), plus one small
stateful helper, BatchFiller, that the producer feeds draw after draw until a batch is full.

Dynamic sampling (DAPO §3.2). A group whose usable episodes (finish_reason != "error") all have the
same reward, or that has fewer than 2 of them, gets GRPO advantages of exactly 0: it costs a forward
and backward pass, dilutes a token-mean loss, and teaches nothing. `informative_groups` drops such
groups; `BatchFiller` draws more tasks until `tasks_per_batch` informative groups are in hand, or
until a bound on the groups drawn is reached (then the batch is short, and the shortfall is counted:
when every task is solved, or none is, the producer stops instead of looping forever).

Overlong episodes (DAPO §3.4). An episode is *truncated by a length limit* when its finish_reason is
"max_tokens" (a turn hit rollout.limits.max_tokens_per_turn) or "context" (the episode hit
rollout.limits.max_total_tokens). Its last turn was cut mid-text, so its reward says little about the
policy. "max_turns" is not one of them: every turn of such an episode ended on its own, and running
out of turns is the policy's doing (a real signal, like any other reward). `shape_overlong` either
keeps them ('keep'), masks them out of the loss while they stay in their group's reward statistics
('mask'), or adds DAPO's soft length penalty to every episode's reward ('penalty').

Order: shape each draw first, then judge its groups (`shape_overlong`, then `BatchFiller.add`): a
penalty changes rewards, and a masked episode carries no loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from alp_agents.rollout import RolloutLimits
from alp_agents.trajectory import Trajectory, group_by_id

if TYPE_CHECKING:  # for the annotation only: run_config pulls in the trainer (torch), which this module does not need
    from alp_agents.trainers.run_config import RolloutSection

OverlongMode = Literal["keep", "mask", "penalty"]

LENGTH_TRUNCATED = frozenset({"max_tokens", "context"})
"""finish_reasons of an episode cut by a length limit (per turn, or the whole context); not 'max_turns'."""


# -- groups and dynamic sampling ----------------------------------------------------------------------


def is_informative(group: Sequence[Trajectory]) -> bool:
    """Whether one group carries a GRPO signal, judged on its usable (non-'error') episodes.

    It must have at least 2 usable episodes, rewards that are not all equal, and at least one usable
    episode with loss tokens (an overlong-masked episode has none: it only shapes the others' baseline).
    """
    usable = [t for t in group if t.finish_reason != "error"]
    return (
        len(usable) >= 2
        and len({t.reward for t in usable}) > 1
        and any(t.num_sampled_tokens > 0 for t in usable)
    )


def informative_groups(trajectories: Sequence[Trajectory]) -> tuple[list[Trajectory], int]:
    """(the usable episodes of the informative groups, in their given order; how many groups were dropped).

    Failed episodes (finish_reason 'error') are left out before a group is judged and are never
    returned, as the training loop does. A group whose episodes all failed counts as dropped.
    """
    kept: list[Trajectory] = []
    dropped = 0
    for group in group_by_id(trajectories).values():
        if is_informative(group):
            kept += [t for t in group if t.finish_reason != "error"]
        else:
            dropped += 1
    return kept, dropped


def has_learning_signal(trajectories: Sequence[Trajectory]) -> bool:
    """Whether any group is informative (otherwise every GRPO advantage is zero, or carries no loss)."""
    return any(is_informative(group) for group in group_by_id(trajectories).values())


def max_groups(tasks_per_batch: int, max_draw_factor: float) -> int:
    """The most groups one batch may draw: floor(factor * tasks_per_batch), never below tasks_per_batch."""
    if tasks_per_batch < 1 or max_draw_factor < 1:
        raise ValueError(f"need tasks_per_batch >= 1 and max_draw_factor >= 1, got {tasks_per_batch} and {max_draw_factor}")
    return max(tasks_per_batch, math.floor(round(max_draw_factor * tasks_per_batch, 6)))


class BatchFiller:
    """Collects groups, draw after draw, until a batch holds `tasks_per_batch` groups or `max_groups` were drawn.

        filler = BatchFiller(tasks_per_batch=8, max_groups=24)       # or BatchFiller.for_rollout(cfg.rollout)
        while not filler.done:
            filler.add(shape(await collect(..., tasks=next_tasks(filler.needed), ...)))
        batch = filler.batch()                                       # may be empty: skip the update
        row.update(filler.metrics())

    With `filter_groups` (dynamic sampling) only informative groups enter the batch; without it every
    group does (usable episodes only) and one draw of `tasks_per_batch` groups fills it: today's loop.
    The batch keeps the first `tasks_per_batch` groups it accepted, in draw order; groups accepted
    beyond that (a producer that drew more than `needed`) are discarded and counted as surplus, so an
    update always sees at most `tasks_per_batch` groups (DAPO's implementation truncates the same way).
    A group whose id is already in the batch (the same task at the same index of another draw) is
    renamed `<id>#<draw>` so GRPO never pools two draws' episodes into one group.
    """

    def __init__(self, tasks_per_batch: int, max_groups: int, *, filter_groups: bool = True) -> None:
        if tasks_per_batch < 1:
            raise ValueError(f"tasks_per_batch must be >= 1, got {tasks_per_batch}")
        if max_groups < tasks_per_batch:
            raise ValueError(f"max_groups ({max_groups}) must be >= tasks_per_batch ({tasks_per_batch})")
        self.tasks_per_batch = tasks_per_batch
        """Groups the batch wants."""
        self.max_groups = max_groups
        """The most groups that may be drawn for it, over all draws."""
        self.filter_groups = filter_groups
        """Keep informative groups only (dynamic sampling); False keeps every group."""
        self.draws = 0
        """Calls to `add`."""
        self.groups_drawn = 0
        """Groups received, over all draws."""
        self.groups_dropped = 0
        """Groups left out: every episode failed, or (when filtering) they carry no signal."""
        self.groups_surplus = 0
        """Accepted groups beyond `tasks_per_batch`, discarded."""
        self._groups: list[list[Trajectory]] = []
        self._ids: set[str] = set()

    @classmethod
    def for_rollout(cls, rollout: RolloutSection) -> BatchFiller:
        """The filler a run's `[rollout]` section asks for: dynamic sampling on or off."""
        tasks = rollout.tasks_per_batch
        if not rollout.dynamic_sampling:
            return cls(tasks, tasks, filter_groups=False)
        return cls(tasks, max_groups(tasks, rollout.dynamic_sampling_max_draws), filter_groups=True)

    @property
    def groups_kept(self) -> int:
        """Groups in the batch so far (at most `tasks_per_batch`)."""
        return len(self._groups)

    @property
    def needed(self) -> int:
        """Groups to draw next: the ones still missing, capped by what the bound leaves; 0 when done."""
        return max(0, min(self.tasks_per_batch - self.groups_kept, self.max_groups - self.groups_drawn))

    @property
    def done(self) -> bool:
        """The batch is full, or the bound on groups drawn is reached."""
        return self.needed == 0

    @property
    def shortfall(self) -> int:
        """Groups missing from the batch: 0 once full; above 0 when the bound stopped the draws (or, without
        filtering, a group's episodes all failed)."""
        return self.tasks_per_batch - self.groups_kept

    def add(self, trajectories: Sequence[Trajectory]) -> None:
        """Take one draw's episodes (grouped by group_id, as `collect` returns them).

        Raises ValueError if the draw would take the groups drawn past `max_groups`: ask for `needed`.
        """
        groups = group_by_id(trajectories)
        if self.groups_drawn + len(groups) > self.max_groups:
            raise ValueError(f"this draw has {len(groups)} groups, but only {self.max_groups - self.groups_drawn} more may be "
                             f"drawn (max_groups={self.max_groups}, {self.groups_drawn} drawn); draw `needed` groups")
        self.draws += 1
        self.groups_drawn += len(groups)
        for group_id, group in groups.items():
            usable = [t for t in group if t.finish_reason != "error"]
            if not usable or self.filter_groups and not is_informative(group):
                self.groups_dropped += 1
                continue
            if self.groups_kept == self.tasks_per_batch:
                self.groups_surplus += 1
                continue
            if group_id in self._ids:
                group_id = f"{group_id}#{self.draws}"
                usable = [t.model_copy(update={"group_id": group_id}) for t in usable]
            self._ids.add(group_id)
            self._groups.append(usable)

    def batch(self) -> list[Trajectory]:
        """The usable episodes of the kept groups, in draw order (empty when no group was kept)."""
        return [t for group in self._groups for t in group]

    def metrics(self) -> dict[str, float]:
        """batch/* counts of this batch's draws (README: "Batch shaping")."""
        return {
            "batch/draws": float(self.draws),
            "batch/groups_drawn": float(self.groups_drawn),
            "batch/groups_kept": float(self.groups_kept),
            "batch/groups_dropped": float(self.groups_dropped),
            "batch/groups_surplus": float(self.groups_surplus),
            "batch/shortfall": float(self.shortfall),
        }


# -- overlong episodes ------------------------------------------------------------------------------


def overlong_penalty(length: int, max_length: int, buffer: float) -> float:
    """DAPO eq. 13, R_length: 0 up to max_length - buffer, then linear down to -1 at max_length, -1 beyond.

    0 if L <= L_max - L_cache; ((L_max - L_cache) - L) / L_cache if L_max - L_cache < L <= L_max; -1 if L > L_max.
    A buffer of 0 is the hard cliff: 0 up to max_length, -1 beyond.
    """
    if buffer < 0 or buffer > max_length:
        raise ValueError(f"buffer must be in [0, max_length={max_length}], got {buffer}")
    start = max_length - buffer
    if length <= start:
        return 0.0
    if length > max_length:
        return -1.0
    return (start - length) / buffer


def episode_overlong_penalty(trajectory: Trajectory, limits: RolloutLimits, buffer_fraction: float) -> float:
    """How close the episode came to a length limit, as DAPO's penalty in [-1, 0]: the worse of its two limits.

    A multi-turn episode has two length limits, and hitting either one cuts it: each turn's sampled
    tokens (L = turn.num_sampled_tokens, L_max = limits.max_tokens_per_turn; the longest turn counts),
    and its whole token record (L = len(token_ids): prompt, turns, tool results and template tokens,
    L_max = limits.max_total_tokens; equivalently the tokens after the prompt against the context left
    after it). L_cache = buffer_fraction * L_max for each. A turn cut by its limit, or an episode cut at
    the context limit, gets exactly -1.
    """
    per_turn = limits.max_tokens_per_turn
    longest_turn = max((turn.num_sampled_tokens for turn in trajectory.turns), default=0)
    return min(
        overlong_penalty(longest_turn, per_turn, buffer_fraction * per_turn),
        overlong_penalty(len(trajectory.token_ids), limits.max_total_tokens, buffer_fraction * limits.max_total_tokens),
    )


def mask_loss(trajectory: Trajectory) -> Trajectory:
    """A copy that carries no loss: loss mask all 0 (log-probs 0.0 with it, turns claim 0 sampled tokens).

    Its reward and group id are unchanged, so it still counts in its group's GRPO mean and std.
    metadata['overlong_masked'] = True; metadata['sampled_tokens'] keeps the original count.
    """
    n = len(trajectory.token_ids)
    return trajectory.model_copy(update={
        "loss_mask": [0] * n,
        "infer_logprobs": [0.0] * n,
        "turns": [turn.model_copy(update={"num_sampled_tokens": 0}) for turn in trajectory.turns],
        "metadata": {**trajectory.metadata, "overlong_masked": True, "sampled_tokens": trajectory.num_sampled_tokens},
    })


def shape_overlong(
    trajectories: Sequence[Trajectory],
    mode: OverlongMode,
    *,
    limits: RolloutLimits | None = None,
    buffer_fraction: float = 0.2,
    penalty_factor: float = 1.0,
) -> tuple[list[Trajectory], dict[str, float]]:
    """(the episodes after overlong shaping, in the same order and number; `overlong_metrics` of them).

    keep:    unchanged (the same objects).
    mask:    episodes truncated by a length limit (LENGTH_TRUNCATED) become `mask_loss` copies: no loss,
             but their reward stays in the group's statistics (DAPO's overlong filtering masks the loss,
             it does not drop the sample; dropping would shift the group's mean and std).
    penalty: every usable episode's reward += penalty_factor * episode_overlong_penalty(...) (DAPO's
             soft overlong punishment, truncated or not); metadata['overlong_penalty'] records the amount
             added and metadata['reward_before_overlong'] the env's reward. `limits` is required.
    Failed episodes ('error') pass through unchanged in every mode.
    """
    if mode == "keep":
        shaped = list(trajectories)
    elif mode == "mask":
        shaped = [mask_loss(t) if t.finish_reason in LENGTH_TRUNCATED else t for t in trajectories]
    elif mode == "penalty":
        if limits is None:
            raise ValueError("overlong mode 'penalty' needs the rollout's limits (limits=cfg.rollout.limits)")
        if not 0 <= buffer_fraction <= 1 or penalty_factor < 0:
            raise ValueError(f"need 0 <= buffer_fraction <= 1 and penalty_factor >= 0, got {buffer_fraction} and {penalty_factor}")
        shaped = []
        for t in trajectories:
            if t.finish_reason == "error":
                shaped.append(t)
                continue
            added = penalty_factor * episode_overlong_penalty(t, limits, buffer_fraction)
            shaped.append(t.model_copy(update={
                "reward": t.reward + added,
                "metadata": {**t.metadata, "overlong_penalty": added, "reward_before_overlong": t.reward},
            }))
    else:
        raise ValueError(f"unknown overlong mode {mode!r}; expected 'keep', 'mask' or 'penalty'")
    return shaped, overlong_metrics(shaped)


def overlong_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """batch/overlong_* over the usable episodes (finish_reason != 'error'); 0.0 when there are none.

    overlong_fraction: truncated by a length limit; overlong_masked_fraction: masked out of the loss;
    overlong_penalty_mean: mean reward added by the penalty (<= 0); overlong_penalized_fraction: penalty < 0.
    """
    usable = [t for t in trajectories if t.finish_reason != "error"]
    n = max(len(usable), 1)
    penalties = [float(t.metadata.get("overlong_penalty", 0.0)) for t in usable]
    return {
        "batch/overlong_fraction": sum(t.finish_reason in LENGTH_TRUNCATED for t in usable) / n,
        "batch/overlong_masked_fraction": sum(bool(t.metadata.get("overlong_masked")) for t in usable) / n,
        "batch/overlong_penalty_mean": sum(penalties) / n,
        "batch/overlong_penalized_fraction": sum(p < 0 for p in penalties) / n,
    }
