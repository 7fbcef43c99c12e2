"""vLLM OpenAI-compatible servers over HTTP, behind the InferenceEngine contract.

    engine = OpenAIServerEngine(["http://10.0.0.1:8000", "http://10.0.0.2:8000"], weights_dir="/mnt/shared")
    generation = await engine.generate(prompt_ids, SamplingConfig(max_tokens=64))
    await engine.update_weights(model.state_dict(), version=1)   # every live server, no restart
    engine.server_status()                                       # per server: up or down, failures, version held

Token ids go in and come out (never text). Two server routes can carry them:
- api="generate" (default): vLLM's token-in/token-out `/inference/v1/generate`; the server must run
  with `--enable-scale-out` (start_vllm_server does).
- api="completions": `/v1/completions` with the prompt as a list of token ids and
  `return_token_ids`, which any vLLM server offers.
Either way the log-probs are the server's `--logprobs-mode` (processed_logprobs when started by
start_vllm_server: the distribution actually sampled from).

Servers in rotation. Each request goes to the server with the fewest requests in flight from this
engine, among the servers in rotation. A server is taken out of rotation as soon as it fails
`GET /health` (no answer within `health_timeout_s`, a refused connection, a 503 from a dead
engine), and its requests in flight go to the other servers at once, without using a retry. /health
is asked on first use (`async with engine`, or the first request or weight push), every
`health_interval_s` afterwards, and right after any request fails with a connection error, a 5xx or
a timeout. So a server that dies is out within a moment, and one that stalls (a stopped process, a
hung machine) within `health_interval_s + health_timeout_s`, while a long generation may still take
up to `timeout_s`. A server that answers /health again rejoins, with the current weights loaded
first when it lacks them. EngineUnavailable is raised only when no server is left (its message names
every URL and what happened to it); this is checked once more right before giving up.

Failures on a server that still answers /health are the request's own: connection errors, 5xx answers
and timeouts are retried `max_retries` times with exponential backoff (`backoff_s`, `2 * backoff_s`, ...),
possibly on another server, then raised as EngineTimeout (a timeout) or EngineError; 4xx answers are not
retried. A stall inside vLLM's engine process that leaves its API server answering /health is not
detected: such requests end at `timeout_s`.

Weight updates need the servers' dev endpoints (`VLLM_SERVER_DEV_MODE=1`) and the worker extension
(`--worker-extension-cls`, set by start_vllm_server): the trainer writes a safetensors file to
`weights_dir` (/dev/shm by default), then asks each server in rotation to load it, to reset its prefix
cache, and to label its weights with the version (vLLM's `/update_weight_version`), and reads the label
back (`/weight_info`): a version is checked, not assumed. How the file reaches a server is the
`weights_transport`:
- "file": the server reads it where the trainer wrote it, so `weights_dir` must be a directory every
  server can read (/dev/shm on one machine, a shared filesystem across machines);
- "http": the file is streamed to each server (`PUT /alp/weights/<name>`, the upload middleware of
  `weight_upload`, which start_vllm_server adds), loaded from the server's own /dev/shm and deleted:
  no shared filesystem needed.
The file is kept until the next update (one model's worth of `weights_dir` space) so that a server that
rejoins can load it; a server's label says whether it needs to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

import httpx

from alp_agents.engines.base import ClosesOnExit, EngineThread, Generation, NamedTensors, SamplingConfig, WeightVersionGate, checked_prompt
from alp_agents.engines.vllm_setup import sampling_arguments
from alp_agents.engines.weight_sync import LOAD_METHOD, raise_for_load_reports, weights_file
from alp_agents.engines.weight_upload import MIDDLEWARE as UPLOAD_MIDDLEWARE
from alp_agents.engines.weight_upload import ROUTE as UPLOAD_ROUTE
from alp_agents.errors import AlpError, ConfigError, EngineError, EngineTimeout, EngineUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")
ServerApi = Literal["generate", "completions"]
ServerState = Literal["unchecked", "joining", "up", "down"]
WeightsTransport = Literal["file", "http"]

START_HINT = (
    "start one with alp_agents.engines.start_vllm_server(MODEL_DIR), or with "
    "`VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model MODEL_DIR --enable-scale-out "
    "--logprobs-mode processed_logprobs --worker-extension-cls alp_agents.engines.weight_sync.WeightSyncExtension "
    "--middleware alp_agents.engines.weight_upload.WeightUploadMiddleware`, or `alp serve --model MODEL_DIR`"
)
DEV_ENDPOINTS = ("/collective_rpc", "/reset_prefix_cache", "/update_weight_version", "/weight_info")
"""Routes a server offers only with VLLM_SERVER_DEV_MODE=1; weight updates need them."""


@dataclass(frozen=True)
class ServerStatus:
    """What the engine knows about one server (see `OpenAIServerEngine.server_status`)."""

    url: str
    state: ServerState
    """'up': in rotation; 'down': out of rotation, asked /health again every health_interval_s;
    'joining': answers /health again and is getting the current weights; 'unchecked': not used yet."""
    in_flight: int
    """Requests from this engine waiting on it now."""
    failures: int
    """Requests that failed on it with a connection error, a 5xx answer or a timeout."""
    outages: int
    """Times it was taken out of rotation after having been in it."""
    version: int | None
    """The weights version this engine last loaded into it (None: none yet, it serves the weights it started with)."""
    problem: str | None
    """Why it is out of rotation (None when it is up or unchecked)."""


@dataclass
class _Server:
    """One base URL and what the engine knows about it; only the engine's loop changes it."""

    url: str
    state: ServerState = "unchecked"
    problem: str | None = None
    in_flight: int = 0
    failures: int = 0
    outages: int = 0
    version: int | None = None
    lost: asyncio.Event = field(default_factory=asyncio.Event)  # set while down: requests waiting on it give up
    check: asyncio.Future[None] | None = None  # the /health check under way, shared by everyone who asks for one


