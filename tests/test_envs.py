"""TextEnv lifecycle, MathEnv and ToolEnv rewards and replies, and the gymnasium registry.

Everything runs for real: the grader's sympy worker processes, the calculator, the bwrap sandbox.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import threading
import time
import warnings

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env as gymnasium_check_env

import alp_agents.envs
from alp_agents.envs import (
    AssistantText,
    MathEnv,
    MessageList,
    Task,
    TextEnv,
    ToolEnv,
    TurnResult,
    arithmetic_tasks,
    check_env,
)
from alp_agents.errors import EnvError
from alp_agents.tools import Calculator, PythonSandbox, PythonTool, ToolRegistry, shared_sandbox, tool
from alp_agents.trajectory import Message, ToolCall

TASK = Task(id="stock", prompt="A store receives 624 crates with 89 stickers in each crate and sells 655. How many are left?", answer="54881")
HALF = Task(id="half", prompt="What is one half?", answer="\\frac{1}{2}")


def call(name: str, **arguments: object) -> str:
    """A Hermes-style tool call as the model writes it."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def registered_ids() -> list[str]:
    return sorted(env_id for env_id in gymnasium.registry if env_id.startswith("alp_agents/"))


# ---------------------------------------------------------------------------------------------
# Registry and the checkers, on every built-in env
# ---------------------------------------------------------------------------------------------


def test_all_is_sorted_and_complete():
    assert alp_agents.envs.__all__ == sorted(alp_agents.envs.__all__)
    assert all(hasattr(alp_agents.envs, name) for name in alp_agents.envs.__all__)
    public = {name for name in vars(alp_agents.envs) if name[0].isupper() and not name.startswith("_")}
    assert public <= set(alp_agents.envs.__all__)


def test_builtins_are_registered_and_make_returns_the_env_itself():
    assert registered_ids() == ["alp_agents/Math-v0", "alp_agents/ToolMath-v0"]
    with gymnasium.make("alp_agents/Math-v0", tasks=[TASK], format_penalty=0.5) as env:
        assert type(env) is MathEnv and env.format_penalty == 0.5  # no wrapper hides areset/astep
    with gymnasium.make("alp_agents/ToolMath-v0", tasks=[TASK], max_turns=2) as env:
        assert type(env) is ToolEnv and env.max_turns == 2


def test_importing_again_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(alp_agents.envs)
    assert registered_ids() == ["alp_agents/Math-v0", "alp_agents/ToolMath-v0"]


@pytest.mark.parametrize("env_id", registered_ids())
def test_every_registered_env_passes_check_env(env_id):
    with gymnasium.make(env_id, tasks=arithmetic_tasks(4, seed=0, difficulty=2)) as env:
        check_env(env)


@pytest.mark.parametrize("env_id", registered_ids())
def test_every_registered_env_passes_gymnasiums_own_checker(env_id):
    with gymnasium.make(env_id, tasks=arithmetic_tasks(4, seed=0, difficulty=2)) as env:
        gymnasium_check_env(env, skip_render_check=True)


# ---------------------------------------------------------------------------------------------
# TextEnv: spaces, task selection, lifecycle
# ---------------------------------------------------------------------------------------------


def test_spaces_hold_any_text_and_lists_of_messages():
    space = AssistantText()
    assert "héllo ∑ 😀 \x00" in space and "" in space and 42 not in space
    assert "x" * (space.max_length + 1) not in space
    space.seed(0)
    samples = [space.sample() for _ in range(20)]
    assert all(sample in space and len(sample) <= space.sample_max_length for sample in samples)
    assert [Message(role="user", content="hi")] in MessageList() and [] in MessageList()
    assert ["hi"] not in MessageList() and "hi" not in MessageList()


def test_seeded_reset_picks_the_same_task_and_seeds_spread_over_tasks():
    tasks = arithmetic_tasks(10, seed=0)
    with MathEnv(tasks=tasks) as env:
        picks = [env.reset(seed=seed)[1]["task_id"] for seed in range(30)]
        assert picks == [env.reset(seed=seed)[1]["task_id"] for seed in range(30)]
        assert len(set(picks)) > 5
        env.reset(seed=3)
        unseeded = [env.reset()[1]["task_id"] for _ in range(5)]
        env.reset(seed=3)
        assert [env.reset()[1]["task_id"] for _ in range(5)] == unseeded  # later resets follow from the seed


