"""A user's own environment: registered the plain gymnasium way it trains; one whose episodes all fail stops the run
with the first error instead of "training" on nothing and exiting 0."""

from __future__ import annotations

import asyncio
import logging

import gymnasium
import pytest

from alp_agents.envs import Task, TextEnv
from alp_agents.errors import ConfigError, EnvError, EpisodesFailed
from alp_agents.config import load_config, load_config_data
from alp_agents.jobs import env_factory, run_tasks
from alp_agents.trainers.loop import check_failures
from alp_agents.trainers.run_config import EnvSection, TrainConfig
from alp_agents.trajectory import Trajectory
from test_train_loop import train_in_process


def test_gymnasiums_default_wrappers_are_looked_through():
    make = env_factory(EnvSection(id="parity_envs:WrappedParity-v0"))
    env = make()
    assert isinstance(env, TextEnv) and type(env).__name__ == "ParityEnv"
    messages, _ = asyncio.run(env.areset(seed=0, options={"task": Task(id="t", prompt="say hi", answer="")}))
    assert messages[-1].content == "say hi"
    _, reward, terminated, _, _ = asyncio.run(env.astep("ab"))
    assert (reward, terminated) == (1.0, True)


@pytest.mark.parametrize(("register", "message"), [
    (dict(entry_point="parity_envs:ParityEnv", max_episode_steps=3), "wrapped in TimeLimit, .* use the env's own max_turns"),
    (dict(entry_point="gymnasium.envs.classic_control:CartPoleEnv"), r"\(CartPoleEnv\) has no areset/astep: derive it from alp_agents.envs.TextEnv"),
])  # fmt: skip
def test_an_env_the_loop_cannot_play_fails_at_load_saying_why(register, message):
    env_id = f"Unplayable{len(message)}-v0"
    gymnasium.register(env_id, **register)
    try:
        with pytest.raises(ConfigError, match=message):
            env_factory(EnvSection(id=env_id))
    finally:
        del gymnasium.registry[env_id]


def test_an_env_registered_the_plain_gymnasium_way_trains(tmp_path, tiny_model_dir, vllm_engine):
    rows = train_in_process(tmp_path, tiny_model_dir, ["env.id=parity_envs:WrappedParity-v0"], iterations=2, engine=vllm_engine)
    assert [row["rollout/failure_rate"] for row in rows if row["iteration"] > 0] == [0.0, 0.0]
    assert rows[-1]["eval/episodes"] > 0 and rows[-1]["eval/failure_rate"] == 0.0


@pytest.mark.parametrize(("eval_size", "where"), [(4, "the evaluation at policy version 0"), (0, "iteration 1's rollouts")])
def test_a_run_whose_episodes_all_fail_stops_with_the_first_error(tmp_path, tiny_model_dir, vllm_engine, eval_size, where):
    overrides = ["env.id=parity_envs:Parity-v0", 'env.kwargs.fail_with="the grader is down"', f"data.eval_size={eval_size}"]
    with pytest.raises(EpisodesFailed, match=rf"every episode of {where} failed \(\d+ of \d+\); the first error: RuntimeError: the grader is down"):
        train_in_process(tmp_path, tiny_model_dir, overrides, iterations=2, engine=vllm_engine)
    assert (tmp_path / "run" / "checkpoint").is_dir()  # the checkpoint of iteration 0, as for any error


def episode(finish_reason: str, error: str = "") -> Trajectory:
    return Trajectory(token_ids=[1, 2], loss_mask=[0, 1], infer_logprobs=[0.0, -0.5], prompt_length=1, finish_reason=finish_reason,
                      metadata={"error": error} if error else {})


def test_a_high_failure_rate_warns_with_the_first_error(caplog):
    with caplog.at_level(logging.WARNING, logger="alp_agents.trainers.loop"):
        check_failures([episode("error", "ToolFailure: boom"), episode("terminated")], "a batch", warn_above=0.25)
        check_failures([episode("error", "ToolFailure: boom"), *[episode("terminated")] * 3], "a batch", warn_above=0.25)
    assert [r.getMessage() for r in caplog.records] == [
        "1 of 2 episodes of a batch failed (above rollout.warn_failure_rate = 0.25); the first error: ToolFailure: boom"]
    with pytest.raises(EpisodesFailed, match="every episode of a batch failed \\(2 of 2\\); the first error: ToolFailure: boom"):
        check_failures([episode("error", "ToolFailure: boom"), episode("error", "Other")], "a batch", warn_above=0.25)


