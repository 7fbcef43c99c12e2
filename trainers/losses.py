"""The clipped importance-ratio policy loss of ALP and of every baseline, as pure functions of tensors.

All tensors are `(B, T)`, aligned with the token ids: position t holds the log-prob of token t. The
algorithms differ only in what they feed in (ALPTrainer picks it from `TrainerConfig.algo`):

    ratio r = pi_theta / behavior, with behavior = the engine's mu (alp, bypass) or a recomputed pi_old
    (grpo, tis, mis, gspo); tis/mis multiply the loss by `importance_weights(pi_old, mu)`; gspo is
    `level="geometric"` with a narrow clip range. MIS rejection (`mis_rejected`) either zeroes a
    token's weight or also removes it from the mask (`rejected_in_denominator`).

The ratio, its clamp and the PPO clip follow the ALP authors' released code; the diagnostics sit beside
the loss under `no_grad` (CleanRL) and are summarised by `alp_agents.trainers.metrics.loss_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from alp_agents.config import Config

RatioLevel = Literal["token", "sequence", "geometric"]
Aggregation = Literal["token_mean", "sequence_mean"]


class PolicyLossConfig(Config):
    """The ratio, clipping and aggregation of the policy loss (defaults: the ALP authors' code)."""

    level: RatioLevel = "token"
    """'token': one ratio per token; 'sequence': every token carries its sequence's ratio exp(S_i);
    'geometric': the same with the length-normalised S_i / n_i (GSPO)."""
    clip_low: float = Field(default=0.5, ge=0.0, le=1.0)
    """PPO clip range below 1: the ratio is clipped at 1 - clip_low."""
    clip_high: float = Field(default=3.0, ge=0.0)
    """PPO clip range above 1: the ratio is clipped at 1 + clip_high (asymmetric, wide)."""
    dual_clip: float | None = Field(default=3.0, gt=1.0)
    """Dual clip c for negative advantages: the per-token loss is at most -A * c. None disables it."""
    log_ratio_clamp: float = Field(default=20.0, gt=0.0)
    """C: the log-ratio is clamped to [-C, C] before exp, so no sequence can overflow."""
    aggregation: Aggregation = "token_mean"
    """'token_mean': mean over every loss token of the batch; 'sequence_mean': mean over sequences of
    each sequence's token mean (sequences without loss tokens are left out)."""
    correction_level: RatioLevel = "token"
    """tis/mis/mis_reject: the correction weight pi_old / mu per token, per sequence (product over its
    loss tokens) or 'geometric' (per sequence, the geometric mean over its loss tokens)."""
    correction_low: float = Field(default=0.5, ge=0.0)
    """mis and mis_reject: weights below this are rejected (masked to 0)."""
    correction_high: float = Field(default=2.0, gt=0.0)
    """tis: weights are truncated at this cap; mis and mis_reject: weights above it are rejected."""
    rejected_in_denominator: bool = True
    """mis and mis_reject: True (the ALP authors' code) keeps a rejected token in the token-mean
    denominator (it contributes 0); False (verl >= 0.6, slime) removes it from the loss mask, so it
    leaves the denominator too."""

    @model_validator(mode="after")
    def _check_ranges(self) -> PolicyLossConfig:
        if self.correction_low >= self.correction_high:
            raise ValueError(f"correction_low={self.correction_low} must be below correction_high={self.correction_high}")
        return self


@dataclass(frozen=True)
class LossDiagnostics:
    """What one policy_loss call saw, per token, detached: read by `metrics.loss_metrics`."""

    mask: Tensor
    """(B, T) bool: tokens that carry loss."""
    log_ratio: Tensor
    """(B, T) d_t = logprobs_t - behavior_logprobs_t, unclamped, 0 off the mask."""
    ratio: Tensor
    """(B, T) the ratio r_t the loss used (after the level and the clamp)."""
    clipped_low: Tensor
    """(B, T) bool: A < 0 and r < 1 - clip_low (the clip zeroes the gradient)."""
    clipped_high: Tensor
    """(B, T) bool: A > 0 and r > 1 + clip_high."""
    clipped_dual: Tensor
    """(B, T) bool: A < 0 and r > dual_clip."""


def policy_loss(
    logprobs: Tensor,
    behavior_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: PolicyLossConfig,
    *,
    weights: Tensor | None = None,
) -> tuple[Tensor, LossDiagnostics]:
    """Clipped ratio loss `agg(w * max(-A r, -A clip(r)))`, dual-clipped for A < 0; returns (loss, diagnostics).

    d_t = logprobs_t - behavior_logprobs_t, C = cfg.log_ratio_clamp, and by `cfg.level`:
      token:     log r_t = clamp(d_t, -C, C)
      sequence:  log r_t = clamp(sg(S_i) + logprobs_t - sg(logprobs_t), -C, C),  S_i = sum_t mask_t d_t
      geometric: the same with S_i / max(1, n_i), n_i = number of loss tokens of sequence i
    so every token of sequence i carries the value exp(S_i) and the gradient of its own log-prob (a
    sequence beyond the clamp gets no gradient). Then with r = exp(log r), for each token
      pg_t = max(-A r_t, -A clip(r_t, 1 - clip_low, 1 + clip_high)),  and for A < 0: pg_t = min(pg_t, -A c)
    and the loss is the token mean (or sequence mean) of `weights * pg` over the mask.

    `advantages` is (B,) or (B, T); `weights` (no gradient) is (B, T) or (B, 1), e.g. `importance_weights`.
    """
    mask = mask.bool()
    d = torch.where(mask, logprobs - behavior_logprobs, 0.0)  # (B, T)
    C = cfg.log_ratio_clamp
    if cfg.level == "token":
        log_ratio = d.clamp(-C, C)
    else:
        S = d.sum(-1, keepdim=True)  # (B, 1)
        if cfg.level == "geometric":
            S = S / mask.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = (S.detach() + logprobs - logprobs.detach()).clamp(-C, C)  # (B, T)
    ratio = log_ratio.exp()
    A = advantages if advantages.dim() == 2 else advantages[:, None]  # (B, T) or (B, 1)
    clipped_ratio = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = torch.maximum(-A * ratio, -A * clipped_ratio)  # (B, T)
    if cfg.dual_clip is not None:
        pg = torch.where(A < 0, torch.minimum(pg, -A * cfg.dual_clip), pg)
    if weights is not None:
        pg = pg * weights
    loss = aggregate(pg, mask, cfg.aggregation)

    with torch.no_grad():
        r = ratio.detach()
        diagnostics = LossDiagnostics(
            mask=mask,
            log_ratio=d.detach(),
            ratio=r,
            clipped_low=mask & (A < 0) & (r < 1.0 - cfg.clip_low),
            clipped_high=mask & (A > 0) & (r > 1.0 + cfg.clip_high),
            clipped_dual=mask & (A < 0) & (r > cfg.dual_clip) if cfg.dual_clip is not None else torch.zeros_like(mask),
        )
    return loss, diagnostics


def aggregate(values: Tensor, mask: Tensor, how: Aggregation) -> Tensor:
    """Mean of `values` over the mask: per token ('token_mean') or per sequence of token means ('sequence_mean')."""
    mask = mask.bool()
    masked = torch.where(mask, values, 0.0)  # (B, T)
    if how == "token_mean":
        total = masked.sum()
    else:
        total = (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    return total / max(loss_units(mask, how), 1)


def loss_units(mask: Tensor, how: Aggregation) -> int:
    """What `aggregate` divides by: loss tokens, or sequences with at least one loss token.

    A trainer that splits a batch into micro-batches weights each micro-batch's loss by
    units(micro) / units(batch), which makes the sum equal to the loss of the whole batch.
    """
    mask = mask.bool()
    return int(mask.sum()) if how == "token_mean" else int(mask.any(-1).sum())


def correction_log_weights(old_logprobs: Tensor, infer_logprobs: Tensor, mask: Tensor, cfg: PolicyLossConfig) -> Tensor:
    """log w, w = pi_old / mu at `cfg.correction_level`, clamped to [-C, C]; no gradient.

    token: log w_t = old_t - mu_t, shape (B, T); sequence: log w_i = sum_t mask_t (old_t - mu_t),
    shape (B, 1); geometric: the same divided by max(1, n_i), n_i the sequence's loss tokens.
    """
    C = cfg.log_ratio_clamp
    mask = mask.bool()
    d = torch.where(mask, old_logprobs - infer_logprobs, 0.0).detach()  # (B, T)
    if cfg.correction_level != "token":
        d = d.sum(-1, keepdim=True)  # (B, 1)
    if cfg.correction_level == "geometric":
        d = d / mask.sum(-1, keepdim=True).clamp(min=1)
    return d.clamp(-C, C)


def importance_weights(
    old_logprobs: Tensor, infer_logprobs: Tensor, mask: Tensor, cfg: PolicyLossConfig, *, kind: Literal["tis", "mis"]
) -> Tensor:
    """Correction w = pi_old / mu for the engine mismatch, truncated (TIS) or masked (MIS); no gradient.

    w = exp(correction_log_weights(...)): (B, T) at token level, (B, 1) at sequence or geometric level. Then
      tis: w = min(w, correction_high)
      mis: w = w if correction_low <= w <= correction_high else 0
    """
    w = correction_log_weights(old_logprobs, infer_logprobs, mask, cfg).exp()
    if kind == "tis":
        return w.clamp(max=cfg.correction_high)
    inside = (w >= cfg.correction_low) & (w <= cfg.correction_high)
    return torch.where(inside, w, 0.0)


def mis_rejected(old_logprobs: Tensor, infer_logprobs: Tensor, mask: Tensor, cfg: PolicyLossConfig) -> Tensor:
    """(B, T) bool: the loss tokens MIS rejects, i.e. whose weight (token, or their sequence's) is outside [low, high]."""
    w = correction_log_weights(old_logprobs, infer_logprobs, mask, cfg).exp()  # (B, T) or (B, 1)
    outside = (w < cfg.correction_low) | (w > cfg.correction_high)
    return mask.bool() & outside


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor, *, clamp: float = 20.0) -> Tensor:
    """Per-token k3 estimate of KL(pi || ref) on tokens sampled from pi: exp(x) - x - 1, x = ref - logprobs.

    Always >= 0, unbiased, low variance (J. Schulman, "Approximating KL divergence", 2020); x is
    clamped to [-clamp, clamp] so it cannot overflow. Differentiable in `logprobs`.
    """
    x = (ref_logprobs - logprobs).clamp(-clamp, clamp)
    return x.exp() - x - 1.0
