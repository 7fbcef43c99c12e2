"""Fake weight quantisation of the engine's copy: a tunable train/inference mismatch for the mismatch lab.

The trainer keeps float32 weights; the engine serves a copy whose matrices went through a symmetric
int8 / int4 quantiser and back (round to the grid, then dequantise). Every weight push goes through it,
so the engine never serves the trainer's exact weights. This stands in for quantised rollouts and, at
tiny scale, for the heavy mismatch of long real rollouts (../shared/notes/mismatch-lab.md, section 4:
int4 with groups of 32 gives a per-token log-ratio std of 4-8e-2 on the tiny models, bf16 about 1e-2).

    engine = FakeQuantizedEngine(await VLLMEngine.start(model_dir), Quantization(bits=4, group_size=32))
    await engine.update_weights(model.state_dict(), version=1)   # the engine gets the int4 round trip

Only 2-D weights outside the embedding are quantised: a tied LM head is rebuilt from the (unquantised)
embedding by the engine, as in weight-only quantisation schemes.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from alp_agents.config import Config
from alp_agents.engines.base import ClosesOnExit, Generation, InferenceEngine, NamedTensors, SamplingConfig


class Quantization(Config):
    """Symmetric round-to-nearest weight quantisation, per group of input columns (or per output row)."""

    bits: Literal[2, 3, 4, 8] = 4
    """Bits per weight: grid -2^(bits-1) .. 2^(bits-1) - 1 (int4: -8..7); 2 and 3 amplify the mismatch beyond real schemes."""
    group_size: int | None = Field(32, ge=1)
    """Consecutive weights of a row that share one scale; None: one scale per output row."""


def is_quantised(name: str, tensor: Tensor) -> bool:
    """Whether a weight goes through the quantiser: matrices, except the embedding (and a tied head built from it)."""
    return tensor.dim() == 2 and "embed" not in name


def fake_quantize_tensor(weight: Tensor, q: Quantization) -> Tensor:
    """The weight after a round trip through the quantiser, in float32 (same shape; scale = max |w| / qmax per group)."""
    rows, columns = weight.shape
    group = q.group_size or columns
    if columns % group:
        raise ValueError(f"a weight with {columns} columns cannot be split into groups of {group}; choose a group_size that divides it")
    qmax = 2 ** (q.bits - 1) - 1
    grouped = weight.detach().float().reshape(rows, columns // group, group)
    scale = grouped.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax
    return ((grouped / scale).round().clamp(-qmax - 1, qmax) * scale).reshape(rows, columns)


def fake_quantize(named_tensors: NamedTensors, q: Quantization) -> dict[str, Tensor]:
    """A state dict with every quantised weight replaced by its round trip (the others are returned as they are)."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    return {name: fake_quantize_tensor(t, q) if is_quantised(name, t) else t for name, t in items}


def engine_view(model: nn.Module, *, quantization: Quantization | None = None, dtype: str | None = None) -> nn.Module:
    """A copy of `model` as the engine serves it: fake-quantised and/or cast to the engine's dtype.

    The trainer uses it to measure the hidden-state mismatch it calibrates ALP's sigma against.
    """
    view = copy.deepcopy(model).eval().requires_grad_(False)
    if quantization is not None:
        with torch.no_grad():
            for name, parameter in view.named_parameters():
                if is_quantised(name, parameter):
                    parameter.copy_(fake_quantize_tensor(parameter, quantization))
    if dtype not in (None, "auto", "float32"):
        view = view.to(getattr(torch, dtype))
    return view


class FakeQuantizedEngine(ClosesOnExit):
    """An engine wrapper (gymnasium-style) that fake-quantises every weight update before passing it on.

    Generation and closing go straight to the wrapped engine. The weights the wrapped engine was
    started with are not quantised: push them once (`update_weights`) before sampling.
    """

    def __init__(self, engine: InferenceEngine, quantization: Quantization) -> None:
        self.engine = engine
        """The wrapped engine."""
        self.quantization = quantization
        """The round trip every pushed weight goes through."""

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingConfig) -> Generation:
        return await self.engine.generate(prompt_token_ids, sampling)

    async def update_weights(self, named_tensors: NamedTensors, version: int) -> None:
        """Push the fake-quantised weights; generations in flight see them as the wrapped engine's updates do
        (VLLMEngine: from their next token on, tagged with `version` in token_policy_versions)."""
        await self.engine.update_weights(fake_quantize(named_tensors, self.quantization), version)

    async def close(self) -> None:
        await self.engine.close()


@asynccontextmanager
async def serving_exact_weights(engine: InferenceEngine, weights: Callable[[], NamedTensors], version: int) -> AsyncIterator[None]:
    """Inside the block a FakeQuantizedEngine serves `weights()` unquantised (any other engine is left alone).

    Evaluation runs inside it, so held-out accuracy measures the trained policy itself, not the engine's
    degraded copy; on the way out the quantised weights are pushed back for the next rollouts. The
    caller keeps rollouts from running meanwhile (the training loop holds its `collecting` lock).
    """
    if not isinstance(engine, FakeQuantizedEngine):
        yield
        return
    exact = weights()
    await engine.engine.update_weights(exact, version)
    try:
        yield
    finally:
        await engine.update_weights(exact, version)
