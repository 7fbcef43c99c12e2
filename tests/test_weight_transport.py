"""Weights to servers that share no directory with the trainer, and the engine settings of a run.

The server here is `alp serve` started by bubblewrap in its own mount namespace, with empty /tmp
and /dev/shm of its own (the model directory bound in read-only): it cannot see a file the trainer
writes, as a server on another machine cannot. The file transport must then fail saying what to do,
and the HTTP transport must load exactly the pushed weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from alp_agents.config import load_config
from alp_agents.engines import OpenAIServerEngine, SamplingConfig
from alp_agents.engines.factory import EngineSection, start_engine
from alp_agents.engines.vllm_setup import VLLMSettings, engine_arguments
from alp_agents.engines.weight_upload import ROUTE
from alp_agents.errors import ConfigError, EngineError, ModelError
from alp_agents.trainers.run_config import TrainConfig
from conftest import max_abs_diff, perturbed, survivors

SERVER_MAX_MODEL_LEN = 2048
LOGPROB_TOLERANCE = 1e-4


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def isolated_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """URL of `alp serve` in its own mount namespace (private /tmp and /dev/shm); stopped with SIGTERM at the end."""
    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap for a server with its own mount namespace")
    port = free_port()
    log = (tmp_path_factory.mktemp("serve-log") / "serve.log").open("wb")
    alp = str(Path(sys.executable).with_name("alp"))
    command = ["bwrap", "--dev-bind", "/", "/", "--tmpfs", "/tmp", "--tmpfs", "/dev/shm",
               "--ro-bind", str(tiny_model_dir), str(tiny_model_dir), "--",
               alp, "serve", "--model", str(tiny_model_dir), "--port", str(port), "--max-model-len", str(SERVER_MAX_MODEL_LEN)]  # fmt: skip
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while not _healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"`alp serve` did not come up: {Path(log.name).read_text(errors='replace')[-3000:]}")
        time.sleep(1)
    processes = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    (alp_serve,) = psutil.Process(process.pid).children()  # bwrap's one child
    yield url
    alp_serve.terminate()  # SIGTERM: `alp serve` closes its vLLM server (its own process group) and exits 143
    assert process.wait(timeout=60) == 128 + signal.SIGTERM  # bwrap exits with its child's status
    assert not survivors(processes), "`alp serve` left processes running after SIGTERM"
    log.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_the_server_cannot_see_the_trainers_files(isolated_server, tmp_path):
    """The premise of the tests below: the file transport's default directory is not shared."""
    engine = OpenAIServerEngine(isolated_server, weights_transport="file")
    with pytest.raises(ModelError, match=r"does not exist on .*weights_transport = 'http'"):
        asyncio.run(_push_and_close(engine, {"model.norm.weight": torch.ones(1)}, version=1))


async def _push_and_close(engine: OpenAIServerEngine, weights: dict, version: int) -> None:
    async with engine:
        await engine.update_weights(weights, version=version)


def test_http_transport_loads_the_pushed_weights_into_a_server_that_shares_no_directory(isolated_server, tiny_weights, hf_logprobs, prompts):
    new_weights = perturbed(tiny_weights, seed=11)
    sampling = SamplingConfig(max_tokens=12, ignore_eos=True, temperature=1.0, seed=0)

    async def run():
        async with OpenAIServerEngine(isolated_server, weights_transport="http") as engine:
            await engine.update_weights(new_weights, version=7)
            pushed = await engine.generate(prompts[0], sampling)
            label = httpx.get(f"{isolated_server}/weight_info").json()["weight_version"]
            await engine.update_weights(tiny_weights, version=8)
            restored = await engine.generate(prompts[0], sampling)
            return pushed, label, restored, engine.server_status()[0].version

    pushed, label, restored, held = asyncio.run(run())
    assert pushed.policy_version == 7 and label.startswith("7:")
    assert max_abs_diff(pushed.logprobs, hf_logprobs(prompts[0], pushed.token_ids, weights=new_weights)) < LOGPROB_TOLERANCE
    assert max_abs_diff(pushed.logprobs, hf_logprobs(prompts[0], pushed.token_ids)) > 0.05
    assert max_abs_diff(restored.logprobs, hf_logprobs(prompts[0], restored.token_ids)) < LOGPROB_TOLERANCE
    assert held == 8


