"""ALPTrainer end to end on the tiny model: every algo, learning, determinism, checkpoints, weight export."""

from __future__ import annotations

import io
import math

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from alp_agents.errors import ConfigError, TrajectoryError
from alp_agents.trainers import ALPTrainer, TrainerConfig, collate, token_logprobs_naive
from alp_agents.trajectory import Trajectory

PROMPT_LENGTH = 6
ALGOS = ["alp", "bypass", "grpo", "tis", "mis", "gspo"]
DOCUMENTED = [  # every step reports at least these (README metrics table)
    "loss/policy", "loss/kl", "loss/total", "ratio/p1", "ratio/p50", "ratio/p99", "ratio/min", "ratio/max", "ratio/mean",
    "clip/low", "clip/high", "clip/dual", "kl/k1", "kl/k3", "mismatch/k1", "mismatch/k3", "mismatch/chi2", "mismatch/ess",
    "mismatch/log_ratio_std", "mismatch/prob_pearson", "mismatch/prob_abs_diff_mean", "mismatch/prob_abs_diff_max",
    "adv/mean", "adv/std", "adv/groups", "adv/constant_groups", "entropy/mean", "grad/policy_norm", "grad/policy_norm_max",
    "perf/tokens", "perf/sequences", "perf/skipped_updates",
    "mismatch/token_p1", "mismatch/token_p99", "mismatch/max_abs_log_ratio", "mismatch/seq_p2", "mismatch/seq_p98",
    "mismatch/seq_log_width", "mismatch/sample_nll", "loss_seq/p1", "loss_seq/p50", "loss_seq/p99", "loss_seq/log_width",
]  # fmt: skip


@pytest.fixture
def load(tiny_model_dir):
    """A fresh copy of the tiny model (seed 0) per call."""
    return lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def make_trajectories(model, *, groups: int = 2, group_size: int = 4, seed: int = 0) -> list[Trajectory]:
    """Random episodes with a masked tool-output span; the engine's log-probs are the model's plus noise
    (a stand-in for a low-precision engine); in each group only the first episode is rewarded."""
    generator = torch.Generator().manual_seed(seed)
    trajectories = []
    for i in range(groups * group_size):
        n = 16 + 3 * (i % 3)
        token_ids = torch.randint(0, model.config.vocab_size, (n,), generator=generator)
        loss_mask = [0] * PROMPT_LENGTH + [1] * (n - PROMPT_LENGTH)
        loss_mask[PROMPT_LENGTH + 4 : PROMPT_LENGTH + 7] = [0, 0, 0]  # tool output inserted by the loop
        with torch.no_grad():
            logprobs = token_logprobs_naive(model, token_ids[None], torch.ones(1, n, dtype=torch.long))[0][0]
        logprobs = (logprobs + 0.02 * torch.randn(n, generator=generator)).clamp(max=0.0)
        trajectories.append(
            Trajectory(
                token_ids=token_ids.tolist(),
                loss_mask=loss_mask,
                infer_logprobs=[float(lp) if m else 0.0 for lp, m in zip(logprobs, loss_mask)],
                prompt_length=PROMPT_LENGTH,
                reward=float(i % group_size == 0),
                group_id=f"task-{i // group_size}",
            )
        )
    return trajectories


def sequence_logprobs(model, trajectories: list[Trajectory]) -> torch.Tensor:
    """Sum of each episode's log-probs over its loss tokens, under `model` now."""
    batch = collate(trajectories)
    with torch.no_grad():
        logprobs, _ = token_logprobs_naive(model, batch.input_ids, batch.attention_mask)
    return (logprobs * batch.loss_mask).sum(-1)


