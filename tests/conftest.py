"""Shared fixtures: the embedded tiny model, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
"""The public math eval sets (read-only, beside the repository); tests may read them, the package may not."""


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ~1M-parameter default model (seed 0), built once for the whole session."""
    from alp_agents.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0, size="tiny")


# --- Inference engines (alp_agents.engines): one in-process vLLM engine and one vLLM server per session.
# Each takes 20-60 s to start on a CPU, so tests share them; a test that changes the weights restores them.


def survivors(processes, grace_s: float = 20.0) -> list:
    """The processes still alive `grace_s` after they were told to stop (vLLM kills its workers asynchronously)."""
    import psutil

    _, alive = psutil.wait_procs(list(processes), timeout=grace_s)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_dir: Path):
    """A VLLMEngine (AsyncLLM) on the tiny model; usable from any test's `asyncio.run`.

    At the end of the session it is closed (twice: close is idempotent), and none of the vLLM
    processes it started may still run.
    """
    import asyncio

    import psutil

    from alp_agents.engines import VLLMEngine

    def vllm_processes() -> set[psutil.Process]:
        return {p for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM")}

    before = vllm_processes()
    engine = asyncio.run(VLLMEngine.start(tiny_model_dir, seed=0))
    started = vllm_processes() - before
    assert started, "VLLMEngine runs vLLM's EngineCore and worker in child processes"
    yield engine
    asyncio.run(engine.close())
    asyncio.run(engine.close())
    left = survivors(started)
    assert not left, f"VLLMEngine.close() left vLLM processes running: {left}"


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir: Path):
    """A local vLLM OpenAI-compatible server on the tiny model (token-in/token-out routes and dev endpoints on).

    At the end of the session it is closed, and no process of its process group may still run.
    """
    import psutil

    from alp_agents.engines import start_vllm_server

    with start_vllm_server(tiny_model_dir, startup_timeout_s=300) as server:
        processes = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
        yield server
    left = survivors(processes)
    assert not left, f"VLLMServer.close() left processes running: {left}"


@pytest.fixture(scope="session")
def tiny_weights(tiny_model_dir: Path):
    """The tiny model's parameters by HF name (a tied lm_head appears once, as the embedding)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


@pytest.fixture(scope="session")
def hf_logprobs(tiny_model_dir: Path, tiny_weights):
    """Reference log-probs from the HF model in float32: `(prompt, sampled, weights=None, temperature=1, top_k=None)`.

    Returns, for each sampled token, log_softmax(logits / temperature) at its position, restricted to
    the top-k logits when top_k is set: the distribution vLLM samples from and reports with
    processed_logprobs. `weights` (HF names) replaces the model's parameters for this call only.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def compute(prompt: list[int], sampled: list[int], weights=None, temperature: float = 1.0, top_k: int | None = None):
        missing, unexpected = model.load_state_dict(weights if weights is not None else tiny_weights, strict=False)
        assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)  # tied head: the embedding
        logits = model(torch.tensor([prompt + sampled])).logits[0, len(prompt) - 1 : -1] / temperature  # (T, V)
        if top_k is not None:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits.log_softmax(-1).gather(1, torch.tensor(sampled)[:, None])[:, 0].tolist()

    return compute


# --- Helpers the engine tests share.


@pytest.fixture(scope="session")
def prompts(tiny_model_dir: Path) -> list[list[int]]:
    """Three chat prompts of the tiny model, as token ids."""
    from transformers import AutoTokenizer

    from alp_agents.chat import prompt_token_ids
    from alp_agents.trajectory import Message

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["What is 12 * 34? Use the calculator.", "Compute 7 + 8 and put the answer in \\boxed{}.", "Hello"]
    return [prompt_token_ids(tokenizer, [Message(role="user", content=text)]) for text in texts]


def perturbed(weights: dict, seed: int) -> dict:
    """`weights` plus seeded Gaussian noise of std 0.05: other weights, which change every log-prob by > 0.05."""
    import torch

    noise = torch.Generator().manual_seed(seed)
    return {name: tensor + 0.05 * torch.randn(tensor.shape, generator=noise) for name, tensor in weights.items()}


def max_abs_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))
