"""check_env catches each kind of broken environment, and says what to fix."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import gymnasium
import pytest

from alp_agents.envs import MathEnv, Task, TextEnv, ToolEnv, TurnResult, check_env
from alp_agents.errors import EnvError
from alp_agents.trajectory import Message

TASKS = [Task(id=f"t{i}", prompt=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(5)]


class Echo(TextEnv):
    """A correct env: it answers each turn with user feedback until the model says the answer."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(tasks=TASKS, max_turns=3, **kwargs)

    async def respond(self, action: str) -> TurnResult:
        correct = action.strip() == self.task.answer
        if correct:
            return TurnResult(reward=1.0, terminated=True, answer=action.strip(), correct=True)
        return TurnResult(messages=[Message(role="user", content="No, try again.")], void=True)


# --- one class per broken rule ------------------------------------------------------------------


class UnseededPrompt(Echo):
    def opening(self, task: Task) -> list[Message]:
        return [Message(role="user", content=f"{task.prompt} (variant {random.random()})")]


class ForgetsToSeed(Echo):
    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[list[Message], dict[str, Any]]:
        messages, info = await super().areset(seed=None, options=options)
        return messages, info


class OldGymStep(Echo):
    def step(self, action: str) -> Any:
        messages, reward, terminated, truncated, info = super().step(action)
        return messages, reward, terminated or truncated, info


class NanReward(Echo):
    async def astep(self, action: str) -> Any:
        messages, _, terminated, truncated, info = await super().astep(action)
        return messages, float("nan"), terminated, truncated, info


class ParsesBlindly(Echo):
    async def respond(self, action: str) -> TurnResult:
        json.loads(action)  # model text is not trusted input
        return await super().respond(action)


class NeverEnds(Echo):
    def __init__(self) -> None:
        TextEnv.__init__(self, tasks=TASKS, max_turns=10_000)


class SyncOnlyBonus(Echo):
    def step(self, action: str) -> Any:
        messages, reward, terminated, truncated, info = super().step(action)
        return messages, reward + 0.5, terminated, truncated, info


class SpeaksForTheAssistant(Echo):
    async def respond(self, action: str) -> TurnResult:
        return TurnResult(messages=[Message(role="assistant", content="Let me try again.")])


class ReturnsStrings(Echo):
    async def astep(self, action: str) -> Any:
        _, reward, terminated, truncated, info = await super().astep(action)
        return ["No, try again."], reward, terminated, truncated, info


class HomemadeInfo(Echo):
    async def astep(self, action: str) -> Any:
        messages, reward, terminated, truncated, _ = await super().astep(action)
        return messages, reward, terminated, truncated, {"done": terminated}


class IntegerFlags(Echo):
    async def astep(self, action: str) -> Any:
        messages, reward, terminated, truncated, info = await super().astep(action)
        return messages, reward, int(terminated), truncated, info


class EndsWithSystem(Echo):
    def opening(self, task: Task) -> list[Message]:
        return [Message(role="user", content=task.prompt), Message(role="system", content="Be brief.")]


class ToolsWithoutStyle(Echo):
    def tool_schemas(self) -> list[dict[str, Any]]:
        return [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]


class HermesWithoutSchemas(Echo):
    tool_call_style = "hermes"


class CarriesState(Echo):
    episodes = 0

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[list[Message], dict[str, Any]]:
        type(self).episodes += 1
        return await super().areset(seed=seed, options=options)

    async def respond(self, action: str) -> TurnResult:
        return TurnResult(reward=float(self.episodes), terminated=True)


class CalculatorEnv(ToolEnv):
    def __init__(self) -> None:
        super().__init__(tasks=TASKS)


class SwallowsBadCalls(CalculatorEnv):
    async def respond(self, action: str) -> TurnResult:
        result = await super().respond(action)
        kept = [m for m in result.messages if not m.content.startswith("Error:")]
        return result.model_copy(update={"messages": kept, "tool_calls": len(kept), "tool_errors": 0, "parsed_tool_calls": []})


class GivesUpOnBadCalls(CalculatorEnv):
    async def respond(self, action: str) -> TurnResult:
        result = await super().respond(action)
        return result.model_copy(update={"terminated": result.terminated or result.tool_errors > 0})


class DropsToolMessages(CalculatorEnv):
    async def respond(self, action: str) -> TurnResult:
        result = await super().respond(action)
        return result.model_copy(update={"messages": result.messages[:0]})


