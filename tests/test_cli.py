"""Every `alp` command has help, and the model builder works from the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from alp_agents.cli import app


def alp(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alp_agents.cli", *args], capture_output=True, text=True, timeout=timeout)


def command_names() -> list[str]:
    return sorted(command.name or command.callback.__name__ for command in app.registered_commands)


@pytest.mark.parametrize("command", command_names())
def test_every_command_has_help(command):
    out = alp(command, "--help")
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout


def test_init_model_writes_a_loadable_directory(tmp_path):
    out = alp("init-model", str(tmp_path / "m"), "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in (tmp_path / "m").iterdir()}


def test_init_model_rejects_an_unknown_size(tmp_path):
    out = alp("init-model", str(tmp_path / "m"), "--size", "huge")
    assert out.returncode != 0
    assert "unknown model size 'huge'" in out.stderr + out.stdout


def test_train_under_torchrun_without_servers_refuses_before_any_work(tmp_path, monkeypatch):
    # torchrun sets WORLD_SIZE for every rank; one in-process engine per rank would each sample and take the weights.
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = alp("train", "--run-dir", str(tmp_path / "run"))
    assert out.returncode != 0
    assert "under torchrun needs its rollouts on vLLM servers: pass --server URL" in " ".join((out.stdout + out.stderr).split())
    assert not (tmp_path / "run").exists()  # refused before writing anything


def test_update_outside_torchrun_says_how_to_launch_it(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = alp("update", "--model", str(tmp_path / "m"), "--trajectories", str(tmp_path / "t.jsonl"))
    assert out.returncode == 2
    assert "alp update runs under torchrun, one rank or more: torchrun --nproc-per-node N -m alp_agents.cli update" in " ".join(out.stderr.split())


def test_the_alp_script_imports_your_modules_from_the_working_directory(tmp_path):
    # A console script's sys.path starts at its bin directory, not where it runs: `alp` adds the latter, as `python -m` does.
    (tmp_path / "my_envs.py").write_text("IMPORTED = True\n", encoding="utf-8")
    script = Path(sys.executable).parent / "alp"
    out = subprocess.run([str(script), "train", "--run-dir", "run", "--set", "env.id=my_envs:Mine-v0"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 2
    assert "env.id 'my_envs:Mine-v0' is not registered" in out.stderr  # imported; it just registers nothing


def test_max_turns_is_the_envs_argument_given_once():
    from alp_agents.cli import parse_env_args
    from alp_agents.errors import ConfigError

    assert parse_env_args('{"tools": ["python"]}', 3) == {"tools": ["python"], "max_turns": 3}
    assert parse_env_args('{"max_turns": 3}', 3) == {"max_turns": 3} and parse_env_args("{}") == {}
    with pytest.raises(ConfigError, match="--max-turns 3 and --env-args max_turns 2 disagree"):
        parse_env_args('{"max_turns": 2}', 3)