def test_reset_opens_with_system_prompt_and_task_and_reports_info():
    with MathEnv(system_prompt="Box it.") as env:
        messages, info = env.reset(options={"task": TASK})
    assert messages == [Message(role="system", content="Box it."), Message(role="user", content=TASK.prompt)]
    assert info == {"task_id": "stock", "tools": [], "tool_call_style": None, "max_turns": 1}
    with MathEnv(system_prompt="") as env:
        assert [m.role for m in env.reset(options={"task": TASK.model_dump()})[0]] == ["user"]  # a dict of Task fields is validated


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (None, r"MathEnv has no task to play: pass tasks=\[\.\.\.\] to the constructor or reset\(options="),
        ({"task": "What is 2+2?"}, r"options\['task'\] must be an alp_agents.envs.Task \(or a dict of its fields\), got str"),
        ({"task": {"id": "x", "prompt": "p"}}, r"options\['task'\] is not a valid Task \(answer: Field required\)"),
        ({"task": TASK, "difficulty": 2}, r"unknown option\(s\) \['difficulty'\]; the only option is 'task'"),
    ],
)
def test_reset_rejects_missing_or_untyped_tasks(options, message):
    with MathEnv() as env, pytest.raises(EnvError, match=message):
        env.reset(options=options)


def test_constructor_validates_tasks_and_budget():
    with pytest.raises(EnvError, match=r"tasks\[1\] must be an alp_agents.envs.Task"):
        MathEnv(tasks=[TASK, "2+2"])
    with pytest.raises(EnvError, match="max_turns must be at least 1"):
        ToolEnv(max_turns=0)


def test_step_outside_an_episode_raises():
    env = MathEnv(tasks=[TASK])
    with pytest.raises(EnvError, match=r"step\(\) called before reset\(\)"):
        env.step("\\boxed{1}")
    with pytest.raises(EnvError, match=r"no task yet: call reset\(\) first"):
        _ = env.task
    env.reset(seed=0)
    with pytest.raises(EnvError, match=r"the action must be the assistant's text \(a str\), got int"):
        env.step(5)
    env.step("\\boxed{54881}")
    with pytest.raises(EnvError, match=r"step\(\) called after the episode ended \(turn 1\): call reset\(\)"):
        env.step("\\boxed{54881}")
    env.reset(seed=0)  # a new episode starts cleanly
    assert env.step("\\boxed{54881}")[1] == 1.0
    env.close()
    env.close()  # idempotent


def test_sync_api_inside_an_event_loop_says_to_await():
    async def main() -> None:
        with MathEnv(tasks=[TASK]) as env:
            with pytest.raises(EnvError, match=r"inside a running event loop: use `await env.areset"):
                env.reset(seed=0)
            messages, _ = await env.areset(seed=0)
            assert messages[-1].content == TASK.prompt

    asyncio.run(main())


def test_a_subclass_without_respond_says_what_to_implement():
    class Empty(TextEnv):
        pass

    with Empty(tasks=[TASK]) as env:
        env.reset(seed=0)
        with pytest.raises(NotImplementedError, match=r"Empty must implement `async def respond"):
            env.step("hi")


def test_turn_results_reject_non_finite_rewards_and_inconsistent_counts():
    with pytest.raises(ValueError, match="finite"):
        TurnResult(reward=float("nan"))
    with pytest.raises(ValueError, match=r"tool_errors \(2\) cannot exceed tool_calls \(1\)"):
        TurnResult(tool_calls=1, tool_errors=2)


# ---------------------------------------------------------------------------------------------
# MathEnv
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "response", "reward", "answer", "void"),
    [
        (TASK, "624 * 89 = 55536, minus 655 is \\boxed{54881}.", 1.0, "54881", False),
        (TASK, "The final answer is 54,881", 1.0, "54,881", False),
        (TASK, "\\boxed{54880}", 0.0, "54880", False),
        (TASK, "\\boxed{-54881}", 0.0, "-54881", False),
        (HALF, "so it is \\boxed{0.5}", 1.0, "0.5", False),
        (HALF, "\\boxed{\\dfrac{2}{4}}", 1.0, "\\dfrac{2}{4}", False),
        (HALF, "\\boxed{0.05}", 0.0, "0.05", False),
        (TASK, "54881", 1.0 - 0.25, None, True),  # no marker: the whole text is graded, and the penalty applies
        (TASK, "I do not know.", -0.25, None, True),
    ],
)
def test_math_env_rewards_equivalent_answers(task, response, reward, answer, void):
    with MathEnv(format_penalty=0.25) as env:
        env.reset(options={"task": task})
        messages, got_reward, terminated, truncated, info = env.step(response)
    assert (messages, got_reward, terminated, truncated) == ([], reward, True, False)
    assert info["answer"] == answer and info["void"] is void
    assert info["correct"] is (reward > 0)
    assert info["tool_calls"] == info["tool_errors"] == 0


