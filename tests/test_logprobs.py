"""Chunked log-probs equal the naive full-logits computation, in value and in gradient."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from alp_agents.errors import ModelError
from alp_agents.trainers import token_logprobs, token_logprobs_naive


@pytest.fixture
def qwen2(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    return LlamaForCausalLM(config)


def batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(0, vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 14:] = 0
    attention_mask[2, 5:] = 0
    return input_ids, attention_mask


def gradients(model, logprobs: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    weights = torch.linspace(-1.0, 1.0, logprobs.shape[1])  # any fixed weighting of the tokens
    (logprobs * weights * attention_mask).sum().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("name", ["qwen2", "llama"])
@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_chunked_equals_naive_in_value_and_gradient(name, chunk_size, request):
    model = request.getfixturevalue(name)
    input_ids, attention_mask = batch(model.config.vocab_size)
    naive_lp, naive_entropy = token_logprobs_naive(model, input_ids, attention_mask)
    naive_grads = gradients(model, naive_lp, attention_mask)
    lp, entropy = token_logprobs(model, input_ids, attention_mask, chunk_size=chunk_size)
    assert lp.shape == entropy.shape == input_ids.shape and lp.dtype == torch.float32
    assert lp[:, 0].eq(0).all() and entropy[:, 0].eq(0).all()  # the first token has no prediction
    torch.testing.assert_close(lp, naive_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, naive_entropy, rtol=1e-5, atol=1e-5)
    assert not entropy.requires_grad
    for a, b in zip(gradients(model, lp, attention_mask), naive_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_log_probs_are_those_of_the_sampled_token(llama):
    input_ids, attention_mask = batch(llama.config.vocab_size)
    with torch.no_grad():
        lp, _ = token_logprobs(llama, input_ids, attention_mask, chunk_size=5)
        logits = llama(input_ids=input_ids).logits
    by_hand = logits[0, 3].log_softmax(-1)[input_ids[0, 4]]  # position 4 is predicted from position 3
    assert lp[0, 4].item() == pytest.approx(by_hand.item(), abs=1e-5)
    assert not lp.requires_grad


def test_temperature_divides_the_logits(llama):
    input_ids, attention_mask = batch(llama.config.vocab_size)
    with torch.no_grad():
        hot, _ = token_logprobs(llama, input_ids, attention_mask, chunk_size=8, temperature=0.7)
        reference, _ = token_logprobs_naive(llama, input_ids, attention_mask, temperature=0.7)
        plain, _ = token_logprobs(llama, input_ids, attention_mask, chunk_size=8)
    torch.testing.assert_close(hot, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hot, plain)


def test_single_token_sequences_have_no_predictions(llama):
    lp, entropy = token_logprobs(llama, torch.tensor([[5], [6]]), torch.ones(2, 1, dtype=torch.long), chunk_size=4)
    assert lp.tolist() == [[0.0], [0.0]] and entropy.tolist() == [[0.0], [0.0]]


def test_models_that_rescale_their_logits_are_refused(llama):
    llama.config.final_logit_softcapping = 30.0
    with pytest.raises(ModelError, match="final_logit_softcapping"):
        token_logprobs(llama, torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long))
