"""Faults an operator meets first, with real processes: signals sent the way a terminal sends them, kill -9, a full disk.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group, vLLM's EngineCore and worker
included, so these tests signal the group (`os.killpg`); tests/test_train_loop.py signals the PID alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from alp_agents.engines import SamplingConfig, VLLMEngine
from alp_agents.errors import CheckpointError, EngineUnavailable
from alp_agents.trainers import run_dir as run_dir_module
from alp_agents.trainers.loop import why_never_updated
from alp_agents.trainers.run_dir import LoopState, RunDir
from conftest import survivors
from test_train_loop import config_toml, descendants, metric_rows, wait_for

TESTS = Path(__file__).parent


def run_alp(*args: str, harness: tuple[str, Path] | None = None) -> subprocess.Popen:
    """`alp ARGS` in a process group of its own, as a shell starts it; with `harness`, one loop phase is held (fault_harness.py)."""
    prefix = [str(TESTS / "fault_harness.py"), harness[0], str(harness[1])] if harness else ["-m", "alp_agents.cli"]
    return subprocess.Popen([sys.executable, *prefix, *args], env={**os.environ, "PYTHONPATH": str(TESTS)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture
def long_run_config(tiny_model_dir, tmp_path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(config_toml(tiny_model_dir, iterations=50, checkpoint_every=0))
    return path


# The iteration each phase's checkpoint holds: rollouts of iteration 2 are cancelled (1 is the last completed);
# the update step of iteration 2 finishes (it cannot be cut safely), and a cancelled push leaves it completed.
LAST_COMPLETED = {"rollouts": 1, "update": 2, "push": 2}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("phase", ["rollouts", "update", "push"])
def test_a_signal_to_the_process_group_stops_the_run_with_a_checkpoint_and_no_process_left(phase, sig, long_run_config, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "phase-started"
    process = run_alp("train", "--config", str(long_run_config), "--run-dir", str(run_dir), harness=(phase, marker))
    wait_for(marker.exists, 300, process)
    started = descendants(process)
    assert any(p.name().startswith("VLLM") for p in started), "vLLM's processes are in the group the signal reaches"
    os.killpg(process.pid, sig)
    sent = time.monotonic()
    output, _ = process.communicate(timeout=120)
    assert time.monotonic() - sent < 30, output[-3000:]
    assert process.returncode == 128 + sig, output[-3000:]
    message = [line for line in output.splitlines() if line.startswith("interrupted: ")]
    assert len(message) == 1 and "--resume" in message[0], output[-3000:]
    assert message[0].startswith(f"interrupted: {signal.Signals(sig).name}: stopped after iteration {LAST_COMPLETED[phase]}")
    state = json.loads((run_dir / "checkpoint" / "loop.json").read_text())
    assert state == {"iteration": LAST_COMPLETED[phase], "policy_version": LAST_COMPLETED[phase]}
    assert [row["iteration"] for row in metric_rows(run_dir)] == list(range(LAST_COMPLETED[phase] + 1))
    assert survivors(started, grace_s=10) == []


def test_ctrl_c_with_rollouts_two_versions_ahead_leaves_a_resumable_checkpoint_and_no_process(long_run_config, tmp_path):
    run_dir = tmp_path / "run"
    process = run_alp("train", "--config", str(long_run_config), "--run-dir", str(run_dir), "--set", "schedule.max_staleness=2")
    wait_for(lambda: any(r["iteration"] >= 2 for r in metric_rows(run_dir)), 300, process)
    started = descendants(process)
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-3000:]
    _, _, state = RunDir(run_dir).load_checkpoint()
    assert state.iteration == state.policy_version == metric_rows(run_dir)[-1]["iteration"] >= 2  # the batches in flight are lost
    assert survivors(started, grace_s=10) == []


def test_kill_9_of_the_alp_process_alone_leaves_no_vllm_process(long_run_config, tmp_path):
    run_dir = tmp_path / "run"
    process = run_alp("train", "--config", str(long_run_config), "--run-dir", str(run_dir))
    wait_for(lambda: any(r["iteration"] >= 1 for r in metric_rows(run_dir)), 300, process)
    started = descendants(process)
    assert {"VLLM::EngineCore", "VLLM::Worker"} <= {p.name() for p in started}
    process.kill()  # the PID only: its children are orphaned, as when the OOM killer picks the trainer
    process.wait()
    assert survivors(started, grace_s=10) == []


def test_a_run_that_never_updates_warns_why_and_exits_3(tiny_model_dir, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(config_toml(tiny_model_dir, iterations=2))
    process = run_alp("train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--set", "rollout.group_size=1")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 3, output[-3000:]
    assert "warning: the policy was never updated in 2 iterations: no group of episodes had rewards that differ" in " ".join(output.split())


def test_why_never_updated_names_the_cause():
    def row(iteration: int, skipped: float, reward: float = 0.0, failure_rate: float = 0.0) -> dict:
        return {"iteration": iteration, "train/skipped_batch": skipped, "rollout/mean_reward": reward, "rollout/failure_rate": failure_rate}

    assert why_never_updated([row(0, 1.0), row(1, 1.0), row(2, 0.0)]) is None
    assert why_never_updated([row(0, 1.0)]) is None  # no iteration ran
    assert "too easy" in why_never_updated([row(1, 1.0, reward=1.0), row(2, 1.0, reward=0.9)])
    assert "too hard" in why_never_updated([row(1, 1.0, reward=0.0)])


def test_a_weight_push_to_a_dead_engine_fails_at_once(tiny_model_dir, tiny_weights):
    def engine_cores() -> set[psutil.Process]:
        return {p for p in psutil.Process().children(recursive=True) if p.name() == "VLLM::EngineCore"}

    async def main() -> tuple[float, str]:
        others = engine_cores()  # the session's shared engine must live on
        engine = await VLLMEngine.start(tiny_model_dir, seed=0)
        try:
            await engine.generate([1, 2, 3], SamplingConfig(max_tokens=2))
            (core,) = engine_cores() - others
            core.send_signal(signal.SIGINT)  # as a Ctrl-C to the process group delivers it
            core.wait(30)
            start = time.monotonic()
            with pytest.raises(EngineUnavailable) as error:
                await engine.update_weights(tiny_weights, version=1)
            return time.monotonic() - start, str(error.value)
        finally:
            await engine.close()

    seconds, message = asyncio.run(main())
    assert seconds < 5 and "engine process died" in message


# -- checkpoints ----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path, request):
    """A tmpfs of `request.param` MB (a checkpoint of the tiny model takes about 7 MB)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def save(run: RunDir, tiny_model_dir: Path, iteration: int) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer_state = {name: value.clone() for name, value in model.state_dict().items()}
    run.save_checkpoint(model, AutoTokenizer.from_pretrained(tiny_model_dir), {"optimizer": optimizer_state},
                        LoopState(iteration=iteration, policy_version=iteration))