def test_math_env_rejects_a_negative_penalty():
    with pytest.raises(EnvError, match="format_penalty must be a finite number >= 0"):
        MathEnv(format_penalty=-1.0)


def ticks_while(coroutine_factory):
    """Run a coroutine beside a 10 ms ticker; return (its result, how often the ticker ran meanwhile)."""

    async def main():
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        result = await coroutine_factory()
        done.set()
        await ticking
        return result, ticks

    return asyncio.run(main())


def test_math_env_grades_off_the_event_loop_and_a_pathological_answer_is_wrong():
    async def episode():
        with MathEnv(tasks=[Task(id="x", prompt="Expand (x+1)^2.", answer="x^2+2x+1")], grade_timeout_s=0.5) as env:
            await env.areset(seed=0)
            return await env.astep("\\boxed{(x+1)^{100000} - 9^{9^{9^9}}}")

    (_, reward, terminated, _, info), ticks = ticks_while(episode)
    assert (reward, terminated, info["correct"]) == (0.0, True, False)
    assert ticks >= 5  # the loop kept running while the grader worked for at least 0.5 s


# ---------------------------------------------------------------------------------------------
# ToolEnv
# ---------------------------------------------------------------------------------------------


def test_tool_env_plays_a_calculator_episode():
    with ToolEnv(tasks=[TASK]) as env:
        messages, info = env.reset(seed=0)
        assert [m.role for m in messages] == ["system", "user"]
        assert [schema["function"]["name"] for schema in info["tools"]] == ["calculator"]
        assert info["tool_call_style"] == "hermes" and info["max_turns"] == 4

        reply, reward, terminated, truncated, info = env.step("Let me compute.\n" + call("calculator", expression="624 * 89 - 655"))
        assert reply == [Message(role="tool", name="calculator", content="54881")]
        assert (reward, terminated, truncated) == (0.0, False, False)
        assert info["parsed_tool_calls"] == [ToolCall(name="calculator", arguments={"expression": "624 * 89 - 655"})]
        assert (info["turn"], info["tool_calls"], info["tool_errors"], info["void"], info["answer"]) == (1, 1, 0, False, None)

        reply, reward, terminated, truncated, info = env.step("The answer is \\boxed{54881}.")
        assert (reply, reward, terminated, truncated) == ([], 1.0, True, False)
        assert (info["turn"], info["answer"], info["correct"], info["void"]) == (2, "54881", True, False)


def test_every_call_gets_one_tool_message_saying_what_was_wrong():
    action = "\n".join(
        [
            call("calculator", expression="2 ** 10"),
            '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1 +\n</tool_call>',
            call("calculater", expression="1 + 1"),
            call("calculator", expr="1 + 1"),
            call("calculator", expression="1 / 0"),
            "and also \\boxed{54881}",  # ignored: a turn with tool calls is not a final answer
        ]
    )
    with ToolEnv(tasks=[TASK]) as env:
        env.reset(seed=0)
        reply, reward, terminated, truncated, info = env.step(action)
    assert [m.role for m in reply] == ["tool"] * 5
    assert reply[0].content == "1024"
    assert reply[1].content.startswith("Error: invalid JSON")
    assert reply[2].content.startswith("Error: unknown tool 'calculater'") and "Did you mean 'calculator'?" in reply[2].content
    assert "expression" in reply[3].content and "expr" in reply[3].content
    assert reply[4].content.startswith("Error:") and "zero" in reply[4].content
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert (info["tool_calls"], info["tool_errors"], info["void"], info["answer"]) == (5, 4, False, None)
    assert [c.name for c in info["parsed_tool_calls"]] == ["calculator", "calculater", "calculator", "calculator"]


