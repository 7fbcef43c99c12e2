"""TextEnv: the base of every environment, a gymnasium.Env whose actions are assistant turns.

An episode is a conversation. `reset` opens it with the task's messages (system prompt, user
prompt); each `step` takes the assistant's text for one turn and returns the environment's reply
(tool results or user feedback) as new messages. The async twins `areset`/`astep` are the real
implementation, so an agent loop can run many episodes concurrently; `reset`/`step` run them to
completion for plain synchronous code.

A subclass implements one method, `async def respond(self, action) -> TurnResult`, and may override
`opening(task)` (the first messages) and `tool_schemas()` (the tools the model is told about). The
task and the turn counter live on `self` (one env instance per episode is the usual pattern).
"""

from __future__ import annotations

import asyncio
import string
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import gymnasium
from gymnasium import spaces
from gymnasium.wrappers import OrderEnforcing, PassiveEnvChecker, TimeLimit
from pydantic import ConfigDict, Field, ValidationError, model_validator
from typing_extensions import TypedDict  # pydantic can validate typing.TypedDict only from Python 3.12

from alp_agents.envs.tasks import Task
from alp_agents.errors import EnvError
from alp_agents.threads import WorkerThreads
from alp_agents.tools.parsing import ToolCallStyle
from alp_agents.trajectory import Message, StepInfo, TurnFacts

T = TypeVar("T")


MAX_ACTION_CHARS = 1_000_000
"""Upper bound of the action space: far beyond any turn a token budget allows."""

GRADING_THREADS = WorkerThreads(8, "alp-grading")
"""Threads that wait for the grader (its symbolic work runs in killable processes, see grading.py).

Apart from the loop's default executor, which the trainer step uses: grading never queues behind
a training step, nor a step behind a batch of grading."""


class ResetInfo(TypedDict):
    """The `info` that `reset` returns: what an agent loop needs to render and run the episode."""

    task_id: str
    """Id of the task this episode plays."""
    tools: list[dict[str, Any]]
    """JSON schemas of the tools, in the shape chat templates render (`{"type": "function", ...}`); empty without tools."""
    tool_call_style: ToolCallStyle | None
    """How the env reads tool calls from an action; None when it has no tools."""
    max_turns: int
    """The env's turn budget: the episode is truncated after this many steps."""


class TurnResult(TurnFacts):
    """What an environment makes of one assistant turn: `respond` returns it, `step` unpacks it (its TurnFacts
    become the step's StepInfo)."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Message] = Field(default_factory=list)
    """The environment's reply: tool results (role "tool") or feedback (role "user"); may be empty."""
    reward: float = Field(default=0.0, allow_inf_nan=False)
    """Reward for this turn (finite)."""
    terminated: bool = False
    """The task is over (answered, or given up); the turn limit is not the subclass's business."""

    @model_validator(mode="before")
    @classmethod
    def _void_renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "void_turn" in data:
            raise ValueError("TurnResult's void_turn is now called void: write TurnResult(..., void=...)")
        return data


class AssistantText(spaces.Text):
    """The action space: one assistant turn, any Unicode string of at most `max_length` characters.

    gymnasium's Text space holds strings over a finite charset, but a model can write any character,
    so `contains` accepts every str up to `max_length`. `sample` draws printable ASCII strings of at
    most `sample_max_length` characters: enough to fuzz an env (and for gymnasium's own env checker),
    while a uniform length up to a million would only make the checker slow. Not flattenable.
    """

    def __init__(self, max_length: int = MAX_ACTION_CHARS, *, sample_max_length: int = 64, seed: int | None = None) -> None:
        super().__init__(max_length, min_length=0, charset=string.printable, seed=seed)
        self.sample_max_length = min(sample_max_length, max_length)

    def contains(self, x: Any) -> bool:
        """Any str of at most max_length characters."""
        return isinstance(x, str) and len(x) <= self.max_length

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        """A random printable string (length uniform in [0, sample_max_length] unless a mask gives it)."""
        if mask is None and probability is None:
            mask = (int(self.np_random.integers(0, self.sample_max_length + 1)), None)
        return super().sample(mask=mask, probability=probability)

    @property
    def is_np_flattenable(self) -> bool:
        """False: characters outside the sampling charset have no index to flatten to."""
        return False

    def __repr__(self) -> str:
        return f"AssistantText(max_length={self.max_length})"


