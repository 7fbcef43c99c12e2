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
go through a safetensors file on /dev/shm and a worker method (see weight_sync).

Weight updates in flight (the default). An update does not wait for generations to finish:
1. `pause_generation(mode="keep")`: vLLM stops scheduling after the step under way; requests in
   flight stay where they are (new ones queue);
2. the new weights are loaded;
3. `reset_prefix_cache(reset_running_requests=True)`: every request in flight is preempted, so the KV
   of its prompt and of the tokens it sampled so far (computed by the old weights) is dropped, and so
   is every cached prefix;
4. vLLM's weight label becomes the new version (`update_weight_version`), then `resume_generation`.
Each interrupted request then recomputes its whole prefix (prompt + its tokens so far) under the new
weights and samples on, inside the same vLLM request: max_tokens, stop strings spanning the switch,
the per-request seed (its generator just continues) and the request deadline all behave as without
an update. vLLM labels every sampled token with the weights label of the step that sampled it
(`CompletionOutput.weight_versions`), which becomes `Generation.token_policy_versions`; each token's
log-prob is that of the weights that sampled it, given the full prefix. A generation can straddle
any number of updates. The update costs every request in flight one recompute of its prefix.
`update_weights(..., drain=True)` keeps the old behaviour: generations that have started finish on
the old weights first (vLLM's `pause_generation(mode="wait")`); new ones, and those vLLM has queued
but not started, wait for the new weights. Either way the per-token versions are exact.

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

from alp_agents.engines.base import ClosesOnExit, EngineThread, Generation, NamedTensors, SamplingConfig, checked_prompt
from alp_agents.engines.vllm_setup import (
    VLLMSettings,
    configure_vllm_environment,
    engine_arguments,
    model_directory,
    sampling_arguments,
)
from alp_agents.engines.weight_sync import LOAD_METHOD, raise_for_load_reports, weights_file
from alp_agents.errors import EngineError, EngineTimeout, EngineUnavailable
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
        self._version = version
        self._updating = asyncio.Lock()  # one weight update at a time
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
        settings: VLLMSettings | None = None,
        request_timeout_s: float | None = None,
        weights_timeout_s: float = 600.0,
        weights_dir: str | Path | None = None,
        version: int = 0,
    ) -> Self:
        """Start vLLM on `model_dir` (20-40 s on a CPU) and return the engine; `version` names the initial weights.

        `settings`: dtype, context length, GPU memory share, tensor parallelism and other vLLM engine arguments.
        """
        model_directory(model_dir)
        configure_vllm_environment()
        reap_children_on_exit()
        arguments = engine_arguments(str(model_dir), seed=seed, settings=settings)
        thread = EngineThread(name=f"VLLMEngine({model_dir})")
        try:
            llm = await thread.run(_start_async_llm(arguments))
        except Exception as error:
            thread.stop()
            raise EngineUnavailable(f"vLLM failed to start on {model_dir}: {type(error).__name__}: {error}") from error
        engine = cls(
            llm,
            thread,
            version=version,
            request_timeout_s=request_timeout_s,
            weights_timeout_s=weights_timeout_s,
            weights_dir=Path(weights_dir) if weights_dir is not None else None,
        )
        try:
            await thread.run(engine._label_weights(version))
        except BaseException:
            await engine.close()
            raise
        return engine

    @property
    def policy_version(self) -> int:
        """The version of the weights new generations use."""
        return self._version

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingConfig) -> Generation:
        """Sample a continuation of `prompt_token_ids` (see InferenceEngine.generate)."""
        return await self._thread.run(self._generate(checked_prompt(prompt_token_ids), sampling))

    async def update_weights(self, named_tensors: NamedTensors, version: int, *, drain: bool = False) -> None:
        """Load a full state dict (HF names) into the running engine and call it `version`.

        Generations in flight continue under the new weights from the next token on, without waiting
        (see the module docstring); their tokens carry the version that sampled each one. It returns
        once the weights are loaded, not when those generations end. drain=True: generations in
        flight finish on the old weights first, those started meanwhile wait for the new ones.
        Weights that do not fit are refused (ModelError) and the old ones go on serving.
        """
        with weights_file(named_tensors, self.weights_dir) as path:  # written on the caller's thread
            await self._thread.run(self._load_weights(str(path), version, drain))

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
        submitted_under = self._version  # what an empty generation reports (tokens carry vLLM's labels)
        async with self._engine(f"request {request_id}", self.request_timeout_s) as llm:
            (engine_input,) = await llm.renderer.render_cmpl_async([TokensPrompt(prompt_token_ids=prompt_token_ids)])
            async for output in llm.generate(engine_input, _sampling_params(sampling), request_id):
                final = output  # FINAL_ONLY: one output, when the request is done
        return _generation(final.outputs[0], submitted_under)

    async def _load_weights(self, path: str, version: int, drain: bool) -> None:
        what = f"weight update to version {version}"
        async with self._updating:
            # Draining waits for the generations in flight, which may take long: no weights deadline on it.
            async with self._engine(f"{what} (pausing generation)", None if drain else self.weights_timeout_s) as llm:
                try:
                    await _while_alive(llm, llm.pause_generation(mode="wait" if drain else "keep", clear_cache=False))
                except asyncio.CancelledError:
                    asyncio.ensure_future(llm.resume_generation())  # the caller gave up before any weight changed
                    raise
            async with self._engine(what, self.weights_timeout_s) as llm:
                try:
                    try:
                        await self._swap_weights(llm, path, version)
                    except Exception:
                        await _while_alive(llm, llm.resume_generation())  # refused weights: the old ones serve on
                        raise
                    await _while_alive(llm, llm.resume_generation())
                except asyncio.CancelledError:  # the deadline, or the caller gave up
                    await self._shutdown()  # a load cut half-way leaves the model half-replaced: it must not serve again
                    raise

    async def _label_weights(self, version: int) -> None:
        async with self._engine(f"labelling the weights as version {version}", self.weights_timeout_s) as llm:
            await _while_alive(llm, llm.update_weight_version(str(version)))  # vLLM tags every sampled token with it

    async def _swap_weights(self, llm: AsyncLLM, path: str, version: int) -> None:
        """Load the weights into the paused engine, drop every KV block of the old ones, label the new ones."""
        # vLLM leaves a utility call unanswered when its engine process dies: watch for that.
        raise_for_load_reports(await _while_alive(llm, llm.collective_rpc(LOAD_METHOD, args=(path,))), "the vLLM worker")
        # Preempt the requests in flight: their KV (prompt and tokens so far, old weights) is freed and
        # recomputed by the new weights when they resume; cached prefixes go too.
        if not await _while_alive(llm, llm.reset_prefix_cache(reset_running_requests=True)):
            raise EngineError("vLLM loaded the new weights but could not reset its prefix cache")
        await _while_alive(llm, llm.update_weight_version(str(version)))  # the label of every token sampled from now on
        self._version = version

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
    # No local may hold the engine here: vLLM keeps a traceback of an import failure made in this
    # frame, which would keep the engine alive past its shutdown (and AsyncLLM.__del__ would complain).
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


