"""Training diagnostics as pure functions of tensors, returning `{namespace/name: float}`.

Every function takes the values of loss tokens only (flat tensors, or diagnostics with their mask);
an empty input gives NaN rather than an error, so a batch without loss tokens still logs. Each name
and its formula is listed in the README's metrics table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from alp_agents.trainers.advantages import GroupAdvantages
from alp_agents.trainers.losses import LossDiagnostics

QUANTILES = (1, 2, 5, 25, 50, 75, 95, 98, 99)
"""Percentiles of the importance ratio reported every step (the tails are what ALP is about)."""

LOG_RATIO_CLAMP = 20.0
"""Log-ratios are clamped to [-20, 20] before exp in every estimator here, like the loss."""


def quantiles(values: Tensor, qs: Sequence[float]) -> list[float]:
    """Linear-interpolation quantiles (torch.quantile's default) of a flat tensor of any size, qs in [0, 1]."""
    if values.numel() == 0:
        return [math.nan] * len(qs)
    ordered = values.double().flatten().sort().values
    position = torch.tensor(qs, dtype=torch.float64, device=ordered.device) * (len(ordered) - 1)
    below, above = position.floor().long(), position.ceil().long()
    fraction = position - below
    return (ordered[below] + fraction * (ordered[above] - ordered[below])).tolist()


def ratio_metrics(ratio: Tensor) -> dict[str, float]:
    """ratio/p1 ... ratio/p99, ratio/min, ratio/max, ratio/mean of the ratios r_t the loss used."""
    metrics = {f"ratio/p{q}": value for q, value in zip(QUANTILES, quantiles(ratio, [q / 100 for q in QUANTILES]))}
    empty = ratio.numel() == 0
    metrics["ratio/min"] = math.nan if empty else float(ratio.min())
    metrics["ratio/max"] = math.nan if empty else float(ratio.max())
    metrics["ratio/mean"] = _mean(ratio)
    return metrics


def loss_metrics(diagnostics: Sequence[LossDiagnostics]) -> dict[str, float]:
    """Ratio quantiles, clip fractions and the KL between behavior and current policy, over all loss tokens.

    clip/low, clip/high, clip/dual: fraction of loss tokens whose gradient that clip zeroed.
    kl/k1 = mean(-d), kl/k3 = mean(exp(d) - 1 - d), with d = log pi - log behavior: estimates of
    KL(behavior || pi) on tokens sampled from the behavior policy.
    """
    ratio = torch.cat([diag.ratio[diag.mask] for diag in diagnostics])
    d = torch.cat([diag.log_ratio[diag.mask] for diag in diagnostics]).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    metrics = ratio_metrics(ratio)
    for side in ("low", "high", "dual"):
        clipped = torch.cat([getattr(diag, f"clipped_{side}")[diag.mask] for diag in diagnostics])
        metrics[f"clip/{side}"] = _mean(clipped.float())
    metrics["kl/k1"] = _mean(-d)
    metrics["kl/k3"] = _mean(d.exp() - 1.0 - d)
    return metrics


def mismatch_metrics(train_logprobs: Tensor, infer_logprobs: Tensor) -> dict[str, float]:
    """How far the trainer's token probabilities are from the inference engine's, on the same tokens.

    With d = log pi_train - log mu and r = exp(d), over sampled tokens (drawn from mu):
    k1 = mean(-d) and k3 = mean(r - 1 - d) estimate KL(mu || pi_train); chi2 = mean((r - 1)^2)
    estimates chi^2(pi_train || mu); ess = (sum r)^2 / (n sum r^2) is the normalised effective sample
    size (1 = no mismatch); log_ratio_std = std(d); prob_pearson, prob_abs_diff_mean/max compare
    the probabilities exp(log pi_train) and exp(log mu) directly.
    """
    d = (train_logprobs - infer_logprobs).double().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    r = d.exp()
    p_train, p_infer = train_logprobs.double().exp(), infer_logprobs.double().exp()
    n = d.numel()
    return {
        "mismatch/k1": _mean(-d),
        "mismatch/k3": _mean(r - 1.0 - d),
        "mismatch/chi2": _mean((r - 1.0) ** 2),
        "mismatch/ess": math.nan if n == 0 else float(r.sum() ** 2 / (n * (r**2).sum())),
        "mismatch/log_ratio_std": math.nan if n < 2 else float(d.std()),
        "mismatch/prob_pearson": _pearson(p_train, p_infer),
        "mismatch/prob_abs_diff_mean": _mean((p_train - p_infer).abs()),
        "mismatch/prob_abs_diff_max": math.nan if n == 0 else float((p_train - p_infer).abs().max()),
    }


def advantage_metrics(group_advantages: GroupAdvantages) -> dict[str, float]:
    """adv/mean, adv/std, adv/min, adv/max over episodes; adv/groups and adv/constant_groups (no signal)."""
    advantages = group_advantages.advantages.double()
    return {
        "adv/mean": _mean(advantages),
        "adv/std": math.nan if advantages.numel() < 2 else float(advantages.std()),
        "adv/min": float(advantages.min()),
        "adv/max": float(advantages.max()),
        "adv/groups": float(group_advantages.num_groups),
        "adv/constant_groups": float(group_advantages.num_constant_groups),
    }


def sigma_metrics(names: Sequence[str], sigmas: Tensor) -> dict[str, float]:
    """sigma/min, sigma/mean, sigma/max over the perturbed points, and sigma/<point> for each one."""
    values = sigmas.tolist()
    metrics = {"sigma/min": min(values), "sigma/mean": sum(values) / len(values), "sigma/max": max(values)}
    metrics.update({f"sigma/{name}": value for name, value in zip(names, values)})
    return metrics


def _mean(values: Tensor) -> float:
    return math.nan if values.numel() == 0 else float(values.double().mean())


def _pearson(x: Tensor, y: Tensor) -> float:
    if x.numel() < 2:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    denominator = float((x.square().sum() * y.square().sum()).sqrt())
    return math.nan if denominator == 0.0 else float((x * y).sum()) / denominator