class MessageList(spaces.Space[list[Message]]):
    """The observation space: a list of chat messages (`alp_agents.trajectory.Message`), possibly empty."""

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(shape=None, dtype=None, seed=seed)

    def contains(self, x: Any) -> bool:
        """A list whose items are all Message instances."""
        return isinstance(x, list) and all(isinstance(message, Message) for message in x)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MessageList)

    def __hash__(self) -> int:
        return hash(MessageList)

    def __repr__(self) -> str:
        return "MessageList()"


class TextEnv(gymnasium.Env[list[Message], str]):
    """A text environment: observations are lists of chat messages, actions are assistant turns.

    Lifecycle:

    - `reset(seed=..., options={"task": task})` starts an episode on `task`, or, without that option,
      on a task drawn from the constructor's `tasks` with `self.np_random` (so a seed picks the same
      task every time). It returns the opening messages and a ResetInfo.
    - `step(action)` plays one assistant turn: `respond(action)` decides the reply, reward and
      termination; `step` counts the turn and issues truncation. A turn that ends the task sets
      `terminated`; the step that uses up `max_turns` without terminating sets `truncated` instead.
      That last turn is processed in full first (its tools run, its reply is returned), so nothing a
      trainer records is skipped; only the model never gets to read the reply. Stepping before
      `reset` or after the episode ended raises EnvError.
    - Bad model output is never an exception: a subclass turns it into a message and counts it in
      the step's info (`tool_errors`, `void`).
    - `close()` releases what the env owns (the event loop the sync methods use, and whatever a
      subclass adds); it is idempotent, and `with env:` closes on exit.

    `reset`/`step` cannot be called from inside a running event loop; there, await `areset`/`astep`.
    """

    metadata: dict[str, Any] = {"render_modes": []}  # nothing to render: the messages are the state
    tool_call_style: ToolCallStyle | None = None
    """How tool calls are written in actions; None for an env without tools."""

    def __init__(self, *, tasks: Sequence[Task] | None = None, max_turns: int = 1, system_prompt: str = "") -> None:
        """`tasks`: the tasks `reset` draws from when not given one; `max_turns`: the turn budget;
        `system_prompt`: the system message that opens every episode ("": no system message)."""
        if max_turns < 1:
            raise EnvError(f"max_turns must be at least 1, got {max_turns}")
        self.tasks: list[Task] = [_as_task(task, f"tasks[{i}]") for i, task in enumerate(tasks or [])]
        self.max_turns = max_turns
        self.system_prompt = system_prompt
        self.observation_space = MessageList()
        self.action_space = AssistantText()
        self.turn = 0
        """Turns played in the current episode."""
        self._task: Task | None = None
        self._over = False
        self._runner: asyncio.Runner | None = None

    @property
    def task(self) -> Task:
        """The task of the current episode."""
        if self._task is None:
            raise EnvError(f"{type(self).__name__} has no task yet: call reset() first")
        return self._task

    # --- what subclasses implement ----------------------------------------------------------------

    async def respond(self, action: str) -> TurnResult:
        """Play one assistant turn: return the reply messages, the reward and whether the task is over."""
        raise NotImplementedError(f"{type(self).__name__} must implement `async def respond(self, action: str) -> TurnResult`")

    def opening(self, task: Task) -> list[Message]:
        """The messages that open an episode: the system prompt (the task's own, Task.system, else the env's; none if
        empty), then the task's prompt as the user."""
        system = self.system_prompt if task.system is None else task.system
        return [*([Message(role="system", content=system)] if system else []), Message(role="user", content=task.prompt)]

    def expert_action(self, conversation: list[Message]) -> str | None:
        """A scripted expert's next assistant text in the current episode, given the conversation so far (for
        `alp make-demos`: demonstrations to warm-start a model by SFT); None: this environment has no expert."""
        return None

    def tool_schemas(self) -> list[dict[str, Any]]:
        """JSON schemas of the tools the model may call (none by default)."""
        return []

    # --- the gymnasium API, async first ---------------------------------------------------------

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[list[Message], dict[str, Any]]:
        """Start an episode; returns (opening messages, ResetInfo). Options: {"task": Task} only."""
        super().reset(seed=seed)
        self._task = self._choose_task(options or {})
        self.turn = 0
        self._over = False
        info = ResetInfo(task_id=self._task.id, tools=self.tool_schemas(), tool_call_style=self.tool_call_style, max_turns=self.max_turns)
        return self.opening(self._task), dict(info)

    async def astep(self, action: str) -> tuple[list[Message], float, bool, bool, dict[str, Any]]:
        """Play one turn; returns (new messages, reward, terminated, truncated, the StepInfo as a dict)."""
        if self._task is None:
            raise EnvError(f"step() called before reset() on {type(self).__name__}: call reset() to start an episode")
        if self._over:
            raise EnvError(f"step() called after the episode ended (turn {self.turn}): call reset() to start a new one")
        if not isinstance(action, str):
            raise EnvError(f"the action must be the assistant's text (a str), got {type(action).__name__}")
        self.turn += 1
        result = await self.respond(action)
        truncated = not result.terminated and self.turn >= self.max_turns  # the only place truncation is issued
        self._over = result.terminated or truncated
        info = StepInfo(turn=self.turn, **{name: getattr(result, name) for name in TurnFacts.model_fields})
        return list(result.messages), result.reward, result.terminated, truncated, info.as_info()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[list[Message], dict[str, Any]]:
        """Synchronous `areset`, which calls `super().reset(seed=seed)` first, as gymnasium requires."""
        return self._run(self.areset(seed=seed, options=options))

    def step(self, action: str) -> tuple[list[Message], float, bool, bool, dict[str, Any]]:
        """Synchronous `astep`.

        Returns:
            observation (list[Message]): the environment's reply to append to the conversation.
            reward (float): the reward of this turn (finite).
            terminated (bool): the task ended (a final answer, or the model stopped without one).
            truncated (bool): the turn budget `max_turns` ran out first (outside the task's own rules).
            info (dict): a StepInfo's fields (`StepInfo.as_info()`): tool_calls, parsed_tool_calls, tool_errors, void, answer,
                correct, turn.
        """
        return self._run(self.astep(action))

    def close(self) -> None:
        """Release the event loop used by the sync methods; safe to call twice."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        super().close()

    # --- plumbing ---------------------------------------------------------------------------------

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coroutine.close()
            raise EnvError(f"{type(self).__name__}.reset()/step() called inside a running event loop: use `await env.areset(...)` / `await env.astep(...)`")
        if self._runner is None:
            self._runner = asyncio.Runner()  # one loop for all sync calls, so tools may keep loop-bound state
        return self._runner.run(coroutine)

    def _choose_task(self, options: Mapping[str, Any]) -> Task:
        unknown = sorted(set(options) - {"task"})
        if unknown:
            raise EnvError(f"reset() got unknown option(s) {unknown}; the only option is 'task' (a Task)")
        if "task" in options:
            return _as_task(options["task"], "options['task']")
        if not self.tasks:
            raise EnvError(f"{type(self).__name__} has no task to play: pass tasks=[...] to the constructor or reset(options={{'task': Task(...)}})")
        return self.tasks[int(self.np_random.integers(len(self.tasks)))]


GYMNASIUM_DEFAULT_WRAPPERS = (OrderEnforcing, PassiveEnvChecker)
"""What `gymnasium.register` wraps every env in by default: checks of reset/step order and of the spaces, which the
agent loop keeps by construction. They have no areset/astep, so the loop plays the env inside them."""


def env_the_loop_plays(env: gymnasium.Env[Any, Any], name: str) -> gymnasium.Env[Any, Any]:
    """`env`, or the env inside gymnasium's default wrappers: what the agent loop (and `check_env`) plays. EnvError, naming
    `name`, for any other wrapper, which the loop would bypass without a word, and for an env with no areset/astep."""
    inner: Any = env
    while not hasattr(inner, "areset") and isinstance(inner, GYMNASIUM_DEFAULT_WRAPPERS):
        inner = inner.env
    if hasattr(inner, "areset") and hasattr(inner, "astep"):
        return inner
    if isinstance(inner, gymnasium.Wrapper):
        hint = ("use the env's own max_turns instead of max_episode_steps" if isinstance(inner, TimeLimit)
                else "apply its logic inside the environment (or give the wrapper async areset/astep)")
        raise EnvError(f"{name} is wrapped in {type(inner).__name__}, which has no areset/astep, so the agent loop cannot play "
                       f"through it: {hint}")
    raise EnvError(f"{name} ({type(inner).__name__}) has no areset/astep: derive it from alp_agents.envs.TextEnv (or ToolEnv / "
                   "MathEnv), whose async twins the agent loop calls")


def _as_task(task: Any, where: str) -> Task:
    """A Task as is, or a mapping with Task's fields validated into one."""
    if isinstance(task, Task):
        return task
    if isinstance(task, Mapping):
        try:
            return Task.model_validate(task)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise EnvError(f"{where} is not a valid Task ({problems})") from e
    raise EnvError(f"{where} must be an alp_agents.envs.Task (or a dict of its fields), got {type(task).__name__}")
