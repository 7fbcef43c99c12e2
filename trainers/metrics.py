"""Training diagnostics as pure functions of tensors, returning `{namespace/name: float}`.

Every function takes the values of loss tokens only (flat tensors, with per-sequence lengths where a
metric is per sequence, or diagnostics with their mask);
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

TAIL_QUANTILES = (1, 2, 50, 98, 99)
"""Percentiles of the mismatch and sequence-level ratios (token_pX, seq_pX, loss_seq/pX)."""

LOG_RATIO_CLAMP = 20.0
"""Token log-ratios are clamped to [-20, 20] before exp in every estimator here, like the loss."""

SEQUENCE_LOG_RATIO_CLAMP = 700.0
"""Sequence log-ratios (sums over up to thousands of tokens) are clamped only where exp would overflow float64."""


def quantiles(values: Tensor, qs: Sequence[float]) -> list[float]:
    """Linear-interpolation quantiles (torch.quantile's default) of a flat tensor of any size, qs in [0, 1]."""
    if values.numel() == 0:
        return [math.nan] * len(qs)
    ordered = values.double().flatten().sort().values
    position = torch.tensor(qs, dtype=torch.float64, device=ordered.device) * (len(ordered) - 1)
    below, above = position.floor().long(), position.ceil().long()
    fraction = position - below
    return (ordered[below] + fraction * (ordered[above] - ordered[below])).tolist()


def log_quantiles(log_values: Tensor, qs: Sequence[float]) -> list[float]:
    """exp of the quantiles of log-values: the quantiles of exp(log_values), interpolated in log space.

    The order statistics are those of the ratios themselves; only the interpolation between two of
    them differs from `quantiles(exp(x))`, and nothing overflows before the exp.
    """
    return [math.exp(q) if math.isfinite(q) else q for q in quantiles(log_values, qs)]


def sequence_sums(values: Tensor, lengths: Tensor) -> Tensor:
    """(S,) sum of each sequence's values: `values` is flat, sequence after sequence, `lengths` their sizes."""
    lengths = torch.as_tensor(lengths, device=values.device).long()
    if int(lengths.sum()) != values.numel():
        raise ValueError(f"lengths sum to {int(lengths.sum())} but there are {values.numel()} values")
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=values.device), lengths)  # (n,)
    sums = torch.zeros(len(lengths), dtype=torch.float64, device=values.device).index_add_(0, sequence, values.double())
    return sums[lengths > 0]  # a sequence without loss tokens has no ratio


def tail_metrics(prefix: str, log_ratios: Tensor) -> dict[str, float]:
    """{prefix}p1, p2, p50, p98, p99 of exp(log_ratios) (`log_quantiles`)."""
    values = log_quantiles(log_ratios, [q / 100 for q in TAIL_QUANTILES])
    return {f"{prefix}p{q}": value for q, value in zip(TAIL_QUANTILES, values)}


def log_width(log_ratios: Tensor) -> float:
    """ln(P98 / P2) of exp(log_ratios): the width of the ratio's central 96%, in nats."""
    p2, p98 = quantiles(log_ratios, [0.02, 0.98])
    return p98 - p2


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
    loss_seq/p1 ... loss_seq/p99, loss_seq/log_width: the sequence ratio exp(sum_t d_t) over each
    sequence's loss tokens (whatever the loss level), d unclamped (`tail_metrics`, `log_width`).
    """
    ratio = torch.cat([diag.ratio[diag.mask] for diag in diagnostics])
    d = torch.cat([diag.log_ratio[diag.mask] for diag in diagnostics]).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    metrics = ratio_metrics(ratio)
    for side in ("low", "high", "dual"):
        clipped = torch.cat([getattr(diag, f"clipped_{side}")[diag.mask] for diag in diagnostics])
        metrics[f"clip/{side}"] = _mean(clipped.float())
    metrics["kl/k1"] = _mean(-d)
    metrics["kl/k3"] = _mean(d.exp() - 1.0 - d)
    sequence_log_ratio = torch.cat(
        [torch.where(diag.mask, diag.log_ratio, 0.0).double().sum(-1)[diag.mask.any(-1)] for diag in diagnostics]
    ).clamp(-SEQUENCE_LOG_RATIO_CLAMP, SEQUENCE_LOG_RATIO_CLAMP)  # (sequences,)
    metrics.update(tail_metrics("loss_seq/", sequence_log_ratio))
    metrics["loss_seq/log_width"] = log_width(sequence_log_ratio)
    return metrics


def mismatch_metrics(train_logprobs: Tensor, infer_logprobs: Tensor, lengths: Tensor) -> dict[str, float]:
    """How far the trainer's token probabilities are from the inference engine's, on the same tokens.

    `train_logprobs` and `infer_logprobs` are flat, the loss tokens of one sequence after another;
    `lengths` (S,) gives each sequence's count (sequences of length 0 are skipped).
    With d = log pi_train - log mu and r = exp(d), over sampled tokens (drawn from mu):
    k1 = mean(-d) and k3 = mean(r - 1 - d) estimate KL(mu || pi_train); chi2 = mean((r - 1)^2)
    estimates chi^2(pi_train || mu); ess = (sum r)^2 / (n sum r^2) is the normalised effective sample
    size (1 = no mismatch); log_ratio_std = std(d); prob_pearson, prob_abs_diff_mean/max compare
    the probabilities exp(log pi_train) and exp(log mu) directly; token_pX are quantiles of r,
    max_abs_log_ratio = max |d| (unclamped); seq_pX are quantiles of the sequence ratio
    exp(S_i), S_i = sum of d over sequence i, and seq_log_width = ln(seq_p98 / seq_p2);
    sample_nll = mean(-log mu), an entropy proxy that no algorithm's training side changes.
    """
    raw = (train_logprobs - infer_logprobs).double()
    d = raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    r = d.exp()
    p_train, p_infer = train_logprobs.double().exp(), infer_logprobs.double().exp()
    S = sequence_sums(raw, lengths).clamp(-SEQUENCE_LOG_RATIO_CLAMP, SEQUENCE_LOG_RATIO_CLAMP)  # (sequences,)
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
        **tail_metrics("mismatch/token_", d),
        "mismatch/max_abs_log_ratio": math.nan if n == 0 else float(raw.abs().max()),
        **tail_metrics("mismatch/seq_", S),
        "mismatch/seq_log_width": log_width(S),
        "mismatch/sample_nll": _mean(-infer_logprobs),
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