def test_a_turn_whose_calls_all_fail_is_void_and_the_episode_goes_on():
    with ToolEnv(tasks=[TASK]) as env:
        env.reset(seed=0)
        reply, _, terminated, _, info = env.step("<tool_call>{oops}</tool_call>")
        assert len(reply) == 1 and not terminated
        assert (info["tool_calls"], info["tool_errors"], info["void"], info["parsed_tool_calls"]) == (1, 1, True, [])
        assert env.step(call("calculator", expression="1 + 1"))[4]["void"] is False


def test_stopping_without_a_call_or_an_answer_ends_a_void_episode():
    with ToolEnv(tasks=[TASK], format_penalty=0.1) as env:
        env.reset(seed=0)
        reply, reward, terminated, truncated, info = env.step("Hmm, I am not sure how to continue.")
    assert (reply, reward, terminated, truncated) == ([], -0.1, True, False)
    assert info["void"] is True and info["correct"] is None


def test_a_wrong_final_answer_scores_zero():
    with ToolEnv(tasks=[TASK]) as env:
        env.reset(seed=0)
        _, reward, terminated, _, info = env.step("\\boxed{55536}")
    assert (reward, terminated, info["correct"]) == (0.0, True, False)


def test_the_turn_budget_truncates_after_running_the_last_turn():
    with ToolEnv(tasks=[TASK], max_turns=2) as env:
        env.reset(seed=0)
        assert env.step(call("calculator", expression="624 * 89"))[2:4] == (False, False)
        reply, reward, terminated, truncated, info = env.step(call("calculator", expression="55536 - 655"))
        assert reply[0].content == "54881"  # the last turn still ran its tools
        assert (reward, terminated, truncated, info["turn"]) == (0.0, False, True, 2)
        with pytest.raises(EnvError, match="after the episode ended"):
            env.step("\\boxed{54881}")


@tool
def shout(text: str, times: int) -> str:
    """Repeat a text.

    Args:
        text: What to repeat.
        times: How many times.
    """
    return text * times


def test_long_tool_output_is_cut_to_the_budget_with_a_visible_marker():
    with ToolEnv(tasks=[TASK], tools=ToolRegistry([shout])) as env:
        env.reset(seed=0)
        [long, short] = env.step(call("shout", text="ab", times=5000) + call("shout", text="ab", times=3))[0]
    assert long.content == "ab" * 512 + "...[truncated]"  # 256 tokens' worth: 1024 characters
    assert short.content == "ababab"
    with ToolEnv(tasks=[TASK], max_tool_output_chars=10) as env:
        env.reset(seed=0)
        [reply] = env.step(call("calculator", expression="2 ** 100"))[0]
    assert reply.content == "1267650600...[truncated]"


def test_tool_env_rejects_impossible_configurations():
    with pytest.raises(EnvError, match=r"sends ```python blocks to a tool named 'python', but the registry has only \['calculator'\]"):
        ToolEnv(tool_call_style="python")
    with pytest.raises(EnvError, match="empty tool registry"):
        ToolEnv(tools=ToolRegistry())
    with pytest.raises(EnvError, match="tool_call_style must be 'hermes' or 'python'"):
        ToolEnv(tool_call_style="json")
    with pytest.raises(EnvError, match="max_tool_output_chars must be at least 1"):
        ToolEnv(max_tool_output_chars=0)


in_flight = 0
most_in_flight = 0
_lock = threading.Lock()


@tool
def slow_square(x: int) -> int:
    """Square a number, slowly.

    Args:
        x: The number.
    """
    global in_flight, most_in_flight
    with _lock:
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
    time.sleep(0.3)
    with _lock:
        in_flight -= 1
    return x * x


def test_tool_calls_run_concurrently_without_blocking_the_event_loop():
    async def episode():
        with ToolEnv(tasks=[TASK], tools=ToolRegistry([slow_square])) as env:
            await env.areset(seed=0)
            return await env.astep(call("slow_square", x=3) + call("slow_square", x=4) + call("slow_square", x=5))

    (reply, *_), ticks = ticks_while(episode)
    assert [m.content for m in reply] == ["9", "16", "25"]
    assert most_in_flight == 3  # the three calls of the turn overlapped
    assert ticks >= 10  # and the loop ran meanwhile


