"""vLLM's AsyncLLM in this process, behind the InferenceEngine contract.

    engine = await VLLMEngine.start("models/tiny", seed=0)
    generation = await engine.generate(prompt_ids, SamplingConfig(temperature=1.0, max_tokens=64))
    await engine.update_weights(model.state_dict(), version=1)   # no restart
    await engine.close()

Prompts go in as token ids and sampled token ids come out, never text, so nothing is re-tokenised.
Each sampled token carries vLLM's `processed_logprobs`: its log-prob after temperature, top-k and
top-p, i.e. under the distribution it was really drawn from (the behaviour policy mu of the
importance ratio). vLLM's default `raw_logprobs` would ignore temperature and top-p.

vLLM runs its model in an EngineCore child process; this object holds the client side (AsyncLLM)
on its own event loop thread (EngineThread), so it can be used from any event loop. Weight updates
go through a safetensors file on /dev/shm and a worker method (see weight_sync), followed by a
prefix-cache reset, since cached KV blocks were computed by the old weights.

No wait on vLLM is open-ended: a generation has `request_timeout_s`, a weight update
`weights_timeout_s`, and both fail at once (EngineUnavailable) when vLLM's engine process dies,
e.g. when a terminal's Ctrl-C reached it too. Its processes die with this one (alp_agents.reaper).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import multiprocessing
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

from alp_agents.engines.base import ClosesOnExit, EngineThread, Generation, NamedTensors, SamplingConfig, WeightVersionGate, checked_prompt
from alp_agents.engines.vllm_setup import configure_vllm_environment, engine_arguments, sampling_arguments
from alp_agents.engines.weight_sync import LOAD_METHOD, raise_for_load_reports, weights_file
from alp_agents.errors import EngineError, EngineTimeout, EngineUnavailable, ModelError
from alp_agents.reaper import reap_children_on_exit

T = TypeVar("T")

DEATH_CHECK_S = 0.5
"""How often a weight update checks that vLLM's engine process is still alive."""

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.outputs import CompletionOutput
    from vllm.v1.engine.async_llm import AsyncLLM


class VLLMEngine(ClosesOnExit):
    """An in-process vLLM engine (AsyncLLM) serving token-id prompts; start it with `await VLLMEngine.start(...)`."""

    def __init__(
        self, llm: AsyncLLM, thread: EngineThread, *, version: int, request_timeout_s: float | None, weights_timeout_s: float,
        weights_dir: Path | None,
    ) -> None:
        self._llm: AsyncLLM | None = llm
        self._thread = thread
        self._gate = WeightVersionGate(version)
        self._request_ids = itertools.count()
        self._closed = False
        self.request_timeout_s = request_timeout_s
        """Deadline of one generate call in seconds (None: no deadline); past it the request is aborted."""
        self.weights_timeout_s = weights_timeout_s
        """Deadline of one weight update; past it the engine holds unknown weights and is closed."""
        self.weights_dir = weights_dir
        """Where update_weights writes its temporary file (None: /dev/shm when present)."""

    @classmethod
    async def start(
        cls,
        model_dir: str | Path,
        *,
        seed: int = 0,
        dtype: str | None = None,
        max_model_len: int = 4096,
        request_timeout_s: float | None = None,
        weights_timeout_s: float = 600.0,
        weights_dir: str | Path | None = None,
        version: int = 0,
    ) -> Self:
        """Start vLLM on `model_dir` (20-40 s on a CPU) and return the engine; `version` names the initial weights."""
        if not (Path(model_dir) / "config.json").is_file():
            raise ModelError(f"{model_dir} is not a model directory (no config.json); build one with `alp init-model`")
        configure_vllm_environment()
        reap_children_on_exit()
        arguments = engine_arguments(str(model_dir), seed=seed, dtype=dtype, max_model_len=max_model_len)
        thread = EngineThread(name=f"VLLMEngine({model_dir})")
        try:
            llm = await thread.run(_start_async_llm(arguments))
        except Exception as error:
            thread.stop()
            raise EngineUnavailable(f"vLLM failed to start on {model_dir}: {type(error).__name__}: {error}") from error
        return cls(
            llm,
            thread,
            version=version,
            request_timeout_s=request_timeout_s,
            weights_timeout_s=weights_timeout_s,
            weights_dir=Path(weights_dir) if weights_dir is not None else None,
        )

    @property
    def policy_version(self) -> int:
        """The version of the weights new generations use."""
        return self._gate.version

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingConfig) -> Generation:
        """Sample a continuation of `prompt_token_ids` (see InferenceEngine.generate)."""
        return await self._thread.run(self._generate(checked_prompt(prompt_token_ids), sampling))

    async def update_weights(self, named_tensors: NamedTensors, version: int) -> None:
        """Load a full state dict (HF names) into the running engine, then reset its prefix cache.

        Generations in flight finish on the old weights first; those started meanwhile wait and
        run on the new ones (WeightVersionGate).
        """
        with weights_file(named_tensors, self.weights_dir) as path:  # written on the caller's thread
            await self._thread.run(self._load_weights(str(path), version))

    async def close(self) -> None:
        """Shut vLLM down (its EngineCore and worker processes exit) and stop the engine thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._thread.run(self._shutdown())
        self._thread.stop()

    # Everything below runs on the engine thread's loop.

    async def _generate(self, prompt_token_ids: list[int], sampling: SamplingConfig) -> Generation:
        from vllm.inputs import TokensPrompt

        request_id = f"alp-{next(self._request_ids)}"
        async with self._gate.generation() as version, self._engine(f"request {request_id}", self.request_timeout_s) as llm:
            (engine_input,) = await llm.renderer.render_cmpl_async([TokensPrompt(prompt_token_ids=prompt_token_ids)])
            async for output in llm.generate(engine_input, _sampling_params(sampling), request_id):
                final = output  # FINAL_ONLY: one output, when the request is done
        return _generation(final.outputs[0], version)

    async def _load_weights(self, path: str, version: int) -> None:
        async with self._gate.update(version), self._engine(f"weight update to version {version}", self.weights_timeout_s) as llm:
            try:
                # vLLM leaves a utility call unanswered when its engine process dies: watch for that.
                raise_for_load_reports(await _while_alive(llm, llm.collective_rpc(LOAD_METHOD, args=(path,))), "the vLLM worker")
                if not await _while_alive(llm, llm.reset_prefix_cache()):  # cached KV blocks were computed by the old weights
                    raise EngineError("vLLM loaded the new weights but could not reset its prefix cache")
            except asyncio.CancelledError:  # the deadline, or the caller gave up
                await self._shutdown()  # a load cut half-way leaves the model half-replaced: it must not serve again
                raise

    async def _shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:  # already shut down after a weight update that did not finish
            return
        llm.shutdown()
        del llm
        gc.collect()  # AsyncLLM.__del__ would otherwise run after the loop is gone and print a TypeError
        multiprocessing.active_children()  # reap the engine processes vLLM had to kill (no zombies left)

    @asynccontextmanager
    async def _engine(self, what: str, timeout_s: float | None) -> AsyncIterator[AsyncLLM]:
        """The live AsyncLLM under a deadline (None: none), with vLLM's errors mapped to ours."""
        if self._llm is None:
            raise EngineUnavailable(f"{what}: {self._thread.name} is closed; start a new one with `await VLLMEngine.start(...)`")
        with map_vllm_exceptions(what, timeout_s):
            async with asyncio.timeout(timeout_s):
                yield self._llm


