"""The agent loop: environments + an inference engine -> Trajectory records a trainer can trust.

Token-in, token-out. An episode's token ids are built by appending, never by re-rendering:

    ids  = chat_template(opening messages)           mask 0   (the prompt)
    ids += engine's sampled ids for turn 1           mask 1   (with the engine's log-probs)
    ids += template ids of the tool results + next   mask 0   (tokenised from the new text only)
           generation prompt
    ids += engine's sampled ids for turn 2           mask 1
    ...

so the trainer scores exactly the tokens the engine sampled, in the context the engine saw, and
tool output never carries loss. The environment owns the turn budget: turns go on until it
terminates or truncates the episode. A turn cut by a token limit ends the episode (finish_reason
"max_tokens" for the per-turn limit, "context" for the total) without stepping the environment.

Isolation: an exception anywhere in an episode (an env that cannot be built, a tool crash, a
grader timeout, an engine error on one request, `episode_timeout_s`) ends that episode with
finish_reason "error" and the error in `Trajectory.error`; the batch goes on. The one exception
is EngineUnavailable (no engine left to ask): `collect` cancels every episode and raises it. A
callback that blocks the event loop (blocking code in an async env) stalls every episode and
every timeout; a watchdog thread logs a warning naming the function that blocks, and an episode
that overran its timeout meanwhile is failed once the loop runs again.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from pydantic import Field, model_validator
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from alp_agents.chat import continuation_token_ids, prompt_token_ids
from alp_agents.config import Config
from alp_agents.engines.base import InferenceEngine, SamplingConfig
from alp_agents.errors import EngineUnavailable
from alp_agents.seeding import derive_seed
from alp_agents.threads import WorkerThreads
from alp_agents.trajectory import EpisodeFinish, Message, StepInfo, Trajectory, Turn

logger = logging.getLogger(__name__)

LOOP_STALL_WARNING_S = 1.0
"""The event loop not running for this long (something blocked it) logs a warning during `collect`."""
CLOSE_THREADS = WorkerThreads(8, "alp-env-close")
"""Where finished episodes close their envs: closing may kill processes (a sandbox pool) and must stall neither the
other episodes' event loop nor the trainer step in the loop's default executor."""


class EpisodeEnv(Protocol):
    """What the loop needs from an environment: the async twins of TextEnv's reset/step, and close."""

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[list[Message], dict[str, Any]]: ...

    async def astep(self, action: str) -> tuple[list[Message], float, bool, bool, dict[str, Any]]: ...

    def close(self) -> None: ...


class RolloutLimits(Config):
    """Token and time limits of one episode. Its turn budget is the environment's (`max_turns` in `env.kwargs`): the
    env truncates the episode, which then ends with finish_reason 'max_turns'."""

    @model_validator(mode="before")
    @classmethod
    def _turns_moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_turns" in data:
            raise ValueError("rollout.limits.max_turns was removed: the environment owns the turn budget; set it in env.kwargs "
                             "(max_turns = N; on the command line --env-args '{\"max_turns\": N}')")
        return data

    max_tokens_per_turn: int = Field(256, ge=1)
    """Most tokens sampled in one assistant turn."""
    max_total_tokens: int = Field(2048, ge=16)
    """Most tokens in the whole episode (prompt, turns, tool results): the context budget."""
    episode_timeout_s: float = Field(300.0, gt=0)
    """Wall-clock limit of one episode; past it the episode fails with finish_reason 'error'."""


