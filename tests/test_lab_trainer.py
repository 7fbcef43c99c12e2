"""The trainer side of the mismatch lab: MIS rejection (mis, and stacked on alp/bypass), void-turn masking,
sigma fixed at 0, sigma calibrated to an engine copy, and clean mismatch metrics; on the tiny model."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from test_alp_trainer import PROMPT_LENGTH, make_trajectories, small_config
from transformers import AutoModelForCausalLM

from alp_agents.errors import ConfigError, TrajectoryError
from alp_agents.trainers import ALPTrainer, collate
from alp_agents.trainers.batching import void_turn_mask
from alp_agents.trajectory import Trajectory, Turn

NEW_METRICS = [  # added for the mismatch lab; each must be documented in the README's metrics table
    *[f"mismatch/token_p{q}" for q in (1, 2, 50, 98, 99)], "mismatch/max_abs_log_ratio",
    *[f"mismatch/seq_p{q}" for q in (1, 2, 50, 98, 99)], "mismatch/seq_log_width", "mismatch/sample_nll",
    *[f"loss_seq/p{q}" for q in (1, 2, 50, 98, 99)], "loss_seq/log_width",
]  # fmt: skip
CONDITIONAL_METRICS = ["correction/rejected_fraction", "train/void_turn_token_fraction"]
REJECTED = (1, 5)
"""Episodes whose engine log-probs are shifted down by 0.2 per token: pi_old / mu ~ e^2 per sequence, above 2."""


@pytest.fixture
def load(tiny_model_dir):
    """A fresh copy of the tiny model (seed 0) per call."""
    return lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def with_outliers(trajectories: list[Trajectory]) -> list[Trajectory]:
    """The REJECTED episodes' engine log-probs lowered by 0.2 on every sampled token (a sequence-level MIS outlier)."""
    shifted = []
    for i, t in enumerate(trajectories):
        if i in REJECTED:
            t = t.model_copy(update={"infer_logprobs": [lp - 0.2 if m else 0.0 for lp, m in zip(t.infer_logprobs, t.loss_mask)]})
        shifted.append(t)
    return shifted


def masked_out(trajectories: list[Trajectory], drop: list[list[bool]]) -> list[Trajectory]:
    """The same episodes with loss mask 0 (and log-prob 0.0) wherever `drop` is True."""
    return [
        t.model_copy(update={
            "loss_mask": [0 if d else m for m, d in zip(t.loss_mask, row)],
            "infer_logprobs": [0.0 if d else lp for lp, d in zip(t.infer_logprobs, row)],
        })
        for t, row in zip(trajectories, drop)
    ]  # fmt: skip


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# -- MIS rejection -------------------------------------------------------------------------------


def test_mis_reject_is_only_for_alp_and_bypass():
    for algo in ("grpo", "tis", "mis", "gspo"):
        with pytest.raises(ValidationError, match="mis_reject"):
            small_config(algo=algo, mis_reject=True)
    assert small_config(algo="alp", mis_reject=True).mis_reject and small_config(algo="bypass", mis_reject=True).mis_reject


def test_mis_reject_drops_the_rejected_sequences_and_keeps_the_ratio_against_mu(load):
    model = load()
    trajectories = with_outliers(make_trajectories(model))
    loss = {"correction_level": "sequence", "rejected_in_denominator": False}
    rejecting = load()
    metrics = ALPTrainer(rejecting, small_config(algo="bypass", mis_reject=True, loss=loss)).step(trajectories)
    # Reference: plain bypass on the same episodes with the rejected ones' loss tokens masked by hand.
    drop = [[bool(m) and i in REJECTED for m in t.loss_mask] for i, t in enumerate(trajectories)]
    reference = load()
    expected = ALPTrainer(reference, small_config(algo="bypass", loss=loss)).step(masked_out(trajectories, drop))
    assert_same_weights(rejecting, reference)
    for name in ("loss/policy", "ratio/p1", "ratio/p99", "ratio/mean", "clip/high", "kl/k3", "loss_seq/p50"):
        assert metrics[name] == expected[name], name
    rejected_tokens = sum(trajectories[i].num_sampled_tokens for i in REJECTED)
    assert metrics["correction/rejected_fraction"] == rejected_tokens / sum(t.num_sampled_tokens for t in trajectories)


