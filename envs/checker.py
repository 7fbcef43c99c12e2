"""check_env: does an environment keep the TextEnv contract that agent loops and trainers rely on?

Modelled on gymnasium's `utils/env_checker.py`: it plays a few short episodes with fixed seeds and
deliberately bad actions, and raises EnvError at the first broken rule, with the likely cause and
the fix. In order, it checks that:

1. the env is a gymnasium.Env with the async twins `areset`/`astep` and gymnasium spaces (an env that
   `gymnasium.make` returned inside its default OrderEnforcing/PassiveEnvChecker is checked inside them,
   as the agent loop plays it; any other wrapper is refused, as training refuses it);
2. `reset` returns (list of Message, ResetInfo): system message first if any, a user message last,
   a `tool_call_style` whenever there are `tools`, and `tools` for the Hermes style; `reset(seed=s)` twice gives equal results and
   seeds `self.np_random`; `reset(options={"task": task})` plays that task;
3. bad actions (an empty turn, junk text; with Hermes-style tools a call with broken JSON, an
   unknown tool, invalid arguments; with python-style tools an unclosed ```python block) do not
   raise; each step returns (list of Message, finite reward, bool, bool, StepInfo) with tool/user
   replies only and one tool message per tool call; a bad tool call gets a tool message saying
   what was wrong, and the episode goes on;
4. an episode of one bad action repeated ends (terminated or truncated) within `max_turns` steps;
5. the same seed and actions give the same results twice, and `areset`/`astep` agree with `reset`/`step`.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium
from pydantic import BaseModel, TypeAdapter, ValidationError
from typing_extensions import TypedDict  # pydantic can validate typing.TypedDict only from Python 3.12

from alp_agents.envs.base import ResetInfo, TextEnv, env_the_loop_plays
from alp_agents.errors import EnvError
from alp_agents.trajectory import Message, StepInfo

_RESET_INFO = TypeAdapter(ResetInfo)
_STEP_INFO = TypeAdapter(TypedDict("StepInfoKeys", {name: field.annotation for name, field in StepInfo.model_fields.items()}))  # type: ignore[misc]
"""StepInfo's fields, all required: the info TextEnv.astep returns has every one (the agent loop would default a missing one)."""
_FIX_VIA_RESPOND = "implement `async def respond(self, action) -> TurnResult` and let TextEnv build the step's return value"


@dataclass(frozen=True)
class _Probe:
    """One episode of the check: reset with the seed, then play `action` once or until the episode ends."""

    label: str
    action: str
    bad_tool_call: bool = False
    """The action is a broken tool call: the env must answer with a tool message and go on."""
    until_done: bool = False
    """Repeat the action until the episode ends (the termination check), instead of playing it once."""


Record = list[dict[str, Any]]
"""One played probe: its reset and each step, as dicts of named return values."""