class IgnoresTaskOption(Echo):
    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[list[Message], dict[str, Any]]:
        return await super().areset(seed=seed)


def wrapped_in_a_time_limit() -> gymnasium.Env[Any, Any]:
    return gymnasium.wrappers.TimeLimit(Echo(), max_episode_steps=5)


class NotAGymEnv:
    async def areset(self, **kwargs: Any) -> Any: ...

    async def astep(self, action: str) -> Any: ...


@pytest.mark.parametrize(
    ("make_env", "message"),
    [
        (UnseededPrompt, r"reset\(seed=123\) is not deterministic: observation\[0\]\['content'\] was .* unseeded random source .* self.np_random"),
        (ForgetsToSeed, r"did not seed self.np_random: .* must be super\(\).reset\(seed=seed\)"),
        (OldGymStep, r"returned 4 values; expected 5: \(observation, reward, terminated, truncated, info\). A 4-tuple is the old gym API"),
        (NanReward, r"returned reward nan: it must be a finite float"),
        (ParsesBlindly, r"step\(''\) on turn 1 \(an empty turn\) raised JSONDecodeError: .* bad model output must become a message"),
        (NeverEnds, r"the episode of repeated turns without an answer was still running after 64 turns: set a turn budget"),
        (SyncOnlyBonus, r"areset\(\)/astep\(\) disagree with reset\(\)/step\(\): reward of step\(\) on turn 1 \(an empty turn\) was 0.5 from step\(\) but 0.0"),
        (SpeaksForTheAssistant, r"replied with roles \['assistant'\]: the action is the assistant's message"),
        (ReturnsStrings, r"must return a list of alp_agents.trajectory.Message as its observation, got \['No, try again.'\]"),
        (HomemadeInfo, r"returned an invalid info \(info\['tool_calls'\]: Field required; .*info\['turn'\]: Field required\): implement `async def respond"),
        (IntegerFlags, r"returned terminated=0 \(int\): it must be a bool"),
        (EndsWithSystem, r"reset\(\) returned roles \['user', 'system'\]: an episode opens with an optional system message"),
        (ToolsWithoutStyle, r"reset\(\) info has 1 tools but tool_call_style=None: an env with tools must say how calls are written: set the class attribute"),
        (HermesWithoutSchemas, r"tool_call_style='hermes' but no tools: the model cannot know which tools exist"),
        (CarriesState, r"step\(\) is not deterministic: with the same seed and actions, reward of step\(\) on turn 1 \(an empty turn\) was \d\.0 and then \d\.0"),
        (SwallowsBadCalls, r"gave no tool message reporting the error"),
        (GivesUpOnBadCalls, r"ended the episode \(terminated=True\): a bad tool call is reported to the model, and the episode goes on"),
        (DropsToolMessages, r"returned 0 tool messages for info\['tool_calls'\]=1: answer every tool call with exactly one tool message"),
        (IgnoresTaskOption, r"reset\(options=\{'task': task\}\) did not play task 't\d'"),
        (MathEnv, r"MathEnv has no task to play: pass tasks=\[\.\.\.\]"),
        (NotAGymEnv, r"expected a gymnasium.Env, got NotAGymEnv: subclass alp_agents.envs.TextEnv"),
        (wrapped_in_a_time_limit, r"check_env's env is wrapped in TimeLimit, .* use the env's own max_turns instead of max_episode_steps"),
    ],
    ids=lambda value: value.__name__ if callable(value) else "",
)
def test_check_env_names_the_broken_rule_and_the_fix(make_env, message):
    env = make_env()
    with pytest.raises(EnvError, match=message):
        check_env(env)


def test_a_correct_custom_env_passes():
    with Echo() as env:
        check_env(env)


def test_check_env_refuses_to_run_inside_an_event_loop():
    async def main() -> None:
        with Echo() as env, pytest.raises(EnvError, match=r"cannot run inside an event loop: call it from sync code"):
            check_env(env)

    asyncio.run(main())


def test_an_env_made_by_gymnasium_with_its_default_wrappers_is_checked_as_training_plays_it():
    # gymnasium.register's defaults wrap a user's env in OrderEnforcing and PassiveEnvChecker; the loop plays the env inside.
    if "CheckedEcho-v0" not in gymnasium.registry:
        gymnasium.register("CheckedEcho-v0", entry_point=Echo)
    with gymnasium.make("CheckedEcho-v0") as env:
        assert type(env).__name__ == "OrderEnforcing"
        check_env(env)