def test_mis_reject_on_alp_with_the_rejected_tokens_in_the_denominator(load):
    model = load()
    trajectories = with_outliers(make_trajectories(model))
    loss = {"correction_level": "geometric", "correction_low": 0.9, "correction_high": 1.1}  # geometric: ~e^0.2 per token
    metrics = ALPTrainer(model, small_config(algo="alp", mis_reject=True, loss=loss)).step(trajectories)
    rejected_tokens = sum(trajectories[i].num_sampled_tokens for i in REJECTED)
    assert metrics["correction/rejected_fraction"] == rejected_tokens / sum(t.num_sampled_tokens for t in trajectories)
    assert all(math.isfinite(value) for value in metrics.values())


@pytest.mark.parametrize("in_denominator", [True, False])
def test_mis_micro_batching_gives_the_whole_batch_loss_either_way(in_denominator, load):
    model = load()
    trajectories = with_outliers(make_trajectories(model))
    cfg = dict(algo="mis", updates_per_batch=1, loss={"correction_level": "sequence", "rejected_in_denominator": in_denominator})
    whole = ALPTrainer(load(), small_config(micro_batch_size=8, **cfg)).step(trajectories)
    split = ALPTrainer(load(), small_config(micro_batch_size=1, **cfg)).step(trajectories)
    assert split["loss/policy"] == pytest.approx(whole["loss/policy"], rel=1e-5)
    assert whole["correction/rejected_fraction"] > 0


def test_rejected_tokens_in_the_denominator_scale_the_loss_by_the_kept_fraction(load):
    model = load()
    trajectories = with_outliers(make_trajectories(model))
    losses = {}
    for in_denominator in (True, False):
        cfg = small_config(algo="bypass", mis_reject=True, updates_per_batch=1,
                           loss={"correction_level": "sequence", "rejected_in_denominator": in_denominator})
        losses[in_denominator] = ALPTrainer(load(), cfg).step(trajectories)
    kept = 1.0 - losses[True]["correction/rejected_fraction"]
    assert 0 < kept < 1
    # one update: sum over kept tokens / all tokens (True) vs / kept tokens (False)
    assert losses[True]["loss/policy"] == pytest.approx(losses[False]["loss/policy"] * kept, rel=1e-5)


# -- void turns ----------------------------------------------------------------------------------


def three_turns(*, void_middle: bool = True, seed: int = 0) -> Trajectory:
    """Prompt, turn 1 (4 sampled), tool output, turn 2 (3 sampled around a template token), tool output, turn 3 (5 sampled)."""
    mask = [0] * PROMPT_LENGTH + [1] * 4 + [0] * 2 + [1, 1, 0, 1] + [0] * 3 + [1] * 5
    generator = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, 300, (len(mask),), generator=generator).tolist()
    logprobs = [-1.0 - 0.1 * (j % 5) if m else 0.0 for j, m in enumerate(mask)]
    turns = [Turn(text="a", num_sampled_tokens=4), Turn(text="b", num_sampled_tokens=3, void=void_middle), Turn(text="c", num_sampled_tokens=5)]
    return Trajectory(token_ids=token_ids, loss_mask=mask, infer_logprobs=logprobs, prompt_length=PROMPT_LENGTH, turns=turns,
                      reward=float(seed % 2), group_id=f"g{seed // 2}")  # fmt: skip


def test_void_turn_mask_finds_exactly_the_void_turns_sampled_tokens():
    trajectory = three_turns()
    void = void_turn_mask(trajectory)
    middle = PROMPT_LENGTH + 4 + 2  # turn 2 starts after turn 1 and the tool output
    assert [j for j, v in enumerate(void) if v] == [middle, middle + 1, middle + 3]  # not the template token between
    expected = [m and not v for m, v in zip(trajectory.loss_mask, void)]
    assert collate([trajectory], mask_void_turns=True).loss_mask[0].tolist() == expected
    assert collate([trajectory]).loss_mask[0].tolist() == [bool(m) for m in trajectory.loss_mask]  # off by default
    assert not any(void_turn_mask(three_turns(void_middle=False)))
    too_many = trajectory.model_copy(update={"turns": [*trajectory.turns, Turn(text="d", num_sampled_tokens=1)]})
    with pytest.raises(TrajectoryError, match="num_sampled_tokens"):
        void_turn_mask(too_many)