async def collect(
    env_factory: Callable[[], EpisodeEnv],
    tasks: Sequence[Any],
    engine: InferenceEngine,
    tokenizer: PreTrainedTokenizerBase,
    *,
    sampling: SamplingConfig,
    group_size: int = 1,
    limits: RolloutLimits | None = None,
    max_concurrency: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> list[Trajectory]:
    """Play `group_size` episodes of every task (one fresh env each) and return them, grouped, in task order.

    Episodes of the same task share a `group_id`. At most `max_concurrency` run at once. Episode i
    resets its env with seed `seed * 1_000_003 + i`; when `sampling.seed` is set, every generate
    request gets its own seed derived from it, the episode's seed and the turn, so a rollout can
    be replayed exactly (the training loop relies on this to resume). A failed
    episode comes back with finish_reason 'error'; cancelling `collect` cancels every episode and
    closes its environment, and so does an episode that finds the engine gone, whose
    EngineUnavailable `collect` then raises.
    """
    limits = limits or RolloutLimits()
    slots = asyncio.Semaphore(max_concurrency)
    bar = tqdm(total=len(tasks) * group_size, desc="rollout", unit="ep", disable=not progress, leave=False)
    started = time.perf_counter()
    sampled_tokens = failures = 0

    async def one(index: int, task: Any, group_id: str) -> Trajectory:
        nonlocal sampled_tokens, failures
        async with slots:
            trajectory = await run_episode(env_factory, task, engine, tokenizer, sampling, limits, seed=seed * 1_000_003 + index)
        trajectory.group_id = group_id
        sampled_tokens += trajectory.num_sampled_tokens
        failures += trajectory.finish_reason == "error"
        bar.update()
        bar.set_postfix(tok_s=f"{sampled_tokens / (time.perf_counter() - started):.0f}", failed=failures, refresh=False)
        return trajectory

    try:
        with _LoopWatchdog(LOOP_STALL_WARNING_S):
            async with asyncio.TaskGroup() as group:
                jobs = [
                    group.create_task(one(t * group_size + k, task, f"{t}:{_task_id(task)}"))
                    for t, task in enumerate(tasks)
                    for k in range(group_size)
                ]
    except* EngineUnavailable as lost:  # the group has cancelled the other episodes; only the engine's loss matters
        raise lost.exceptions[0] from None
    finally:
        bar.close()
    return [job.result() for job in jobs]


def collect_sync(*args: Any, **kwargs: Any) -> list[Trajectory]:
    """`collect` for code without an event loop (same arguments)."""
    return asyncio.run(collect(*args, **kwargs))


async def run_episode(
    env_factory: Callable[[], EpisodeEnv],
    task: Any,
    engine: InferenceEngine,
    tokenizer: PreTrainedTokenizerBase,
    sampling: SamplingConfig,
    limits: RolloutLimits,
    *,
    seed: int,
) -> Trajectory:
    """Play one episode; raises only on cancellation and EngineUnavailable (other failures are recorded in the trajectory)."""
    episode = _Episode(task_id=_task_id(task))
    env: EpisodeEnv | None = None
    try:
        env = env_factory()  # in the try: an env that cannot be built fails its episode, not the batch
        await _within(limits.episode_timeout_s, episode.play(env, task, engine, tokenizer, sampling, limits, seed))
    except EngineUnavailable:
        raise  # no engine left: every other episode would fail the same way, so the batch stops
    except Exception as error:  # noqa: BLE001 - a bad episode is data, not a crash of the batch
        episode.fail(error)
    finally:
        if env is not None:
            await CLOSE_THREADS.run(env.close)
    return episode.trajectory()


async def _within(timeout_s: float, play: Coroutine[Any, Any, None]) -> None:
    """Await `play` for at most `timeout_s` seconds; TimeoutError naming the limit past it.

    `asyncio.timeout` alone misses a deadline that passed while a callback blocked the loop (the
    episode may finish before the timeout's handle ever runs), hence the check after it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    scope = asyncio.timeout_at(deadline)
    message = f"the episode ran longer than its episode_timeout_s of {timeout_s:g} s"
    try:
        async with scope:
            await play
    except TimeoutError:
        if not scope.expired():
            raise
        raise TimeoutError(message) from None
    if loop.time() > deadline:
        raise TimeoutError(f"{message} (the event loop was blocked past the deadline, most likely by blocking code in an async env or tool)")


class _Episode:
    """The growing token record of one episode (kept outside `play` so a failure keeps what was done)."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.token_ids: list[int] = []
        self.loss_mask: list[int] = []
        self.logprobs: list[float] = []
        self.prompt_length = 0
        self.messages: list[Message] = []
        self.turns: list[Turn] = []
        self.reward = 0.0
        self.versions: list[int] = []  # per token, aligned with token_ids: the sampling version, -1 where the loop inserted it
        self.finish_reason: EpisodeFinish = "max_turns"
        self.correct: bool | None = None
        self.answer: str | None = None
        self.error: str | None = None
        self.metadata: dict[str, Any] = {}  # the env's own step-info keys

    def append(self, token_ids: list[int], logprobs: list[float] | None = None, versions: list[int] | None = None) -> None:
        """Append ids: sampled ones (with their log-probs and sampling versions) get mask 1; inserted ones mask 0, version -1."""
        self.token_ids += token_ids
        self.loss_mask += [0 if logprobs is None else 1] * len(token_ids)
        self.logprobs += [0.0] * len(token_ids) if logprobs is None else logprobs
        self.versions += [-1] * len(token_ids) if versions is None else versions

    async def play(self, env: EpisodeEnv, task: Any, engine: InferenceEngine, tokenizer: PreTrainedTokenizerBase,
                   sampling: SamplingConfig, limits: RolloutLimits, seed: int) -> None:
        eos_id = tokenizer.eos_token_id
        self.messages, info = await env.areset(seed=seed, options={"task": task})
        self.append(prompt_token_ids(tokenizer, self.messages, info.get("tools")))  # mask 0: the prompt
        self.prompt_length = len(self.token_ids)
        while True:  # the env owns the turn budget (it truncates); the context budget bounds an env that never ends
            context_left = limits.max_total_tokens - len(self.token_ids)
            budget = min(limits.max_tokens_per_turn, context_left)
            if budget <= 0:
                self.finish_reason = "context"
                return
            start = time.perf_counter()
            request = {"max_tokens": budget}
            if sampling.seed is not None:  # reproducible sampling: each turn of each episode has its own seed
                request["seed"] = derive_seed(sampling.seed, seed, len(self.turns), bits=31)  # fits every engine's seed type
            generation = await engine.generate(self.token_ids, sampling.model_copy(update=request))
            generation_s = time.perf_counter() - start
            # mask 1: sampled by the policy, each token tagged with the weights version that sampled it
            self.append(generation.token_ids, generation.logprobs, generation.token_policy_versions)
            ended_turn = generation.token_ids[-1:] == [eos_id]
            text = tokenizer.decode(generation.token_ids[:-1] if ended_turn else generation.token_ids, skip_special_tokens=False)
            self.messages.append(Message(role="assistant", content=text))
            if generation.finish_reason == "length":
                self.turns.append(Turn(text=text, num_sampled_tokens=len(generation.token_ids), generation_s=generation_s))
                self.finish_reason = "context" if budget == context_left else "max_tokens"
                return
            start = time.perf_counter()
            new_messages, reward, terminated, truncated, raw_info = await env.astep(text)
            step_info = StepInfo.model_validate(raw_info)  # typed from here on; a malformed info fails the episode, naming the field
            self.metadata.update(step_info.model_extra or {})
            self.reward += float(reward)
            self.messages += new_messages
            self.turns.append(_turn(text, generation, generation_s, time.perf_counter() - start, new_messages, reward, step_info))
            if terminated or truncated:
                self.finish_reason = "terminated" if terminated else "max_turns"
                self.correct = bool(step_info.correct)
                self.answer = step_info.answer
                return
            continuation = ([] if ended_turn else [eos_id]) + continuation_token_ids(tokenizer, new_messages)
            if len(self.token_ids) + len(continuation) >= limits.max_total_tokens:
                self.finish_reason = "context"  # no room left to show the tool results and sample a reply
                return
            self.append(continuation)  # mask 0: end of turn (if a stop string ended it), tool results, next prompt

    def fail(self, error: BaseException) -> None:
        self.finish_reason = "error"
        self.error = f"{type(error).__name__}: {error}"

    def trajectory(self) -> Trajectory:
        sampled_by = [version for version in self.versions if version >= 0]
        return Trajectory(
            token_ids=self.token_ids,
            loss_mask=self.loss_mask,
            infer_logprobs=self.logprobs,
            prompt_length=self.prompt_length,
            reward=self.reward,
            messages=self.messages,
            turns=self.turns,
            task_id=self.task_id,
            policy_version=sampled_by[0] if sampled_by else 0,
            policy_version_last=sampled_by[-1] if sampled_by else None,
            token_policy_versions=self.versions,
            finish_reason=self.finish_reason,
            correct=self.correct,
            answer=self.answer,
            error=self.error,
            metadata=self.metadata,
        )


class _LoopWatchdog:
    """Logs a warning when a callback blocks the event loop for more than `threshold_s`.

    A blocked loop cannot notice that it is blocked, so a daemon thread watches a heartbeat that the
    loop updates every `threshold_s / 4` (call_later: no task to cancel). When the heartbeat is
    older than `threshold_s`, the thread reads the loop thread's stack to name the code that blocks
    it (usually an env's or tool's async method calling blocking code: time.sleep, a sync client,
    heavy CPU work), once per stall.
    """

    def __init__(self, threshold_s: float) -> None:
        self.threshold_s = threshold_s
        self.beat = time.monotonic()
        self._stop = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._handle: asyncio.TimerHandle | None = None

    def __enter__(self) -> _LoopWatchdog:
        self._tick()
        threading.Thread(target=self._watch, name="alp-loop-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()

    def _tick(self) -> None:
        self.beat = time.monotonic()
        self._handle = self._loop.call_later(self.threshold_s / 4, self._tick)

    def _watch(self) -> None:
        reported = None
        while not self._stop.wait(self.threshold_s / 4):
            beat = self.beat
            stalled_s = time.monotonic() - beat
            if stalled_s > self.threshold_s and beat != reported:
                reported = beat
                logger.warning(
                    "the event loop has been blocked for %.1f s by %s; every episode and timeout waits meanwhile "
                    "(episode_timeout_s cannot fire). Make that code async, or run it in a thread (a Tool's sync `run` is)",
                    stalled_s, self._blocker(),
                )

    def _blocker(self) -> str:
        """The innermost Python frames the loop thread is running, each followed by its caller."""
        frame = sys._current_frames().get(self._loop_thread)
        frames = []
        while frame is not None and len(frames) < 3:
            frames.append(f"{frame.f_code.co_qualname} ({frame.f_code.co_filename}:{frame.f_lineno})")
            frame = frame.f_back
        return " <- ".join(frames) or "unknown code"


def _turn(text: str, generation: Any, generation_s: float, env_s: float, new_messages: list[Message], reward: float,
          info: StepInfo) -> Turn:
    return Turn(
        text=text,
        tool_calls=info.parsed_tool_calls,
        tool_results=[m.content for m in new_messages if m.role == "tool"],
        tool_errors=info.tool_errors,
        num_sampled_tokens=len(generation.token_ids),
        generation_s=generation_s,
        env_s=env_s,
        reward=float(reward),
        void=info.void,
    )


def _task_id(task: Any) -> str:
    return str(getattr(task, "id", task))
