"""The one place that starts the engine a job asks for: vLLM in this process or vLLM servers, quantised or not.

    engine = await start_engine(EngineSection(servers=["http://gpu-node-1:8000"]), model_dir, seed=0)

`alp train`, `alp eval`, `alp rollout` and the lab all start their engines here, so each gets the
same guarantee: the engine serves `model_dir`'s weights (or the weights given), never whatever a
server happened to hold, and a quantised engine serves their quantised copy from the start.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import Field
from transformers import AutoModelForCausalLM

from alp_agents.engines.base import InferenceEngine, NamedTensors
from alp_agents.engines.openai_server import OpenAIServerEngine, WeightsTransport
from alp_agents.engines.quantize import FakeQuantizedEngine, Quantization
from alp_agents.engines.vllm_engine import VLLMEngine
from alp_agents.engines.vllm_setup import VLLMSettings
from alp_agents.errors import ConfigError


class EngineSection(VLLMSettings):
    """The engine of a run: vLLM in this process (with the VLLMSettings above) or vLLM servers started elsewhere."""

    servers: list[str] = Field(default_factory=list)
    """Base URLs of vLLM OpenAI-compatible servers (load-balanced); empty starts vLLM in this process. A server's own
    settings (dtype, max_model_len, ...) are those it was started with (`alp serve`)."""
    request_timeout_s: float | None = Field(120.0, gt=0)
    """Deadline of one generate call; past it the episode fails (not the run)."""
    weights_timeout_s: float = Field(600.0, gt=0)
    """Deadline of one weight push to the in-process engine; past it the run stops, with a checkpoint."""
    weights_transport: WeightsTransport = "file"
    """How new weights reach servers: 'file' (they read weights_dir, which every server must see) or 'http' (the file is
    uploaded to each server: no shared filesystem needed). The in-process engine always reads a local file."""
    weights_dir: str | None = None
    """Where weight files are written (default /dev/shm); with servers and the 'file' transport, a directory every server
    can read (e.g. a shared filesystem)."""
    quantize: Quantization | None = None
    """Fake-quantise the engine's copy of the weights on every push (e.g. {bits = 4, group_size = 32}); the trainer stays
    float32. A tunable train/inference mismatch for the mismatch lab; None serves the trainer's weights as they are."""


async def start_engine(cfg: EngineSection, model_dir: Path, *, seed: int, version: int = 0, context_tokens: int | None = None,
                       weights: Callable[[], NamedTensors] | None = None, running: InferenceEngine | None = None) -> InferenceEngine:
    """The engine of `cfg`, serving `weights()` (default: `model_dir`'s) as policy `version`.

    `context_tokens`: the longest episode the job will play; servers that cannot hold it are refused (ConfigError),
    naming their max_model_len (the in-process engine's is checked against the config at load).
    `running`: an engine already started (shared by several runs) to use instead of starting one; it gets the weights.
    """
    engine: InferenceEngine
    if running is not None:
        engine = running
    elif cfg.servers:
        engine = await OpenAIServerEngine(cfg.servers, timeout_s=cfg.request_timeout_s or 600.0, version=version,
                                          weights_dir=cfg.weights_dir, weights_transport=cfg.weights_transport).__aenter__()
        await _refuse_short_servers(engine, context_tokens)
    else:
        engine = await VLLMEngine.start(model_dir, seed=seed, settings=cfg, request_timeout_s=cfg.request_timeout_s,
                                        weights_timeout_s=cfg.weights_timeout_s, weights_dir=cfg.weights_dir, version=version)
    if cfg.quantize is not None:
        engine = FakeQuantizedEngine(engine, cfg.quantize)
    # A running engine or a server may hold other weights; a quantised engine starts from exact ones.
    if running is not None or cfg.servers or cfg.quantize is not None:
        await engine.update_weights((weights or (lambda: _model_weights(model_dir)))(), version)
    return engine


async def _refuse_short_servers(engine: OpenAIServerEngine, context_tokens: int | None) -> None:
    if context_tokens is None:
        return
    short = {url: length for url, length in (await engine.max_model_lens()).items() if length is not None and length < context_tokens}
    if short:
        await engine.close()
        served = ", ".join(f"{url} serves {length}" for url, length in short.items())
        raise ConfigError(f"rollout.limits.max_total_tokens = {context_tokens} does not fit the servers' max_model_len ({served}): "
                          "lower rollout.limits.max_total_tokens or restart the servers with a larger --max-model-len")


def _model_weights(model_dir: Path) -> NamedTensors:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
