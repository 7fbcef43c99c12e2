"""Every policy-loss mode against a hand computation, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from alp_agents.trainers.losses import (
    PolicyLossConfig,
    aggregate,
    importance_weights,
    k3_kl,
    loss_units,
    mis_rejected,
    policy_loss,
)


def tensors(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def run(logprobs, behavior, advantages, mask, **cfg):
    """policy_loss and d loss / d logprobs."""
    logprobs = logprobs.clone().requires_grad_(True)
    loss, diag = policy_loss(logprobs, behavior, advantages, mask, PolicyLossConfig(**cfg))
    loss.backward()
    return loss.item(), logprobs.grad, diag


def test_token_level_positive_advantage():
    logprobs = tensors([-1.0, -2.0, -0.5, -3.0])
    behavior = tensors([-1.0, -1.0, -1.0, -1.0])
    mask = tensors([1, 1, 1, 0])
    loss, grad, diag = run(logprobs, behavior, torch.tensor([2.0]), mask)
    r = [1.0, math.exp(-1.0), math.exp(0.5)]  # all inside [1 - 0.5, 1 + 3]
    assert loss == pytest.approx(-2.0 * sum(r) / 3)
    torch.testing.assert_close(grad, tensors([-2 * r[0] / 3, -2 * r[1] / 3, -2 * r[2] / 3, 0.0]))
    torch.testing.assert_close(diag.ratio, tensors([*r, 1.0]))
    assert not (diag.clipped_low | diag.clipped_high | diag.clipped_dual).any()


def test_token_level_clip_high_zeroes_the_gradient():
    logprobs, behavior = tensors([math.log(5.0), 0.0]), tensors([0.0, 0.0])
    loss, grad, diag = run(logprobs, behavior, torch.tensor([1.0]), tensors([1, 1]))
    assert loss == pytest.approx(-(4.0 + 1.0) / 2)  # r = 5 clipped at 1 + 3
    torch.testing.assert_close(grad, tensors([0.0, -0.5]))
    assert diag.clipped_high.tolist() == [[True, False]]


def test_token_level_negative_advantage_clip_low_and_dual_clip():
    logprobs = tensors([2.0, -1.0, 0.1])
    behavior = tensors([0.0, 0.0, 0.0])
    loss, grad, diag = run(logprobs, behavior, torch.tensor([-1.0]), tensors([1, 1, 1]))
    # A = -1: pg = max(r, clip(r)), then min(pg, 3): e^2 -> 3 (dual), e^-1 -> 0.5 (low clip), e^0.1 unclipped
    assert loss == pytest.approx((3.0 + 0.5 + math.exp(0.1)) / 3)
    torch.testing.assert_close(grad, tensors([0.0, 0.0, math.exp(0.1) / 3]))
    assert diag.clipped_dual.tolist() == [[True, False, False]]
    assert diag.clipped_low.tolist() == [[False, True, False]]
    loss_without_dual, _, _ = run(logprobs, behavior, torch.tensor([-1.0]), tensors([1, 1, 1]), dual_clip=None)
    assert loss_without_dual == pytest.approx((math.exp(2.0) + 0.5 + math.exp(0.1)) / 3)


def test_sequence_level_value_is_the_sequence_ratio_and_gradient_is_exp_s_weighted():
    logprobs = tensors([-1.0, -1.2, -0.7, -9.0], [-0.5, -0.5, -0.5, -0.5])
    behavior = tensors([-1.1, -1.0, -0.75, 0.0], [-0.4, -0.6, -0.5, -0.5])
    mask = tensors([1, 1, 1, 0], [1, 1, 1, 1])
    A = torch.tensor([1.0, -0.5])
    loss, grad, diag = run(logprobs, behavior, A, mask, level="sequence")
    S = [0.1 - 0.2 + 0.05, -0.1 + 0.1 + 0.0 + 0.0]  # sum of the masked log-ratios
    R = [math.exp(s) for s in S]
    assert loss == pytest.approx((-1.0 * R[0] * 3 + 0.5 * R[1] * 4) / 7)
    expected = tensors([-R[0] / 7] * 3 + [0.0], [0.5 * R[1] / 7] * 4)
    torch.testing.assert_close(grad, expected)  # each token: its own log-prob's gradient, weighted by exp(S_i)
    torch.testing.assert_close(diag.ratio[0, :3], torch.full((3,), R[0], dtype=torch.float64))


def test_geometric_level_uses_the_length_normalised_sum():
    logprobs, behavior = tensors([0.3, 0.3, 0.0, 5.0]), tensors([0.0, 0.0, 0.0, 0.0])
    mask = tensors([1, 1, 1, 0])
    loss, grad, _ = run(logprobs, behavior, torch.tensor([1.0]), mask, level="geometric")
    r = math.exp(0.6 / 3)
    assert loss == pytest.approx(-r)
    torch.testing.assert_close(grad, tensors([-r / 3, -r / 3, -r / 3, 0.0]))


def test_clamp_bounds_long_sequences_and_stops_their_gradient():
    logprobs = torch.zeros(2, 100, dtype=torch.float64)
    behavior = torch.full((2, 100), -10.0, dtype=torch.float64)  # S = 1000: exp would overflow
    behavior[1] = -0.001  # S = 0.1: inside the clamp
    cfg = dict(level="sequence", clip_high=1e12, dual_clip=None)
    loss, grad, diag = run(logprobs, behavior, torch.tensor([1.0, 1.0]), torch.ones(2, 100), **cfg)
    assert math.isfinite(loss)
    assert diag.ratio[0, 0].item() == pytest.approx(math.exp(20.0))
    assert (grad[0] == 0).all() and (grad[1] != 0).all()


def test_token_level_clamp_keeps_extreme_tokens_finite():
    loss, grad, diag = run(tensors([0.0]), tensors([-1000.0]), torch.tensor([-1.0]), tensors([1]), dual_clip=None)
    assert loss == pytest.approx(math.exp(20.0))
    assert grad.item() == 0.0 and torch.isfinite(diag.ratio).all()


def test_sequence_mean_aggregation_weighs_each_sequence_equally():
    logprobs, behavior = torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
    mask = tensors([1, 0, 0, 0], [1, 1, 1, 1])
    A = torch.tensor([1.0, 3.0])  # r = 1 everywhere: per-token loss = -A
    assert run(logprobs, behavior, A, mask, aggregation="token_mean")[0] == pytest.approx(-(1 + 4 * 3) / 5)
    assert run(logprobs, behavior, A, mask, aggregation="sequence_mean")[0] == pytest.approx(-(1 + 3) / 2)


def test_per_token_advantages_and_weights_scale_each_token():
    logprobs, behavior, mask = torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64), tensors([1, 1, 1])
    loss, _ = policy_loss(logprobs, behavior, tensors([1.0, 2.0, 3.0]), mask, PolicyLossConfig(), weights=tensors([1.0, 0.5, 0.0]))
    assert loss.item() == pytest.approx(-(1.0 + 1.0 + 0.0) / 3)


@pytest.mark.parametrize("how", ["token_mean", "sequence_mean"])
def test_micro_batches_weighted_by_units_sum_to_the_batch_loss(how):
    g = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(6, 9, generator=g, dtype=torch.float64)
    behavior = logprobs + 0.1 * torch.randn(6, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 9, generator=g) > 0.3
    mask[2] = False  # a sequence without loss tokens
    A = torch.randn(6, generator=g, dtype=torch.float64)
    cfg = PolicyLossConfig(aggregation=how)
    whole, _ = policy_loss(logprobs, behavior, A, mask, cfg)
    units = loss_units(mask, how)
    parts = [slice(0, 2), slice(2, 3), slice(3, 6)]
    summed = sum(policy_loss(logprobs[s], behavior[s], A[s], mask[s], cfg)[0] * loss_units(mask[s], how) / units for s in parts)
    assert summed.item() == pytest.approx(whole.item())


def test_tis_truncates_and_mis_masks_the_correction_weight():
    old = tensors([math.log(3.0), math.log(0.5), math.log(1.5), 0.0])
    infer = torch.zeros(1, 4, dtype=torch.float64)
    mask = tensors([1, 1, 1, 0])
    cfg = PolicyLossConfig(correction_low=0.5, correction_high=2.0)
    torch.testing.assert_close(importance_weights(old, infer, mask, cfg, kind="tis"), tensors([2.0, 0.5, 1.5, 1.0]))
    torch.testing.assert_close(importance_weights(old, infer, mask, cfg, kind="mis"), tensors([0.0, 0.5, 1.5, 1.0]))
    sequence = PolicyLossConfig(correction_level="sequence")
    torch.testing.assert_close(importance_weights(old, infer, mask, sequence, kind="tis"), tensors([2.0]))  # 3 * 0.5 * 1.5 = 2.25
    torch.testing.assert_close(importance_weights(old, infer, mask, sequence, kind="mis"), tensors([0.0]))


def test_geometric_correction_is_one_weight_per_sequence_from_the_mean_log_ratio():
    old = tensors([math.log(3.0), math.log(0.5), math.log(1.5), 7.0], [math.log(4.0), math.log(4.0), 0.0, 0.0])
    infer = torch.zeros(2, 4, dtype=torch.float64)
    mask = tensors([1, 1, 1, 0], [1, 1, 0, 0])
    cfg = PolicyLossConfig(correction_level="geometric", correction_low=0.5, correction_high=2.0)
    first = 2.25 ** (1 / 3)  # (3 * 0.5 * 1.5)^(1/3): the masked 7.0 is ignored
    torch.testing.assert_close(importance_weights(old, infer, mask, cfg, kind="tis"), tensors([first], [2.0]))  # 4 -> cap 2
    torch.testing.assert_close(importance_weights(old, infer, mask, cfg, kind="mis"), tensors([first], [0.0]))  # 4 rejected
    assert mis_rejected(old, infer, mask, cfg).tolist() == [[False] * 4, [True, True, False, False]]
    clamped = PolicyLossConfig(correction_level="geometric", log_ratio_clamp=1.0, correction_high=100.0)
    torch.testing.assert_close(importance_weights(old, infer, mask, clamped, kind="tis"), tensors([first], [math.e]))  # log 4 > C


@pytest.mark.parametrize("in_denominator", [True, False])
def test_mis_rejected_tokens_leave_the_denominator_only_when_asked(in_denominator):
    logprobs = torch.zeros(2, 3, dtype=torch.float64)  # r = 1, A = 1: per-token loss -1 times the weight
    old = tensors([math.log(3.0), math.log(0.5), math.log(1.5)], [0.0, math.log(4.0), 0.0])
    infer = torch.zeros(2, 3, dtype=torch.float64)
    mask = tensors([1, 1, 1], [1, 1, 0]).bool()
    cfg = PolicyLossConfig(correction_low=0.5, correction_high=2.0, rejected_in_denominator=in_denominator)
    rejected = mis_rejected(old, infer, mask, cfg)
    assert rejected.tolist() == [[True, False, False], [False, True, False]]  # w = 3 and w = 4: above 2
    weights = importance_weights(old, infer, mask, cfg, kind="mis")  # [[0, 0.5, 1.5], [1, 0, -]]
    kept = mask & ~rejected if not in_denominator else mask
    loss, _ = policy_loss(logprobs, logprobs, torch.ones(2, dtype=torch.float64), kept, cfg, weights=weights)
    expected = -(0.5 + 1.5 + 1.0) / (5 if in_denominator else 3)  # 5 loss tokens, 2 of them rejected
    assert loss.item() == pytest.approx(expected)
    assert loss_units(kept, "token_mean") == (5 if in_denominator else 3)
    parts = [slice(0, 1), slice(1, 2)]  # micro-batches weighted by the units of the mask the loss used
    summed = sum(
        policy_loss(logprobs[s], logprobs[s], torch.ones(1, dtype=torch.float64), kept[s], cfg, weights=weights[s])[0]
        * loss_units(kept[s], "token_mean") / loss_units(kept, "token_mean")
        for s in parts
    )
    assert summed.item() == pytest.approx(expected)


def test_k3_kl_is_zero_on_equal_policies_and_matches_its_formula():
    logprobs = tensors([-1.0, -2.0, -0.1]).requires_grad_(True)
    ref = tensors([-1.0, -1.5, -0.3])
    kl = k3_kl(logprobs, ref)
    x = torch.tensor([0.0, 0.5, -0.2], dtype=torch.float64)
    torch.testing.assert_close(kl, (x.exp() - x - 1.0)[None])
    assert kl[0, 0].item() == 0.0 and (kl >= 0).all()
    aggregate(kl, torch.ones(1, 3), "token_mean").backward()
    torch.testing.assert_close(logprobs.grad, ((1.0 - x.exp()) / 3)[None])


def test_invalid_config_names_the_field():
    with pytest.raises(ValidationError, match="clip_low"):
        PolicyLossConfig(clip_low=1.5)
    with pytest.raises(ValidationError, match="dual_clip"):
        PolicyLossConfig(dual_clip=0.5)
    with pytest.raises(ValidationError, match="correction_low"):
        PolicyLossConfig(correction_low=3.0, correction_high=2.0)
    with pytest.raises(ValidationError, match="level"):
        PolicyLossConfig(level="tokens")