def small_config(**overrides) -> TrainerConfig:
    return TrainerConfig(**{"lr": 1e-3, "micro_batch_size": 2, "updates_per_batch": 2, **overrides})


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algo_steps_and_reports_finite_documented_metrics(algo, load):
    model = load()
    trajectories = make_trajectories(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    metrics = ALPTrainer(model, small_config(algo=algo)).step(trajectories)
    assert set(DOCUMENTED) <= set(metrics)
    assert all(math.isfinite(value) for value in metrics.values())
    assert metrics["perf/tokens"] == sum(t.num_sampled_tokens for t in trajectories)
    assert metrics["perf/skipped_updates"] == 0
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert ("sigma/mean" in metrics) == (algo == "alp")
    assert ("correction/rejected_fraction" in metrics) == (algo == "mis")


def test_rewarded_episodes_become_more_likely(load):
    model = load()
    trajectories = make_trajectories(model)
    rewarded = torch.tensor([t.reward == 1.0 for t in trajectories])
    before = sequence_logprobs(model, trajectories)
    trainer = ALPTrainer(model, small_config(algo="alp"))
    for _ in range(3):
        trainer.step(trajectories)
    change = sequence_logprobs(model, trajectories) - before
    assert change[rewarded].min() > 0 > change[~rewarded].max()


def test_grpo_ratio_is_one_before_the_weights_move(load):
    model = load()
    metrics = ALPTrainer(model, small_config(algo="grpo", updates_per_batch=1)).step(make_trajectories(model))
    assert metrics["ratio/min"] == pytest.approx(1.0, abs=1e-5) and metrics["ratio/max"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["mismatch/log_ratio_std"] == pytest.approx(0.02, rel=0.3)  # the engine noise of make_trajectories


def test_alp_ratio_envelope_is_wider_than_bypass_on_the_same_batch(load):
    model = load()
    trajectories = make_trajectories(model)
    config = dict(updates_per_batch=1, sigma_init="absolute", init_sigma=0.05)
    bypass = ALPTrainer(load(), small_config(algo="bypass", **config)).step(trajectories)
    alp = ALPTrainer(load(), small_config(algo="alp", **config)).step(trajectories)
    assert alp["ratio/p99"] - alp["ratio/p1"] > bypass["ratio/p99"] - bypass["ratio/p1"]
    assert alp["grad/sigma_norm"] > 0


def test_same_seed_same_step(load):
    model = load()
    trajectories = make_trajectories(model)
    runs = []
    for _ in range(2):
        trainer = ALPTrainer(load(), small_config(algo="alp", seed=3))
        metrics = [trainer.step(trajectories) for _ in range(2)]
        runs.append((metrics, trainer.policy_state_dict(), trainer.perturbation.sigmas()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    assert torch.equal(runs[0][2], runs[1][2])
    other = ALPTrainer(load(), small_config(algo="alp", seed=4)).step(trajectories)
    assert other != runs[0][0][0]


def test_checkpoint_resumes_bit_exactly(load):
    model = load()
    first, second = make_trajectories(model, seed=1), make_trajectories(model, seed=2)
    config = small_config(algo="alp", kl_coef=0.1)
    trainer = ALPTrainer(load(), config)
    trainer.step(first)
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    expected = trainer.step(second)

    resumed = ALPTrainer(load(), config)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert resumed.step(second) == expected
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), trainer.model.parameters()))
    assert torch.equal(resumed.perturbation.log_sigma, trainer.perturbation.log_sigma)
    with pytest.raises(ConfigError, match="algo='alp'"):
        ALPTrainer(load(), small_config(algo="bypass")).load_state_dict(trainer.state_dict())


def test_policy_state_dict_holds_model_weights_once_and_no_perturbation(load):
    trainer = ALPTrainer(load(), small_config(algo="alp"))
    weights = trainer.policy_state_dict()
    full = trainer.model.state_dict()
    assert "lm_head.weight" not in weights  # tied to model.embed_tokens.weight, which is kept
    assert set(weights) == set(full) - {"lm_head.weight"}
    assert not any("sigma" in name for name in weights)
    assert all(torch.equal(weights[name], full[name]) and not weights[name].requires_grad for name in weights)


def test_non_finite_gradients_skip_the_update(load):
    model = load()
    trajectories = make_trajectories(model)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    trainer = ALPTrainer(model, small_config(algo="bypass"))
    metrics = trainer.step(trajectories)
    assert metrics["perf/skipped_updates"] == 2 and trainer.num_skipped_updates == 2
    for after, original in zip(model.parameters(), before):
        torch.testing.assert_close(after, original, rtol=0, atol=0, equal_nan=True)
    assert not trainer.optimizer.state  # AdamW never stepped


def test_kl_penalty_to_the_initial_model(load):
    model = load()
    trajectories = make_trajectories(model)
    trainer = ALPTrainer(model, small_config(algo="grpo", kl_coef=0.5))
    reference = [p.detach().clone() for p in trainer.reference.parameters()]
    first = trainer.step(trajectories)
    second = trainer.step(trajectories)
    assert 0 <= first["loss/kl"] < second["loss/kl"]
    assert second["loss/total"] == pytest.approx(second["loss/policy"] + 0.5 * second["loss/kl"], abs=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(trainer.reference.parameters(), reference))


def test_relative_sigma_is_set_from_the_first_batch(load):
    model = load()
    trajectories = make_trajectories(model)
    trainer = ALPTrainer(model, small_config(algo="alp", init_sigma=0.01, sigma_lr=0.0, perturb_layers="late"))
    batch = collate(trajectories)
    rms = trainer.perturbation.calibrate(batch.input_ids, batch.attention_mask, relative_sigma=0.01)
    metrics = trainer.step(trajectories)
    assert trainer.perturbation.names == ["layer_3"]
    assert metrics["sigma/layer_3"] == pytest.approx(0.01 * rms.item(), rel=0.1)  # the trainer measures one micro-batch


def test_gradient_checkpointing_gives_the_same_step(load):
    model = load()
    trajectories = make_trajectories(model)
    plain = ALPTrainer(load(), small_config(algo="alp")).step(trajectories)
    checkpointed = ALPTrainer(load(), small_config(algo="alp", gradient_checkpointing=True)).step(trajectories)
    assert checkpointed == pytest.approx(plain, rel=1e-4, abs=1e-6)


def test_any_hf_decoder_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
    )
    model = LlamaForCausalLM(config)
    metrics = ALPTrainer(model, small_config(algo="alp")).step(make_trajectories(model))
    assert {f"sigma/layer_{i}" for i in range(3)} <= set(metrics)
    assert all(math.isfinite(value) for value in metrics.values())


