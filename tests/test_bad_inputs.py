"""Bad config and data fail before any engine starts, as one line that names the file, line, field or option.

Each case runs `alp` as a user would and checks the whole answer: exit code 2, a single `error:` line
on stderr that names what is wrong, and nothing else: vLLM logs at INFO level here, so an engine
that had started would have printed its own lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alp_agents import jobs
from alp_agents.config import load_config
from alp_agents.envs import ToolEnv
from alp_agents.errors import ConfigError, ToolError
from alp_agents.tools import Calculator, PythonTool, ToolRegistry
from alp_agents.trainers.run_config import EnvSection, TrainConfig

SECONDS_TO_REFUSE = 120
"""A refusal takes the start of Python and torch (5 to 20 s on a busy machine); past this, something hangs."""
TASK = json.dumps({"id": "a", "problem": "What is 2 + 2?", "answer": "4"})


def refusal(*args: str, cwd: Path) -> str:
    """Run `alp *args` in `cwd`, check that it was refused cleanly and early, and return its one error line."""
    start = time.monotonic()
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "INFO"}  # rich's 80 columns on a pipe: the message must stay one line anyway
    out = subprocess.run([sys.executable, "-m", "alp_agents.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    seconds = time.monotonic() - start
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout == "", out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert seconds < SECONDS_TO_REFUSE, f"refused only after {seconds:.0f} s"
    return lines[0]


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A working directory with task files: good, empty, not UTF-8 (line 2), and too small to hold out 64 tasks."""
    (tmp_path / "good.jsonl").write_text(TASK + "\n", encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    latin1_task = '{"id": "b", "problem": "Caf\u00e9", "answer": "1"}\n'.encode("latin-1")
    (tmp_path / "latin1.jsonl").write_bytes(TASK.encode() + b"\n" + latin1_task)
    (tmp_path / "run.toml").write_text("[schedule]\niterations = 2\n", encoding="utf-8")
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    (tmp_path / "needs_dependency.py").write_text("import not_installed_anywhere\n", encoding="utf-8")
    (tmp_path / "mine.jsonl").write_text(json.dumps({"uid": "q1", "question": "What is 2 + 3?", "final": "5"}) + "\n", encoding="utf-8")
    (tmp_path / "my_envs.py").write_text('import gymnasium\ngymnasium.register("Mine-v0", entry_point="alp_agents.envs:MathEnv")\n',
                                         encoding="utf-8")
    (tmp_path / "used-run").mkdir()
    (tmp_path / "used-run" / "metrics.jsonl").write_text('{"iteration": 0}\n', encoding="utf-8")
    return tmp_path


EVAL_CASES = {
    "missing model": (["--model", "no-such-model", "--data", "good.jsonl"], ["--model 'no-such-model' does not exist"]),
    "task file not UTF-8": (["--data", "latin1.jsonl"], ["latin1.jsonl:2: not UTF-8 text (byte 0xe9"]),
    "empty task file": (["--data", "empty.jsonl"], ["empty.jsonl: no tasks"]),
    "env-args not JSON": (["--data", "good.jsonl", "--env-args", "{max_turns: 3}"], ["--env-args is not valid JSON"]),
    "env-args not an object": (["--data", "good.jsonl", "--env-args", "[3]"], ["--env-args must be a JSON object", "got list"]),
    "arithmetic not a number": (["--data", "arithmetic:abc"], ["--data 'arithmetic:abc' is not arithmetic:N[:difficulty[:seed]]"]),
    "arithmetic bad difficulty": (["--data", "arithmetic:4:9"], ["--data 'arithmetic:4:9': difficulty must be one of [1, 2, 3]"]),
    "env kwargs typo": (["--data", "good.jsonl", "--env-args", '{"max_turn": 3}'],
                        ["'alp_agents/ToolMath-v0'", "env.kwargs {'max_turn': 3}", "unexpected keyword argument 'max_turn'"]),
    "columns not mapped": (["--data", "mine.jsonl"], ["mine.jsonl:1: no column 'answer' for the answer",
                                                       """(--fields '{"answer": "<column>"}' for alp eval)"""]),
    "fields not a FieldMap": (["--data", "mine.jsonl", "--fields", '{"promt": "question"}'],
                              ['--fields {"promt": "question"}: promt: Extra inputs are not permitted (keys: prompt, answer, id']),
    "unknown tool": (["--data", "good.jsonl", "--env-args", '{"tools": ["pyhton"]}'],
                     ["unknown tool 'pyhton'; did you mean 'python'? built-in tools: calculator, python"]),
}


ROLLOUT_CASES = ["missing model", "env kwargs typo"]
"""`alp rollout` reads --data and --env-args with the same functions as `alp eval`; these check that it checks first."""


@pytest.mark.parametrize(("command", "case"), [("eval", case) for case in EVAL_CASES] + [("rollout", case) for case in ROLLOUT_CASES])
def test_eval_and_rollout_refuse_bad_inputs_before_the_engine(command, case, files, tiny_model_dir):
    args, expected = EVAL_CASES[case]
    options = ["--model", str(tiny_model_dir), *args] if "--model" not in args else list(args)
    if command == "rollout":
        options += ["--out", "trajectories.jsonl"]
    message = refusal(command, *options, cwd=files)
    for fragment in expected:
        assert fragment in message


TRAIN_CASES = {
    "missing model.path": (["--set", "model.path=no-such-model"], ["model.path 'no-such-model' does not exist"]),
    "missing data.path": (["--set", "data.source=jsonl", "--set", "data.path=missing.jsonl"], ["data.path 'missing.jsonl' is not a file"]),
    "empty task file": (["--set", "data.source=jsonl", "--set", "data.path=empty.jsonl"], ["empty.jsonl: no tasks"]),
    "no tasks left to train on": (["--set", "data.source=jsonl", "--set", "data.path=good.jsonl"],
                                  ["data.eval_size = 64 holds out all 1 tasks of good.jsonl", "lower data.eval_size"]),
    "env kwargs typo": (["--set", "env.kwargs.max_turn=3"], ["env.kwargs {'max_turn': 3}", "unexpected keyword argument 'max_turn'"]),
    "env module not importable": (["--set", "env.id=my_missing_envs:Mine-v0"],
                                  ["env.id 'my_missing_envs:Mine-v0': no module named 'my_missing_envs' on the import path",
                                   "run from the directory that holds my_missing_envs.py", "add that directory to PYTHONPATH"]),
    "env id typo in your module": (["--set", "env.id=my_envs:Mien-v0"],
                                   ["env.id 'my_envs:Mien-v0' is not registered; did you mean 'my_envs:Mine-v0'?"]),
    "env module lacks a dependency": (["--set", "env.id=needs_dependency:Mine-v0"],
                                      ["importing 'needs_dependency' failed: it imports 'not_installed_anywhere', which is not installed"]),
    "run dir not writable": (["--run-dir", "a-file/run"], ["run directory a-file/run cannot be written"]),
    "run dir holds a run": (["--run-dir", "used-run"], ["run directory used-run already holds a run: continue it with "
                                                        "`alp train --run-dir used-run --resume`", "or choose another --run-dir"]),
    "bad --set blamed on the override": (["--config", "run.toml", "--set", "schedule.iteratons=3"],
                                         ["did you mean 'schedule.iterations'? (from --set schedule.iteratons=3)"]),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_refuses_bad_config_and_data_before_the_engine(case, files, tiny_model_dir):
    args, expected = TRAIN_CASES[case]
    run_dir = [] if "--run-dir" in args else ["--run-dir", "run"]
    message = refusal("train", "--set", f"model.path={tiny_model_dir}", *run_dir, *args, cwd=files)
    for fragment in expected:
        assert fragment in message
    if "--config" in args:
        assert "run.toml" not in message  # the file is fine; only the override is wrong


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_train_refuses_a_read_only_run_dir(files, tiny_model_dir):
    (files / "run").mkdir(mode=0o555)
    message = refusal("train", "--set", f"model.path={tiny_model_dir}", "--run-dir", "run", cwd=files)
    assert "run directory run cannot be written (Permission denied)" in message


@pytest.mark.parametrize("command", [["sft", "--data", "good.jsonl", "--out", "out"], ["generate", "hi"], ["show", "good.jsonl"]],
                         ids=["sft", "generate", "show"])
def test_every_command_refuses_a_missing_model_directory(command, files):
    assert "--model 'no-such-model' does not exist" in refusal(*command, "--model", "no-such-model", cwd=files)


def test_make_demos_refuses_bad_env_args(files):
    assert "--env-args is not valid JSON" in refusal("make-demos", "--out", "demos.jsonl", "--n", "2", "--env-args", "{", cwd=files)
    message = refusal("make-demos", "--out", "demos.jsonl", "--n", "2", "--env-args", '{"max_turn": 3}', cwd=files)
    assert "unexpected keyword argument 'max_turn'" in message
    assert not (files / "demos.jsonl").exists()


# -- tools named in a config ----------------------------------------------------------------------

USER_TOOLS = '''
from alp_agents.tools import Calculator, ToolRegistry, tool


@tool
def double(x: int) -> int:
    """Twice x.

    Args:
        x: the number.
    """
    return 2 * x


class Closing(Calculator):
    name = "closing"
    closed = 0

    def close(self) -> None:
        type(self).closed += 1


def make_registry() -> ToolRegistry:
    return ToolRegistry([double, Closing()])
'''


@pytest.fixture
def user_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "user_tools_for_test.py").write_text(USER_TOOLS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_tools_for_test

    yield user_tools_for_test
    sys.modules.pop("user_tools_for_test", None)


def test_a_config_selects_the_python_tool_style_by_tool_names(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[env]\nkwargs = {tools = ["calculator", "python"], tool_call_style = "python"}\n', encoding="utf-8")
    make_env = jobs.env_factory(load_config(TrainConfig, path).env)
    with make_env() as env:
        assert env.tools.names == ["calculator", "python"]
        assert isinstance(env.tools.get("python"), PythonTool) and env.tool_call_style == "python"


def test_tools_by_import_path_and_who_closes_them(user_tools):
    with ToolEnv(tools="user_tools_for_test:make_registry") as env:
        assert env.tools.names == ["double", "closing"]
    assert user_tools.Closing.closed == 1  # the env made the registry, so the env closes it
    with ToolEnv(tools=["calculator", "user_tools_for_test:double", "user_tools_for_test:Closing"]) as env:
        assert env.tools.names == ["calculator", "double", "closing"]
    assert user_tools.Closing.closed == 2
    shared = ToolRegistry([user_tools.Closing()])
    with ToolEnv(tools=shared):
        pass
    assert user_tools.Closing.closed == 2  # a registry passed in belongs to the caller


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        (["calculater"], r"unknown tool 'calculater'; did you mean 'calculator'\? built-in tools: calculator, python, or 'module:attribute'"),
        (["no_such_module_xyz:tools"], r"tool 'no_such_module_xyz:tools' cannot be imported: no module named 'no_such_module_xyz' on the "
                                        r"import path \(the working directory is .*\): run from the directory that holds no_such_module_xyz\.py"),
        (["json:no_such_tool"], r"tool 'json:no_such_tool' cannot be imported: module 'json' \(.*json/__init__\.py\) has no attribute 'no_such_tool'"),
        (["json:__doc__"], r"tool 'json:__doc__' is a str: expected a Tool, a Tool class, or a function returning"),
    ],
)
def test_bad_tool_names_are_named(tools, message):
    with pytest.raises(ToolError, match=message):
        ToolEnv(tools=tools)
    with pytest.raises(ConfigError, match=r"environment 'alp_agents/ToolMath-v0' cannot be built from env\.kwargs .*ToolError: " + message):
        jobs.env_factory(EnvSection(kwargs={"tools": tools}))


def test_env_factory_builds_one_env_and_closes_it(user_tools):
    make_env = jobs.env_factory(EnvSection(kwargs={"tools": ["user_tools_for_test:Closing"]}))
    assert user_tools.Closing.closed == 1
    with make_env() as env:
        assert isinstance(env.tools.get("closing"), Calculator)


def test_fields_map_a_task_files_own_columns(files):
    from alp_agents.cli import parse_fields

    [task] = jobs.tasks_from_argument(str(files / "mine.jsonl"), fields=parse_fields('{"prompt": "question", "answer": "final", "id": "uid"}'))
    assert (task.id, task.prompt, task.answer, task.metadata) == ("q1", "What is 2 + 3?", "5", {})