def test_concurrent_async_episodes_match_sync_ones():
    tasks = arithmetic_tasks(6, seed=1, difficulty=2)
    script = [call("calculator", expression="12345 * 678"), "<tool_call>{", "\\boxed{8369910}"]

    def sync_episode(seed: int) -> list:
        with ToolEnv(tasks=tasks) as env:
            return [env.reset(seed=seed)] + [env.step(action) for action in script]

    async def async_episode(seed: int) -> list:
        with ToolEnv(tasks=tasks) as env:
            return [await env.areset(seed=seed)] + [await env.astep(action) for action in script]

    async def all_episodes() -> list:
        return await asyncio.gather(*(async_episode(seed) for seed in range(6)))

    assert asyncio.run(all_episodes()) == [sync_episode(seed) for seed in range(6)]


# ---------------------------------------------------------------------------------------------
# ToolEnv with the python tool, in the real bubblewrap sandbox
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def python_tools():
    """Calculator and python tools sharing one sandbox, as a training run would share them across envs."""
    with PythonSandbox(timeout_s=5.0) as sandbox:
        yield ToolRegistry([Calculator(), PythonTool(sandbox)])


def test_python_style_runs_fenced_code_in_the_sandbox(python_tools):
    with ToolEnv(tasks=[TASK], tools=python_tools, tool_call_style="python") as env:
        messages, info = env.reset(seed=0)
        assert (info["tool_call_style"], info["tools"]) == ("python", [])  # fences need no schema...
        assert "```python" in messages[0].content  # ...the system prompt explains them
        action = "```python\nprint(624 * 89 - 655)\n```\nand\n```python\nopen('/etc/passwd').read()\n```"
        [ok, failed], reward, terminated, _, info = env.step(action)
        assert (ok.name, ok.content) == ("python", "54881")
        assert "FileNotFoundError" in failed.content and "[exit code 1]" in failed.content  # the host's files are not there
        assert (reward, terminated, info["tool_calls"]) == (0.0, False, 2)
        [unclosed], _, terminated, _, info = env.step("```python\nprint(1)\n")
        assert "not closed" in unclosed.content and (info["tool_errors"], info["void"], terminated) == (1, True, False)
        assert env.step("So the answer is \\boxed{54881}.")[1:3] == (1.0, True)


def test_python_runs_do_not_block_the_event_loop(python_tools):
    async def episode():
        with ToolEnv(tasks=[TASK], tools=python_tools, tool_call_style="python") as env:
            await env.areset(seed=0)
            return await env.astep("```python\nimport time\ntime.sleep(0.5)\nprint('done')\n```")

    ([reply], *_), ticks = ticks_while(episode)
    assert reply.content == "done"
    assert ticks >= 10


def test_envs_configured_with_the_python_tool_by_name_share_one_sandbox_that_outlives_them():
    # A config's tools = ["python"]: every episode's env would otherwise start and kill a sandbox pool of its own.
    first = ToolEnv(tasks=[TASK], tools=["python"], tool_call_style="python")
    with ToolEnv(tasks=[TASK], tools=["python"], tool_call_style="python") as second:
        assert first.tools.get("python").sandbox is second.tools.get("python").sandbox is shared_sandbox()
        first.close()
        second.reset(seed=0)
        [reply], *_ = second.step("```python\nprint(6 * 7)\n```")
        assert reply.content == "42"  # still open after the other env closed
    assert shared_sandbox().run("print(1)").stdout == "1\n"


def test_tool_math_with_python_passes_check_env(python_tools):
    tasks = arithmetic_tasks(3, seed=0, difficulty=3)
    with gymnasium.make("alp_agents/ToolMath-v0", tasks=tasks, tools=python_tools, tool_call_style="python") as env:
        check_env(env)
    with gymnasium.make("alp_agents/ToolMath-v0", tasks=tasks, tools=python_tools) as env:
        check_env(env)  # hermes calls to either tool
    assert python_tools.get("python")(code="print(1)") == "1"  # closing the envs left the shared tools open


def test_a_turn_result_written_with_the_old_void_turn_name_says_its_new_name():
    with pytest.raises(ValueError, match=r"void_turn is now called void: write TurnResult\(\.\.\., void=\.\.\.\)"):
        TurnResult(void_turn=True)
    assert TurnResult(void=True).void is True