async def _start_async_llm(arguments: dict[str, Any]) -> AsyncLLM:
    # Runs on the engine thread: AsyncLLM binds its output handler to the loop it is created on.
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**arguments))


async def _while_alive(llm: AsyncLLM, call: Awaitable[T]) -> T:
    """Await a utility call, failing (EngineDeadError) as soon as vLLM's engine process is found dead."""
    from vllm.v1.engine.exceptions import EngineDeadError

    job = asyncio.ensure_future(call)
    try:
        while not job.done():
            await asyncio.wait({job}, timeout=DEATH_CHECK_S)
            if not job.done() and llm.errored:
                raise EngineDeadError()
        return job.result()
    finally:
        job.cancel()


def _sampling_params(sampling: SamplingConfig) -> SamplingParams:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(**sampling_arguments(sampling), output_kind=RequestOutputKind.FINAL_ONLY)


def _generation(completion: CompletionOutput, version: int) -> Generation:
    token_ids = list(completion.token_ids)
    logprobs = [position[token].logprob for position, token in zip(completion.logprobs or [], token_ids)]
    if completion.finish_reason not in ("stop", "length", "abort"):
        raise EngineError(f"vLLM finished a request with reason {completion.finish_reason!r}; expected stop, length or abort")
    return Generation(token_ids=token_ids, logprobs=logprobs, finish_reason=completion.finish_reason, policy_version=version)


def vllm_exception_map() -> list[tuple[type[BaseException], type[EngineError], str]]:
    """(upstream exception, our exception, what it means), most specific first; the one table of the translation."""
    from vllm.exceptions import GracefulHTTPError, VLLMClientError, VLLMError
    from vllm.v1.engine.exceptions import EngineDeadError

    return [
        (TimeoutError, EngineTimeout, "took longer than its deadline and was aborted in the engine"),
        (EngineDeadError, EngineUnavailable, "failed: vLLM's engine process died (see its log above); start a new VLLMEngine"),
        (VLLMClientError, EngineError, "was rejected by vLLM"),
        (GracefulHTTPError, EngineError, "was refused by vLLM"),
        (VLLMError, EngineError, "failed inside vLLM"),
        (Exception, EngineError, "failed in a vLLM utility call (collective_rpc, reset_prefix_cache)"),
    ]


def _matches(error: BaseException, upstream: type[BaseException]) -> bool:
    # vLLM reports a failed utility call as a bare Exception: only that exact type is vLLM's, not every subclass.
    return type(error) is Exception if upstream is Exception else isinstance(error, upstream)


@contextmanager
def map_vllm_exceptions(what: str, timeout_s: float | None = None) -> Iterator[None]:
    """Re-raise vLLM's exceptions (and our deadline) as the matching alp_agents.errors exception."""
    try:
        yield
    except Exception as error:
        for upstream, ours, meaning in vllm_exception_map():
            if _matches(error, upstream):
                cause = error.__cause__ or error  # EngineGenerateError carries the real error as its cause
                detail = f" ({timeout_s} s)" if isinstance(error, TimeoutError) else f": {type(cause).__name__}: {cause}"
                raise ours(f"{what} {meaning}{detail}") from error
        raise
