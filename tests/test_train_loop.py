"""The RL loop end to end on the tiny model: weight sync, resume after kill -9, Ctrl-C, skipped batches."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alp_agents.config import load_config
from alp_agents.engines import OpenAIServerEngine, SamplingConfig
from alp_agents.trainers.loop import tasks_for_iteration, train
from alp_agents.trainers.run_config import TrainConfig
from alp_agents.trainers.trainer import ALPTrainer
from conftest import survivors

TESTS = Path(__file__).parent


def config_toml(model_dir: Path, **schedule: int) -> str:
    """A small deterministic run on the parity env (sampling seeded, one episode at a time)."""
    schedule_lines = "\n".join(f"{k} = {v}" for k, v in {"iterations": 4, "eval_every": 0, "checkpoint_every": 2, **schedule}.items())
    return f"""
[model]
path = "{model_dir}"
[env]
id = "parity_envs:Parity-v0"
[data]
train_size = 20
eval_size = 4
[rollout]
tasks_per_batch = 2
group_size = 4
max_concurrency = 1
[rollout.sampling]
temperature = 1.0
seed = 3
stop = ["e", "a", "o"]  # the random model rarely ends a turn by itself
[rollout.limits]
max_tokens_per_turn = 12
max_total_tokens = 512
[trainer]
algo = "alp"
lr = 1e-3
micro_batch_size = 4
updates_per_batch = 2
[schedule]
{schedule_lines}
eval_k = 1
"""


def alp_train(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.Popen([sys.executable, "-m", "alp_agents.cli", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def train_in_process(tmp_path: Path, model_dir: Path, overrides: list[str], *, iterations: int, engine=None) -> list[dict]:
    """A run of `config_toml` plus `overrides` in this process, on `engine` (default: the engines its config names)."""
    sys.path.insert(0, str(TESTS))
    from alp_agents import jobs

    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text(config_toml(model_dir, iterations=iterations, checkpoint_every=0))
    cfg = load_config(TrainConfig, cfg_path, overrides)
    train_tasks, eval_tasks = jobs.load_tasks(cfg.data)
    return train(cfg, tmp_path / "run", env_factory=jobs.env_factory(cfg.env), model_dir=model_dir, train_tasks=train_tasks,
                 eval_tasks=eval_tasks, engine=engine, progress=False)


def wait_for(predicate, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"alp train exited early ({process.returncode}):\n{process.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for alp train")
        time.sleep(0.05)  # an iteration of the tiny model can take well under a second


def checkpoint_iteration(run_dir: Path) -> int | None:
    """The iteration of the run's checkpoint; None before the first (or while one is being swapped in)."""
    try:
        return json.loads((run_dir / "checkpoint" / "loop.json").read_text())["iteration"]
    except (OSError, ValueError):
        return None


def metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def comparable(row: dict) -> dict:
    """A metrics row without wall-clock measurements."""
    return {k: v for k, v in row.items() if not k.startswith(("time/", "perf/rollout_tokens"))}


def descendants(process: subprocess.Popen) -> list[psutil.Process]:
    """The processes `alp train` started (vLLM's EngineCore and worker, grader workers, sandboxes)."""
    return psutil.Process(process.pid).children(recursive=True)




@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir, vllm_engine, tiny_weights):
    """An uninterrupted 4-iteration run, in this process on the shared engine (whose weights are restored after)."""
    sys.path.insert(0, str(TESTS))
    from alp_agents import jobs

    run_dir = tmp_path_factory.mktemp("reference")
    cfg_path = run_dir / "run.toml"
    cfg_path.write_text(config_toml(tiny_model_dir))
    cfg = load_config(TrainConfig, cfg_path)
    train_tasks, eval_tasks = jobs.load_tasks(cfg.data)
    rows = train(cfg, run_dir, env_factory=jobs.env_factory(cfg.env), model_dir=tiny_model_dir, train_tasks=train_tasks,
                 eval_tasks=eval_tasks, engine=vllm_engine, progress=False)
    yield cfg_path, run_dir, rows
    asyncio.run(vllm_engine.update_weights(tiny_weights, vllm_engine.policy_version + 1))


