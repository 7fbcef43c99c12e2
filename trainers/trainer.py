"""ALPTrainer: one RL update of a Hugging Face causal LM from a batch of Trajectory records.

`step(trajectories)` reads top to bottom: pad the episodes into tensors, compute GRPO advantages per
group, split the batch into `updates_per_batch` shuffled mini-batches (one AdamW step each) of
`micro_batch_size` micro-batches (gradient accumulation), and for each micro-batch run the update
forward (perturbed for ALP), the policy loss against the algorithm's behavior log-probs, and backward.

`TrainerConfig.algo` picks the algorithm; every one uses the same loss function (losses.py):

    algo    ratio denominator          perturbation  extra
    alp     engine log-probs mu        yes           -
    bypass  engine log-probs mu        no            -
    grpo    recomputed pi_old          no            -
    tis     recomputed pi_old          no            x min(pi_old / mu, cap)
    mis     recomputed pi_old          no            x pi_old / mu, masked outside [low, high]
    gspo    recomputed pi_old          no            geometric sequence ratio, clip 1 -/+ (3e-4, 4e-4)

Precision (`dtype`): the weights, their gradients and AdamW's moments are always float32 (master weights);
bfloat16 and float16 run the forwards under `torch.autocast`, float16 with a GradScaler (loss scaling, an
update whose scaled gradient overflowed is skipped and the scale lowered). Log-probs, the loss and ALP's
noise and sigma stay float32. Under FSDP2 (torchrun) the sharding's MixedPrecisionPolicy casts instead.

LoRA (`lora`): the model is wrapped by PEFT; only the adapters (and sigma) train, and the weights pushed
to the engine or saved are the base model's, Hugging Face names and shapes, with the adapters merged in.

pi_old is the policy before the step's first optimizer update, recomputed without noise on the same
micro-batches; it is computed only for the algorithms that need it, and for `mis_reject`: alp or bypass
whose loss drops the tokens (or sequences) MIS would reject, without MIS's reweighting.

The `mismatch/*` metrics always compare a noise-free forward of the policy before any update with the
engine: pi_old where it exists, the first update's forward for bypass, an extra no-grad forward of the
first update's micro-batches for alp.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from alp_agents.config import Config
from alp_agents.errors import ConfigError, TrajectoryError
from alp_agents.seeding import derive_seed
from alp_agents.trainers.advantages import grpo_advantages
from alp_agents.trainers.batching import Batch, collate
from alp_agents.trainers.logprobs import token_logprobs
from alp_agents.trainers.losses import (
    LossDiagnostics,
    PolicyLossConfig,
    aggregate,
    importance_weights,
    k3_kl,
    loss_units,
    mis_rejected,
    policy_loss,
)
from alp_agents.trainers.metrics import advantage_metrics, loss_metrics, mismatch_metrics, sigma_metrics
from alp_agents.trainers.perturbation import LayerPerturbation, LayerSelection
from alp_agents.trainers.run_dir import LoopState, RunDir
from alp_agents.trajectory import Trajectory

logger = logging.getLogger(__name__)

Algo = Literal["alp", "bypass", "grpo", "tis", "mis", "gspo"]
RECOMPUTES_OLD_POLICY = ("grpo", "tis", "mis", "gspo")
MIS_REJECT_ALGOS = ("alp", "bypass")
"""The algorithms whose ratio is against mu, to which `mis_reject` adds MIS's rejection."""
Precision = Literal["float32", "bfloat16", "float16"]
COMPUTE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_ADAPTER = "default"
"""PEFT's name of the one adapter the trainer adds."""
GSPO_LOSS_DEFAULTS = {"level": "geometric", "clip_low": 3e-4, "clip_high": 4e-4, "dual_clip": None}
"""GSPO's published settings, applied to every `loss` field the config leaves unset when algo='gspo'."""