# --- Where a run's tasks come from: [data], or the environment's own.


def tasks_of(config: dict) -> tuple[list[Task], list[Task], str]:
    cfg = load_config_data(TrainConfig, config)
    train, held_out = run_tasks(cfg, env_factory(cfg.env), cfg.env.id)
    return train, held_out, cfg.data.source


def test_an_env_with_its_own_tasks_trains_on_them_when_data_is_left_out():
    train, held_out, source = tasks_of({"env": {"id": "parity_envs:TaskedParity-v0"}})
    assert source == "env"  # resolved in the config the run saves, so that --resume reads the same tasks
    assert len(held_out) == 2 and len(train) == 8  # a fifth held out of the env's 10 tasks
    assert {t.id for t in train + held_out} == {f"say-{i}" for i in range(10)}


def test_data_overrides_the_envs_own_tasks():
    train, held_out, source = tasks_of({"env": {"id": "parity_envs:TaskedParity-v0"}, "data": {"source": "arithmetic", "train_size": 5,
                                                                                                "eval_size": 1}})
    assert source == "arithmetic" and len(train) == 5 and len(held_out) == 1 and train[0].id.startswith("arith")


def test_a_custom_env_without_tasks_and_without_data_is_refused_not_fed_arithmetic():
    with pytest.raises(ConfigError, match=r"'parity_envs:Parity-v0' has no tasks of its own .* no \[data\] section"):
        tasks_of({"env": {"id": "parity_envs:Parity-v0"}})
    _, _, source = tasks_of({"env": {"id": "alp_agents/ToolMath-v0"}})  # the built-in envs default to arithmetic
    assert source == "arithmetic"


def test_tasks_from_a_python_function():
    train, held_out, source = tasks_of({"env": {"id": "parity_envs:Parity-v0"},
                                        "data": {"source": "python", "path": "parity_envs:make_tasks", "eval_size": 3}})
    assert (len(train), len(held_out), source) == (7, 3, "python")
    for path, message in [("parity_envs", "must be 'module:function'"), ("parity_envs:nope", r"module 'parity_envs' \(.*parity_envs\.py\) has no attribute 'nope'"),
                          ("no_such_module:f", "no module named 'no_such_module' on the import path .* add that directory to PYTHONPATH")]:
        with pytest.raises(ConfigError, match=message):
            tasks_of({"env": {"id": "parity_envs:Parity-v0"}, "data": {"source": "python", "path": path}})


# --- Pluggable answer matching.


@pytest.mark.parametrize(("match", "answer", "gold", "expected"), [
    ("math", "\\frac{1}{2}", "0.5", True),
    ("exact", "2024-05-01", "2024-04-02", False),
    ("exact", "$\\text{NaCl}$", "NaCl", True),
    ("exact", "\\frac{1}{2}", "0.5", False),
    ("numeric", "1,000", "1000.0", True),
    ("numeric", "1e3", "1000", True),
    ("numeric", "\\frac{1}{2}", "0.5", False),  # not a number as written
    ("numeric", "0.333", "0.3333", False),
])  # fmt: skip
def test_answer_matchers_by_name(match, answer, gold, expected):
    from alp_agents.envs.matching import answer_matcher

    assert answer_matcher(match)(answer, gold) is expected