def test_iterations_update_the_policy_and_the_engine_serves_it(reference_run, vllm_engine, hf_logprobs, tiny_model_dir):
    _, run_dir, rows = reference_run
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4]
    trained = [r for r in rows[1:] if r["train/skipped_batch"] == 0.0]
    assert trained, "no iteration had a learning signal"
    for row in trained:
        for key in ("loss/policy", "ratio/p1", "ratio/p99", "kl/k3", "mismatch/k3", "sigma/mean", "entropy/mean", "grad/policy_norm"):
            assert math.isfinite(row[key]), key
    assert rows[-1]["policy_version"] == 4 and "eval/avg_at_k" in rows[-1]
    # The engine now holds the trained weights: its log-probs match an HF recompute with them.
    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint" / "model", dtype=torch.float32)
    weights = {name: p.detach() for name, p in model.named_parameters()}
    prompt = AutoTokenizer.from_pretrained(tiny_model_dir).encode("Ava has 12 apples.")
    generation = asyncio.run(vllm_engine.generate(prompt, SamplingConfig(max_tokens=16, seed=1)))
    new = hf_logprobs(prompt, generation.token_ids, weights=weights)
    old = hf_logprobs(prompt, generation.token_ids)
    assert max(abs(a - b) for a, b in zip(new, generation.logprobs)) < 1e-4
    assert max(abs(a - b) for a, b in zip(old, generation.logprobs)) > 1e-3  # the weights really changed
    # Outputs a person looks at.
    assert {"reward.png", "ratio_envelope.png", "kl.png", "sigma.png", "entropy_length.png"} <= {p.name for p in (run_dir / "plots").iterdir()}
    assert list((run_dir / "tensorboard").iterdir()) and (run_dir / "samples" / "iter_4.jsonl").exists()


def test_resume_after_kill_9_gives_the_same_metrics(reference_run, tmp_path):
    cfg_path, _, reference = reference_run
    run_dir = tmp_path / "run"
    process = alp_train("--config", str(cfg_path), "--run-dir", str(run_dir))
    wait_for(lambda: checkpoint_iteration(run_dir) == 2, 300, process)  # killed within iterations 3-4, before the next one
    os.killpg(process.pid, signal.SIGKILL)  # the trainer and everything it started die without a word
    process.wait()
    assert checkpoint_iteration(run_dir) == 2
    resumed = alp_train("--run-dir", str(run_dir), "--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    rows = metric_rows(run_dir)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4]  # rows the killed run logged past its checkpoint were replaced
    for got, want in zip(rows, reference):
        assert comparable(got).keys() == comparable(want).keys()
        for key, value in comparable(want).items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), (got["iteration"], key)


def test_ctrl_c_saves_a_checkpoint_and_leaves_no_processes(reference_run, tmp_path):
    cfg_path, _, _ = reference_run
    run_dir = tmp_path / "run"
    process = alp_train("--config", str(cfg_path), "--run-dir", str(run_dir), "--set", "schedule.iterations=50",
                        "--set", "schedule.checkpoint_every=0")
    wait_for(lambda: any(r["iteration"] >= 1 for r in metric_rows(run_dir)), 300, process)
    started = descendants(process)
    assert started, "alp train runs vLLM in child processes"
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-3000:]  # a scheduler can tell an interrupted run from a finished one
    assert "SIGINT: saving a checkpoint" in output and "interrupted: SIGINT: stopped after iteration" in output
    state = json.loads((run_dir / "checkpoint" / "loop.json").read_text())
    assert 1 <= state["iteration"] < 50 and state["policy_version"] == state["iteration"]
    assert survivors(started) == []


