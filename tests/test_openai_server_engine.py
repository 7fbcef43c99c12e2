"""OpenAIServerEngine against a real vLLM server on the tiny model: token ids and log-probs over
HTTP, weight updates over HTTP, load balancing and failover; faults a real server cannot produce
on demand (500s, timeouts, malformed answers) are injected with httpx.MockTransport."""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import socket
from collections.abc import Awaitable, Callable

import httpx
import psutil
import pytest
import torch
from transformers import AutoTokenizer

from alp_agents.chat import prompt_token_ids
from alp_agents.engines import Generation, InferenceEngine, OpenAIServerEngine, SamplingConfig, start_vllm_server
from alp_agents.engines.openai_server import httpx_exception_map, map_httpx_exceptions
from alp_agents.errors import ConfigError, EngineError, EngineTimeout, EngineUnavailable, ModelError
from alp_agents.trajectory import Message
from conftest import max_abs_diff

LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def prompts(tiny_model_dir) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["What is 12 * 34? Use the calculator.", "Compute 7 + 8 and put the answer in \\boxed{}."]
    return [prompt_token_ids(tokenizer, [Message(role="user", content=text)]) for text in texts]


@pytest.fixture(scope="module")
def engine(vllm_server):
    engine = OpenAIServerEngine(vllm_server.url)
    yield engine
    asyncio.run(engine.close())


def dead_url() -> str:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


class FaultyTransport(httpx.MockTransport):
    """Answers with `faults` in turn (responses, or exceptions to raise), then forwards to the real server.

    GET /health always answers 200 and is not counted in `calls`: these faults hit a server that is up.
    """

    def __init__(self, faults: list[httpx.Response | Exception]) -> None:
        super().__init__(self._handle)
        self.faults = faults
        self.calls: list[str] = []
        self._real = httpx.AsyncHTTPTransport()

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        self.calls.append(str(request.url))
        if len(self.calls) > len(self.faults):
            return await self._real.handle_async_request(request)
        fault = self.faults[len(self.calls) - 1]
        if isinstance(fault, Exception):
            raise fault
        return fault

    async def aclose(self) -> None:
        await self._real.aclose()


def run_with(engine: OpenAIServerEngine, work: Callable[[OpenAIServerEngine], Awaitable]):
    async def main():
        async with engine:
            return await work(engine)

    return asyncio.run(main())


def test_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, InferenceEngine)


