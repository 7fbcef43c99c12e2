"""Per-token log-probs and entropies of a causal LM without holding the full (B, T, V) logits.

With a real vocabulary (Qwen2.5: 151,936 tokens) float32 logits for a 4k-token batch are 2.5 GB, and
log_softmax and its gradient triple that. `token_logprobs` runs the decoder once, then applies the
LM head to `chunk_size` positions at a time under activation checkpointing: the forward keeps only
one chunk's logits alive, and the backward recomputes each chunk's logits when it needs them.
`token_logprobs_naive` is the plain full-logits computation it must equal (tests, benchmark).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from alp_agents.errors import ModelError

OUTPUT_SCALING_ATTRIBUTES = ("final_logit_softcapping", "logits_scaling", "logit_scale")
"""Config fields of models whose forward changes the LM head's output, which the chunked path would miss."""


def token_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, *, chunk_size: int = 1024, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """log p(token_t | tokens_<t) and the entropy of that prediction, both (B, T) float32.

    Position 0 has no prediction and holds 0.0 in both. Log-probs are of `logits / temperature`
    (use the rollout's sampling temperature); they carry gradients, the entropy does not.
    `chunk_size` is the number of token positions whose logits exist at once.
    """
    _check_plain_head(model)
    B, T = input_ids.shape
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    H = hidden.shape[-1]
    h = hidden[:, :-1].reshape(-1, H)  # (B*(T-1), H): position t predicts token t+1
    targets = input_ids[:, 1:].reshape(-1)  # (B*(T-1),)
    chunk = partial(_chunk_logprobs, model.get_output_embeddings(), temperature=temperature)
    recompute = torch.is_grad_enabled() and h.requires_grad
    logprobs, entropy = [], []
    for start in range(0, h.shape[0], chunk_size):
        h_chunk, t_chunk = h[start : start + chunk_size], targets[start : start + chunk_size]
        lp, ent = checkpoint(chunk, h_chunk, t_chunk, use_reentrant=False) if recompute else chunk(h_chunk, t_chunk)
        logprobs.append(lp)
        entropy.append(ent)
    zeros = h.new_zeros(0, dtype=torch.float32)  # torch.cat needs one tensor even when T == 1
    logprobs_flat = torch.cat([zeros, *logprobs])
    entropy_flat = torch.cat([zeros, *entropy])
    return _shift_back(logprobs_flat, B, T), _shift_back(entropy_flat, B, T)


def token_logprobs_naive(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, *, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The reference for `token_logprobs`: full float32 logits and log_softmax over the whole batch."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    logp = (logits[:, :-1].float() / temperature).log_softmax(-1)  # (B, T-1, V)
    logprobs = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)  # (B, T-1)
    return F.pad(logprobs, (1, 0)), F.pad(entropy, (1, 0))


def _chunk_logprobs(head: nn.Module, hidden: Tensor, targets: Tensor, *, temperature: float) -> tuple[Tensor, Tensor]:
    # Under bf16/fp16 compute the head's matmul runs (and rounds the logits) in that dtype, as an engine serving that
    # dtype does; the normaliser and everything after it are float32, so the ratio's log-probs lose nothing more.
    logits = head(hidden).float() / temperature  # (n, V)
    log_normalizer = logits.logsumexp(-1)  # (n,)
    logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - log_normalizer  # (n,)
    with torch.no_grad():
        entropy = log_normalizer - (logits.softmax(-1) * logits).sum(-1)  # H = log Z - E_p[logit]
    return logprobs, entropy


def _shift_back(flat: Tensor, B: int, T: int) -> Tensor:
    """(B*(T-1),) predictions of tokens 1..T-1 -> (B, T) aligned with the tokens, 0.0 at position 0."""
    return F.pad(flat.view(B, T - 1), (1, 0))


def _check_plain_head(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    for attribute in OUTPUT_SCALING_ATTRIBUTES:
        value = getattr(config, attribute, None)
        if value not in (None, 1.0):
            raise ModelError(
                f"{type(model).__name__} sets config.{attribute}={value}, which its forward applies to the LM head's output; "
                "token_logprobs reads the LM head directly and would miss it: use token_logprobs_naive for this model"
            )
    if model.get_output_embeddings() is None:
        raise ModelError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None); load it as a causal LM")
