"""Episode isolation: whatever one episode's env, tool or grader does, the batch and the run go on.

Except when the engine itself is gone: then `collect` stops at once with EngineUnavailable. The
episodes below are scripted (test_rollout.ScriptedEngine) where a test needs the model to make a
given call; the tools, sandbox, envs and grader are the real ones.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_rollout import ScriptedEngine, TASK
from transformers import AutoTokenizer
from typer.testing import CliRunner

from alp_agents import rollout
from alp_agents.cli import app
from alp_agents.engines import SamplingConfig
from alp_agents.envs import MathEnv, Task, ToolEnv
from alp_agents.errors import EngineUnavailable
from alp_agents.evaluation import rollout_stats
from alp_agents.rollout import RolloutLimits, collect, collect_sync
from alp_agents.tools import Calculator, PythonSandbox, PythonTool, ToolRegistry, tool
from alp_agents.trajectory import read_trajectories, write_trajectories

ANSWER = "The answer is \\boxed{69104}."


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


class ByTask:
    """Routes each episode to the scripted engine named by a word of its prompt."""

    def __init__(self, tokenizer, scripts: dict[str, ScriptedEngine]) -> None:
        self.tokenizer, self.scripts = tokenizer, scripts

    async def generate(self, prompt_token_ids, sampling):
        prompt = self.tokenizer.decode(prompt_token_ids)
        engine = next(engine for word, engine in self.scripts.items() if word in prompt)
        return await engine.generate(prompt_token_ids, sampling)


# ---------------------------------------------------------------------------------------------
# 1. An env that cannot be built fails its own episode
# ---------------------------------------------------------------------------------------------


def test_an_env_that_raises_in_its_constructor_fails_only_its_episode(vllm_engine, tokenizer):
    built = 0

    def flaky_env() -> MathEnv:
        nonlocal built
        built += 1
        if built == 2:
            raise RuntimeError("could not open the task database")
        return MathEnv()

    tasks = [Task(id=f"t{i}", prompt=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(3)]
    limits = RolloutLimits(max_tokens_per_turn=8)
    trajectories = collect_sync(flaky_env, tasks, vllm_engine, tokenizer, sampling=SamplingConfig(), limits=limits,
                                max_concurrency=1, progress=False)
    assert [t.finish_reason == "error" for t in trajectories] == [False, True, False]
    assert trajectories[1].error == "RuntimeError: could not open the task database"
    assert all(t.num_sampled_tokens > 0 for t in (trajectories[0], trajectories[2]))  # the real engine played them
    assert rollout_stats(trajectories).failure_rate == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------
# 2. Text that UTF-8 cannot encode
# ---------------------------------------------------------------------------------------------


@tool
def legacy_lookup(key: str) -> str:
    """Look a key up in a legacy store that decodes its bytes with errors="surrogateescape".

    Args:
        key: What to look up.
    """
    return f"{key}: caf\udce9 \ud83d\ude00"  # a lone surrogate, and a surrogate pair


def test_a_tool_returning_lone_surrogates_does_not_fail_the_episode_or_the_writer(tokenizer, tmp_path):
    engine = ScriptedEngine(tokenizer, [call("legacy_lookup", '{"key": "menu"}'), ANSWER])
    env = lambda: ToolEnv(tools=ToolRegistry([legacy_lookup]))  # noqa: E731
    [t] = collect_sync(env, [TASK], engine, tokenizer, sampling=SamplingConfig(), progress=False)
    assert t.finish_reason == "terminated" and t.reward == 1.0, t.metadata
    assert t.messages[3].content == t.turns[0].tool_results[0] == "menu: caf\ufffd 😀"
    assert read_trajectories(write_trajectories(tmp_path / "t.jsonl", [t])) == [t]


# ---------------------------------------------------------------------------------------------
# 3. A sync tool that hangs, and grading, never wait behind (or starve) the default executor
# ---------------------------------------------------------------------------------------------


def test_a_hanging_sync_tool_times_out_without_starving_the_default_executor(tokenizer):
    release = threading.Event()

    @tool
    def stuck(x: int) -> int:
        """Wait on a lock that is never released (until the test ends).

        Args:
            x: Anything.
        """
        release.wait()
        return x

    stuck.timeout_s = 0.5
    registry = ToolRegistry([stuck, Calculator()])
    engine = ByTask(tokenizer, {
        "hang": ScriptedEngine(tokenizer, [call("stuck", '{"x": 1}'), ANSWER]),
        "apples": ScriptedEngine(tokenizer, [call("calculator", '{"expression": "1234 * 56"}'), ANSWER]),
    })
    tasks = [Task(id=f"hang{i}", prompt="Please hang.", answer="69104") for i in range(4)] + [TASK] * 2

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=2))  # fewer threads than hanging calls
        started = time.perf_counter()
        try:
            episodes = asyncio.create_task(collect(lambda: ToolEnv(tools=registry), tasks, engine, tokenizer,
                                                   sampling=SamplingConfig(), progress=False))
            await asyncio.sleep(0.2)  # the stuck calls are running
            unrelated = await asyncio.wait_for(asyncio.to_thread(lambda: "trainer step"), 1.0)
            return unrelated, await asyncio.wait_for(episodes, 5.0), time.perf_counter() - started
        finally:
            release.set()  # before asyncio.run joins the default executor's threads

    unrelated, trajectories, elapsed = asyncio.run(main())
    assert unrelated == "trainer step"
    assert elapsed < 3.0
    stuck_turns, calculator_turns = [t.turns[0] for t in trajectories[:4]], [t.turns[0] for t in trajectories[4:]]
    assert all(turn.tool_errors == 1 for turn in stuck_turns)
    assert stuck_turns[0].tool_results == ["Error: the tool did not finish within its 0.5 s time limit"]
    assert [turn.tool_results for turn in calculator_turns] == [["69104"]] * 2 and all(t.reward == 1.0 for t in trajectories[4:])
    assert all(t.finish_reason == "terminated" for t in trajectories)
    assert rollout_stats(trajectories).tool_error_rate == pytest.approx(4 / 6)


@pytest.mark.parametrize("make_env", [MathEnv, ToolEnv])
def test_grading_does_not_wait_behind_a_busy_default_executor(tokenizer, make_env):
    release = threading.Event()
    engine = ScriptedEngine(tokenizer, [ANSWER])

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        loop.run_in_executor(None, release.wait)  # a long trainer step holds the only thread
        try:
            return await asyncio.wait_for(collect(make_env, [TASK], engine, tokenizer, sampling=SamplingConfig(), progress=False), 5.0)
        finally:
            release.set()  # before asyncio.run joins the default executor's threads

    [t] = asyncio.run(main())
    assert t.finish_reason == "terminated" and t.correct is True


# ---------------------------------------------------------------------------------------------
# 4. An async env that blocks the event loop
# ---------------------------------------------------------------------------------------------


class BlockingEnv(MathEnv):
    """Blocks the event loop in `astep` for the task "block" (the classic mistake: time.sleep in async code)."""

    async def astep(self, action):
        if self.task.id != "block":
            return await super().astep(action)
        await asyncio.sleep(0.1)  # let the other episodes finish first
        time.sleep(1.0)
        return [], 0.0, True, False, {}  # no await after the block: asyncio.timeout alone never fires


def test_an_env_blocking_the_loop_is_named_in_a_warning_and_its_episode_fails(tokenizer, caplog, monkeypatch):
    monkeypatch.setattr(rollout, "LOOP_STALL_WARNING_S", 0.5)
    engine = ScriptedEngine(tokenizer, [ANSWER])
    tasks = [TASK, Task(id="block", prompt="Block.", answer="1"), TASK]
    with caplog.at_level(logging.WARNING, logger="alp_agents.rollout"):
        trajectories = collect_sync(BlockingEnv, tasks, engine, tokenizer, sampling=SamplingConfig(),
                                    limits=RolloutLimits(episode_timeout_s=0.6), progress=False)
    assert [t.finish_reason for t in trajectories] == ["terminated", "error", "terminated"]
    assert "TimeoutError: the episode ran longer than its episode_timeout_s of 0.6 s" in trajectories[1].error
    [warning] = [r.getMessage() for r in caplog.records if "event loop has been blocked" in r.getMessage()]
    assert "BlockingEnv.astep" in warning and "test_episode_isolation.py" in warning


class SlowToCloseEnv(MathEnv):
    """Takes a second to close, as an env killing its processes may (the classic case: a sandbox pool of its own)."""

    def close(self):
        time.sleep(1.0)
        super().close()


def test_closing_envs_never_blocks_the_event_loop(tokenizer, caplog, monkeypatch):
    monkeypatch.setattr(rollout, "LOOP_STALL_WARNING_S", 0.5)
    with caplog.at_level(logging.WARNING, logger="alp_agents.rollout"):
        trajectories = collect_sync(SlowToCloseEnv, [TASK] * 3, ScriptedEngine(tokenizer, [ANSWER]), tokenizer,
                                    sampling=SamplingConfig(), progress=False)
    assert [t.finish_reason for t in trajectories] == ["terminated"] * 3
    assert not [r for r in caplog.records if "event loop has been blocked" in r.getMessage()]  # closed in CLOSE_THREADS


# ---------------------------------------------------------------------------------------------
# 5. Sandbox timeouts, memory kills and failed programs are tool errors, shown by `alp show`
# ---------------------------------------------------------------------------------------------


def test_sandbox_failures_count_as_tool_errors_through_to_alp_show(tokenizer, tiny_model_dir, tmp_path):
    programs = {"fine": "print(6 * 7)", "raises": "1 / 0", "loops": "while True: pass"}
    replies = [call("python", f'{{"code": "{programs[name]}"}}') for name in programs] + [ANSWER]
    with PythonSandbox(timeout_s=1.0) as sandbox:
        registry = ToolRegistry([PythonTool(sandbox)])
        engine = ScriptedEngine(tokenizer, replies)
        [t] = collect_sync(lambda: ToolEnv(tools=registry), [TASK], engine, tokenizer, sampling=SamplingConfig(), progress=False)
    assert [turn.tool_errors for turn in t.turns] == [0, 1, 1, 0]
    assert "ZeroDivisionError" in t.turns[1].tool_results[0] and "[exit code 1]" in t.turns[1].tool_results[0]
    assert t.turns[2].tool_results[0].endswith("[stopped: the program ran longer than the 1 s time limit]")
    assert rollout_stats([t]).tool_error_rate == pytest.approx(2 / 3)
    path = write_trajectories(tmp_path / "t.jsonl", [t])
    shown = CliRunner().invoke(app, ["show", str(path), "--model", str(tiny_model_dir)])
    assert shown.exit_code == 0, shown.output
    assert "tool calls 3 (failed 2)" in shown.output


# ---------------------------------------------------------------------------------------------
# 6. A lost engine stops the batch; one failed request does not
# ---------------------------------------------------------------------------------------------


def test_engine_unavailable_cancels_the_batch_and_is_raised(tokenizer):
    closed = []

    class DyingEngine:
        """Every request waits, except the one that finds the server gone."""

        async def generate(self, prompt_token_ids, sampling):
            if "poison" in tokenizer.decode(prompt_token_ids):
                await asyncio.sleep(0.1)
                raise EngineUnavailable("no server left: http://127.0.0.1:1 refused the connection")
            await asyncio.sleep(30)

    def env() -> MathEnv:
        e = MathEnv()
        e.close = lambda: closed.append(True)
        return e

    tasks = [TASK, Task(id="poison", prompt="poison pill", answer="1"), TASK]
    started = time.perf_counter()
    with pytest.raises(EngineUnavailable, match="no server left"):
        collect_sync(env, tasks, DyingEngine(), tokenizer, sampling=SamplingConfig(), progress=False)
    assert time.perf_counter() - started < 5
    assert len(closed) == 3