def test_weights_that_do_not_fit_are_refused_over_the_http_transport(isolated_server, tiny_weights, prompts):
    async def run():
        async with OpenAIServerEngine(isolated_server, weights_transport="http") as engine:
            with pytest.raises(ModelError, match="unknown names: model.extra.weight"):
                await engine.update_weights({**tiny_weights, "model.extra.weight": torch.zeros(3)}, version=20)
            return engine.policy_version, await engine.generate(prompts[0], SamplingConfig(max_tokens=4))

    version, generation = asyncio.run(run())
    assert version == 0 and len(generation.token_ids) == 4


@pytest.mark.parametrize(("method", "name", "status"), [
    ("PUT", "..%2F..%2Fetc%2Fpasswd", 400),
    ("PUT", "alp-weights-x.safetensors", 400),
    ("GET", "alp-weights-" + "0" * 32 + ".safetensors", 405),
])  # fmt: skip
def test_the_upload_route_takes_only_its_own_file_names(isolated_server, method, name, status):
    response = httpx.request(method, f"{isolated_server}{ROUTE}{name}", content=b"x")
    assert response.status_code == status, response.text
    assert "error" in response.json()


def test_servers_shorter_than_the_episodes_are_refused_naming_both(isolated_server, tiny_model_dir):
    cfg = EngineSection(servers=[isolated_server], weights_transport="http")
    with pytest.raises(ConfigError, match=rf"max_total_tokens = 4096 .*{isolated_server} serves {SERVER_MAX_MODEL_LEN}"):
        asyncio.run(start_engine(cfg, tiny_model_dir, seed=0, context_tokens=4096))

    async def fits() -> int:
        async with await start_engine(cfg, tiny_model_dir, seed=0, context_tokens=SERVER_MAX_MODEL_LEN) as engine:
            return engine.policy_version

    assert asyncio.run(fits()) == 0


def test_a_label_that_does_not_read_back_fails_the_push(isolated_server, tiny_weights):
    """Another client relabelling the server between our push and our check: the push fails instead of assuming."""
    real = httpx.AsyncClient()

    async def relabelled(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/weight_info":
            return httpx.Response(200, json={"weight_version": "someone-else"})
        response = await real.send(request)
        await response.aread()
        return response

    async def run():
        engine = OpenAIServerEngine(isolated_server, weights_transport="http", transport=httpx.MockTransport(relabelled))
        async with engine:
            await engine.update_weights(tiny_weights, version=30)

    with pytest.raises(EngineError, match="reports weights version 'someone-else' right after loading '30:"):
        asyncio.run(run())


# --- Engine settings: checked at load, passed to vLLM as given.


def test_episodes_longer_than_the_engine_fail_at_load_naming_both_fields(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[rollout.limits]\nmax_total_tokens = 8192\n")
    with pytest.raises(ConfigError, match=r"rollout.limits.max_total_tokens = 8192 exceeds engine.max_model_len = 4096"):
        load_config(TrainConfig, config)
    assert load_config(TrainConfig, config, ["engine.max_model_len=8192"]).engine.max_model_len == 8192


@pytest.mark.parametrize(("line", "message"), [
    ("enable_prefix_cachng = true", "'enable_prefix_cachng' is not a vLLM engine argument (did you mean 'enable_prefix_caching'?)"),
    ('dtype = "bfloat16"', "'dtype' is set by alp itself: use engine.dtype"),
    ('logprobs_mode = "raw_logprobs"', "'logprobs_mode' is set by alp itself: the loss"),
])  # fmt: skip
def test_vllm_args_are_checked_at_load(tmp_path, line, message):
    config = tmp_path / "run.toml"
    config.write_text(f"[engine.vllm_args]\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(TrainConfig, config)
    assert "engine.vllm_args" in str(caught.value) and message in str(caught.value)


def test_engine_settings_reach_vllms_arguments():
    settings = VLLMSettings(max_model_len=1024, tensor_parallel_size=2, gpu_memory_utilization=0.3,
                            vllm_args={"max_num_seqs": 7, "enable_prefix_caching": False})
    arguments = engine_arguments("m", seed=3, settings=settings)
    assert (arguments["max_model_len"], arguments["tensor_parallel_size"], arguments["seed"]) == (1024, 2, 3)
    assert (arguments["max_num_seqs"], arguments["enable_prefix_caching"]) == (7, False)
    assert arguments["logprobs_mode"] == "processed_logprobs"
    if not torch.cuda.is_available():
        assert arguments["max_num_batched_tokens"] == 4096 and "gpu_memory_utilization" not in arguments  # CPU: KV space by env var
