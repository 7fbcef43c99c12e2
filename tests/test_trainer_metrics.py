"""The metric functions on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from alp_agents.trainers import GroupAdvantages, LossDiagnostics
from alp_agents.trainers.metrics import (
    QUANTILES,
    TAIL_QUANTILES,
    advantage_metrics,
    loss_metrics,
    mismatch_metrics,
    quantiles,
    ratio_metrics,
    sigma_metrics,
)


def test_quantiles_match_torch_quantile():
    values = torch.randn(1001, generator=torch.Generator().manual_seed(0)).exp()
    qs = [0.0, 0.013, 0.5, 0.98, 1.0]
    assert quantiles(values, qs) == pytest.approx(torch.quantile(values.double(), torch.tensor(qs, dtype=torch.float64)).tolist())
    assert all(math.isnan(q) for q in quantiles(torch.empty(0), qs))


def test_ratio_metrics_of_a_known_ramp():
    metrics = ratio_metrics(torch.arange(1, 102, dtype=torch.float32))  # 1..101: percentile q is 1 + q
    assert [metrics[f"ratio/p{q}"] for q in QUANTILES] == pytest.approx([1 + q for q in QUANTILES])
    assert (metrics["ratio/min"], metrics["ratio/max"], metrics["ratio/mean"]) == (1.0, 101.0, 51.0)


def diagnostics(log_ratio: list[float], mask: list[bool], low: list[bool], high: list[bool], dual: list[bool]) -> LossDiagnostics:
    d = torch.tensor([log_ratio])
    return LossDiagnostics(
        mask=torch.tensor([mask]),
        log_ratio=d,
        ratio=d.exp(),
        clipped_low=torch.tensor([low]),
        clipped_high=torch.tensor([high]),
        clipped_dual=torch.tensor([dual]),
    )


def test_loss_metrics_pool_the_loss_tokens_of_every_micro_batch():
    first = diagnostics([0.0, math.log(2.0), 9.0], [True, True, False], [False, False, True], [False, True, False], [False] * 3)
    second = diagnostics([math.log(0.5)], [True], [True], [False], [True])
    metrics = loss_metrics([first, second])
    d = torch.tensor([0.0, math.log(2.0), math.log(0.5)], dtype=torch.float64)  # the masked-out 9.0 is ignored
    assert metrics["ratio/max"] == pytest.approx(2.0) and metrics["ratio/min"] == pytest.approx(0.5)
    assert (metrics["clip/low"], metrics["clip/high"], metrics["clip/dual"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert metrics["kl/k1"] == pytest.approx(float((-d).mean()))
    assert metrics["kl/k3"] == pytest.approx(float((d.exp() - 1 - d).mean()))


def test_mismatch_metrics_are_neutral_for_identical_policies():
    logprobs = torch.tensor([-0.1, -2.0, -0.7, -3.0])
    metrics = mismatch_metrics(logprobs, logprobs.clone(), torch.tensor([4]))
    assert metrics["mismatch/k1"] == metrics["mismatch/k3"] == metrics["mismatch/chi2"] == 0.0
    assert metrics["mismatch/ess"] == pytest.approx(1.0) and metrics["mismatch/prob_pearson"] == pytest.approx(1.0)
    assert metrics["mismatch/prob_abs_diff_max"] == 0.0 and metrics["mismatch/log_ratio_std"] == 0.0


def test_mismatch_metrics_of_a_known_pair():
    train = torch.tensor([math.log(0.4), math.log(0.3)])
    infer = torch.tensor([math.log(0.2), math.log(0.3)])  # r = [2, 1]
    metrics = mismatch_metrics(train, infer, torch.tensor([1, 1]))
    assert metrics["mismatch/k1"] == pytest.approx(-math.log(2.0) / 2)
    assert metrics["mismatch/k3"] == pytest.approx((1.0 - math.log(2.0)) / 2)
    assert metrics["mismatch/chi2"] == pytest.approx(0.5)
    assert metrics["mismatch/ess"] == pytest.approx(9 / (2 * 5))
    assert metrics["mismatch/prob_abs_diff_mean"] == pytest.approx(0.1)
    assert metrics["mismatch/prob_abs_diff_max"] == pytest.approx(0.2)
    assert metrics["mismatch/prob_pearson"] == pytest.approx(-1.0)  # 0.4 -> 0.3 falls where 0.2 -> 0.3 rises
    assert all(math.isnan(v) for v in mismatch_metrics(torch.empty(0), torch.empty(0), torch.tensor([], dtype=torch.long)).values())


def test_mismatch_tail_and_sequence_metrics_of_known_sequences():
    # three sequences: d = [ln 2, ln 2] (S = ln 4), d = [0] (S = 0), d = [-ln 2] (S = -ln 2), and one without loss tokens
    infer = torch.tensor([-1.0, -2.0, -3.0, -0.5], dtype=torch.float64)
    train = infer + torch.tensor([math.log(2.0), math.log(2.0), 0.0, -math.log(2.0)], dtype=torch.float64)
    metrics = mismatch_metrics(train, infer, torch.tensor([2, 0, 1, 1]))
    S = torch.tensor([math.log(4.0), 0.0, -math.log(2.0)], dtype=torch.float64)
    d = torch.tensor([math.log(2.0), math.log(2.0), 0.0, -math.log(2.0)], dtype=torch.float64)
    for q in TAIL_QUANTILES:  # quantiles interpolated in log space: exp(quantile of the log-ratio)
        assert metrics[f"mismatch/seq_p{q}"] == pytest.approx(math.exp(torch.quantile(S, q / 100).item()))
        assert metrics[f"mismatch/token_p{q}"] == pytest.approx(math.exp(torch.quantile(d, q / 100).item()))
    assert metrics["mismatch/seq_p50"] == pytest.approx(1.0)
    assert metrics["mismatch/seq_log_width"] == pytest.approx(math.log(metrics["mismatch/seq_p98"] / metrics["mismatch/seq_p2"]))
    assert metrics["mismatch/max_abs_log_ratio"] == pytest.approx(math.log(2.0))
    assert metrics["mismatch/sample_nll"] == pytest.approx((1.0 + 2.0 + 3.0 + 0.5) / 4)
    with pytest.raises(ValueError, match="lengths"):
        mismatch_metrics(train, infer, torch.tensor([2, 1]))


def test_loss_sequence_ratio_quantiles_sum_each_sequences_masked_log_ratio():
    first = diagnostics([math.log(2.0), math.log(2.0), 9.0], [True, True, False], [False] * 3, [False] * 3, [False] * 3)
    second = diagnostics([math.log(0.5)], [True], [False], [False], [False])
    empty = diagnostics([5.0], [False], [False], [False], [False])  # no loss tokens: no sequence ratio
    metrics = loss_metrics([first, second, empty])
    S = torch.tensor([math.log(4.0), math.log(0.5)], dtype=torch.float64)  # 9.0 is off the mask
    for q in TAIL_QUANTILES:
        assert metrics[f"loss_seq/p{q}"] == pytest.approx(math.exp(torch.quantile(S, q / 100).item()))
    assert metrics["loss_seq/log_width"] == pytest.approx(0.96 * math.log(8.0))


def test_advantage_and_sigma_metrics():
    metrics = advantage_metrics(GroupAdvantages(torch.tensor([1.0, -1.0, 0.0, 0.0]), num_groups=2, num_constant_groups=1))
    assert metrics == pytest.approx(
        {"adv/mean": 0.0, "adv/std": math.sqrt(2 / 3), "adv/min": -1.0, "adv/max": 1.0, "adv/groups": 2.0, "adv/constant_groups": 1.0}
    )
    sigmas = sigma_metrics(["layer_0", "layer_2"], torch.tensor([0.001, 0.003]))
    assert sigmas == pytest.approx(
        {"sigma/min": 0.001, "sigma/mean": 0.002, "sigma/max": 0.003, "sigma/layer_0": 0.001, "sigma/layer_2": 0.003}
    )
