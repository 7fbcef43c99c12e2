"""Batch shaping: dynamic sampling (which groups are kept, a bounded filler) and overlong episodes (mask, penalty)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from alp_agents.rollout import RolloutLimits
from alp_agents.trainers import collate, grpo_advantages
from alp_agents.trainers.batch_shaping import (
    BatchFiller,
    episode_overlong_penalty,
    has_learning_signal,
    informative_groups,
    max_groups,
    overlong_penalty,
    shape_overlong,
)
from alp_agents.trainers.run_config import RolloutSection, TrainConfig
from alp_agents.trajectory import Trajectory, Turn

PROMPT = 4


def episode(group: str, reward: float, finish: str = "terminated", *, turns: tuple[int, ...] = (3,), total: int | None = None) -> Trajectory:
    """A real episode: a 4-token prompt, then each turn's sampled tokens; `total` pads with tool tokens (mask 0)."""
    mask = [0] * PROMPT
    for n in turns:
        mask += [1] * n + [0]  # the turn's tokens, then one template token the loop inserted
    mask += [0] * ((total or len(mask)) - len(mask))
    return Trajectory(
        token_ids=list(range(len(mask))),
        loss_mask=mask,
        infer_logprobs=[-0.5 if m else 0.0 for m in mask],
        prompt_length=PROMPT,
        reward=reward,
        turns=[Turn(text="x", num_sampled_tokens=n) for n in turns],
        group_id=group,
        finish_reason=finish,
    )


def draw(name: str, *rewards_per_group: list[float]) -> list[Trajectory]:
    """One draw as `collect` returns it: groups `<name><i>`, their episodes side by side."""
    return [episode(f"{name}{i}", r) for i, rewards in enumerate(rewards_per_group) for r in rewards]


def group_ids(trajectories: list[Trajectory]) -> list[str]:
    return list(dict.fromkeys(t.group_id for t in trajectories))


# -- dynamic sampling --------------------------------------------------------------------------------


def test_groups_whose_usable_rewards_differ_are_kept_the_others_dropped():
    varied = [episode("a", 1.0), episode("a", 0.0), episode("a", 1.0)]
    solved = [episode("b", 1.0)] * 3
    one_usable = [episode("c", 0.0), episode("c", 1.0, "error")]  # the failed episode's reward is not judged
    varied_with_failure = [episode("d", 1.0), episode("d", 0.0), episode("d", 0.0, "error")]
    all_failed = [episode("e", 0.0, "error"), episode("e", 1.0, "error")]
    kept, dropped = informative_groups(varied + solved + one_usable + varied_with_failure + all_failed)
    assert kept == varied + varied_with_failure[:2]  # in the given order, failed episodes left out
    assert dropped == 3
    assert has_learning_signal(varied) and not has_learning_signal(solved + one_usable + all_failed)


def test_filler_draws_until_enough_groups_differ_and_keeps_them_in_draw_order():
    filler = BatchFiller(tasks_per_batch=3, max_groups=9)
    assert filler.needed == 3
    filler.add(draw("x", [1, 1], [1, 0], [0, 0]))  # one informative group of three
    assert (filler.needed, filler.done) == (2, False)
    filler.add(draw("y", [0, 0], [0, 1]))
    assert filler.needed == 1
    filler.add(draw("z", [1, 0]))
    assert filler.done and filler.needed == 0
    assert group_ids(filler.batch()) == ["x1", "y1", "z0"]
    assert [t.reward for t in filler.batch()] == [1, 0, 0, 1, 1, 0]
    assert filler.metrics() == {"batch/draws": 3.0, "batch/groups_drawn": 6.0, "batch/groups_kept": 3.0,
                                "batch/groups_dropped": 3.0, "batch/groups_surplus": 0.0, "batch/shortfall": 0.0}


@pytest.mark.parametrize("reward", [1.0, 0.0], ids=["every_task_solved", "every_task_unsolvable"])
def test_filler_stops_at_the_bound_with_a_counted_shortfall_when_no_group_differs(reward):
    filler = BatchFiller(tasks_per_batch=4, max_groups=max_groups(4, 2.5))  # 10 groups at most
    asked = []
    for n in range(100):  # the producer's loop; a filler that never ends would run out of this
        if filler.done:
            break
        asked.append(filler.needed)
        filler.add(draw(f"d{n}-", *[[reward] * 4] * filler.needed))
    assert asked == [4, 4, 2]  # the last draw is cut to what the bound leaves
    assert filler.groups_drawn == 10 and filler.groups_kept == 0 and filler.shortfall == 4
    assert filler.batch() == []
    assert filler.metrics()["batch/groups_dropped"] == 10.0