@pytest.mark.parametrize("api", ["generate", "completions"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_over_http_match_hf(vllm_server, prompts, hf_logprobs, api, temperature):
    async def sample(engine: OpenAIServerEngine) -> list[Generation]:
        sampling = SamplingConfig(temperature=temperature, max_tokens=24)
        return await asyncio.gather(*(engine.generate(prompt, sampling) for prompt in prompts))

    for prompt, generation in zip(prompts, run_with(OpenAIServerEngine(vllm_server.url, api=api), sample)):
        assert 1 <= len(generation.token_ids) == len(generation.logprobs) <= 24
        assert all(math.isfinite(lp) and lp <= 0 for lp in generation.logprobs)
        reference = hf_logprobs(prompt, generation.token_ids, temperature=temperature)
        assert max_abs_diff(generation.logprobs, reference) < LOGPROB_TOLERANCE


def test_many_requests_in_flight(engine, prompts):
    async def sample_many() -> list[Generation]:
        return await asyncio.gather(*(engine.generate(prompts[i % 2], SamplingConfig(max_tokens=16)) for i in range(48)))

    generations = asyncio.run(sample_many())
    assert all(g.finish_reason in ("stop", "length") and 1 <= len(g.token_ids) <= 16 for g in generations)


def test_length_and_stop_token(engine, prompts):
    async def run() -> tuple[Generation, Generation, Generation]:
        length = await engine.generate(prompts[0], SamplingConfig(max_tokens=5, ignore_eos=True))
        greedy = await engine.generate(prompts[0], SamplingConfig(temperature=0, max_tokens=12, ignore_eos=True))
        stopped = await engine.generate(prompts[0], SamplingConfig(temperature=0, max_tokens=12, stop_token_ids=[greedy.token_ids[3]]))
        return length, greedy, stopped

    length, greedy, stopped = asyncio.run(run())
    assert (len(length.token_ids), length.finish_reason) == (5, "length")
    assert stopped.token_ids == greedy.token_ids[: greedy.token_ids.index(greedy.token_ids[3]) + 1]
    assert stopped.finish_reason == "stop"


def test_update_weights_over_http(engine, hf_logprobs, tiny_weights):
    noise = torch.Generator().manual_seed(3)
    new_weights = {name: t + 0.05 * torch.randn(t.shape, generator=noise) for name, t in tiny_weights.items()}
    long_prompt = [10 + (7 * j) % 500 for j in range(300)]  # > 2 KV blocks: cached as a prefix before the update
    sampling = SamplingConfig(max_tokens=16, ignore_eos=True)
    start_version = engine.policy_version

    async def run() -> tuple[Generation, Generation]:
        await engine.generate(long_prompt, sampling)
        await engine.update_weights(new_weights, version=start_version + 1)
        try:
            after = await engine.generate(long_prompt, sampling)
        finally:
            await engine.update_weights(tiny_weights, version=start_version + 2)
        return after, await engine.generate(long_prompt, sampling)

    after, restored = asyncio.run(run())
    assert (after.policy_version, restored.policy_version) == (start_version + 1, start_version + 2)
    assert max_abs_diff(after.logprobs, hf_logprobs(long_prompt, after.token_ids, weights=new_weights)) < LOGPROB_TOLERANCE
    assert max_abs_diff(after.logprobs, hf_logprobs(long_prompt, after.token_ids)) > 0.05
    assert max_abs_diff(restored.logprobs, hf_logprobs(long_prompt, restored.token_ids)) < LOGPROB_TOLERANCE


def test_weights_that_do_not_fit_are_refused_over_http(engine, prompts, tiny_weights):
    version = engine.policy_version
    with pytest.raises(ModelError, match="unknown names: model.extra.weight"):
        asyncio.run(engine.update_weights({**tiny_weights, "model.extra.weight": torch.zeros(3)}, version=version + 1))
    assert engine.policy_version == version
    assert asyncio.run(engine.generate(prompts[0], SamplingConfig(max_tokens=4))).token_ids


def test_dead_servers_give_engine_unavailable_at_once_naming_each(prompts):
    urls = [dead_url(), dead_url()]
    engine = OpenAIServerEngine(urls, max_retries=2, backoff_s=10)  # a retry would show as a 10 s wait
    with pytest.raises(EngineUnavailable) as caught:
        run_with(engine, lambda e: e.generate(prompts[0], SamplingConfig()))
    message = str(caught.value)
    assert all(f"{url} could not be reached for GET /health (ConnectError" in message for url in urls)
    assert "start_vllm_server" in message and "\n" not in message  # the CLI prints it as one line
    assert [status.state for status in engine.server_status()] == ["down", "down"]


def test_one_dead_server_of_two_fails_over(vllm_server, prompts):
    async def sample(engine: OpenAIServerEngine) -> list[Generation]:
        return await asyncio.gather(*(engine.generate(prompts[0], SamplingConfig(max_tokens=8)) for _ in range(8)))

    generations = run_with(OpenAIServerEngine([dead_url(), vllm_server.url], max_retries=2, backoff_s=0.01), sample)
    assert len(generations) == 8 and all(g.token_ids for g in generations)


def test_requests_spread_over_servers_by_load(vllm_server, prompts):
    transport = FaultyTransport([])
    port = vllm_server.url.rsplit(":", 1)[1]
    urls = [vllm_server.url, f"http://localhost:{port}"]  # two names for one server: both must get work

    async def sample(engine: OpenAIServerEngine) -> list[Generation]:
        return await asyncio.gather(*(engine.generate(prompts[1], SamplingConfig(max_tokens=8)) for _ in range(16)))

    run_with(OpenAIServerEngine(urls, transport=transport), sample)
    per_server = [sum(call.startswith(url) for call in transport.calls) for url in urls]
    assert sum(per_server) == 16 and min(per_server) >= 4


def test_server_errors_are_retried_then_succeed(vllm_server, prompts):
    transport = FaultyTransport([httpx.Response(500, text="boom"), httpx.Response(503, text="busy")])
    generation = run_with(
        OpenAIServerEngine(vllm_server.url, transport=transport, backoff_s=0.01), lambda e: e.generate(prompts[0], SamplingConfig(max_tokens=4))
    )
    assert len(transport.calls) == 3 and generation.token_ids


@pytest.mark.parametrize(
    ("fault", "expected", "message"),
    [
        (httpx.Response(500, text="Internal Server Error"), EngineError, "answered 500"),
        (httpx.ReadTimeout("read timed out"), EngineTimeout, "did not answer in time"),
        (httpx.RemoteProtocolError("server disconnected"), EngineError, "lost the connection"),
    ],
)
def test_persistent_faults_on_a_healthy_server_exhaust_the_retries(prompts, fault, expected, message):
    # The server answers /health, so the fault is the request's: the episode fails, not the run (not EngineUnavailable).
    transport = FaultyTransport([fault] * 10)
    engine = OpenAIServerEngine("http://fault.test", transport=transport, max_retries=2, backoff_s=0.01)
    with pytest.raises(expected, match=message) as caught:
        run_with(engine, lambda e: e.generate(prompts[0], SamplingConfig()))
    assert type(caught.value) is expected and "gave up after 3 attempts on http://fault.test" in str(caught.value)
    assert len(transport.calls) == 3
    assert [(s.state, s.failures, s.outages) for s in engine.server_status()] == [("up", 3, 0)]


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (httpx.Response(400, json={"error": "bad"}), "answered 400"),
        (httpx.Response(403, text="Forbidden"), "--enable-scale-out"),
        (httpx.Response(200, json={"choices": []}), "without token ids and log-probs"),
        (httpx.Response(200, text="<html>oops</html>"), "invalid JSON"),
    ],
)
def test_client_errors_are_not_retried(prompts, fault, message):
    transport = FaultyTransport([fault] * 10)
    with pytest.raises(EngineError, match=message) as caught:
        run_with(OpenAIServerEngine("http://fault.test", transport=transport), lambda e: e.generate(prompts[0], SamplingConfig()))
    assert type(caught.value) is EngineError and len(transport.calls) == 1


