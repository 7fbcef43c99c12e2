"""Chat completions from a model directory with vLLM's offline engine (what `alp generate` runs).

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), which starts in seconds;
rollouts during training use the async engines in `alp_agents.engines` instead.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import BaseModel

from alp_agents.engines.vllm_setup import configure_vllm_environment, engine_arguments


class Completion(BaseModel):
    """One chat completion with its speed."""

    prompt: str
    """The user message."""
    text: str
    """The assistant's reply, decoded with special tokens kept."""
    token_ids: list[int]
    """The sampled token ids."""
    logprobs: list[float]
    """Log-prob of each sampled token under the sampling distribution."""
    finish_reason: str
    """'stop' (end-of-turn token) or 'length' (max_tokens reached)."""


class GenerationReport(BaseModel):
    """A batch of completions and how fast they were produced."""

    completions: list[Completion]
    seconds: float
    """Wall time of the generate call (the engine start is not included)."""
    tokens_per_second: float
    """Sampled tokens of the whole batch divided by `seconds`."""


def generate_chat(
    model_dir: str | Path, prompts: list[str], *, max_tokens: int = 64, temperature: float = 1.0, seed: int = 0
) -> GenerationReport:
    """Start an in-process vLLM engine on `model_dir` and answer each prompt as one user message."""
    configure_vllm_environment()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams  # imported here: importing vllm takes seconds

    llm = LLM(**engine_arguments(str(model_dir), seed=seed))
    sampling = SamplingParams(temperature=temperature, max_tokens=max_tokens, logprobs=0, seed=None)
    conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
    llm.chat(conversations[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up: the first call is slow
    start = time.perf_counter()
    outputs = llm.chat(conversations, sampling, use_tqdm=False)
    seconds = time.perf_counter() - start
    completions = []
    for prompt, output in zip(prompts, outputs):
        sample = output.outputs[0]
        token_ids = list(sample.token_ids)
        logprobs = [position[token].logprob for position, token in zip(sample.logprobs or [], token_ids)]
        text = llm.get_tokenizer().decode(token_ids, skip_special_tokens=False)
        completions.append(
            Completion(prompt=prompt, text=text, token_ids=token_ids, logprobs=logprobs, finish_reason=sample.finish_reason or "")
        )
    total_tokens = sum(len(c.token_ids) for c in completions)
    return GenerationReport(completions=completions, seconds=seconds, tokens_per_second=total_tokens / max(seconds, 1e-9))