@pytest.mark.parametrize("max_staleness", [0, 2])
def test_rollouts_run_ahead_of_a_slow_trainer_by_at_most_max_staleness_versions(max_staleness, vllm_engine, tiny_model_dir, tiny_weights,
                                                                                 tmp_path, monkeypatch):
    step = ALPTrainer.step

    def slow_step(self, trajectories):
        time.sleep(3.0)  # the producer meanwhile collects the batches it may
        return step(self, trajectories)

    monkeypatch.setattr(ALPTrainer, "step", slow_step)
    try:
        rows = train_in_process(tmp_path, tiny_model_dir, [f"schedule.max_staleness={max_staleness}"], iterations=5, engine=vllm_engine)
    finally:
        asyncio.run(vllm_engine.update_weights(tiny_weights, vllm_engine.policy_version + 1))
    lags = [row["staleness/max"] for row in rows[1:]]
    assert max(lags) == max_staleness  # the producer ran as far ahead as allowed (batch 3 from policy 0 when k = 2) ...
    assert all(row["train/stale_episodes"] == 0 for row in rows[1:])  # ... and never further
    tokens = [sum(v for k, v in row.items() if k.startswith("staleness/tokens_at_lag_")) for row in rows[1:]]
    assert all(n > 0 for n in tokens) and all(0 <= row["staleness/mean"] <= row["staleness/max"] for row in rows[1:])


@pytest.mark.parametrize(("group_size", "informative"), [(4, True), (1, False)])
def test_dynamic_sampling_fills_the_batch_with_informative_groups_or_stops_at_its_bound(group_size, informative, vllm_engine,
                                                                                        tiny_model_dir, tiny_weights, tmp_path):
    overrides = ["rollout.dynamic_sampling=true", "rollout.dynamic_sampling_max_draws=3", f"rollout.group_size={group_size}"]
    try:
        rows = train_in_process(tmp_path, tiny_model_dir, overrides, iterations=2, engine=vllm_engine)
    finally:
        asyncio.run(vllm_engine.update_weights(tiny_weights, vllm_engine.policy_version + 1))
    for row in rows[1:]:  # tasks_per_batch = 2
        if informative:  # parity rewards differ within most groups of 4: the batch fills, with extra draws if needed
            assert row["batch/groups_kept"] == 2 and row["batch/shortfall"] == 0 and row["train/skipped_batch"] == 0
        else:  # a group of one never differs: every draw up to the bound, then a counted shortfall and no update
            assert (row["batch/groups_drawn"], row["batch/groups_kept"], row["batch/shortfall"]) == (6, 0, 2)
            assert row["train/skipped_batch"] == 1


def test_task_order_is_a_pure_function_of_the_iteration():
    tasks = list(range(10))
    first_epoch = [t for i in range(1, 6) for t in tasks_for_iteration(tasks, i, 2, seed=0)]
    assert sorted(first_epoch) == tasks  # every task once per epoch
    assert tasks_for_iteration(tasks, 7, 2, seed=0) == tasks_for_iteration(tasks, 7, 2, seed=0)
    assert [tasks_for_iteration(tasks, i, 2, seed=0) for i in range(6, 11)] != [tasks_for_iteration(tasks, i, 2, seed=0) for i in range(1, 6)]


@pytest.mark.parametrize("max_staleness", [0, 2])
def test_training_with_rollouts_on_a_vllm_server(max_staleness, vllm_server, tiny_model_dir, tiny_weights, hf_logprobs, tmp_path):
    rows = train_in_process(tmp_path, tiny_model_dir, [f'engine.servers=["{vllm_server.url}"]', f"schedule.max_staleness={max_staleness}"],
                            iterations=3)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3] and rows[-1]["rollout/failure_rate"] == 0.0
    assert all(r["staleness/max"] <= max_staleness for r in rows[1:])
    assert_server_serves(tmp_path / "run" / "checkpoint" / "model", vllm_server.url, tiny_model_dir, tiny_weights, hf_logprobs)


def assert_server_serves(saved_model: Path, server_url: str, tiny_model_dir: Path, tiny_weights, hf_logprobs) -> None:
    """The server samples from the weights of `saved_model` (a trained policy); then it gets the tiny model's back."""
    model = AutoModelForCausalLM.from_pretrained(saved_model, dtype=torch.float32)
    prompt = AutoTokenizer.from_pretrained(tiny_model_dir).encode("Ben has 3 coins.")
    with server_weights_restored(server_url, tiny_weights):
        generation = asyncio.run(generate_on(server_url, prompt))
    trained = hf_logprobs(prompt, generation.token_ids, weights={n: p.detach() for n, p in model.named_parameters()})
    assert max(abs(a - b) for a, b in zip(trained, generation.logprobs)) < 1e-4
    assert max(abs(a - b) for a, b in zip(hf_logprobs(prompt, generation.token_ids), generation.logprobs)) > 1e-3  # it did change