def test_weight_update_without_dev_endpoints_keeps_the_version(tiny_weights):
    transport = FaultyTransport([httpx.Response(404, json={"detail": "Not Found"})] * 10)
    engine = OpenAIServerEngine("http://fault.test", transport=transport)
    with pytest.raises(EngineError, match="VLLM_SERVER_DEV_MODE=1"):
        run_with(engine, lambda e: e.update_weights(tiny_weights, version=7))
    assert engine.policy_version == 0 and transport.calls == ["http://fault.test/collective_rpc"]


def test_every_httpx_error_is_mapped():
    upstream = [cls for _, cls in inspect.getmembers(httpx, inspect.isclass) if issubclass(cls, httpx.HTTPError)]
    assert len(upstream) >= 15
    request = httpx.Request("POST", "http://x.test/v1/completions")
    specific = {httpx.ConnectError: EngineUnavailable, httpx.ConnectTimeout: EngineUnavailable, httpx.ReadTimeout: EngineTimeout,
                httpx.PoolTimeout: EngineTimeout, httpx.ReadError: EngineUnavailable, httpx.RemoteProtocolError: EngineUnavailable}  # fmt: skip
    for cls in upstream:
        error = cls("boom", request=request, response=httpx.Response(500)) if cls is httpx.HTTPStatusError else cls("boom")
        with pytest.raises(EngineError) as caught, map_httpx_exceptions("POST http://x.test/v1/completions"):
            raise error
        assert type(caught.value) is specific.get(cls, type(caught.value)), cls
        assert str(caught.value).startswith("POST http://x.test/v1/completions ")
    assert {ours for _, ours, _ in httpx_exception_map()} == {EngineUnavailable, EngineTimeout, EngineError}


def test_bad_configuration_is_refused():
    with pytest.raises(ConfigError, match="http://"):
        OpenAIServerEngine("localhost:8000")
    with pytest.raises(ConfigError, match="at least one"):
        OpenAIServerEngine([])


def test_closed_engine_raises_engine_unavailable(prompts):
    async def main() -> None:
        engine = OpenAIServerEngine("http://127.0.0.1:9")
        await engine.close()
        await engine.close()
        await engine.generate(prompts[0], SamplingConfig())

    with pytest.raises(EngineUnavailable, match="closed"):
        asyncio.run(main())


def test_server_processes_share_one_process_group(vllm_server):
    # close() signals the group, so every process of the server (API, EngineCore, worker) must be in it.
    tree = psutil.Process(vllm_server.process.pid).children(recursive=True)
    assert any(p.name().startswith("VLLM::EngineCore") for p in tree)
    assert all(os.getpgid(p.pid) == vllm_server.process.pid for p in tree)


def test_server_that_is_not_ready_in_time_is_stopped(tiny_model_dir):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(EngineUnavailable, match="not healthy after 5 s"):
        start_vllm_server(tiny_model_dir, startup_timeout_s=5)
    leftover = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.status() != "zombie"]
    assert leftover == []


def test_server_needs_a_model_directory(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        start_vllm_server(tmp_path)