def _generation(completion: CompletionOutput, submitted_under: int) -> Generation:
    token_ids = list(completion.token_ids)
    logprobs = [position[token].logprob for position, token in zip(completion.logprobs or [], token_ids)]
    if completion.finish_reason not in ("stop", "length", "abort"):
        raise EngineError(f"vLLM finished a request with reason {completion.finish_reason!r}; expected stop, length or abort")
    versions = token_versions(completion.weight_versions, len(token_ids))
    return Generation(token_ids=token_ids, logprobs=logprobs, finish_reason=completion.finish_reason,
                      policy_version=versions[0] if versions else submitted_under, token_policy_versions=versions)  # fmt: skip


def token_versions(spans: list[Any] | None, num_tokens: int) -> list[int]:
    """One weights version per sampled token from vLLM's spans (`WeightVersionSpan` or its JSON: version, start, end).

    The labels are the versions the engine set (`str(version)`); a label of the form "3:file" (servers)
    counts as 3. Spans must cover the tokens exactly.
    """
    versions: list[int] = []
    for span in spans or []:
        label, start, end = (span["version"], span["start"], span["end"]) if isinstance(span, dict) else (span.version, span.start, span.end)
        if start != len(versions) or end < start:
            raise EngineError(f"vLLM's weight-version spans {spans} do not cover the {num_tokens} sampled tokens in order")
        try:
            version = int(str(label).split(":", 1)[0])
        except ValueError:
            raise EngineError(f"vLLM labelled tokens with weights version {label!r}; expected the integer version set by update_weights") from None
        versions += [version] * (end - start)
    if len(versions) != num_tokens:
        raise EngineError(f"vLLM's weight-version spans {spans} cover {len(versions)} tokens, not the {num_tokens} sampled")
    return versions


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
