"""The mismatch lab: fake-quantised engine weights, the grid runner (resumable) and its report, on a real engine."""

from __future__ import annotations

import asyncio
import io
import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from alp_agents.engines import SamplingConfig
from alp_agents.engines.quantize import (
    FakeQuantizedEngine,
    Quantization,
    engine_view,
    fake_quantize,
    fake_quantize_tensor,
    serving_exact_weights,
)
from alp_agents.errors import ConfigError
from alp_agents.lab import grid, is_finished, load_lab_config, run_config, run_lab
from alp_agents.lab_report import Summary, compare, write_report
from test_demo import SHRUNK as DEMO_SHRUNK

SHRUNK = DEMO_SHRUNK + ["rl.schedule.eval_every=1", "rl.schedule.checkpoint_every=1"]
"""The shipped lab at a size a test can afford (the demo test's sizes); every stage still runs for real."""


# -- fake quantisation --------------------------------------------------------------------------------


def test_fake_quantisation_rounds_each_group_to_its_grid():
    weight = torch.randn(4, 64)
    q = Quantization(bits=4, group_size=32)
    out = fake_quantize_tensor(weight, q)
    for row in range(4):
        for group in range(2):
            original, rounded = weight[row, group * 32:(group + 1) * 32], out[row, group * 32:(group + 1) * 32]
            scale = original.abs().max() / 7
            levels = rounded / scale
            assert torch.allclose(levels, levels.round(), atol=1e-4)  # on the grid
            assert levels.min() >= -8 - 1e-4 and levels.max() <= 7 + 1e-4
            assert (rounded - original).abs().max() <= scale / 2 + 1e-6  # round to nearest
    int8 = fake_quantize_tensor(weight, Quantization(bits=8, group_size=None))
    assert (int8 - weight).abs().max() < (out - weight).abs().max()  # 8 bits per row: finer than 4 bits per group
    int3 = fake_quantize_tensor(weight, Quantization(bits=3, group_size=32))
    assert len(int3[0, :32].unique()) <= 8 and (int3 - weight).abs().mean() > (out - weight).abs().mean()


def test_only_matrices_outside_the_embedding_are_quantised(tiny_weights):
    quantised = fake_quantize(tiny_weights, Quantization())
    assert torch.equal(quantised["model.embed_tokens.weight"], tiny_weights["model.embed_tokens.weight"])
    assert torch.equal(quantised["model.norm.weight"], tiny_weights["model.norm.weight"])
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(quantised[up], tiny_weights[up])
    with pytest.raises(ValueError, match="groups of 48"):
        fake_quantize_tensor(torch.randn(2, 64), Quantization(group_size=48))


def test_a_quantised_push_serves_exactly_the_quantised_weights_and_a_float32_push_restores_them(vllm_engine, tiny_weights, hf_logprobs):
    prompt = [5, 17, 33, 2, 91, 40]
    sampling = SamplingConfig(temperature=1.0, max_tokens=24, ignore_eos=True, seed=11)
    quantised_weights = fake_quantize(tiny_weights, Quantization(bits=4, group_size=32))

    async def run() -> tuple:
        engine = FakeQuantizedEngine(vllm_engine, Quantization(bits=4, group_size=32))
        await engine.update_weights(tiny_weights, vllm_engine.policy_version + 1)
        quantised = await engine.generate(prompt, sampling)
        async with serving_exact_weights(engine, lambda: tiny_weights, engine.policy_version):  # what evaluation does
            exact = await engine.generate(prompt, sampling)
        quantised_again = await engine.generate(prompt, sampling)
        await vllm_engine.update_weights(tiny_weights, vllm_engine.policy_version + 1)
        restored = await vllm_engine.generate(prompt, sampling)
        return quantised, exact, quantised_again, restored

    quantised, exact, quantised_again, restored = asyncio.run(run())
    assert quantised_again.token_ids == quantised.token_ids and quantised_again.logprobs == quantised.logprobs
    assert (torch.tensor(exact.logprobs) - torch.tensor(hf_logprobs(prompt, exact.token_ids))).abs().max() < 1e-4
    served = torch.tensor(quantised.logprobs)
    as_quantised = torch.tensor(hf_logprobs(prompt, quantised.token_ids, weights=quantised_weights))
    as_float32 = torch.tensor(hf_logprobs(prompt, quantised.token_ids))
    assert (served - as_quantised).abs().max() < 1e-4  # the engine serves the int4 round trip...
    assert (served - as_float32).abs().max() > 1e-3  # ...which is a real mismatch against the trainer's float32 weights
    assert (torch.tensor(restored.logprobs) - torch.tensor(hf_logprobs(prompt, restored.token_ids))).abs().max() < 1e-4


