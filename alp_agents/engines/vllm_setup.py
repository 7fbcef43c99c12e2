"""Settings every vLLM engine in this project shares: environment, engine and sampling arguments.

vLLM's CPU build needs a KV-cache size (it otherwise tries to take 92% of RAM) and runs eagerly in
float32; on a GPU the model's own dtype is used. The log-probs recorded are `processed_logprobs`:
those of the distribution actually sampled from (after temperature, top-k and top-p), which is the
behaviour policy `mu` that the importance ratio divides by. (`raw_logprobs`, vLLM's default,
ignores temperature and top-p: at temperature 0.7 it is off by up to 2.3 nats.)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from alp_agents.config import Config
from alp_agents.engines.base import SamplingConfig
from alp_agents.engines.weight_sync import WORKER_EXTENSION
from alp_agents.errors import ModelError

FIXED = "the loss and the weight updates rely on its value"
OWN_ARGUMENTS = {
    "model": "use model.path (or --model)", "seed": "it follows the run's seed", "dtype": "use engine.dtype",
    "max_model_len": "use engine.max_model_len", "gpu_memory_utilization": "use engine.gpu_memory_utilization",
    "tensor_parallel_size": "use engine.tensor_parallel_size", "logprobs_mode": FIXED, "worker_extension_cls": FIXED,
}  # fmt: skip
"""vLLM engine arguments this project sets itself -> what to do instead of passing them in vllm_args."""


class VLLMSettings(Config):
    """The vLLM engine arguments a user may set; every engine this project starts gets them the same way."""

    dtype: str | None = None
    """Engine dtype ('float32' on CPU by default, the model's on GPU); 'bfloat16' adds a real train/inference mismatch."""
    max_model_len: int = Field(4096, ge=16)
    """Longest sequence (prompt + generation) the engine serves; rollout.limits.max_total_tokens must fit in it."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """Share of the GPU's memory vLLM may take (weights + KV cache); the rest is the trainer's when both share a GPU."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one engine shards the model over."""
    vllm_args: dict[str, Any] = Field(default_factory=dict)
    """Any other vLLM engine argument, by its name in vllm.engine.arg_utils.EngineArgs (e.g. {enable_prefix_caching =
    true, max_num_seqs = 128}); the names are checked at load."""

    @field_validator("vllm_args")
    @classmethod
    def _known_engine_arguments(cls, arguments: dict[str, Any]) -> dict[str, Any]:
        for name in arguments:
            if name in OWN_ARGUMENTS:
                raise ValueError(f"{name!r} is set by alp itself: {OWN_ARGUMENTS[name]}")
        known = _vllm_engine_argument_names() if arguments else frozenset()
        for name in arguments:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                raise ValueError(f"{name!r} is not a vLLM engine argument" + (f" (did you mean {close[0]!r}?)" if close else "")
                                 + "; the names are those of `python -m vllm.entrypoints.openai.api_server --help`, with _ for -")
        return arguments


@functools.cache
def _vllm_engine_argument_names() -> frozenset[str]:
    from vllm.engine.arg_utils import AsyncEngineArgs  # 5 s to import: only when vllm_args is used

    return frozenset(field.name for field in dataclasses.fields(AsyncEngineArgs))


def configure_vllm_environment() -> None:
    """Set vLLM environment defaults that must exist before vllm is imported (user values win)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def engine_arguments(model_dir: str, *, seed: int = 0, settings: VLLMSettings | None = None) -> dict[str, Any]:
    """Keyword arguments for vllm.LLM / AsyncEngineArgs, identical for every engine we start."""
    settings = settings or VLLMSettings()
    on_gpu = torch.cuda.is_available()
    arguments: dict[str, Any] = dict(
        model=str(model_dir),
        dtype=settings.dtype or ("auto" if on_gpu else "float32"),
        enforce_eager=not on_gpu,
        seed=seed,
        max_model_len=settings.max_model_len,
        tensor_parallel_size=settings.tensor_parallel_size,
        logprobs_mode="processed_logprobs",
        worker_extension_cls=WORKER_EXTENSION,  # lets update_weights load new weights into the live model
    )
    if on_gpu:
        arguments["gpu_memory_utilization"] = settings.gpu_memory_utilization  # the rest is the trainer's on a shared GPU
    else:
        # A request with its own seed crashes the CPU model runner when its prompt is prefilled in
        # chunks ("CPU Generator does not use offset"); without chunking every prompt must fit in one step.
        arguments["enable_chunked_prefill"] = False
        arguments["max_num_batched_tokens"] = max(settings.max_model_len, 4096)
    return arguments | settings.vllm_args


def sampling_arguments(sampling: SamplingConfig) -> dict[str, Any]:
    """vLLM SamplingParams fields (JSON-ready) for `sampling`, asking for each sampled token's log-prob."""
    return dict(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k or 0,  # 0: vLLM's "no top-k"
        max_tokens=sampling.max_tokens,
        stop=sampling.stop,
        stop_token_ids=sampling.stop_token_ids,
        ignore_eos=sampling.ignore_eos,
        seed=sampling.seed,
        logprobs=0,  # the sampled token's log-prob only, no top-k alternatives
        detokenize=bool(sampling.stop),  # stop strings are matched on text; otherwise ids are all we need
    )


def model_directory(path: str | Path, *, option: str = "model directory") -> Path:
    """`path`, if it is a Hugging Face model directory; else ModelError naming `option` and the path.

    Without this check, transformers reads a missing directory as a model hub id and fails deep inside.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        found = "does not exist" if not path.exists() else "is not a Hugging Face model directory (no config.json)"
        raise ModelError(f"{option} {str(path)!r} {found}: pass a model directory, e.g. one written by `alp init-model DIR` or `alp sft`")
    return path
