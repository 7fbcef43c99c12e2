"""OpenAIServerEngine when servers die or stall, on two real vLLM servers (tiny model): one stopped
(SIGSTOP) and resumed, one killed (SIGKILL) in the middle of a training run, then all gone; and `alp eval` at a server that is not there.

The two servers are shared by the module's tests, which run in file order: the stall test resumes
its server, the kill test kills the second one, and the last test kills whatever is left.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest
from transformers import AutoModelForCausalLM

from alp_agents.engines import Generation, OpenAIServerEngine, SamplingConfig, start_vllm_server
from alp_agents.engines.server import VLLMServer
from alp_agents.errors import EngineUnavailable
from test_train_loop import metric_rows, train_in_process
from conftest import max_abs_diff, perturbed

PROMPT = [10 + (7 * j) % 400 for j in range(24)]
HEALTH = {"health_interval_s": 0.5, "health_timeout_s": 3.0}  # a stall is noticed within 3.5 s
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def servers(tiny_model_dir) -> Iterator[list[VLLMServer]]:
    """Two vLLM servers on the tiny model, started side by side."""
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start_vllm_server, tiny_model_dir, startup_timeout_s=300) for _ in range(2)]
    with ExitStack() as stack:
        for future in futures:
            if future.exception() is None:
                stack.enter_context(future.result())  # closed on the way out even if the other one failed to start
        yield [future.result() for future in futures]


class RecordingTransport(httpx.AsyncHTTPTransport):
    """The real transport, keeping the URL of every POST (generations and weight loads)."""

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.posts.append(str(request.url))
        return await super().handle_async_request(request)

    def generations_on(self, url: str) -> int:
        return sum(post == f"{url}/inference/v1/generate" for post in self.posts)


def kill(server: VLLMServer) -> None:
    """SIGKILL the server's whole process group (API server, EngineCore, worker), as a crash would."""
    try:
        os.killpg(server.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone
    server.close()  # reaps the processes and deletes the log


async def wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"still not true after {timeout_s} s"
        await asyncio.sleep(0.01)


def test_alp_eval_at_a_dead_server_fails_at_once_with_one_line(tiny_model_dir):
    command = [sys.executable, "-m", "alp_agents.cli", "eval", "--model", str(tiny_model_dir), "--data", "arithmetic:2", "--k", "1",
               "--server", "http://127.0.0.1:9"]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    message = " ".join(out.stderr.split())  # undo the console's line wrapping
    assert out.returncode == 2, out.stdout + out.stderr
    assert message.startswith("error: no vLLM server can serve requests: http://127.0.0.1:9 could not be reached for GET /health"), message
    assert "Traceback" not in out.stderr and "avg_at_k" not in out.stdout


def test_stalled_server_is_bypassed_within_seconds_and_rejoins_with_the_current_weights(servers, tiny_weights, hf_logprobs, caplog):
    caplog.set_level(logging.WARNING, logger="alp_agents.engines.openai_server")
    stalled, other = servers
    v1, v2 = perturbed(tiny_weights, 1), perturbed(tiny_weights, 2)
    recorder = RecordingTransport()
    engine = OpenAIServerEngine([stalled.url, other.url], transport=recorder, timeout_s=120, **HEALTH)

    async def run() -> tuple[float, list[Generation], list[Generation]]:
        async with engine:
            await engine.update_weights(v1, version=1)
            os.killpg(stalled.process.pid, signal.SIGSTOP)
            try:
                start = time.monotonic()
                await asyncio.gather(*(engine.generate(PROMPT, SamplingConfig(max_tokens=8)) for _ in range(4)))
                moved_after = time.monotonic() - start
                assert recorder.generations_on(stalled.url) >= 1  # some were waiting on the stopped server
                await engine.update_weights(v2, version=2)  # reaches `other` only
                assert [s.version for s in engine.server_status()] == [1, 2]
            finally:
                os.killpg(stalled.process.pid, signal.SIGCONT)
            # Requests keep flowing while the resumed server rejoins: none may reach it before it holds v2.
            during, deadline = [], time.monotonic() + 180  # a busy 2-core machine (other vLLM processes poll it) is slow
            while engine.server_status()[0].state != "up":
                assert time.monotonic() < deadline, engine.server_status()
                during.append(await engine.generate(PROMPT, SamplingConfig(max_tokens=4)))
            served_before = recorder.generations_on(stalled.url)
            after = await asyncio.gather(*(engine.generate(PROMPT, SamplingConfig(max_tokens=8)) for _ in range(4)))
            assert recorder.generations_on(stalled.url) > served_before  # the resumed server serves again
            return moved_after, during, after

    moved_after, during, after = asyncio.run(run())
    assert moved_after < 15  # health_interval_s + health_timeout_s and a generation, not the 120 s request timeout
    for generation in during + after:
        assert generation.policy_version == 2
        assert max_abs_diff(generation.logprobs, hf_logprobs(PROMPT, generation.token_ids, weights=v2)) < LOGPROB_TOLERANCE
    assert [(s.state, s.version, s.outages) for s in engine.server_status()] == [("up", 2, 1), ("up", 2, 0)]
    logged = [record.getMessage() for record in caplog.records]
    assert any(message.startswith(f"{stalled.url} is out of rotation: did not answer GET /health within 3 s") for message in logged)
    assert any(message.startswith(f"{stalled.url} is back in rotation") for message in logged)

    # The same seeded request on each server alone: the same tokens and log-probs, those of v2.
    seeded = SamplingConfig(max_tokens=12, ignore_eos=True, seed=5)

    async def sample_on(url: str) -> Generation:
        async with OpenAIServerEngine(url) as single:
            return await single.generate(PROMPT, seeded)

    resumed, reference = (asyncio.run(sample_on(server.url)) for server in (stalled, other))
    assert resumed.token_ids == reference.token_ids
    assert max_abs_diff(resumed.logprobs, reference.logprobs) < LOGPROB_TOLERANCE
    assert max_abs_diff(resumed.logprobs, hf_logprobs(PROMPT, resumed.token_ids, weights=v1)) > 0.01  # not the weights it missed


def test_a_training_run_finishes_on_one_server_when_the_other_is_killed_mid_run(servers, tiny_model_dir, hf_logprobs, tmp_path):
    survivor, victim = servers
    recorder = RecordingTransport()
    engine = OpenAIServerEngine([survivor.url, victim.url], transport=recorder, **HEALTH)
    run_dir = tmp_path / "run"  # train_in_process's

    def kill_in_iteration_2() -> None:
        deadline = time.monotonic() + 300
        while not (any(row["iteration"] == 1 for row in metric_rows(run_dir)) and engine.server_status()[1].in_flight > 0):
            assert time.monotonic() < deadline, "the run never reached iteration 2 with a request on the victim"
            time.sleep(0.005)
        kill(victim)

    with ThreadPoolExecutor(1) as pool:
        killer = pool.submit(kill_in_iteration_2)
        rows = train_in_process(tmp_path, tiny_model_dir, ["rollout.max_concurrency=8"], iterations=4, engine=engine)  # both servers busy
        killer.result()
    assert [row["iteration"] for row in rows] == [0, 1, 2, 3, 4]
    assert [row["rollout/failure_rate"] for row in rows[1:]] == [0.0] * 4  # the requests in flight on the victim moved, none failed
    assert recorder.generations_on(victim.url) >= 1
    assert [(s.state, s.version, s.outages) for s in engine.server_status()] == [("up", 4, 0), ("down", 1, 1)]

    async def sample() -> Generation:  # the survivor serves the run's final weights
        async with engine:
            return await engine.generate(PROMPT, SamplingConfig(max_tokens=8))

    generation = asyncio.run(sample())
    final = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint" / "model").state_dict()
    assert max_abs_diff(generation.logprobs, hf_logprobs(PROMPT, generation.token_ids, weights=final)) < LOGPROB_TOLERANCE


def test_no_server_left_raises_engine_unavailable_naming_each(servers):
    engine = OpenAIServerEngine([server.url for server in servers], **HEALTH)

    async def run() -> None:
        async with engine:  # the survivor of the test before (or both servers when run alone) is up
            for server in servers:
                kill(server)
            await engine.generate(PROMPT, SamplingConfig(max_tokens=4))

    start = time.monotonic()
    with pytest.raises(EngineUnavailable) as caught:
        asyncio.run(run())
    assert time.monotonic() - start < 30  # kill() waits for the processes; the engine itself gives up at once
    message = str(caught.value)
    assert message.startswith("no vLLM server can serve requests: ")
    assert all(f"{server.url} could not be reached for GET /health" in message for server in servers), message
