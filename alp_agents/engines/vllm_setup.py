"""Settings every vLLM engine in this project shares: environment, engine and sampling arguments.

vLLM's CPU build needs a KV-cache size (it otherwise tries to take 92% of RAM) and runs eagerly in
float32; on a GPU the model's own dtype is used. The log-probs recorded are `processed_logprobs`:
those of the distribution actually sampled from (after temperature, top-k and top-p), which is the
behaviour policy `mu` that the importance ratio divides by. (`raw_logprobs`, vLLM's default,
ignores temperature and top-p: at temperature 0.7 it is off by up to 2.3 nats.)
"""

from __future__ import annotations

import os
from typing import Any

import torch

from alp_agents.engines.base import SamplingConfig
from alp_agents.engines.weight_sync import WORKER_EXTENSION


def configure_vllm_environment() -> None:
    """Set vLLM environment defaults that must exist before vllm is imported (user values win)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def engine_arguments(model_dir: str, *, seed: int = 0, dtype: str | None = None, max_model_len: int = 4096) -> dict[str, Any]:
    """Keyword arguments for vllm.LLM / AsyncEngineArgs, identical for every engine we start."""
    on_gpu = torch.cuda.is_available()
    arguments: dict[str, Any] = dict(
        model=str(model_dir),
        dtype=dtype or ("auto" if on_gpu else "float32"),
        enforce_eager=not on_gpu,
        seed=seed,
        max_model_len=max_model_len,
        logprobs_mode="processed_logprobs",
        worker_extension_cls=WORKER_EXTENSION,  # lets update_weights load new weights into the live model
    )
    if on_gpu:
        arguments["gpu_memory_utilization"] = 0.5  # leave the other half to the trainer on the same GPU
    else:
        # A request with its own seed crashes the CPU model runner when its prompt is prefilled in
        # chunks ("CPU Generator does not use offset"); without chunking every prompt must fit in one step.
        arguments["enable_chunked_prefill"] = False
        arguments["max_num_batched_tokens"] = max(max_model_len, 4096)
    return arguments


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
