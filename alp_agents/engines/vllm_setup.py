"""Settings every vLLM engine in this project shares: environment defaults and engine arguments.

vLLM's CPU build needs a KV-cache size (it otherwise tries to take 92% of RAM) and runs eagerly in
float32; on a GPU the model's own dtype is used. The log-probs recorded are `processed_logprobs`:
those of the distribution actually sampled from (after temperature, top-k and top-p), which is the
behaviour policy `mu` that the importance ratio divides by.
"""

from __future__ import annotations

import os
from typing import Any

import torch


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
    )
    if on_gpu:
        arguments["gpu_memory_utilization"] = 0.5  # leave the other half to the trainer on the same GPU
    return arguments