class LoRAConfig(Config):
    """Low-rank adapters (PEFT LoRA) on the model's projections: W x + (alpha / rank) B A x, only A and B trained."""

    rank: int = Field(default=16, ge=1)
    """r, the rank of each adapter (A: r x in_features, B: out_features x r; B starts at 0, so step 0 is the base model)."""
    alpha: float = Field(default=32.0, gt=0.0)
    """Scale of the adapters' output: alpha / rank."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the adapters' input; > 0 makes pi_old and the mismatch metrics random too (the model stays in train mode)."""
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], min_length=1
    )
    """Names of the Linear modules that get an adapter (default: every attention and MLP projection of Qwen2/Llama)."""


class TrainerConfig(Config):
    """How ALPTrainer updates the policy: the algorithm, its loss, the optimizer and the batching."""

    algo: Algo = "alp"
    """alp | bypass | grpo | tis | mis | gspo (the table in the trainer's module docstring)."""
    loss: PolicyLossConfig = Field(default_factory=PolicyLossConfig, validate_default=True)
    """Ratio level, clip ranges, clamp, aggregation and the TIS/MIS bounds (for gspo, unset fields take GSPO's values)."""
    mis_reject: bool = False
    """alp and bypass only: recompute pi_old (no noise) and reject the loss tokens, or sequences (loss.correction_level),
    whose pi_old / mu is outside [loss.correction_low, loss.correction_high], without reweighting: the ratio stays
    pi_theta / mu (ALP stacked with MIS). loss.rejected_in_denominator says whether rejected tokens still count."""
    lr: float = Field(default=1e-6, gt=0.0)
    """AdamW learning rate of the model's weights (1e-6 suits 0.5B-7B models; the tiny model learns at ~1e-4)."""
    sigma_lr: float = Field(default=1e-3, ge=0.0)
    """AdamW learning rate of log(sigma), in its own parameter group without weight decay (alp only)."""
    sigma_init: Literal["relative", "absolute", "calibrated"] = "relative"
    """'relative': sigma_l = init_sigma * RMS of layer l's input, measured on the first batch; 'absolute': sigma_l = init_sigma;
    'calibrated': sigma_l = init_sigma * RMS(h_l(engine copy) - h_l(policy)) on the first batch, the engine's own error at
    layer l (needs ALPTrainer(..., engine_copy=...); a layer the engine reproduces exactly is floored at 1e-8 x its RMS)."""
    init_sigma: float = Field(default=3e-3, ge=0.0)
    """Initial noise scale (relative: 3e-3 is about the hidden-state error of a bfloat16 engine; calibrated: 1 = the
    engine's error). 0 fixes sigma at exactly 0 for good: alp then computes what bypass computes."""
    perturb_layers: LayerSelection = "all"
    """Points that get noise: 'all', 'early' | 'middle' | 'late' (thirds), 'logits' (final hidden state only) or indices."""
    micro_batch_size: int = Field(default=4, ge=1)
    """Episodes per forward/backward; gradients of the micro-batches of one update are accumulated."""
    updates_per_batch: int = Field(default=4, ge=1)
    """Optimizer steps per call of step(): the batch is split into this many shuffled mini-batches."""
    grad_clip: float = Field(default=1.0, gt=0.0)
    """Max gradient norm, applied to the model's weights and to log(sigma) separately."""
    weight_decay: float = Field(default=0.01, ge=0.0)
    """AdamW weight decay of matrices (biases, norms and log(sigma) get none)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    logprob_chunk_size: int = Field(default=1024, ge=1)
    """Token positions whose logits exist at once in token_logprobs (memory ~ chunk * vocabulary * 4 bytes)."""
    temperature: float = Field(default=1.0, gt=0.0)
    """Sampling temperature of the rollouts: log-probs are computed from logits / temperature, like the engine's. In a run
    it follows rollout.sampling.temperature (leave it unset; a different value is refused at load)."""
    kl_coef: float = Field(default=0.0, ge=0.0)
    """Weight of the k3 KL penalty to the initial model (kept as a frozen copy when > 0)."""
    adv_eps: float = Field(default=1e-6, gt=0.0)
    """eps in (R - mean) / (std + eps)."""
    adv_normalize_std: bool = True
    """Divide advantages by the group's reward std (False: Dr. GRPO's mean-centred rewards)."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in backward (less memory, ~30% more time); the noise is recomputed identically."""
    mask_void_turns: bool = False
    """Give loss mask 0 to the sampled tokens of void turns (neither a valid tool call nor an answer) in the update."""
    seed: int = Field(default=0, ge=0)
    """Seeds the mini-batch shuffle and every noise draw: same seed, model and data give the same step."""
    dtype: Precision = "float32"
    """Compute precision of the forwards: float32 | bfloat16 | float16 (autocast; float16 adds loss scaling). Weights,
    gradients, optimizer state, log-probs and ALP's sigma stay float32."""
    lora: LoRAConfig | None = None
    """Train LoRA adapters instead of every weight (null: full fine-tuning); the engine gets the merged weights. Fields
    (TOML [trainer.lora]): rank (16), alpha (32), dropout (0), target_modules (every attention and MLP projection)."""

    @field_validator("loss", mode="after")
    @classmethod
    def _gspo_loss(cls, loss: PolicyLossConfig, info: ValidationInfo) -> PolicyLossConfig:
        if info.data.get("algo") != "gspo":
            return loss
        if "level" in loss.model_fields_set and loss.level != "geometric":
            raise ValueError(f"algo='gspo' is the geometric sequence ratio; loss.level={loss.level!r} contradicts it")
        unset = {key: value for key, value in GSPO_LOSS_DEFAULTS.items() if key not in loss.model_fields_set}
        return loss.model_copy(update=unset)

    @field_validator("mis_reject", mode="after")
    @classmethod
    def _mis_reject_algo(cls, mis_reject: bool, info: ValidationInfo) -> bool:
        algo = info.data.get("algo")
        if mis_reject and algo not in MIS_REJECT_ALGOS:
            raise ValueError(
                f"mis_reject=True applies to algo 'alp' or 'bypass' (their ratio is against mu), not algo={algo!r}: "
                "mis already rejects, and tis/grpo/gspo ratios are against pi_old"
            )
        return mis_reject


