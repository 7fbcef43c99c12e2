"""Supervised warm start: teach the model the tool-call format from demonstrations before RL.

The loss is the token-mean negative log-likelihood over the tokens the policy would sample (the
demonstration's assistant turns); prompts, tool results and template tokens carry no loss, the same
masking the RL update uses.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from alp_agents.config import Config
from alp_agents.demonstrations import TokenizedExample
from alp_agents.trainers.batching import right_pad
from alp_agents.trainers.logprobs import token_logprobs


class SFTConfig(Config):
    """Hyper-parameters of the supervised warm start."""

    lr: float = Field(2e-3, gt=0)
    """Peak AdamW learning rate (small models from scratch want a large one)."""
    epochs: float = Field(2.0, gt=0)
    """Passes over the demonstrations (fractions allowed)."""
    schema_free_epochs: float = Field(0.0, ge=0)
    """Passes over the demonstrations with the tool schemas left out of the prompt, before `epochs` with
    them (0: none). A curriculum for a model trained from scratch: the tiny model learned to copy numbers
    from short prompts in 225-300 steps, but was still on its loss plateau after 680 behind the schema."""
    batch_size: int = Field(16, ge=1)
    """Demonstrations per optimizer step."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Clip the global gradient norm to this value."""
    seed: int = 0
    """Seed of the shuffling."""


def sft_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the masked tokens."""
    logprobs, _ = token_logprobs(model, input_ids, attention_mask)  # (B, T)
    return -(logprobs * loss_mask).sum() / loss_mask.sum().clamp(min=1)


def pad_examples(examples: Sequence[TokenizedExample], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad examples into (input_ids, attention_mask, loss_mask), each (B, T)."""
    input_ids = right_pad([e.token_ids for e in examples], value=pad_token_id, dtype=torch.long)
    attention_mask = right_pad([[1] * len(e.token_ids) for e in examples], dtype=torch.long)
    loss_mask = right_pad([e.loss_mask for e in examples], dtype=torch.float32)
    return input_ids, attention_mask, loss_mask


def learning_rate(step: int, total: int, cfg: SFTConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to 10% of it."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def run_sft(model: nn.Module, examples: Sequence[TokenizedExample], cfg: SFTConfig, *, pad_token_id: int,
            progress: bool = True) -> list[dict[str, float]]:
    """Train `model` in place on `examples`; return one metrics row per optimizer step."""
    rng = random.Random(cfg.seed)
    total = max(1, math.ceil(cfg.epochs * len(examples) / cfg.batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order: list[int] = []
    history = []
    model.train()
    for step in tqdm(range(total), desc="sft", disable=not progress, leave=False):
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(examples)), len(examples))  # next epoch, reshuffled
        batch = [examples[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        input_ids, attention_mask, loss_mask = pad_examples(batch, pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total, cfg)
        loss = sft_loss(model, input_ids, attention_mask, loss_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        history.append({"sft/loss": loss.item(), "sft/grad_norm": grad_norm.item(), "sft/lr": optimizer.param_groups[0]["lr"]})
    model.eval()
    return history