def test_filler_never_accepts_a_draw_past_the_bound():
    filler = BatchFiller(tasks_per_batch=4, max_groups=6)
    filler.add(draw("a", [1, 0], [1, 1], [1, 1], [1, 1]))
    assert filler.needed == 2  # 3 groups still missing, but only 2 more may be drawn
    with pytest.raises(ValueError, match="only 2 more may be drawn"):
        filler.add(draw("b", [1, 0], [1, 0], [1, 0]))
    assert filler.groups_drawn == 4  # the refused draw left no trace
    filler.add(draw("b", [1, 0], [0, 0]))
    assert filler.done and filler.shortfall == 2 and group_ids(filler.batch()) == ["a0", "b0"]


def test_informative_groups_beyond_the_target_are_discarded_and_counted():
    filler = BatchFiller(tasks_per_batch=2, max_groups=6)
    filler.add(draw("a", [0, 0], [1, 0], [0, 1], [2, 1], [1, 1]))
    assert filler.done and group_ids(filler.batch()) == ["a1", "a2"]
    assert (filler.groups_kept, filler.groups_dropped, filler.groups_surplus, filler.shortfall) == (2, 2, 1, 0)


def test_a_group_id_seen_in_an_earlier_draw_is_renamed_so_groups_never_pool():
    filler = BatchFiller(tasks_per_batch=2, max_groups=4)
    filler.add(draw("t", [1, 0]))
    filler.add(draw("t", [5, 3]))  # collect numbers each draw's groups from 0 again: the same id "t0"
    batch = filler.batch()
    assert group_ids(batch) == ["t0", "t0#2"]
    advantages = grpo_advantages(collate(batch).rewards, collate(batch).group_ids).advantages
    scale = 1 / (math.sqrt(0.5) + 1e-6)  # each group of two centred on its own mean, sample std sqrt(0.5) and sqrt(2)
    torch.testing.assert_close(advantages, torch.tensor([0.5 * scale, -0.5 * scale, 1 / (math.sqrt(2) + 1e-6), -1 / (math.sqrt(2) + 1e-6)]))


def test_without_dynamic_sampling_one_draw_fills_the_batch_as_before():
    filler = BatchFiller.for_rollout(RolloutSection(tasks_per_batch=2))
    assert (filler.max_groups, filler.needed) == (2, 2)
    filler.add([episode("a", 1.0), episode("a", 1.0), episode("b", 0.0), episode("b", 1.0, "error")])
    assert filler.done and filler.groups_dropped == 0 and filler.shortfall == 0
    assert [(t.group_id, t.reward) for t in filler.batch()] == [("a", 1.0), ("a", 1.0), ("b", 0.0)]  # failures left out
    failed = BatchFiller.for_rollout(RolloutSection(tasks_per_batch=2))
    failed.add([episode("a", 1.0), episode("b", 0.0, "error")])  # a group with no usable episode is not in the batch
    assert failed.done and (failed.groups_kept, failed.groups_dropped, failed.shortfall) == (1, 1, 1)


def test_the_bound_is_a_multiple_of_tasks_per_batch_rounded_down():
    filler = BatchFiller.for_rollout(RolloutSection(tasks_per_batch=8, dynamic_sampling=True, dynamic_sampling_max_draws=2.5))
    assert (filler.max_groups, filler.filter_groups) == (20, True)
    assert max_groups(100, 1.15) == 115 and max_groups(3, 1.5) == 4 and max_groups(5, 1.0) == 5
    with pytest.raises(ValueError):
        BatchFiller(tasks_per_batch=4, max_groups=3)


# -- overlong episodes ------------------------------------------------------------------------------


def test_soft_overlong_penalty_at_its_boundaries():
    # L_max = 100, L_cache = 20: 0 up to 80, then (80 - L) / 20, -1 at 100 and beyond (DAPO eq. 13).
    assert [overlong_penalty(L, 100, 20) for L in (0, 80, 81, 90, 99, 100, 101, 10_000)] == [0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0, -1.0]
    assert [overlong_penalty(L, 100, 0) for L in (100, 101)] == [0.0, -1.0]  # no buffer: the hard cliff
    assert overlong_penalty(100, 100, 100) == -1.0 and overlong_penalty(50, 100, 100) == -0.5
    with pytest.raises(ValueError):
        overlong_penalty(10, 100, 101)


def test_an_episode_is_penalised_by_the_limit_it_came_closest_to():
    limits = RolloutLimits(max_tokens_per_turn=100, max_total_tokens=1000)  # buffers 20 and 200 at 0.2
    long_turn = episode("g", 1.0, turns=(50, 90), total=700)
    long_context = episode("g", 1.0, turns=(10, 10), total=900)
    both = episode("g", 1.0, "context", turns=(95, 10), total=1000)
    assert episode_overlong_penalty(long_turn, limits, 0.2) == pytest.approx(-0.5)  # (80 - 90) / 20; context 700 <= 800
    assert episode_overlong_penalty(long_context, limits, 0.2) == pytest.approx(-0.5)  # (800 - 900) / 200
    assert episode_overlong_penalty(both, limits, 0.2) == -1.0  # cut at the context limit, turn at -0.75
    assert episode_overlong_penalty(episode("g", 1.0, turns=(80,), total=800), limits, 0.2) == 0.0