@dataclass
class _PushedWeights:
    """The last weights pushed: their file stays on disk (until `files` is closed) for servers that rejoin."""

    version: int
    path: Path
    files: ExitStack

    @property
    def label(self) -> str:
        """The server-side weight version (`/weight_info`): the version and the file, unique per push."""
        return f"{self.version}:{self.path.name}"


class _ServerLost(Exception):
    """A request gave up on its server because the server was taken out of rotation (internal: never escapes)."""


class OpenAIServerEngine(ClosesOnExit):
    """Generation on one or more vLLM servers over HTTP (see the module docstring for routes, failover and retries)."""

    def __init__(
        self,
        base_urls: list[str] | str,
        *,
        api: ServerApi = "generate",
        timeout_s: float = 300.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        health_timeout_s: float = 5.0,
        health_interval_s: float = 2.0,
        weights_dir: str | Path | None = None,
        weights_transport: WeightsTransport = "file",
        version: int = 0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if max_retries < 0 or backoff_s < 0 or min(timeout_s, health_timeout_s, health_interval_s) <= 0:
            raise ConfigError(
                "need max_retries >= 0, backoff_s >= 0, and timeout_s, health_timeout_s, health_interval_s > 0; "
                f"got {max_retries}, {backoff_s}, {timeout_s}, {health_timeout_s}, {health_interval_s}"
            )
        if not urls:
            raise ConfigError("OpenAIServerEngine needs at least one base URL, e.g. http://127.0.0.1:8000")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"base URL {url!r} must start with http:// or https://, e.g. http://127.0.0.1:8000")
        self._servers = [_Server(_server_root(url)) for url in urls]
        self.api = api
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.health_timeout_s = health_timeout_s
        """A server that does not answer GET /health within this many seconds is taken out of rotation."""
        self.health_interval_s = health_interval_s
        """Seconds between two rounds of /health checks of every server (in rotation or not)."""
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        """Where update_weights writes its file (None: /dev/shm); with the file transport every server must read it."""
        self.weights_transport = weights_transport
        """'file': servers read the file where the trainer wrote it; 'http': the file is uploaded to each server."""
        self._gate = WeightVersionGate(version)
        self._weights: _PushedWeights | None = None
        self._pushing = asyncio.Lock()  # a push and a rejoin never interleave: a rejoining server must not miss a push
        self._watcher: asyncio.Task[None] | None = None
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

    def server_status(self) -> list[ServerStatus]:
        """A snapshot of every server: state, requests in flight, failures, outages, weights version held."""
        return [
            ServerStatus(url=s.url, state=s.state, in_flight=s.in_flight, failures=s.failures, outages=s.outages, version=s.version,
                         problem=s.problem)
            for s in self._servers
        ]  # fmt: skip

    async def __aenter__(self) -> Self:
        """Check the servers now: EngineUnavailable (naming each URL and its problem) if none answers /health."""
        try:
            await self._thread.run(self._live_servers())
        except BaseException:
            await self.close()
            raise
        return self

    async def max_model_lens(self) -> dict[str, int | None]:
        """Each live server's longest sequence (its --max-model-len, from /v1/models; None if it does not say)."""
        return await self._thread.run(self._max_model_lens())

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingConfig) -> Generation:
        """Sample a continuation of `prompt_token_ids` on the least busy server (see InferenceEngine.generate)."""
        return await self._thread.run(self._generate(checked_prompt(prompt_token_ids), sampling))

    async def update_weights(self, named_tensors: NamedTensors, version: int) -> None:
        """Load a full state dict (HF names) into every server in rotation, then reset their prefix caches.

        Generations in flight from this engine finish on the old weights first; those started
        meanwhile wait and run on the new ones. Requests from other clients are not held back.
        Servers out of rotation get these weights when they rejoin. Raises EngineUnavailable if no
        server is left to take them (the version is then unchanged).
        """
        files = ExitStack()
        weights = _PushedWeights(version, files.enter_context(weights_file(named_tensors, self.weights_dir)), files)
        try:
            await self._thread.run(self._load_weights(weights))
        except BaseException:
            files.close()
            raise

    async def close(self) -> None:
        """Close the HTTP connections and the engine thread (the servers keep running), delete the weights file; idempotent."""
        if self._client.is_closed:
            return
        await self._thread.run(self._shutdown())
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

    async def _max_model_lens(self) -> dict[str, int | None]:
        lengths: dict[str, int | None] = {}
        for server in await self._live_servers():
            with map_httpx_exceptions(f"GET {server.url}/v1/models"):
                response = await self._client.get(f"{server.url}/v1/models", timeout=self.health_timeout_s)
            _raise_for_status(response, "/v1/models")
            models = _json_body(response).get("data") or [{}]
            lengths[server.url] = models[0].get("max_model_len")
        return lengths

    async def _load_weights(self, weights: _PushedWeights) -> None:
        await self._live_servers()  # none left: fail before waiting for generations to drain
        async with self._gate.update(weights.version), self._pushing:
            targets = [server for server in self._servers if server.state == "up"]
            outcomes = await asyncio.gather(*(self._push(server, weights) for server in targets), return_exceptions=True)
            errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException) and not isinstance(outcome, _ServerLost)]
            if errors:
                raise errors[0]
            if all(isinstance(outcome, _ServerLost) for outcome in outcomes):  # also when there were no targets left
                raise self._no_server_left()
            previous, self._weights = self._weights, weights
        if previous is not None:
            previous.files.close()

    async def _push(self, server: _Server, weights: _PushedWeights) -> None:
        """Load `weights` into `server`, reset its prefix cache (KV of the old weights) and label its weights; _ServerLost if it goes down.

        The label is read back: a server that does not report the version just pushed fails the push.
        """
        if self.weights_transport == "http":
            async with self._uploaded(server, weights.path) as path:
                await self._load_file(server, path)
        else:
            await self._load_file(server, str(weights.path))
        _, reset = await self._post("/reset_prefix_cache", {}, server=server)
        if not reset.get("success"):
            raise EngineError(
                f"{server.url} loaded the new weights but could not reset its prefix cache (another client's requests "
                "hold cached blocks); its cache may serve KV of the old weights until they finish"
            )
        await self._post("/update_weight_version", {"new_version": weights.label}, server=server)
        if (held := await self._weight_label(server)) != weights.label:
            raise EngineError(f"{server.url} reports weights version {held!r} right after loading {weights.label!r}: another "
                              "client is pushing weights to it; give each run its own servers")
        server.version = weights.version

    async def _load_file(self, server: _Server, path: str) -> None:
        _, loaded = await self._post("/collective_rpc", {"method": LOAD_METHOD, "args": [path]}, server=server)
        raise_for_load_reports(loaded.get("results", [None]), server.url)

    @asynccontextmanager
    async def _uploaded(self, server: _Server, local: Path) -> AsyncIterator[str]:
        """Upload the weights file to `server` and yield its path there; the server deletes it afterwards."""
        route = f"{UPLOAD_ROUTE}{local.name}"
        body = await self._request_checked(server, "PUT", route, content=_file_chunks(local))
        try:
            yield str(body["path"])
        finally:
            with suppress(EngineError, _ServerLost):  # a server that went away took its /dev/shm file with it
                await self._request_checked(server, "DELETE", route)

    async def _post(self, path: str, payload: dict[str, Any], server: _Server | None = None) -> tuple[str, dict[str, Any]]:
        """POST to `server`, or to the least busy server in rotation; returns (server URL, JSON body).

        A request whose server is taken out of rotation moves to another at once (or raises _ServerLost
        when `server` was given). Failures on a server that still answers /health use up the retries.
        """
        failed_on: list[str] = []  # the server of each failed attempt (all of them still answered /health)
        while True:
            target = server or min(await self._live_servers(), key=lambda candidate: candidate.in_flight)
            try:
                return target.url, await self._request_checked(target, "POST", path, json=payload)
            except _ServerLost:
                if server is not None:
                    raise
            except (EngineUnavailable, EngineTimeout) as error:
                failed_on.append(target.url)
                if len(failed_on) > self.max_retries:
                    raise _gave_up(error, failed_on) from error
                await asyncio.sleep(self.backoff_s * 2 ** (len(failed_on) - 1))

    async def _request_checked(self, server: _Server, method: str, path: str, **request: Any) -> dict[str, Any]:
        """One request; if it fails with a connection error, a 5xx or a timeout, ask /health whether the server is still there."""
        try:
            return await self._request_once(server, method, path, **request)
        except (EngineUnavailable, EngineTimeout) as error:
            server.failures += 1
            if (problem := await self._probe(server)) is None:
                raise  # the server is fine: the failure is this request's
            self._take_out(server, problem)
            raise _ServerLost(server.url) from error

    async def _request_once(self, server: _Server, method: str, path: str, **request: Any) -> dict[str, Any]:
        server.in_flight += 1
        try:
            with map_httpx_exceptions(f"{method} {server.url}{path}"):
                response = await _unless_lost(server, self._client.request(method, f"{server.url}{path}", **request))
            _raise_for_status(response, path)
            return _json_body(response)
        finally:
            server.in_flight -= 1

    async def _live_servers(self) -> list[_Server]:
        """The servers in rotation; when there are none, every server is checked once more before EngineUnavailable."""
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch())
            await self._check_all()
            if any(server.state == "up" for server in self._servers):  # else the EngineUnavailable below says it all
                for server in self._servers:
                    if server.state == "down":
                        logger.warning("%s is left out of rotation: %s", server.url, server.problem)
        if not any(server.state == "up" for server in self._servers):
            await self._check_all()
        live = [server for server in self._servers if server.state == "up"]
        if not live:
            raise self._no_server_left()
        return live

    async def _check_all(self) -> None:
        await asyncio.gather(*(self._check(server) for server in self._servers))

    async def _watch(self) -> None:
        """Check every server every health_interval_s, for the life of the engine."""
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self._check_all()

    async def _check(self, server: _Server) -> None:
        """Ask `server` for /health and update its state; joins a check already under way rather than starting another."""
        if server.check is None or server.check.done():
            server.check = asyncio.ensure_future(self._recheck(server))
        await asyncio.shield(server.check)

    async def _recheck(self, server: _Server) -> None:
        if (problem := await self._probe(server)) is not None:
            self._take_out(server, problem)
        elif server.state != "up":
            await self._rejoin(server)

    async def _probe(self, server: _Server) -> str | None:
        """None if `server` answers GET /health with 200 within health_timeout_s, else what went wrong."""
        try:
            response = await self._client.get(f"{server.url}/health", timeout=self.health_timeout_s)
        except httpx.TimeoutException:
            return f"did not answer GET /health within {self.health_timeout_s:g} s (stopped, hung or overloaded)"
        except httpx.TransportError as error:
            return f"could not be reached for GET /health ({type(error).__name__}: {error})"
        if response.status_code != 200:
            return f"answered GET /health with {response.status_code} (its vLLM engine has died)"
        return None

    async def _rejoin(self, server: _Server) -> None:
        """Put a server that answers /health (back) in rotation, after loading the current weights if it lacks them."""
        async with self._pushing:  # no push can start meanwhile, so the server cannot miss one
            weights = self._weights
            was_down, server.state = server.state == "down", "joining"
            server.lost.clear()
            try:
                if weights is not None and await self._weight_label(server) != weights.label:
                    await self._push(server, weights)
            except _ServerLost:
                return  # taken out again while loading; the next check tries again
            except AlpError as error:
                self._take_out(server, f"answers /health but could not get the current weights ({error})")
                return
            server.state, server.problem = "up", None
        if was_down:
            held = server.version if server.version is not None else "it started with"
            logger.warning("%s is back in rotation (it answers /health and holds weights version %s)", server.url, held)

    async def _weight_label(self, server: _Server) -> str | None:
        """The weight version the server reports (vLLM's /weight_info; 'default' until someone sets one)."""
        with map_httpx_exceptions(f"GET {server.url}/weight_info"):
            response = await self._client.get(f"{server.url}/weight_info", timeout=self.health_timeout_s)
        _raise_for_status(response, "/weight_info")
        return _json_body(response).get("weight_version")

    def _take_out(self, server: _Server, problem: str) -> None:
        """Mark `server` down: its requests in flight give up on it (and move on), new ones go elsewhere."""
        # Say nothing twice about a server that stays down, nor about one never in rotation (_live_servers reports those).
        news = server.state == "up" or (server.state != "unchecked" and problem != server.problem)
        if server.state == "up":
            server.outages += 1
        server.state, server.problem = "down", problem
        server.lost.set()
        if news:
            logger.warning("%s is out of rotation: %s (%d requests in flight move to other servers; asked /health every %g s)",
                           server.url, problem, server.in_flight, self.health_interval_s)  # fmt: skip

    def _no_server_left(self) -> EngineUnavailable:
        problems = "; ".join(f"{server.url} {server.problem or 'was taken out of rotation'}" for server in self._servers)
        return EngineUnavailable(
            f"no vLLM server can serve requests: {problems}. Restart the servers (one that answers /health again "
            f"rejoins with the current weights) or fix the URLs; to {START_HINT}"
        )

    async def _shutdown(self) -> None:
        tasks = [task for task in (self._watcher, *(server.check for server in self._servers)) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.aclose()
        if self._weights is not None:
            self._weights.files.close()
            self._weights = None


async def _unless_lost(server: _Server, call: Coroutine[Any, Any, T]) -> T:
    """Await `call`, unless `server` is taken out of rotation first: then cancel it and raise _ServerLost."""
    request = asyncio.ensure_future(call)
    lost = asyncio.ensure_future(server.lost.wait())
    try:
        await asyncio.wait((request, lost), return_when=asyncio.FIRST_COMPLETED)
    finally:
        lost.cancel()
        request.cancel()  # a no-op when it is done
    if not request.done():
        raise _ServerLost(server.url)
    return request.result()


def _gave_up(error: EngineUnavailable | EngineTimeout, tried: list[str]) -> EngineError:
    """The error for a request that failed on every try although its servers still answer /health."""
    what = (f"{error}\n(gave up after {len(tried)} attempts on {', '.join(dict.fromkeys(tried))}, which still answer /health: "
            "the fault is this request's; see the server's log)")  # fmt: skip
    return EngineTimeout(what) if isinstance(error, EngineTimeout) else EngineError(what)


def _server_root(url: str) -> str:
    """Base URL without a trailing slash or `/v1` (people copy OpenAI-style URLs; our routes start at the root)."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


async def _file_chunks(path: Path, chunk_bytes: int = 8 << 20) -> AsyncIterator[bytes]:
    """The file's bytes in chunks, for a streamed request body (a model does not fit in one)."""
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            yield chunk


def _raise_for_status(response: httpx.Response, path: str) -> None:
    if response.is_success:
        return
    what = f"{response.request.method} {response.request.url} answered {response.status_code} {response.reason_phrase}: {response.text[:500]}"
    if response.status_code >= 500:
        raise EngineUnavailable(what)
    if path == "/inference/v1/generate" and response.status_code in (403, 404):
        raise EngineError(f"{what}\nThe server was started without --enable-scale-out: restart it with it, or use api='completions'.")
    if path in DEV_ENDPOINTS and response.status_code == 404:
        raise EngineError(f"{what}\nWeight updates need the server's dev endpoints: {START_HINT}")
    if path.startswith(UPLOAD_ROUTE) and response.status_code == 404:
        raise EngineError(f"{what}\nWeights over HTTP need the upload middleware in the server: add `--middleware {UPLOAD_MIDDLEWARE}` "
                          "(start_vllm_server and `alp serve` do), or use engine.weights_transport = 'file' with a shared directory")
    raise EngineError(what)


def _json_body(response: httpx.Response) -> dict[str, Any]:
    if not response.content:
        return {}
    try:
        body = response.json()
    except ValueError as error:
        raise EngineError(f"{response.request.method} {response.request.url} answered with invalid JSON ({error}): {response.text[:500]}") from error
    if not isinstance(body, dict):
        raise EngineError(f"{response.request.method} {response.request.url} answered {str(body)[:500]}; expected a JSON object")
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
