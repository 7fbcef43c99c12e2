"""trainer.dtype: bf16/fp16 compute over float32 master weights, float32 log-probs and sigma, fp16 loss scaling.

The CPU runs bf16 and fp16 autocast for real (bf16 through avx512_bf16 here), so every assertion below is
about numbers that change when the precision does: log-probs move by a measured amount, weights stay
float32, an overflowing loss scale skips its update.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from alp_agents.config import load_config
from alp_agents.errors import ConfigError
from alp_agents.trainers import ALPTrainer, collate, token_logprobs
from alp_agents.trainers.perturbation import find_decoder_layers
from alp_agents.trainers.run_config import TrainConfig
from alp_agents.trajectory import Trajectory

from test_alp_trainer import make_trajectories, small_config

BF16_MAX_ABS_LOGPROB_ERROR = 0.05
"""Largest |log p(bf16 compute) - log p(fp32)| on a loss token allowed. Measured on the tiny model: 1.0e-2 (mean 3.6e-3)."""
FP16_MAX_ABS_LOGPROB_ERROR = 0.01
"""The same for fp16 (10 mantissa bits against bf16's 7). Measured: 1.5e-3 (mean 4.3e-4)."""
AUTOCAST_RAN = 1e-4
"""Smallest max difference that shows the low precision really ran (float32 reproduces itself exactly)."""


@pytest.fixture
def load(tiny_model_dir):
    return lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def with_exact_engine(model, trajectories: list[Trajectory]) -> list[Trajectory]:
    """The episodes with the engine's log-probs replaced by the float32 model's own (chunked, as the trainer computes)."""
    batch = collate(trajectories)
    with torch.no_grad():
        exact, _ = token_logprobs(model, batch.input_ids, batch.attention_mask)  # (N, T)
    return [
        t.model_copy(update={"infer_logprobs": [float(lp) if m else 0.0 for lp, m in zip(exact[i, : len(t.token_ids)], t.loss_mask)]})
        for i, t in enumerate(trajectories)
    ]


def test_bf16_step_keeps_float32_master_weights_and_optimizer_state(load):
    model = load()
    trajectories = make_trajectories(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = ALPTrainer(model, small_config(algo="bypass", dtype="bfloat16"))
    metrics = trainer.step(trajectories)

    assert torch.isfinite(torch.tensor(metrics["loss/total"])) and metrics["perf/skipped_updates"] == 0
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    moments = [value for state in trainer.optimizer.state.values() for key, value in state.items() if key != "step"]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    moved = max(float((p.detach() - before[name]).abs().max()) for name, p in model.named_parameters())
    assert moved > 1e-4  # lr 1e-3, two AdamW updates
    assert {t.dtype for t in trainer.policy_state_dict().values()} == {torch.float32}  # the engine casts to its own dtype


@pytest.mark.parametrize(("dtype", "bound"), [(torch.bfloat16, BF16_MAX_ABS_LOGPROB_ERROR), (torch.float16, FP16_MAX_ABS_LOGPROB_ERROR)])
def test_low_precision_logprobs_are_float32_close_to_fp32_and_not_identical(load, dtype, bound):
    model = load()
    batch = collate(make_trajectories(model))
    with torch.no_grad():
        exact, _ = token_logprobs(model, batch.input_ids, batch.attention_mask)
        with torch.autocast("cpu", dtype=dtype):
            low, _ = token_logprobs(model, batch.input_ids, batch.attention_mask)
    assert low.dtype == torch.float32  # log_softmax of the (rounded) logits in float32
    error = (low - exact)[batch.loss_mask].abs().max().item()
    assert AUTOCAST_RAN < error < bound


def test_trainer_computes_in_its_dtype(load):
    """Against an engine that reproduces the float32 model exactly, only the trainer's own precision makes a mismatch."""
    trajectories = with_exact_engine(load(), make_trajectories(load()))
    mismatch = {
        dtype: ALPTrainer(load(), small_config(algo="grpo", dtype=dtype)).step(trajectories)["mismatch/max_abs_log_ratio"]
        for dtype in ("float32", "bfloat16")
    }
    assert mismatch["float32"] < 1e-6
    assert AUTOCAST_RAN < mismatch["bfloat16"] < BF16_MAX_ABS_LOGPROB_ERROR


def test_alp_noise_and_sigma_stay_float32_under_bf16(load):
    model = load()
    trainer = ALPTrainer(model, small_config(algo="alp", dtype="bfloat16", sigma_init="absolute", init_sigma=1e-2, sigma_lr=1e-2))
    seen: list[torch.dtype] = []
    layers = find_decoder_layers(model)
    # registered after ALP's hooks, so it sees each layer's input with the noise already added
    handles = [layer.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).dtype),
                                               with_kwargs=True) for layer in layers]
    before = trainer.perturbation.log_sigma.detach().clone()
    metrics = trainer.step(make_trajectories(model))
    for handle in handles:
        handle.remove()

    assert set(seen) == {torch.float32}  # the residual stream under autocast: the noise is added in float32
    assert trainer.perturbation.log_sigma.dtype == torch.float32
    assert metrics["grad/sigma_norm"] > 0
    assert not torch.equal(trainer.perturbation.log_sigma.detach(), before)  # sigma learned from its float32 gradient
    sigma_state = trainer.optimizer.state[trainer.perturbation.log_sigma]
    assert sigma_state["exp_avg"].dtype == torch.float32


def test_fp16_trains_with_a_loss_scale_kept_in_the_checkpoint(load):
    model = load()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = ALPTrainer(model, small_config(algo="bypass", dtype="float16"))
    metrics = trainer.step(make_trajectories(model))

    assert metrics["perf/skipped_updates"] == 0 and metrics["grad/loss_scale"] == 2.0**16  # GradScaler's initial scale
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert max(float((p.detach() - before[name]).abs().max()) for name, p in model.named_parameters()) > 1e-4
    state = trainer.state_dict()
    assert state["grad_scaler"]["scale"] == 2.0**16

    state["grad_scaler"]["scale"] = 1024.0
    resumed = ALPTrainer(load(), small_config(algo="bypass", dtype="float16"))
    resumed.load_state_dict(state)
    assert resumed.scaler.get_scale() == 1024.0


def test_fp16_update_whose_scaled_gradient_overflows_is_skipped_and_lowers_the_scale(load):
    model = load()
    trainer = ALPTrainer(model, small_config(algo="bypass", dtype="float16", updates_per_batch=1))
    state = trainer.state_dict()
    state["grad_scaler"] = {**state["grad_scaler"], "scale": 2.0**100}  # far past float16's 65504: backward gives inf
    trainer.load_state_dict(state)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    metrics = trainer.step(make_trajectories(model))

    assert metrics["perf/skipped_updates"] == 1
    assert all(torch.equal(p.detach(), before[name]) for name, p in model.named_parameters())
    assert metrics["grad/loss_scale"] == 2.0**99  # halved by the overflow
    assert not trainer.optimizer.state  # AdamW never stepped: no moments


def test_float32_has_no_loss_scale(load):
    trainer = ALPTrainer(load(), small_config(algo="bypass"))
    assert trainer.scaler is None and trainer.state_dict()["grad_scaler"] is None


def test_a_bad_dtype_names_trainer_dtype():
    with pytest.raises(ConfigError, match=r"trainer\.dtype"):
        load_config(TrainConfig, None, ["trainer.dtype=fp8"])