def test_engine_view_is_the_quantised_copy_and_leaves_the_model_alone(tiny_model_dir, tiny_weights):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    view = engine_view(model, quantization=Quantization(bits=4, group_size=32), dtype="bfloat16")
    up = "model.layers.1.mlp.up_proj.weight"
    expected = fake_quantize_tensor(tiny_weights[up], Quantization(bits=4, group_size=32)).to(torch.bfloat16)
    assert torch.equal(dict(view.named_parameters())[up], expected)
    assert torch.equal(dict(model.named_parameters())[up], tiny_weights[up])  # the trainer's model is untouched


# -- the grid ------------------------------------------------------------------------------------------


def test_the_shipped_lab_loads_and_every_cell_is_a_valid_run():
    cfg = load_lab_config(None, [])
    cells = grid(cfg)
    assert len(cells) == sum(len(cfg.arms_of(s)) for s in cfg.settings) * len(cfg.seeds)
    assert len(cfg.seeds) >= 3
    for cell in cells:
        run = run_config(cfg, cell)
        assert (run.trainer.seed, run.rollout.sampling.seed, run.schedule.seed) == (cell.seed,) * 3
    controls = [s for s in cfg.settings.values() if s.control]
    assert controls and all(cfg.settings[s.control].set == [] or "quantize" not in " ".join(cfg.settings[s.control].set) for s in controls)
    variant = grid(cfg, arms=["mis_token"], seeds=[4])  # --arms runs any arm in every setting
    assert [(c.setting, c.arm, c.seed) for c in variant] == [(s, "mis_token", 4) for s in cfg.settings]
    quick = grid(cfg, quick=True)
    assert {c.seed for c in quick} == {0} and {c.arm for c in quick} == set(cfg.quick.arms)


@pytest.mark.parametrize("override, named", [("arms.bypass=[\"trainer.algo=nope\"]", "algo"), ("settings.int3.arms=[\"nope\"]", "nope"),
                                             ("settings.int3.control=\"nope\"", "nope"), ("rl.trainer.lrr=1", "lrr")])
def test_a_bad_lab_config_fails_before_any_work_naming_what_is_wrong(override, named, tmp_path):
    with pytest.raises(ConfigError, match=named):
        cfg = load_lab_config(None, [override])
        run_lab(cfg, tmp_path)
    assert not (tmp_path / "warm_start").exists()


def test_compare_counts_only_differences_beyond_two_standard_errors():
    assert compare(Summary([0.8, 0.82, 0.81]), Summary([0.6, 0.62, 0.61]))[2] == 1
    assert compare(Summary([0.8, 0.5, 0.65]), Summary([0.6, 0.7, 0.62]))[2] == 0
    assert compare(Summary([0.60, 0.61, 0.60]), Summary([0.595, 0.60, 0.59]), floor=0.02)[2] == 0  # below the floor
    assert math.isnan(compare(Summary([]), Summary([0.5]))[0])