def test_penalty_mode_adds_the_scaled_penalty_to_every_usable_reward():
    limits = RolloutLimits(max_tokens_per_turn=100, max_total_tokens=1000)
    cut = episode("g", 1.0, "max_tokens", turns=(20, 100))
    near = episode("g", 1.0, turns=(90,))
    short = episode("g", 0.0, "max_turns", turns=(10, 10))
    failed = episode("g", 1.0, "error", turns=(100,))
    shaped, metrics = shape_overlong([cut, near, short, failed], "penalty", limits=limits, buffer_fraction=0.2, penalty_factor=0.5)
    assert [t.reward for t in shaped] == [0.5, 0.75, 0.0, 1.0]  # 1 - 0.5 * 1, 1 - 0.5 * 0.5, untouched, failed untouched
    assert shaped[0].metadata == {"overlong_penalty": -0.5, "reward_before_overlong": 1.0}
    assert shaped[3] is failed and cut.reward == 1.0 and cut.metadata == {}  # copies: the given episodes are unchanged
    assert metrics == {"batch/overlong_fraction": 1 / 3, "batch/overlong_masked_fraction": 0.0,
                       "batch/overlong_penalty_mean": -0.25, "batch/overlong_penalized_fraction": 2 / 3}


def test_a_penalty_can_make_an_all_solved_group_informative():
    limits = RolloutLimits(max_tokens_per_turn=100, max_total_tokens=1000)
    group = [episode("g", 1.0, "max_tokens", turns=(100,)), episode("g", 1.0), episode("g", 1.0)]
    assert informative_groups(group)[1] == 1
    shaped, _ = shape_overlong(group, "penalty", limits=limits)
    assert [t.reward for t in shaped] == [0.0, 1.0, 1.0]
    assert informative_groups(shaped) == (shaped, 0)


def test_mask_mode_removes_the_loss_of_truncated_episodes_but_keeps_them_in_the_group_statistics():
    raw = [episode("g", 1.0), episode("g", 0.0, "max_tokens", turns=(2, 5)), episode("g", 0.0, "max_turns"),
           episode("g", 1.0, "context"), episode("h", 1.0), episode("h", 0.0)]
    shaped, metrics = shape_overlong(raw, "mask")
    batch = collate(shaped, mask_void_turns=True)  # the turns of a masked copy claim no loss tokens either
    assert batch.loss_mask.sum(-1).tolist() == [3, 0, 3, 0, 3, 3]  # 'max_turns' is not a length cut: it keeps its loss
    assert shaped[1].metadata == {"overlong_masked": True, "sampled_tokens": 7} and raw[1].num_sampled_tokens == 7
    # The trainer's advantages come from every row's reward: the masked episodes still set group g's mean and std.
    advantages = grpo_advantages(batch.rewards, batch.group_ids).advantages
    std_g = math.sqrt(4 * 0.25 / 3)  # sample std of [1, 0, 0, 1]
    assert advantages[0].item() == pytest.approx(0.5 / (std_g + 1e-6)) and advantages[2].item() == pytest.approx(-0.5 / (std_g + 1e-6))
    assert metrics["batch/overlong_fraction"] == metrics["batch/overlong_masked_fraction"] == 2 / 6


def test_a_group_whose_only_differing_episodes_are_masked_carries_no_signal():
    shaped, _ = shape_overlong([episode("a", 1.0, "max_tokens"), episode("a", 0.0, "context"),
                                episode("b", 1.0, "max_tokens"), episode("b", 0.0)], "mask")
    kept, dropped = informative_groups(shaped)
    assert group_ids(kept) == ["b"] and dropped == 1  # in b, the masked 1.0 still lifts the baseline of the 0.0


def test_keep_mode_and_bad_arguments():
    raw = [episode("g", 1.0, "max_tokens"), episode("g", 0.0)]
    shaped, metrics = shape_overlong(raw, "keep")
    assert shaped == raw and shaped[0] is raw[0] and metrics["batch/overlong_fraction"] == 0.5
    with pytest.raises(ValueError, match="needs the rollout's limits"):
        shape_overlong(raw, "penalty")
    with pytest.raises(ValueError, match="unknown overlong mode 'drop'"):
        shape_overlong(raw, "drop")  # type: ignore[arg-type]


def test_rollout_config_fields_and_their_checks():
    rollout = TrainConfig().rollout
    assert (rollout.dynamic_sampling, rollout.dynamic_sampling_max_draws, rollout.overlong,
            rollout.overlong_buffer_fraction, rollout.overlong_penalty_factor) == (False, 3.0, "keep", 0.2, 1.0)
    for bad in ({"dynamic_sampling_max_draws": 0.5}, {"overlong": "drop"}, {"overlong_buffer_fraction": 0.0},
                {"overlong_penalty_factor": -1.0}):
        with pytest.raises(ValidationError):
            RolloutSection(**bad)