def test_envs_take_a_matcher_by_name_function_or_import_path():
    from alp_agents.envs import MathEnv, ToolEnv

    task = Task(id="date", prompt="Which day is 30 days after 2024-04-01?", answer="2024-05-01")

    def reward(env, action: str) -> float:
        asyncio.run(env.areset(seed=0, options={"task": task}))
        return asyncio.run(env.astep(action))[1]

    assert reward(ToolEnv(answer_match="exact"), "\\boxed{2024-05-01}") == 1.0
    assert reward(ToolEnv(answer_match="exact"), "\\boxed{2024-04-02}") == 0.0
    assert reward(MathEnv(answer_match=lambda answer, gold: answer[-2:] == gold[-2:]), "\\boxed{1999-01-01}") == 1.0
    assert reward(MathEnv(answer_match="alp_agents.envs.matching:exact_match"), "\\boxed{2024-05-01}") == 1.0
    with pytest.raises(Exception, match="answer_match must be one of 'math', 'exact', 'numeric'"):
        ToolEnv(answer_match="fuzzy")


# --- Demonstrations for any environment with a scripted expert.


def test_make_demos_for_the_readmes_env_uses_its_own_tasks_and_expert(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from alp_agents.demonstrations import read_demonstrations

    module = tmp_path / "reverse_env.py"  # the README's ReverseEnv in a user's module, registered the usual way
    example = (Path(__file__).parent / "test_custom_env_example.py").read_text()
    code = example[example.index("# --- README: an environment from scratch"):example.index("check_env(ReverseEnv")]
    module.write_text(code + 'import gymnasium\ngymnasium.register("Reverse-v0", entry_point=ReverseEnv, kwargs={"words": ["gradient", "policy"]})\n')
    out = tmp_path / "demos.jsonl"
    done = subprocess.run([sys.executable, "-m", "alp_agents.cli", "make-demos", "--env", "reverse_env:Reverse-v0", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    demos = read_demonstrations(out)
    assert [d.messages[-1].content for d in demos] == ["tneidarg", "ycilop"]
    assert [m.role for m in demos[0].messages] == ["user", "assistant"]


def test_make_demos_for_the_calculator_env_and_an_env_without_expert(tmp_path):
    from alp_agents import jobs
    from alp_agents.demonstrations import read_demonstrations

    path, count, left_out = jobs.make_demos(tmp_path / "calc.jsonl", EnvSection(), "arithmetic:3:1:5")
    demos = read_demonstrations(path)
    assert (count, left_out) == (3, 0) and [m.role for m in demos[0].messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert "<tool_call>" in demos[0].messages[2].content and "\\boxed{" in demos[0].messages[4].content
    with pytest.raises(EnvError, match=r"ToolEnv's built-in expert computes a task's metadata\['expression'\] .* task 'gsm8k-test-0' has none"):
        jobs.make_demos(tmp_path / "gsm8k.jsonl", EnvSection(), "gsm8k")
    with pytest.raises(Exception, match=r"ParityEnv has no scripted expert for task 'say-\d+': define expert_action"):
        jobs.make_demos(tmp_path / "none.jsonl", EnvSection(id="parity_envs:TaskedParity-v0"))


def test_make_demos_on_an_envs_own_tasks_leaves_out_what_train_holds_out(tmp_path):
    import gymnasium
    from test_custom_env_example import ReverseEnv

    from alp_agents import jobs
    from alp_agents.demonstrations import read_demonstrations

    words = ["gradient", "policy", "token", "engine", "reward", "sample", "update", "layer", "noise", "ratio"]
    if "TestReverseTen-v0" not in gymnasium.registry:
        gymnasium.register("TestReverseTen-v0", entry_point=ReverseEnv, kwargs={"words": words})
    section = EnvSection(id="TestReverseTen-v0")
    path, count, left_out = jobs.make_demos(tmp_path / "demos.jsonl", section)
    _, held_out = jobs.run_tasks(TrainConfig(env=section), jobs.env_factory(section), section.id)  # what `alp train` evaluates on
    demonstrated = {d.messages[-1].content[::-1] for d in read_demonstrations(path)}
    assert (count, left_out, len(held_out)) == (8, 2, 2)
    assert demonstrated == set(words) - {task.id for task in held_out}


# --- A finished run goes on with --resume and more iterations.


def test_a_finished_run_is_extended_with_resume_and_more_iterations(tmp_path, tiny_model_dir, vllm_engine):
    import json

    from alp_agents import jobs
    from alp_agents.trainers.loop import train
    from alp_agents.trainers.run_dir import RunDir

    first = train_in_process(tmp_path, tiny_model_dir, [], iterations=2, engine=vllm_engine)
    assert first[-1]["iteration"] == 2
    with pytest.raises(ConfigError, match=r"drop trainer.lr=1 \(with --resume, --set may change only schedule.iterations, "):
        jobs.resumed_config(tmp_path / "run", ["schedule.iterations=3", "trainer.lr=1"])
    with pytest.raises(ConfigError, match=r"has finished its 2 iterations: to go on, resume with --set schedule.iterations=N \(N > 2\)"):
        jobs.train_from_config(None, [], tmp_path / "run", resume=True)  # before an engine starts for nothing
    cfg = jobs.resumed_config(tmp_path / "run", ["schedule.iterations=3"])
    assert cfg.model_dump(exclude={"schedule"}) == RunDir(tmp_path / "run").read_config(TrainConfig).model_dump(exclude={"schedule"})
    train_tasks, eval_tasks = jobs.load_tasks(cfg.data)
    more = train(cfg, tmp_path / "run", env_factory=jobs.env_factory(cfg.env), model_dir=tiny_model_dir, train_tasks=train_tasks,
                 eval_tasks=eval_tasks, resume=True, engine=vllm_engine, progress=False)
    assert [row["iteration"] for row in more] == [3]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["schedule"]["iterations"] == 3  # a later --resume goes on from 3
    assert json.loads((tmp_path / "run" / "checkpoint" / "loop.json").read_text())["iteration"] == 3


def test_the_readmes_custom_env_trains_end_to_end(tmp_path, tiny_model_dir, vllm_engine, monkeypatch):
    """The README's recipe: the env in a user's module, registered the usual way, its own tasks (no [data]), two iterations."""
    from pathlib import Path

    from alp_agents.trainers.loop import held_out_summary, train

    example = (Path(__file__).parent / "test_custom_env_example.py").read_text()
    code = example[example.index("# --- README: an environment from scratch"):example.index("check_env(ReverseEnv")]
    (tmp_path / "my_reverse_env.py").write_text(
        code + 'import gymnasium\ngymnasium.register("MyReverse-v0", entry_point=ReverseEnv, '
        'kwargs={"words": ["gradient", "policy", "token", "engine", "reward", "sample", "update", "layer", "noise", "ratio"]})\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "run.toml"
    config.write_text(f"""
[model]
path = "{tiny_model_dir}"
[env]
id = "my_reverse_env:MyReverse-v0"
[rollout]
tasks_per_batch = 2
group_size = 2
limits = {{ max_tokens_per_turn = 8, max_total_tokens = 256 }}
[schedule]
iterations = 2
eval_every = 0
checkpoint_every = 0
""")
    cfg = load_config(TrainConfig, config)
    make_env = env_factory(cfg.env)
    train_tasks, eval_tasks = run_tasks(cfg, make_env, cfg.env.id)
    assert (cfg.data.source, len(train_tasks), len(eval_tasks)) == ("env", 8, 2)
    rows = train(cfg, tmp_path / "run", env_factory=make_env, model_dir=tiny_model_dir, train_tasks=train_tasks, eval_tasks=eval_tasks,
                 engine=vllm_engine, progress=False)
    assert [row["iteration"] for row in rows] == [0, 1, 2]
    assert all(row["rollout/failure_rate"] == 0.0 for row in rows[1:]) and rows[-1]["eval/episodes"] == 2 * cfg.schedule.eval_k
    assert (tmp_path / "run" / "checkpoint" / "model" / "config.json").is_file()  # where the README says the model lands
    before, after = rows[0], rows[-1]  # what `alp train` prints at its end
    assert held_out_summary(rows) == (f"held-out avg@k {before['eval/avg_at_k']:.3f} at iteration 0 -> {after['eval/avg_at_k']:.3f} at "
                                      f"iteration 2 (pass@k {before['eval/pass_at_k']:.3f} -> {after['eval/pass_at_k']:.3f}; every "
                                      "evaluation is in metrics.jsonl, eval/*)")
    assert held_out_summary(rows[1:2]) is None  # no evaluation among these rows