class ALPTrainer:
    """Updates `model` in place from batches of trajectories with the algorithm `cfg.algo`.

    >>> trainer = ALPTrainer(model, TrainerConfig(algo="alp", lr=1e-5))   # doctest: +SKIP
    >>> metrics = trainer.step(trajectories)                               # doctest: +SKIP
    >>> engine.update_weights(trainer.policy_state_dict())                 # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, cfg: TrainerConfig, *, engine_copy: Callable[[nn.Module], nn.Module] | None = None) -> None:
        if cfg.algo == "alp" and cfg.sigma_init == "calibrated" and engine_copy is None:
            raise ConfigError(
                "sigma_init='calibrated' sets sigma from the engine's error at each layer: pass "
                "ALPTrainer(model, cfg, engine_copy=fn), fn(model) returning the model as the engine serves it "
                "(e.g. cast to bfloat16), or use sigma_init='relative' or 'absolute'"
            )
        self.cfg = cfg
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
        """Frozen copy of the initial model for the KL penalty (None when kl_coef is 0); copied before any hook or adapter exists."""
        self.model = with_lora(model, cfg.lora, seed=cfg.seed) if cfg.lora is not None else model
        """The policy being trained (in train mode): `model`, or a PeftModel around it with trainer.lora."""
        self.model.train()
        model = self.model  # from here on: the policy as trained (hooks and optimizer go on the PEFT wrapper's modules)
        self.perturbation = (
            LayerPerturbation(model, layers=cfg.perturb_layers, init_sigma=cfg.init_sigma) if cfg.algo == "alp" else None
        )
        """The ALP noise (None for every other algo)."""
        self.optimizer = build_optimizer(model, self.perturbation, cfg)
        """AdamW over the model's weights (decay / no-decay groups) and, for alp, log(sigma)."""
        self.num_updates = 0
        """Optimizer updates attempted so far, applied or skipped (each one seeds its own noise)."""
        self.num_skipped_updates = 0
        """Updates whose gradient was not finite: never applied."""
        self.engine_copy = engine_copy
        """fn(model) -> the model as the inference engine serves it (sigma_init='calibrated'), or None."""
        self.sigma_calibrated = self.perturbation is None or cfg.sigma_init == "absolute"
        """False until the first batch has set the relative or calibrated sigmas."""
        self._shuffle = torch.Generator().manual_seed(cfg.seed)
        self._pad_token_id = getattr(model.config, "pad_token_id", None) or 0
        self._device = next(model.parameters()).device
        self._autocast = cfg.dtype != "float32" and not _is_fsdp(model)  # FSDP2's MixedPrecisionPolicy casts the weights itself
        self.scaler = torch.amp.GradScaler(self._device.type) if cfg.dtype == "float16" else None
        """Loss scaling for float16 (its scale is part of `state_dict()`); None otherwise."""
        if cfg.dtype == "float16" and self._device.type == "cpu":
            logger.warning("trainer.dtype='float16' on a CPU works but is slow (27x float32 per step in "
                           "benchmarks/trainer_step.py: no float16 matmul kernels); bfloat16 is the fast CPU precision")

    # -- the update ------------------------------------------------------------------------------

    def step(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        """Run `updates_per_batch` optimizer updates on these episodes; return the step's metrics (README table)."""
        cfg = self.cfg
        batch = collate(trajectories, pad_token_id=self._pad_token_id, device=self._device, mask_void_turns=cfg.mask_void_turns)
        if len(batch) < cfg.updates_per_batch:
            raise TrajectoryError(f"step() got {len(batch)} trajectories but updates_per_batch={cfg.updates_per_batch} needs at least that many")
        group_advantages = grpo_advantages(batch.rewards, batch.group_ids, eps=cfg.adv_eps, normalize_std=cfg.adv_normalize_std)
        advantages = group_advantages.advantages  # (N,)
        order = torch.randperm(len(batch), generator=self._shuffle).to(self._device)
        plan = [update.split(cfg.micro_batch_size) for update in order.tensor_split(cfg.updates_per_batch)]
        micro = [[batch.rows(rows) for rows in update] for update in plan]  # micro[u][m]: Batch
        if not self.sigma_calibrated:
            self._calibrate_sigma(micro[0][0])
        old = self._frozen_logprobs(self.model, micro) if cfg.algo in RECOMPUTES_OLD_POLICY or cfg.mis_reject else None
        ref = self._frozen_logprobs(self.reference, micro) if self.reference is not None else None
        clean = self._clean_first_update(micro, old)  # [m]: noise-free pi_old of the first update, or None (bypass)
        corrections = [[loss_correction(old[u][m] if old is not None else None, mb, cfg) for m, mb in enumerate(update)]
                       for u, update in enumerate(micro)]  # [u][m]: (loss mask, weights, rejected)

        diagnostics: list[LossDiagnostics] = []
        entropies, train_side, infer_side, lengths = [], [], [], []
        sums = {name: torch.zeros((), device=self._device) for name in ("loss/policy", "loss/kl", "loss/total")}
        grad_norms: dict[str, list[float]] = {"policy": [], "sigma": []}
        skipped_before = self.num_skipped_updates
        for u, update in enumerate(micro):
            units = sum(loss_units(mask, cfg.loss.aggregation) for mask, _, _ in corrections[u])
            # Data parallel (torchrun + FSDP2): the loss is the mean over every rank's units and FSDP averages the
            # ranks' gradients, so this rank's gradient weighs its part of the global units (1.0 in one process).
            grad_scale = units * _world_size() / max(_sum_over_ranks(units, self._device), 1)
            for m, mb in enumerate(update):
                mask, weights, _ = corrections[u][m]
                share = loss_units(mask, cfg.loss.aggregation) / max(units, 1)
                behavior = old[u][m] if old is not None and cfg.algo in RECOMPUTES_OLD_POLICY else mb.infer_logprobs
                with self._noise(m):  # backward too: a checkpointed layer recomputes its forward, noise included
                    with self._compute():  # the forward only: backward runs each op in its forward's dtype by itself
                        logprobs, entropy = token_logprobs(
                            self.model, mb.input_ids, mb.attention_mask, chunk_size=cfg.logprob_chunk_size, temperature=cfg.temperature
                        )  # (b, t) each, float32
                    pg_loss, diag = policy_loss(logprobs, behavior, advantages[plan[u][m]], mask, cfg.loss, weights=weights)
                    kl_loss = aggregate(k3_kl(logprobs, ref[u][m]), mask, cfg.loss.aggregation) if ref is not None else pg_loss.new_zeros(())
                    loss = pg_loss + cfg.kl_coef * kl_loss
                    scaled = loss * (share * grad_scale)
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

                diagnostics.append(diag)
                entropies.append(entropy[mb.loss_mask])
                if u == 0:  # before any weight change: the train-inference mismatch alone, no staleness
                    train_side.append((clean[m] if clean is not None else logprobs.detach())[mb.loss_mask])
                    infer_side.append(mb.infer_logprobs[mb.loss_mask])
                    lengths.append(mb.loss_mask.sum(-1))
                for name, value in (("loss/policy", pg_loss), ("loss/kl", kl_loss), ("loss/total", loss)):
                    sums[name] += value.detach() * (share / cfg.updates_per_batch)
            policy_norm, sigma_norm = self._apply_gradients()
            grad_norms["policy"].append(policy_norm)
            grad_norms["sigma"].append(sigma_norm)

        metrics = {name: float(total) for name, total in sums.items()}
        metrics.update(loss_metrics(diagnostics))
        metrics.update(mismatch_metrics(torch.cat(train_side), torch.cat(infer_side), torch.cat(lengths)))
        metrics.update(advantage_metrics(group_advantages))
        entropy_values = torch.cat(entropies)
        metrics["entropy/mean"] = float(entropy_values.double().mean()) if entropy_values.numel() else math.nan
        metrics["grad/policy_norm"] = _mean(grad_norms["policy"])
        metrics["grad/policy_norm_max"] = max(grad_norms["policy"])
        if self.perturbation is not None:
            metrics["grad/sigma_norm"] = _mean(grad_norms["sigma"])
            metrics.update(sigma_metrics(self.perturbation.names, self.perturbation.sigmas()))
        if cfg.algo == "mis" or cfg.mis_reject:
            rejected = sum(int(r.sum()) for update in corrections for _, _, r in update)
            metrics["correction/rejected_fraction"] = rejected / max(int(batch.loss_mask.sum()), 1)
        if cfg.mask_void_turns:
            sampled = sum(t.num_sampled_tokens for t in trajectories)
            metrics["train/void_turn_token_fraction"] = 1.0 - float(batch.loss_mask.sum()) / max(sampled, 1)
        metrics["perf/tokens"] = float(batch.loss_mask.sum())
        metrics["perf/sequences"] = float(len(batch))
        metrics["perf/skipped_updates"] = float(self.num_skipped_updates - skipped_before)
        if self.scaler is not None:
            metrics["grad/loss_scale"] = float(self.scaler.get_scale())
        return metrics

    def _compute(self) -> Any:
        """The forward's precision: autocast to trainer.dtype (a no-op for float32, and under FSDP2, which casts itself)."""
        if not self._autocast:
            return nullcontext()
        return torch.autocast(self._device.type, dtype=COMPUTE_DTYPES[self.cfg.dtype])

    def _noise(self, micro_index: int) -> Any:
        """The perturbation's `active` block for this micro-batch of the current update (a no-op without ALP)."""
        if self.perturbation is None:
            return nullcontext()
        return self.perturbation.active(seed=derive_seed(self.cfg.seed, self.num_updates, micro_index, _rank()))

    def _clean_first_update(self, micro: list[list[Batch]], old: list[list[Tensor]] | None) -> list[Tensor] | None:
        """Noise-free log-probs of the first update's micro-batches before any weight change, for `mismatch/*`.

        pi_old when it was recomputed; for alp an extra no-grad forward (its update forward is noisy); None
        for bypass, whose first update's own forward is already exactly that.
        """
        if old is not None:
            return old[0]
        return self._frozen_logprobs(self.model, micro[:1])[0] if self.perturbation is not None else None

    @torch.no_grad()
    def _frozen_logprobs(self, model: nn.Module, micro: list[list[Batch]]) -> list[list[Tensor]]:
        """Log-probs of `model` without noise or gradient on each micro-batch (pi_old or the reference)."""
        chunk, temperature = self.cfg.logprob_chunk_size, self.cfg.temperature
        with self._compute():  # the same precision as the update's forward, so that pi_theta = pi_old before any change
            return [
                [token_logprobs(model, mb.input_ids, mb.attention_mask, chunk_size=chunk, temperature=temperature)[0] for mb in update]
                for update in micro
            ]

    def _apply_gradients(self) -> tuple[float, float]:
        """Clip, then step AdamW unless a gradient is not finite (then the update is skipped and counted).

        float16: the gradients are unscaled first, so clipping and the norms see the true values; an overflow
        (a non-finite norm) skips the update and the GradScaler lowers its scale.
        """
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        policy = [p for p in self.model.parameters() if p.grad is not None]
        norms = torch.zeros(2, device=self._device)  # (policy, sigma) gradient norms before clipping
        if policy:
            norms[0] = _full(torch.nn.utils.clip_grad_norm_(policy, self.cfg.grad_clip))
        if self.perturbation is not None and self.perturbation.log_sigma.grad is not None:
            norms[1] = torch.nn.utils.clip_grad_norm_([self.perturbation.log_sigma], self.cfg.grad_clip)
        policy_norm, sigma_norm = norms.tolist()  # one device sync for both
        if math.isfinite(policy_norm) and math.isfinite(sigma_norm):
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # steps: unscale_ found no inf, as the finite norms say
            else:
                self.optimizer.step()
        else:
            self.num_skipped_updates += 1
            scale = f" at float16 loss scale {self.scaler.get_scale()}" if self.scaler is not None else ""
            logger.warning("update %d skipped: gradient norm is not finite%s (policy %s, sigma %s)",
                           self.num_updates, scale, policy_norm, sigma_norm)
        if self.scaler is not None:
            self.scaler.update()  # halves the scale after an overflow, grows it after growth_interval clean updates
        self.optimizer.zero_grad(set_to_none=True)
        self.num_updates += 1
        return policy_norm, sigma_norm

    def _calibrate_sigma(self, mb: Batch) -> None:
        """Set the relative or calibrated sigmas from this micro-batch (once, on the first batch).

        Measured in float32 whatever trainer.dtype: the hidden states' scale, and the engine's error against the
        exact model, are what sigma is a fraction of.
        """
        assert self.perturbation is not None
        if self.cfg.sigma_init == "calibrated":
            assert self.engine_copy is not None  # checked in __init__
            engine = self.engine_copy(self.model)  # now, so the copy has the weights the engine sampled with
            error = self.perturbation.calibrate_to(engine, mb.input_ids, mb.attention_mask, scale=self.cfg.init_sigma)
            del engine
            logger.info("sigma set to %s x the engine's error at each point %s", self.cfg.init_sigma, error.tolist())
        else:
            rms = self.perturbation.calibrate(mb.input_ids, mb.attention_mask, relative_sigma=self.cfg.init_sigma)
            logger.info("sigma set to %s x the input RMS of each point %s", self.cfg.init_sigma, [round(x, 4) for x in rms.tolist()])
        self.sigma_calibrated = True

    # -- weights and checkpoints -----------------------------------------------------------------

    def policy_state_dict(self) -> dict[str, Tensor]:
        """The weights to push to the inference engine: the model's own float32 tensors, each stored once.

        No perturbation parameter is ever included. A tied weight (e.g. lm_head.weight sharing
        embed_tokens.weight) appears once, under its first name; the engine re-ties it from the model
        config. The tensors are detached views of the live weights: copy them to keep a snapshot.
        With trainer.lora: the base model's names and shapes, each adapted weight merged (a new tensor).
        """
        state = merged_weights(self.model) if isinstance(self.model, PeftModel) else self.model.state_dict()
        weights: dict[str, Tensor] = {}
        seen: set[tuple[int, int, tuple[int, ...]]] = set()
        for name, tensor in state.items():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if tensor.numel() > 0 and key in seen:
                continue
            seen.add(key)
            weights[name] = tensor.detach()
        return weights

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly: weights, optimizer (sigma group included), sigmas, counters, RNG."""
        return {
            "algo": self.cfg.algo,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "log_sigma": self.perturbation.log_sigma.detach().clone() if self.perturbation is not None else None,
            "reference": self.reference.state_dict() if self.reference is not None else None,
            "num_updates": self.num_updates,
            "num_skipped_updates": self.num_skipped_updates,
            "sigma_calibrated": self.sigma_calibrated,
            "shuffle_rng": self._shuffle.get_state(),
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "lora": self.cfg.lora.model_dump() if self.cfg.lora is not None else None,
        }

    def save_checkpoint(self, run: RunDir, tokenizer: PreTrainedTokenizerBase, state: LoopState) -> None:
        """The model (a Hugging Face directory), this trainer's `state_dict()` and the loop's state, in `run`'s checkpoint.

        With trainer.lora the model directory holds the merged weights (`alp eval --model` loads it), `adapter/`
        the adapters alone (PEFT format), and trainer.pt the unmerged base weights and adapters that resume needs.
        """
        if isinstance(self.model, PeftModel):
            run.save_checkpoint(self.model.get_base_model(), tokenizer, self.state_dict(), state,
                                weights=self.policy_state_dict(), adapter=self.model)
        else:
            run.save_checkpoint(self.model, tokenizer, self.state_dict(), state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` saved by a trainer with the same algo and model architecture."""
        if state["algo"] != self.cfg.algo:
            raise ConfigError(f"checkpoint was saved with algo={state['algo']!r} but this trainer runs algo={self.cfg.algo!r}")
        if (state["reference"] is None) != (self.reference is None):
            raise ConfigError("checkpoint and trainer disagree on the KL reference model: set kl_coef as when it was saved")
        lora = self.cfg.lora.model_dump() if self.cfg.lora is not None else None
        if state.get("lora") != lora:
            raise ConfigError(f"checkpoint was saved with trainer.lora={state.get('lora')} but this trainer has trainer.lora={lora}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.perturbation is not None:
            with torch.no_grad():
                self.perturbation.log_sigma.copy_(state["log_sigma"])
        if self.reference is not None:
            self.reference.load_state_dict(state["reference"])
        self.num_updates = state["num_updates"]
        self.num_skipped_updates = state["num_skipped_updates"]
        self.sigma_calibrated = state["sigma_calibrated"]
        self._shuffle.set_state(state["shuffle_rng"])
        if self.scaler is not None and state.get("grad_scaler") is not None:  # a float32/bfloat16 checkpoint starts a new scale
            self.scaler.load_state_dict(state["grad_scaler"])


def loss_correction(old: Tensor | None, mb: Batch, cfg: TrainerConfig) -> tuple[Tensor, Tensor | None, Tensor]:
    """One micro-batch's (loss mask, loss weights, rejected tokens) after the algorithm's pi_old / mu correction.

    tis: weights min(w, cap). mis: weights w, 0 where rejected (w outside [low, high]). mis_reject (alp,
    bypass): weights 1, 0 where rejected, so the ratio stays pi_theta / mu. When
    loss.rejected_in_denominator is False a rejected token also leaves the mask, hence the denominator
    and `loss_units` (the micro-batch weighting then still sums to the whole batch's loss).
    """
    mask, nothing = mb.loss_mask, torch.zeros_like(mb.loss_mask)
    if old is None or cfg.algo not in ("tis", "mis") and not cfg.mis_reject:
        return mask, None, nothing
    if cfg.algo == "tis":
        return mask, importance_weights(old, mb.infer_logprobs, mask, cfg.loss, kind="tis"), nothing
    rejected = mis_rejected(old, mb.infer_logprobs, mask, cfg.loss)  # (b, t)
    if cfg.algo == "mis":
        weights: Tensor | None = importance_weights(old, mb.infer_logprobs, mask, cfg.loss, kind="mis")
    else:
        weights = (~rejected).to(old.dtype) if cfg.loss.rejected_in_denominator else None
    if not cfg.loss.rejected_in_denominator:
        mask = mask & ~rejected
    return mask, weights, rejected


def build_optimizer(model: nn.Module, perturbation: LayerPerturbation | None, cfg: TrainerConfig) -> torch.optim.AdamW:
    """AdamW with up to three groups: matrices (weight decay), vectors (biases, norms: none), log(sigma) (own lr, none)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if perturbation is not None:
        groups.append({"params": [perturbation.log_sigma], "weight_decay": 0.0, "lr": cfg.sigma_lr, "name": "sigma"})
    groups = [group for group in groups if group["params"]]
    for group in groups:
        logger.info("optimizer group %s: %d tensors, %d parameters", group["name"], len(group["params"]), sum(p.numel() for p in group["params"]))
    fused = all(p.is_cuda for group in groups for p in group["params"])  # one kernel per group on a GPU (as nanoGPT)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)


def with_lora(model: nn.Module, cfg: LoRAConfig, *, seed: int) -> PeftModel:
    """`model` wrapped by PEFT with one LoRA adapter per target module; every other weight is frozen.

    The random A matrices are drawn from `seed`, apart from the global RNG: the same seed gives the same adapters.
    """
    found = {name.rpartition(".")[2] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = sorted(set(cfg.target_modules) - found)
    if missing:
        raise ConfigError(f"trainer.lora.target_modules names {missing}, which {type(model).__name__} has no Linear "
                          f"module called; its Linear modules are {sorted(found)}")
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules))
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config, adapter_name=LORA_ADAPTER)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("LoRA rank %d on %s: %d trainable parameters of %d", cfg.rank, cfg.target_modules, trainable,
                sum(p.numel() for p in peft_model.parameters()))
    return peft_model


@torch.no_grad()
def merged_weights(model: PeftModel) -> dict[str, Tensor]:
    """The base model's state dict under its Hugging Face names, each adapted weight merged: W + (alpha / r) B A.

    Computed beside the live weights (no merge in place and back, which would round W), in their float32.
    """
    base = model.get_base_model()
    adapted = {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    weights: dict[str, Tensor] = {}
    for name, tensor in base.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if ".lora_" in name:
            continue  # the adapters themselves: merged into their base weight below
        if owner.endswith(".base_layer"):
            owner = owner.removesuffix(".base_layer")
            name = f"{owner}.{leaf}"
            if leaf == "weight":
                tensor = tensor + adapted[owner].get_delta_weight(LORA_ADAPTER).to(tensor.dtype)
        weights[name] = tensor.detach()
    return weights


def training_device() -> torch.device:
    """This process's GPU (torchrun's LOCAL_RANK, 0 without torchrun) when there are GPUs, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def load_policy(model_dir: str | Path) -> PreTrainedModel:
    """A Hugging Face causal LM to train: float32 weights on `training_device()`."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(training_device())


def _is_fsdp(model: nn.Module) -> bool:
    """Whether FSDP2 shards part of `model` (then its MixedPrecisionPolicy, not autocast, sets the compute dtype)."""
    return any(isinstance(module, FSDPModule) for module in model.modules())


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _world_size() -> int:
    return torch.distributed.get_world_size() if _distributed() else 1


def _sum_over_ranks(value: int, device: torch.device) -> int:
    """`value` summed over the ranks of the default process group (`value` itself in a single process)."""
    if _world_size() == 1:
        return value
    total = torch.tensor(value, dtype=torch.int64, device=device)
    torch.distributed.all_reduce(total)
    return int(total)


def _full(norm: Tensor) -> Tensor:
    """A gradient norm as a plain tensor: over FSDP2's sharded gradients it is a DTensor holding the global norm."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