def test_lab_runs_a_two_arm_two_seed_grid_writes_its_report_and_resumes_without_rerunning(tmp_path, vllm_engine, tiny_weights):
    # The parity env rewards a random model half the time, so every batch has a learning signal and trainer metrics.
    parity = ["rl.env.id=parity_envs:Parity-v0", "rl.rollout.sampling.stop=[\"e\", \"a\", \"o\"]", "rl.rollout.limits.max_tokens_per_turn=12"]
    overrides = SHRUNK + parity + ["settings.int3.arms=[\"bypass\", \"alp\"]", "settings.exact.arms=[\"bypass\"]"]
    cfg = load_lab_config(None, overrides)
    console = Console(file=io.StringIO(), width=200)
    try:
        first = run_lab(cfg, tmp_path, seeds=[0], console=console, engine=vllm_engine)
        assert [c.name for c in first] == ["int3/bypass/seed0", "int3/alp/seed0", "exact/bypass/seed0"]
        finished_before = {c.name: (tmp_path / "runs" / c.name / "metrics.jsonl").stat().st_mtime_ns for c in first}

        # An interrupted run: its last checkpoint is from iteration 1 of 2.
        interrupted = tmp_path / "runs" / "int3" / "alp" / "seed0"
        loop_file = interrupted / "checkpoint" / "loop.json"
        loop_file.write_text(json.dumps({"iteration": 1, "policy_version": 1}))
        assert not is_finished(interrupted, run_config(cfg, first[1]))

        second = run_lab(cfg, tmp_path, seeds=[0, 1], console=console, engine=vllm_engine)
    finally:
        asyncio.run(vllm_engine.update_weights(tiny_weights, vllm_engine.policy_version + 1))

    assert len(second) == 6
    for name in ("int3/bypass/seed0", "exact/bypass/seed0"):  # finished runs were not rerun
        assert (tmp_path / "runs" / name / "metrics.jsonl").stat().st_mtime_ns == finished_before[name]
    resumed = [json.loads(line)["iteration"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert resumed == [0, 1, 2]  # iteration 2 rerun once, from the checkpoint
    rows = [json.loads(line) for line in (tmp_path / "runs" / "int3" / "bypass" / "seed1" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iteration"] == 2 and rows[-1]["train/skipped_batch"] == 0.0 and rows[-1]["mismatch/log_ratio_std"] > 0.01
    config = json.loads((tmp_path / "runs" / "int3" / "bypass" / "seed1" / "config.json").read_text())
    assert config["engine"]["quantize"] == {"bits": 3, "group_size": 32} and config["trainer"]["seed"] == 1

    report = write_report(tmp_path).read_text()
    assert "## Setting `int3`" in report and "(control: `exact`)" in report
    assert "| bypass | 2 |" in report and "| alp | 2 |" in report
    assert "**Informative?**" in report and "1. ALP keeps the importance-ratio tails narrow" in report
    assert "4. all-layer noise beats partial noise: not tested (arms missing)" in report
    assert (tmp_path / "figures" / "int3_heldout.png").stat().st_size > 10_000
    assert (tmp_path / "figures" / "int3_envelope_vs_nll.png").stat().st_size > 10_000

    with pytest.raises(ConfigError, match="another config"):
        run_lab(load_lab_config(None, overrides + ["rl.trainer.lr=1e-3"]), tmp_path, console=console, engine=vllm_engine)


# -- controls at the level of a whole iteration (rollouts, update, weight push) ------------------------


def one_iteration(tmp_path: Path, name: str, model_dir: Path, engine, overrides: list[str]) -> tuple[dict, dict]:
    """One training iteration of the test loop's config on the shared engine: (its metrics row, the trained weights)."""
    import tomllib

    from safetensors.torch import load_file

    from alp_agents import jobs
    from alp_agents.config import apply_overrides, load_config_data
    from alp_agents.trainers.loop import train
    from alp_agents.trainers.run_config import TrainConfig
    from test_train_loop import config_toml

    data = apply_overrides(tomllib.loads(config_toml(model_dir, iterations=1, checkpoint_every=1)), overrides)
    cfg = load_config_data(TrainConfig, data)
    train_tasks, eval_tasks = jobs.load_tasks(cfg.data)
    rows = train(cfg, tmp_path / name, env_factory=jobs.env_factory(cfg.env), model_dir=model_dir, train_tasks=train_tasks,
                 eval_tasks=[], engine=engine, progress=False)
    assert rows[-1]["train/skipped_batch"] == 0.0, "the iteration must update the policy for the comparison to mean anything"
    return rows[-1], load_file(tmp_path / name / "checkpoint" / "model" / "model.safetensors")


def test_alp_with_sigma_fixed_at_zero_is_bypass_bit_for_bit_over_a_full_iteration(tmp_path, tiny_model_dir, vllm_engine, tiny_weights):
    try:
        alp_row, alp_weights = one_iteration(tmp_path, "alp0", tiny_model_dir, vllm_engine,
                                             ["trainer.algo=alp", "trainer.init_sigma=0", "trainer.sigma_init=absolute"])
        bypass_row, bypass_weights = one_iteration(tmp_path, "bypass", tiny_model_dir, vllm_engine, ["trainer.algo=bypass"])
    finally:
        asyncio.run(vllm_engine.update_weights(tiny_weights, vllm_engine.policy_version + 1))
    assert alp_weights.keys() == bypass_weights.keys()
    for name in alp_weights:
        assert torch.equal(alp_weights[name], bypass_weights[name]), name
    ignored = ("time/", "perf/rollout_tokens", "sigma/", "grad/sigma_norm")
    shared = {k: v for k, v in bypass_row.items() if not k.startswith(ignored)}
    assert shared == {k: v for k, v in alp_row.items() if k in shared}
    assert alp_row["sigma/max"] == 0.0


def test_mis_is_bypass_with_an_exact_engine_and_one_update_per_batch(tmp_path, tiny_model_dir, vllm_engine, tiny_weights):
    single = ["trainer.updates_per_batch=1", "trainer.micro_batch_size=8"]
    try:
        mis_row, mis_weights = one_iteration(tmp_path, "mis", tiny_model_dir, vllm_engine, ["trainer.algo=mis", *single])
        bypass_row, bypass_weights = one_iteration(tmp_path, "bypass", tiny_model_dir, vllm_engine, ["trainer.algo=bypass", *single])
    finally:
        asyncio.run(vllm_engine.update_weights(tiny_weights, vllm_engine.policy_version + 1))
    # An fp32 engine reproduces the trainer's log-probs to ~1e-6: every MIS weight pi_old/mu is 1 to that precision.
    assert mis_row["correction/rejected_fraction"] == 0.0
    assert mis_row["loss/policy"] == pytest.approx(bypass_row["loss/policy"], rel=1e-4, abs=1e-6)
    moved = max(float((bypass_weights[n] - tiny_weights[n]).abs().max()) for n in bypass_weights if n in tiny_weights)
    differs = max(float((mis_weights[n] - bypass_weights[n]).abs().max()) for n in bypass_weights)
    assert moved > 1e-4 and differs < 1e-3 * moved


def test_envelopes_are_compared_at_matched_entropy_and_spikes_against_the_pooled_median():
    from alp_agents.lab_report import Run, excess_width, spike_counts

    def run(arm: str, seed: int, points: list[tuple[float, float]]) -> Run:
        rows = [{"iteration": i + 1, "mismatch/sample_nll": nll, "mismatch/seq_log_width": width} for i, (nll, width) in enumerate(points)]
        return Run(setting="s", arm=arm, seed=seed, rows=rows, seconds=1.0)

    # Width grows with entropy for everyone. "slow" stays at high entropy, "sharp" at low entropy: the same relation,
    # so neither is credited; "wide" sits 1 above the relation at every entropy.
    slow = run("slow", 0, [(0.40, 2.0), (0.41, 2.0)])
    sharp = run("sharp", 0, [(0.10, 1.0), (0.11, 1.0)])  # narrower than "slow" only because it is sharper
    wide = run("wide", 0, [(0.10, 2.0), (0.11, 2.0), (0.40, 3.0), (0.41, 3.0)])
    excess = excess_width([slow, sharp, wide], "mismatch/seq_log_width")
    assert excess[("slow", 0)] == pytest.approx(excess[("sharp", 0)])
    assert excess[("wide", 0)] - excess[("slow", 0)] == pytest.approx(1.0)

    calm = Run(setting="s", arm="calm", seed=0, rows=[{"iteration": i, "mismatch/k3": 1e-3} for i in range(10)], seconds=1.0)
    spiky = Run(setting="s", arm="spiky", seed=0, rows=[{"iteration": i, "mismatch/k3": 1e-2 if i in (3, 7) else 1e-3} for i in range(10)],
                seconds=1.0)
    assert spike_counts([calm, spiky], "mismatch/k3") == {("calm", 0): 0.0, ("spiky", 0): 2.0}