async def generate_on(server_url: str, prompt: list[int]):
    async with OpenAIServerEngine(server_url) as engine:
        return await engine.generate(prompt, SamplingConfig(max_tokens=8, seed=2))


@contextlib.contextmanager
def server_weights_restored(server_url: str, tiny_weights):
    """The session's shared server gets the tiny model's weights back afterwards, whatever happened."""
    async def restore():
        async with OpenAIServerEngine(server_url) as engine:
            await engine.update_weights(tiny_weights, engine.policy_version + 1)

    try:
        yield
    finally:
        asyncio.run(restore())


def alp_train_on_two_ranks(*args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "alp_agents.cli", "train"]
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*command, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.fixture(scope="module")
def two_rank_run(vllm_server, tiny_model_dir, tmp_path_factory):
    """An uninterrupted 4-iteration `alp train` on 2 gloo ranks, rollouts on the shared server."""
    run_dir = tmp_path_factory.mktemp("two-ranks") / "run"
    cfg_path = run_dir.parent / "run.toml"
    cfg_path.write_text(config_toml(tiny_model_dir))
    process = alp_train_on_two_ranks("--config", str(cfg_path), "--run-dir", str(run_dir), "--server", vllm_server.url)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return cfg_path, run_dir, metric_rows(run_dir)


def test_alp_train_under_torchrun_shards_the_trainer_and_pushes_to_the_server(two_rank_run, vllm_server, tiny_model_dir, tiny_weights,
                                                                               hf_logprobs):
    _, run_dir, rows = two_rank_run
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4] and rows[-1]["policy_version"] == 4
    updated = [r for r in rows[1:] if r["train/skipped_batch"] == 0]  # a batch without learning signal is skipped
    assert updated and all(r["perf/episodes_left_out_by_sharding"] == 0 for r in updated)  # 2 groups of 4: one per rank
    assert all(r["perf/sequences"] == 8 for r in updated)  # the metrics of both ranks' episodes, reduced
    # The server samples from the trained policy that rank 0 gathered, pushed and saved.
    assert_server_serves(run_dir / "checkpoint" / "model", vllm_server.url, tiny_model_dir, tiny_weights, hf_logprobs)


def test_torchrun_resume_after_kill_9_gives_the_same_metrics(two_rank_run, vllm_server, tiny_weights, tmp_path):
    cfg_path, _, reference = two_rank_run
    run_dir = tmp_path / "run"
    with server_weights_restored(vllm_server.url, tiny_weights):
        process = alp_train_on_two_ranks("--config", str(cfg_path), "--run-dir", str(run_dir), "--server", vllm_server.url)
        wait_for(lambda: checkpoint_iteration(run_dir) == 2, 600, process)
        # torchrun and both ranks, one by one: torch elastic starts each rank in a session of its own, so a kill of
        # torchrun's process group alone would leave the ranks to finish the run, and the resume below would have nothing to do.
        processes = [psutil.Process(process.pid), *descendants(process)]
        for victim in processes:
            victim.kill()
        psutil.wait_procs(processes, timeout=30)
        process.wait()
        assert checkpoint_iteration(run_dir) == 2
        assert [r["iteration"] for r in metric_rows(run_dir)][-1] <= 3  # killed before the run could finish
        resumed = alp_train_on_two_ranks("--run-dir", str(run_dir), "--resume")  # the servers come from the saved config
        output, _ = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, output[-4000:]
    rows = metric_rows(run_dir)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4]
    for got, want in zip(rows, reference):
        assert comparable(got).keys() == comparable(want).keys()
        for key, value in comparable(want).items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), (got["iteration"], key)