def test_mask_void_turns_trains_as_if_their_tokens_were_masked(load):
    trajectories = [three_turns(seed=i) for i in range(4)]
    masking = load()
    metrics = ALPTrainer(masking, small_config(algo="bypass", mask_void_turns=True)).step(trajectories)
    reference = load()
    expected = ALPTrainer(reference, small_config(algo="bypass")).step(masked_out(trajectories, [void_turn_mask(t) for t in trajectories]))
    assert_same_weights(masking, reference)
    assert metrics["loss/policy"] == expected["loss/policy"]
    assert metrics["train/void_turn_token_fraction"] == pytest.approx(3 / 12)
    assert metrics["perf/tokens"] == 4 * 9
    assert "train/void_turn_token_fraction" not in ALPTrainer(load(), small_config(algo="bypass")).step(trajectories)


# -- sigma ---------------------------------------------------------------------------------------


def test_alp_with_sigma_zero_is_bypass_bit_for_bit(load):
    model = load()
    trajectories = make_trajectories(model)
    alp_model, bypass_model = load(), load()
    alp_trainer = ALPTrainer(alp_model, small_config(algo="alp", init_sigma=0.0, sigma_init="absolute", seed=1))
    alp = alp_trainer.step(trajectories)
    bypass = ALPTrainer(bypass_model, small_config(algo="bypass", seed=1)).step(trajectories)
    assert_same_weights(alp_model, bypass_model)
    for name, value in bypass.items():
        if name.split("/")[0] in ("loss", "ratio", "clip", "kl", "loss_seq", "entropy", "grad", "mismatch"):
            assert alp[name] == value, name
    assert all(math.isfinite(value) for value in alp.values())
    assert alp["sigma/min"] == alp["sigma/max"] == 0.0 and alp["grad/sigma_norm"] == 0.0
    alp_trainer.step(trajectories)  # AdamW has stepped log(sigma) with a zero gradient: still exactly -inf
    assert torch.isneginf(alp_trainer.perturbation.log_sigma).all()
    relative = ALPTrainer(load(), small_config(algo="alp", init_sigma=0.0)).step(trajectories)  # 0 x RMS = 0 too
    assert relative["sigma/max"] == 0.0 and all(math.isfinite(value) for value in relative.values())


def shifted_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """An 'engine copy' whose input embeddings are all shifted by +0.01: layer 0's input is off by exactly 0.01 RMS."""
    engine = copy.deepcopy(model)
    with torch.no_grad():
        engine.get_input_embeddings().weight.add_(0.01)
    return engine


def test_calibrated_sigma_recovers_a_known_engine_error(load):
    model = load()
    trajectories = make_trajectories(model)
    trainer = ALPTrainer(model, small_config(algo="alp", sigma_init="calibrated", init_sigma=0.5, sigma_lr=0.0),
                         engine_copy=shifted_embeddings)  # fmt: skip
    metrics = trainer.step(trajectories)
    assert metrics["sigma/layer_0"] == pytest.approx(0.5 * 0.01, rel=1e-6)
    assert all(0 < metrics[f"sigma/layer_{i}"] < 1 for i in range(4))
    with pytest.raises(ConfigError, match="engine_copy"):
        ALPTrainer(load(), small_config(algo="alp", sigma_init="calibrated"))
    ALPTrainer(load(), small_config(algo="bypass", sigma_init="calibrated"))  # no noise: nothing to calibrate


# -- clean mismatch metrics ----------------------------------------------------------------------


def test_mismatch_metrics_are_noise_free_for_every_algo(load):
    model = load()
    trajectories = make_trajectories(model)
    runs = {
        algo: ALPTrainer(load(), small_config(algo=algo, sigma_init="absolute", init_sigma=0.05)).step(trajectories)
        for algo in ("alp", "bypass", "grpo")
    }
    for name in runs["grpo"]:
        if name.startswith("mismatch/"):
            assert runs["alp"][name] == pytest.approx(runs["grpo"][name], rel=1e-5, abs=1e-7), name
            assert runs["bypass"][name] == pytest.approx(runs["grpo"][name], rel=1e-5, abs=1e-7), name
    assert runs["alp"]["loss_seq/log_width"] > runs["bypass"]["loss_seq/log_width"]  # the loss's own ratio sees the noise


def test_every_new_metric_is_reported_and_documented(load):
    model = load()
    trajectories = make_trajectories(model)
    metrics = ALPTrainer(model, small_config(algo="mis", mask_void_turns=True)).step(trajectories)
    assert set(NEW_METRICS + CONDITIONAL_METRICS) <= set(metrics)
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme.split("### Metrics")[1].split("\n## ")[0]
    documented = set(re.findall(r"`([a-z_]+/[a-z0-9_]+)`", table))
    assert set(NEW_METRICS + CONDITIONAL_METRICS) <= documented
