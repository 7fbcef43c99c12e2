"""vLLM OpenAI-compatible servers over HTTP, behind the InferenceEngine contract.

    engine = OpenAIServerEngine(["http://10.0.0.1:8000", "http://10.0.0.2:8000"], weights_dir="/mnt/shared")
    generation = await engine.generate(prompt_ids, SamplingConfig(max_tokens=64))
    await engine.update_weights(model.state_dict(), version=1)   # every server, no restart

Token ids go in and come out (never text). Two server routes can carry them:
- api="generate" (default): vLLM's token-in/token-out `/inference/v1/generate`; the server must run
  with `--enable-scale-out` (start_vllm_server does).
- api="completions": `/v1/completions` with the prompt as a list of token ids and
  `return_token_ids`, which any vLLM server offers.
Either way the log-probs are the server's `--logprobs-mode` (processed_logprobs when started by
start_vllm_server: the distribution actually sampled from).

Each request goes to the server with the fewest requests in flight from this engine, skipping
servers that failed recently. Connection errors, 5xx answers and timeouts are retried
`max_retries` times with exponential backoff (`backoff_s`, `2 * backoff_s`, ...), possibly on
another server; 4xx answers are not retried. A request can therefore take up to
`(max_retries + 1) * timeout_s` plus the backoff.

Weight updates need the servers' dev endpoints (`VLLM_SERVER_DEV_MODE=1`) and the worker
extension (`--worker-extension-cls`, set by start_vllm_server): the trainer writes a safetensors
file to `weights_dir`, which every server must be able to read (/dev/shm on one machine, a shared
filesystem across machines), then asks each server to load it and to reset its prefix cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from alp_agents.engines.base import ClosesOnExit, EngineThread, Generation, NamedTensors, SamplingConfig, WeightVersionGate, checked_prompt
from alp_agents.engines.vllm_setup import sampling_arguments
from alp_agents.engines.weight_sync import LOAD_METHOD, raise_for_load_reports, weights_file
from alp_agents.errors import ConfigError, EngineError, EngineTimeout, EngineUnavailable

ServerApi = Literal["generate", "completions"]

START_HINT = (
    "start one with alp_agents.engines.start_vllm_server(MODEL_DIR), or with "
    "`VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model MODEL_DIR --enable-scale-out "
    "--logprobs-mode processed_logprobs --worker-extension-cls alp_agents.engines.weight_sync.WeightSyncExtension`"
)


@dataclass
class _Server:
    """One base URL and what the load balancer knows about it."""

    url: str
    in_flight: int = 0
    consecutive_failures: int = 0
    down_until: float = 0.0  # time.monotonic() before which the server is only used if every server is down


class OpenAIServerEngine(ClosesOnExit):
    """Generation on one or more vLLM servers over HTTP (see the module docstring for routes and retries)."""

    def __init__(
        self,
        base_urls: list[str] | str,
        *,
        api: ServerApi = "generate",
        timeout_s: float = 300.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        weights_dir: str | Path | None = None,
        version: int = 0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if max_retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise ConfigError(f"need max_retries >= 0, backoff_s >= 0, timeout_s > 0; got {max_retries}, {backoff_s}, {timeout_s}")
        if not urls:
            raise ConfigError("OpenAIServerEngine needs at least one base URL, e.g. http://127.0.0.1:8000")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"base URL {url!r} must start with http:// or https://, e.g. http://127.0.0.1:8000")
        self._servers = [_Server(_server_root(url)) for url in urls]
        self.api = api
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        """Where update_weights writes its file; every server must be able to read it (None: /dev/shm)."""
        self._gate = WeightVersionGate(version)
        self._thread = EngineThread(name=f"OpenAIServerEngine({', '.join(s.url for s in self._servers)})")
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=None),  # the agent loop bounds concurrency, not the pool
            transport=transport,
        )

    @property
    def policy_version(self) -> int:
        """The version of the weights new generations use."""
        return self._gate.version

    @property
    def urls(self) -> list[str]:
        """The servers' base URLs."""
        return [server.url for server in self._servers]

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingConfig) -> Generation:
        """Sample a continuation of `prompt_token_ids` on the least busy server (see InferenceEngine.generate)."""
        return await self._thread.run(self._generate(checked_prompt(prompt_token_ids), sampling))

    async def update_weights(self, named_tensors: NamedTensors, version: int) -> None:
        """Load a full state dict (HF names) into every server, then reset their prefix caches.

        Generations in flight from this engine finish on the old weights first; those started
        meanwhile wait and run on the new ones. Requests from other clients are not held back.
        """
        with weights_file(named_tensors, self.weights_dir) as path:
            await self._thread.run(self._load_weights(str(path), version))

    async def close(self) -> None:
        """Close the HTTP connections and the engine thread (the servers keep running); idempotent."""
        if self._client.is_closed:
            return
        await self._thread.run(self._client.aclose())
        self._thread.stop()

    # Everything below runs on the engine thread's loop.

    async def _generate(self, prompt_token_ids: list[int], sampling: SamplingConfig) -> Generation:
        async with self._gate.generation() as version:
            if self.api == "generate":
                request = {"token_ids": prompt_token_ids, "sampling_params": sampling_arguments(sampling)}
                url, body = await self._post("/inference/v1/generate", request)
            else:
                arguments = sampling_arguments(sampling)
                del arguments["detokenize"]  # not a completions field: the server always detokenizes
                request = {"prompt": prompt_token_ids, **arguments, "return_token_ids": True}
                url, body = await self._post("/v1/completions", request)
        return _generation(body, self.api, url, version)

    async def _load_weights(self, path: str, version: int) -> None:
        async with self._gate.update(version):
            await asyncio.gather(*(self._load_weights_on(server, path) for server in self._servers))

    async def _load_weights_on(self, server: _Server, path: str) -> None:
        _, loaded = await self._post("/collective_rpc", {"method": LOAD_METHOD, "args": [path]}, server=server)
        raise_for_load_reports(loaded.get("results", [None]), server.url)
        _, reset = await self._post("/reset_prefix_cache", {}, server=server)
        if not reset.get("success"):
            raise EngineError(
                f"{server.url} loaded the new weights but could not reset its prefix cache (another client's requests "
                "hold cached blocks); its cache may serve KV of the old weights until they finish"
            )

    async def _post(self, path: str, payload: dict[str, Any], server: _Server | None = None) -> tuple[str, dict[str, Any]]:
        """POST with retries and backoff, to `server` or the least busy one; returns (server URL, JSON body)."""
        attempts = self.max_retries + 1
        tried: list[str] = []
        last_error: EngineUnavailable | EngineTimeout | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            target = server or self._pick_server()
            tried.append(target.url)
            try:
                return target.url, await self._post_once(target, path, payload)
            except (EngineUnavailable, EngineTimeout) as error:
                last_error = error
        assert last_error is not None  # attempts >= 1
        servers = ", ".join(dict.fromkeys(tried))
        raise type(last_error)(f"{last_error}\n(gave up after {attempts} attempts on {servers})") from last_error

    async def _post_once(self, server: _Server, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        server.in_flight += 1
        try:
            with map_httpx_exceptions(f"POST {server.url}{path}"):
                response = await self._client.post(f"{server.url}{path}", json=payload)
            _raise_for_status(response, path)
            server.consecutive_failures = 0
            return _json_body(response)
        except EngineUnavailable:
            server.consecutive_failures += 1
            server.down_until = time.monotonic() + self.backoff_s * 2 ** min(server.consecutive_failures, 6)
            raise
        finally:
            server.in_flight -= 1

    def _pick_server(self) -> _Server:
        """The server with the fewest requests in flight among those up (all of them if none is up)."""
        now = time.monotonic()
        up = [server for server in self._servers if server.down_until <= now]
        if not up:
            return min(self._servers, key=lambda server: server.down_until)
        return min(up, key=lambda server: server.in_flight)


def _server_root(url: str) -> str:
    """Base URL without a trailing slash or `/v1` (people copy OpenAI-style URLs; our routes start at the root)."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def _raise_for_status(response: httpx.Response, path: str) -> None:
    if response.is_success:
        return
    what = f"POST {response.request.url} answered {response.status_code} {response.reason_phrase}: {response.text[:500]}"
    if response.status_code >= 500:
        raise EngineUnavailable(what)
    if path == "/inference/v1/generate" and response.status_code in (403, 404):
        raise EngineError(f"{what}\nThe server was started without --enable-scale-out: restart it with it, or use api='completions'.")
    if path in ("/collective_rpc", "/reset_prefix_cache") and response.status_code == 404:
        raise EngineError(f"{what}\nWeight updates need the server's dev endpoints: {START_HINT}")
    raise EngineError(what)


def _json_body(response: httpx.Response) -> dict[str, Any]:
    if not response.content:
        return {}
    try:
        body = response.json()
    except ValueError as error:
        raise EngineError(f"POST {response.request.url} answered with invalid JSON ({error}): {response.text[:500]}") from error
    if not isinstance(body, dict):
        raise EngineError(f"POST {response.request.url} answered {str(body)[:500]}; expected a JSON object")
    return body


def _generation(body: dict[str, Any], api: ServerApi, url: str, version: int) -> Generation:
    try:
        choice = body["choices"][0]
        if api == "generate":
            logprobs = [entry["logprob"] for entry in choice["logprobs"]["content"]]
        else:
            logprobs = choice["logprobs"]["token_logprobs"]
        return Generation(token_ids=choice["token_ids"], logprobs=logprobs, finish_reason=choice["finish_reason"], policy_version=version)
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise EngineError(f"{url} sent a response without token ids and log-probs ({type(error).__name__}: {error}): {str(body)[:500]}") from error


def httpx_exception_map() -> list[tuple[type[httpx.HTTPError], type[EngineError], str]]:
    """(httpx exception, our exception, what it means), most specific first; the one table of the translation."""
    return [
        (httpx.ConnectError, EngineUnavailable, f"could not connect: is a vLLM server running there? To {START_HINT}"),
        (httpx.ConnectTimeout, EngineUnavailable, "timed out while connecting: the server is down or unreachable"),
        (httpx.TimeoutException, EngineTimeout, "did not answer in time (raise timeout_s for long generations)"),
        (httpx.TransportError, EngineUnavailable, "lost the connection: the server may have crashed or restarted"),
        (httpx.HTTPError, EngineError, "failed"),
    ]


@contextmanager
def map_httpx_exceptions(what: str) -> Iterator[None]:
    """Re-raise httpx's exceptions as the matching alp_agents.errors exception, naming the request."""
    try:
        yield
    except httpx.HTTPError as error:
        for upstream, ours, meaning in httpx_exception_map():
            if isinstance(error, upstream):
                raise ours(f"{what} {meaning} ({type(error).__name__}: {error})") from error
        raise