@pytest.mark.parametrize("small_disk", [28], indirect=True)  # room for one checkpoint and the margin save_checkpoint asks for
def test_a_checkpoint_too_big_for_the_disk_is_refused_before_writing(small_disk, tiny_model_dir):
    run = RunDir(small_disk / "run")
    save(run, tiny_model_dir, 1)
    with pytest.raises(CheckpointError, match=r"not enough disk space .* needs about [\d.]+ MB, [\d.]+ MB are free"):
        save(run, tiny_model_dir, 2)
    assert sorted(p.name for p in run.path.iterdir()) == ["checkpoint"]
    assert run.load_checkpoint()[2].iteration == 1


@pytest.mark.parametrize("small_disk", [12], indirect=True)  # room for one checkpoint, not two
def test_a_disk_that_fills_during_a_checkpoint_leaves_the_previous_one_resumable(small_disk, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(run_dir_module, "checkpoint_bytes", lambda *_: 2**20)  # the space check passes; the write then fills the disk
    run = RunDir(small_disk / "run")
    save(run, tiny_model_dir, 1)
    with pytest.raises(CheckpointError, match=r"failed: the disk is full \([\d.]+ MB free, about 1.0 MB needed\).*previous checkpoint is intact"):
        save(run, tiny_model_dir, 2)
    assert sorted(p.name for p in run.path.iterdir()) == ["checkpoint"]  # no partial checkpoint.tmp left
    assert run.load_checkpoint()[2].iteration == 1


@pytest.mark.parametrize("left", [["checkpoint.old"], ["checkpoint.old", "checkpoint.tmp"]])
def test_a_kill_between_the_checkpoint_renames_is_recovered_on_resume(left, tiny_model_dir, tmp_path):
    run = RunDir(tmp_path / "run")
    save(run, tiny_model_dir, 1)
    run.checkpoint_path.rename(run.path / "checkpoint.old")  # the first rename of the swap happened ...
    if "checkpoint.tmp" in left:  # ... and the new, complete checkpoint waits next to it
        save(RunDir(tmp_path / "next"), tiny_model_dir, 2)
        (tmp_path / "next" / "checkpoint").rename(run.path / "checkpoint.tmp")
    _, _, state = run.load_checkpoint()
    assert state.iteration == (2 if "checkpoint.tmp" in left else 1)
