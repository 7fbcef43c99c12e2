"""The inference-engine contract: sampling settings in, sampled tokens with their log-probs out.

Every engine (vLLM in this process, vLLM servers over HTTP) implements `InferenceEngine`, one seam
in the spirit of httpx's `handle_request`: the agent loop hands over the token ids of the whole
context and gets back the token ids the engine sampled, the log-prob of each under the distribution
it actually sampled from, why it stopped, and the weights version that produced them.

Two helpers every engine is built from live here too:
- `EngineThread`: the engine's own event loop on a background thread, so one engine serves any
  number of `asyncio.run` calls in turn (one per rollout batch) and any caller's loop.
- `WeightVersionGate`: generations never straddle a weight update (engines that drain for an
  update; the in-process vLLM engine updates in flight instead and needs no gate).

Weight versions are per token: `Generation.token_policy_versions` names the weights that sampled each
token, because an engine that takes new weights while a generation is in flight continues it under
them (see VLLMEngine.update_weights).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, TypeVar, runtime_checkable

from pydantic import BaseModel, Field, model_validator

from alp_agents.config import Config
from alp_agents.errors import EngineUnavailable

if TYPE_CHECKING:
    from types import TracebackType

    import torch

T = TypeVar("T")

FinishReason = Literal["stop", "length", "abort"]

NamedTensors = Mapping[str, "torch.Tensor"] | Iterable[tuple[str, "torch.Tensor"]]
"""A full state dict with Hugging Face parameter names, as a mapping or as (name, tensor) pairs."""


class SamplingConfig(Config):
    """How to sample one completion. The log-probs recorded are those of exactly this distribution."""

    temperature: float = Field(1.0, ge=0.0)
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 keeps all)."""
    top_k: int | None = Field(None, ge=1)
    """Keep only the k most likely tokens; None (or -1 in a config file) keeps all."""
    max_tokens: int = Field(256, ge=1)
    """Most tokens to sample; reaching it ends the generation with finish_reason 'length'."""
    stop: list[str] = Field(default_factory=list)
    """Stop strings: generation ends (finish_reason 'stop') once the decoded text contains one."""
    stop_token_ids: list[int] = Field(default_factory=list)
    """Token ids that end the generation besides the model's end-of-sequence token."""
    ignore_eos: bool = False
    """Keep sampling past the end-of-sequence token (benchmarks use it to fix the output length)."""
    seed: int | None = None
    """Seed of this request's own sampling noise: the same seed and prompt give the same tokens.

    None (the default for one request) draws from the engine's generator, seeded once at engine
    start, so every request gets fresh noise. In a rollout (`rollout.sampling.seed`, 0 in a training
    run) it is the base from which the agent loop derives each episode's and turn's own seed, so a
    rollout replays exactly (resume relies on it). Two traps to know before setting it on single
    requests: one seed shared by every sample of a group makes the samples identical (give sample i
    the seed `base + i`), and vLLM's CPU build crashes on per-request seeds when a prompt is
    prefilled in chunks, so our engines turn chunked prefill off on CPU (see `vllm_setup.engine_arguments`).
    """

    @model_validator(mode="before")
    @classmethod
    def _minus_one_means_no_top_k(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("top_k") == -1:
            return {**data, "top_k": None}  # vLLM and OpenAI spell "off" as -1
        return data


class Generation(BaseModel):
    """What one generate call sampled."""

    token_ids: list[int]
    """The sampled token ids, including the final stop or end-of-sequence token when there is one."""
    logprobs: list[float]
    """Log-prob of each sampled token under the distribution it was sampled from (after temperature,
    top-k and top-p): the behaviour policy mu in the importance ratio."""
    finish_reason: FinishReason
    """'stop': end-of-sequence token, stop token or stop string; 'length': max_tokens reached;
    'abort': the engine dropped the request (its tokens so far are kept)."""
    policy_version: int
    """The weights version that sampled the first token (for compatibility; the version the request
    started under when no token was sampled). Use token_policy_versions when weights change in flight."""
    token_policy_versions: list[int] = Field(default_factory=list)
    """The weights version that sampled each token, one per token id. Left out, every
    token gets policy_version (an engine whose generations never straddle an update)."""

    @model_validator(mode="before")
    @classmethod
    def _versions_default_to_policy_version(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("token_policy_versions") and "policy_version" in data:
            return {**data, "token_policy_versions": [data["policy_version"]] * len(data.get("token_ids") or [])}
        return data

    @model_validator(mode="after")
    def _one_logprob_and_version_per_token(self) -> Self:
        if len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"{len(self.token_ids)} token ids but {len(self.logprobs)} log-probs; expected one per token")
        versions = self.token_policy_versions
        if len(versions) != len(self.token_ids):
            raise ValueError(f"{len(self.token_ids)} token ids but {len(versions)} token_policy_versions; expected one per token")
        if versions and versions[0] != self.policy_version:
            raise ValueError(f"policy_version is {self.policy_version} but the first token was sampled by version {versions[0]}")
        return self


@runtime_checkable
class InferenceEngine(Protocol):
    """An inference engine the agent loop and the trainer talk to. Many `generate` calls may be in flight."""

    @property
    def policy_version(self) -> int:
        """The version of the weights new generations use (the last `update_weights` version)."""
        ...

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingConfig) -> Generation:
        """Sample a continuation of `prompt_token_ids`; raise an EngineError subclass on failure."""
        ...

    async def update_weights(self, named_tensors: NamedTensors, version: int) -> None:
        """Load new weights (a full state dict, HF names) into the running engine and call them `version`.

        Generations in flight may continue under the new weights (their later tokens then carry
        `version` in token_policy_versions) or finish on the old ones first; each engine says which.
        """
        ...

    async def close(self) -> None:
        """Release the engine's processes and connections; calling it again does nothing."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def checked_prompt(prompt_token_ids: list[int]) -> list[int]:
    """A copy of the prompt as a list of ints; a wrong argument fails here, not deep in the engine."""
    prompt = list(prompt_token_ids)
    if not prompt or not all(isinstance(token, int) for token in prompt):
        raise TypeError(f"prompt_token_ids must be a non-empty list of int token ids, got {str(prompt_token_ids)[:100]}")
    return prompt


class ClosesOnExit:
    """`async with engine:` closes the engine on the way out; every engine derives from it."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class WeightVersionGate:
    """Keeps generations and weight updates apart, so every generation has exactly one weights version.

    Any number of generations run at once. An update first closes the gate (generations that start
    now wait), then waits for those in flight to finish on the old weights, then loads the new
    ones; the gate reopens with the new version. Only the engine's own loop may use it.
    """

    def __init__(self, version: int) -> None:
        self.version = version
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()
        self._open.set()
        self._updating = asyncio.Lock()  # one update at a time

    @asynccontextmanager
    async def generation(self) -> AsyncIterator[int]:
        """Hold the current weights for one generation; yields their version."""
        await self._open.wait()
        self._in_flight += 1
        self._idle.clear()
        try:
            yield self.version
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    @asynccontextmanager
    async def update(self, version: int) -> AsyncIterator[None]:
        """Exclusive access for a weight update; the version changes only if the body succeeds."""
        async with self._updating:
            self._open.clear()
            try:
                await self._idle.wait()
                yield
                self.version = version
            finally:
                self._open.set()


class EngineThread:
    """An event loop running on a daemon thread, owning one engine's asyncio objects.

    vLLM's AsyncLLM and httpx.AsyncClient are bound to the loop that created them, while their
    users call `asyncio.run` once per rollout batch. Every coroutine of the engine runs on this
    loop; `run` awaits one from whatever loop the caller is on, and cancelling the caller cancels it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    async def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the engine's loop and await its result from the caller's loop."""
        if self._loop.is_closed():
            coroutine.close()
            raise EngineUnavailable(f"{self.name} is closed; start a new engine")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    def stop(self) -> None:
        """Cancel whatever still runs on the loop, then stop and join the thread (idempotent)."""
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _cancel_other_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