def check_env(env: gymnasium.Env[Any, Any], *, max_turns: int = 64, seed: int = 123) -> None:
    """Raise EnvError if `env` breaks the TextEnv contract (see the module docstring for the rules).

    `max_turns` bounds the episode of a repeated bad action; `seed` is the seed every probe resets with.
    The env must be able to reset without options (construct it with `tasks=[...]`). Call this from
    synchronous code: it uses both the sync and the async API.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise EnvError("check_env runs the env's sync API, which cannot run inside an event loop: call it from sync code (or `await asyncio.to_thread(check_env, env)`)")
    env = env_the_loop_plays(env, "check_env's env")  # exactly what training plays: gymnasium's default wrappers are left out
    _check_interface(env)
    reset_info = _check_reset(env, seed)
    probes = _probes(reset_info)
    first = _play(probes, env.reset, env.step, seed, max_turns, validate=env)
    second = _play(probes, env.reset, env.step, seed, max_turns)
    _compare(first, second, probes, "step() is not deterministic: with the same seed and actions, {where} was {a} and then {b}. "
             "Most likely the reply or reward uses an unseeded random source, the clock, or state left over from the previous episode: "
             "draw randomness from self.np_random and reset per-episode state in reset")
    with asyncio.Runner() as runner:
        third = _play(probes, lambda **kw: runner.run(env.areset(**kw)), lambda a: runner.run(env.astep(a)), seed, max_turns)
    _compare(first, third, probes, "areset()/astep() disagree with reset()/step(): {where} was {a} from step() but {b} from astep(). "
             f"Most likely reset or step is overridden without its async twin: {_FIX_VIA_RESPOND} (step runs astep)")


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


def _check_interface(env: gymnasium.Env[Any, Any]) -> None:
    if not isinstance(env, gymnasium.Env):
        raise EnvError(f"expected a gymnasium.Env, got {type(env).__name__}: subclass alp_agents.envs.TextEnv")
    for name in ("areset", "astep"):
        if not inspect.iscoroutinefunction(getattr(env, name, None)):
            raise EnvError(f"{type(env).__name__}.{name} is missing or not `async def`: agent loops await it. Subclass TextEnv, which provides it")
    for name in ("observation_space", "action_space"):
        if not isinstance(getattr(env, name, None), gymnasium.spaces.Space):
            raise EnvError(f"{type(env).__name__}.{name} is not a gymnasium space: call TextEnv.__init__ (super().__init__(...)), which declares both")


def _check_reset(env: gymnasium.Env[Any, Any], seed: int) -> dict[str, Any]:
    """Validate reset and its determinism; return the reset info."""
    first = _call(lambda: env.reset(seed=seed), f"reset(seed={seed})", "if it needs a task, construct it with tasks=[...]")
    messages, info = _validate_reset(env, first)
    if getattr(env, "np_random_seed", seed) != seed:
        raise EnvError(f"reset(seed={seed}) did not seed self.np_random: the first line of an overridden reset/areset must be super().reset(seed=seed)")
    again = _call(lambda: env.reset(seed=seed), f"reset(seed={seed})", "")
    difference = _difference({"observation": messages, "info": info}, {"observation": again[0], "info": again[1]}, "")
    if difference is not None:
        path, a, b = difference
        raise EnvError(
            f"reset(seed={seed}) is not deterministic: {path} was {a} and then {b}. Most likely the task or prompt comes from an "
            "unseeded random source (random, numpy's global RNG, the clock, a set's order): draw from self.np_random, which reset(seed=...) seeds"
        )
    if isinstance(env, TextEnv):
        task = env.task
        played = _call(lambda: env.reset(options={"task": task}), "reset(options={'task': task})", "")
        if played[1].get("task_id") != task.id or played[0] != messages:
            raise EnvError(
                f"reset(options={{'task': task}}) did not play task {task.id!r} (got task_id {played[1].get('task_id')!r}): "
                "most likely reset ignores its options; TextEnv.areset reads options['task'], do not bypass it"
            )
    return info


def _validate_reset(env: gymnasium.Env[Any, Any], result: Any) -> tuple[list[Message], dict[str, Any]]:
    _check_arity(result, 2, "reset()", "(observation, info)", "")
    messages, info = result
    _validate_messages(env, messages, "reset()")
    if not messages:
        raise EnvError("reset() returned no messages: the episode must open with at least the task's prompt as a user message")
    roles = [m.role for m in messages]
    if roles[-1] != "user" or "system" in roles[1:] or "tool" in roles:
        raise EnvError(f"reset() returned roles {roles}: an episode opens with an optional system message and ends its opening with a user message (the task)")
    _validate_info(_RESET_INFO, info, "reset()", "return TextEnv.areset's info (or build a ResetInfo)")
    if info["tools"] and info["tool_call_style"] is None:
        raise EnvError(
            f"reset() info has {len(info['tools'])} tools but tool_call_style=None: an env with tools must say how calls are "
            "written: set the class attribute tool_call_style = 'hermes' (or 'python')"
        )
    if info["tool_call_style"] == "hermes" and not info["tools"]:
        raise EnvError("reset() info has tool_call_style='hermes' but no tools: the model cannot know which tools exist; return their schemas from tool_schemas()")
    return messages, info


def _validate_messages(env: gymnasium.Env[Any, Any], messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not all(isinstance(m, Message) for m in messages):
        raise EnvError(f"{where} must return a list of alp_agents.trajectory.Message as its observation, got {_short(messages)}")
    if messages not in env.observation_space:
        raise EnvError(f"{where}'s observation is not in env.observation_space ({env.observation_space}): declare it as MessageList() (TextEnv does)")


def _validate_info(adapter: TypeAdapter[Any], info: Any, where: str, fix: str) -> None:
    if not isinstance(info, dict):
        raise EnvError(f"{where} must return a dict as info, got {_short(info)}: {fix}")
    try:
        adapter.validate_python(info, strict=True)
    except ValidationError as e:
        problems = "; ".join(f"info[{'.'.join(map(repr, err['loc']))}]: {err['msg']}" for err in e.errors())
        raise EnvError(f"{where} returned an invalid info ({problems}): {fix}") from e


def _probes(reset_info: dict[str, Any]) -> list[_Probe]:
    probes = [_Probe("an empty turn", ""), _Probe("junk text", "}{ \x00 \u202e\U0001f600 <|im_end|> ```" + "x" * 3000)]
    if reset_info["tool_call_style"] == "hermes":
        name = _first_tool_name(reset_info["tools"])
        broken_json = f'<tool_call>\n{{"name": "{name}", "arguments": {{"expression": \n</tool_call>'
        probes += [
            _Probe("repeated tool calls with broken JSON", broken_json, bad_tool_call=True, until_done=True),
            _Probe("a call to an unknown tool", '<tool_call>\n{"name": "no_such_tool", "arguments": {}}\n</tool_call>', bad_tool_call=True),
            _Probe("a call with invalid arguments", f'<tool_call>\n{{"name": "{name}", "arguments": {{"no_such_argument": 1}}}}\n</tool_call>', bad_tool_call=True),
        ]
    elif reset_info["tool_call_style"] == "python":
        probes.append(_Probe("repeated unclosed ```python blocks", "```python\nprint(1 + 1)\n", bad_tool_call=True, until_done=True))
    else:
        probes.append(_Probe("repeated turns without an answer", "I am not sure.", until_done=True))
    return probes


def _first_tool_name(tools: list[dict[str, Any]]) -> str:
    schema = tools[0].get("function", tools[0])
    return str(schema.get("name", "tool"))


def _play(probes: list[_Probe], reset: Callable[..., Any], step: Callable[[str], Any], seed: int, max_turns: int,
          validate: gymnasium.Env[Any, Any] | None = None) -> list[Record]:
    """Play every probe; with `validate` (the env), check each return value as it comes."""
    records = []
    for probe in probes:
        opened = _call(lambda: reset(seed=seed), f"reset(seed={seed})", "")
        _check_arity(opened, 2, f"reset(seed={seed})", "(observation, info)", "")
        record: Record = [{"observation": opened[0], "info": opened[1]}]
        while True:
            turn = len(record)
            where = f"step({_short(probe.action, 48)}) on turn {turn} ({probe.label})"
            result = _call(lambda: step(probe.action), where, "bad model output must become a message (e.g. a tool message saying what was wrong), never an exception")
            _check_arity(result, 5, where, "(observation, reward, terminated, truncated, info)",
                         ". A 4-tuple is the old gym API: split `done` into terminated (the task ended) and truncated (the turn budget ran out)")
            if validate is not None:
                _validate_step(validate, result, where, probe)
            observation, reward, terminated, truncated, info = result
            record.append({"observation": observation, "reward": reward, "terminated": terminated, "truncated": truncated, "info": info})
            if terminated or truncated or not probe.until_done:
                break
            if turn >= max_turns:
                raise EnvError(
                    f"the episode of {probe.label} was still running after {max_turns} turns: set a turn budget "
                    f"(TextEnv(max_turns=...) truncates there), or pass check_env a larger max_turns if the env's budget is larger"
                )
        records.append(record)
    return records


def _check_arity(result: Any, size: int, where: str, expected: str, hint: str) -> None:
    if not (isinstance(result, tuple) and len(result) == size):
        got = f"{len(result)} values" if isinstance(result, tuple) else _short(result)
        raise EnvError(f"{where} returned {got}; expected {size}: {expected}{hint}")


def _validate_step(env: gymnasium.Env[Any, Any], result: tuple[Any, ...], where: str, probe: _Probe) -> None:
    messages, reward, terminated, truncated, info = result
    _validate_messages(env, messages, where)
    roles = [m.role for m in messages]
    if any(role not in ("tool", "user") for role in roles):
        raise EnvError(
            f"{where} replied with roles {roles}: the action is the assistant's message, and the env answers only with "
            "tool results (role 'tool') or feedback (role 'user')"
        )
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise EnvError(f"{where} returned reward {reward!r}: it must be a finite float. Most likely a division by zero or log(0) in the reward")
    for name, flag in (("terminated", terminated), ("truncated", truncated)):
        if not isinstance(flag, bool):
            raise EnvError(f"{where} returned {name}={flag!r} ({type(flag).__name__}): it must be a bool")
    _validate_info(_STEP_INFO, info, where, _FIX_VIA_RESPOND)
    tool_messages = roles.count("tool")
    if tool_messages != info["tool_calls"]:
        raise EnvError(f"{where} returned {tool_messages} tool messages for info['tool_calls']={info['tool_calls']}: answer every tool call with exactly one tool message")
    if probe.bad_tool_call:
        if tool_messages == 0 or info["tool_errors"] == 0:
            raise EnvError(
                f"{where} gave no tool message reporting the error (tool messages: {tool_messages}, info['tool_errors']: {info['tool_errors']}). "
                "A malformed call, unknown tool or invalid arguments must come back as a tool message saying what was wrong"
            )
        if terminated:
            raise EnvError(f"{where} ended the episode (terminated=True): a bad tool call is reported to the model, and the episode goes on")


def _compare(first: list[Record], second: list[Record], probes: list[_Probe], message: str) -> None:
    for probe, a, b in zip(probes, first, second):
        if len(a) != len(b):
            raise EnvError(message.format(where=f"the number of turns in the episode of {probe.label}", a=len(a) - 1, b=len(b) - 1))
        for turn, (call_a, call_b) in enumerate(zip(a, b)):
            difference = _difference(call_a, call_b, "")
            if difference is not None:
                path, value_a, value_b = difference
                call = "reset()" if turn == 0 else f"step() on turn {turn}"
                raise EnvError(message.format(where=f"{path} of {call} ({probe.label})", a=value_a, b=value_b))


def _difference(a: Any, b: Any, path: str) -> tuple[str, str, str] | None:
    """(path, a, b) at the first place two return values differ, or None when they are equal."""
    if isinstance(a, BaseModel) and type(a) is type(b):
        return _difference(a.model_dump(), b.model_dump(), path)
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"the keys of {path or 'the dict'}", _short(sorted(a)), _short(sorted(b))
        children = (_difference(a[k], b[k], f"{path}[{k!r}]" if path else k) for k in a)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"the length of {path}", str(len(a)), str(len(b))
        children = (_difference(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    else:
        return (path, _short(a), _short(b)) if type(a) is not type(b) or a != b else None
    return next((d for d in children if d is not None), None)


def _call(function: Callable[[], Any], what: str, fix: str) -> Any:
    try:
        return function()
    except Exception as e:
        hint = f": {fix}" if fix else ""
        raise EnvError(f"{what} raised {type(e).__name__}: {e}{hint}") from e


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