def test_collate_pads_right_and_numbers_groups(load):
    model = load()
    trajectories = make_trajectories(model, groups=2, group_size=2)
    batch = collate(trajectories, pad_token_id=7)
    lengths = [len(t.token_ids) for t in trajectories]
    assert batch.input_ids.shape == (4, max(lengths))
    assert batch.attention_mask.sum(-1).tolist() == lengths
    assert batch.group_ids.tolist() == [0, 0, 1, 1]
    assert batch.input_ids[0, lengths[0] :].eq(7).all()
    assert batch.loss_mask[1, : lengths[1]].tolist() == [bool(m) for m in trajectories[1].loss_mask]
    assert batch.rows(torch.tensor([0])).input_ids.shape == (1, lengths[0])  # padding trimmed
    with pytest.raises(TrajectoryError, match="empty"):
        collate([])


def test_invalid_settings_fail_early_naming_the_field(load):
    with pytest.raises(ValidationError, match="micro_batch_size"):
        TrainerConfig(micro_batch_size=0)
    with pytest.raises(ValidationError, match="algo"):
        TrainerConfig(algo="ppo")
    with pytest.raises(ValidationError, match="geometric"):
        TrainerConfig(algo="gspo", loss={"level": "token"})
    assert TrainerConfig(algo="gspo").loss.clip_high == 4e-4
    assert TrainerConfig(algo="gspo", loss={"clip_high": 1e-3}).loss.clip_high == 1e-3
    with pytest.raises(ConfigError, match="perturb_layers"):
        ALPTrainer(load(), small_config(algo="alp", perturb_layers=[9]))
    model = load()
    with pytest.raises(TrajectoryError, match="updates_per_batch=2"):
        ALPTrainer(model, small_config()).step(make_trajectories(model)[:1])
