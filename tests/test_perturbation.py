"""LayerPerturbation's guarantees: bitwise off outside `active`, seeded noise of std sigma at the chosen
layer inputs, gradients reaching log_sigma, identical recompute, nothing exported; on Qwen2, Llama, GPT-2."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from alp_agents.errors import ConfigError
from alp_agents.trainers import LayerPerturbation, find_decoder_layers
from alp_agents.trainers.perturbation import _AddScaledNoise, select_layers


@pytest.fixture
def qwen2(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
    )
    return LlamaForCausalLM(config)


def batch(vocab_size: int, B: int = 2, T: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, T - 3 :] = 0  # right padding on the second row
    return input_ids, attention_mask


def layer_inputs(model, input_ids, attention_mask, perturbation=None, seed=0) -> list[torch.Tensor]:
    """The residual stream entering each decoder layer, as the layer received it (after any noise)."""
    captured: list[torch.Tensor] = []
    handles = [
        layer.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().clone()))
        for layer in find_decoder_layers(model)
    ]
    try:
        with perturbation.active(seed=seed) if perturbation else torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_finds_the_decoder_layers_of_each_architecture(name, request):
    model = request.getfixturevalue(name)
    assert find_decoder_layers(model) is model.model.layers


def test_finds_layers_by_count_when_the_decoder_has_no_layers_attribute():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=3, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0))
    assert find_decoder_layers(model) is model.transformer.h
    perturbation = LayerPerturbation(model, init_sigma=0.1)
    input_ids = torch.randint(0, 50, (1, 8))
    plain = model(input_ids).logits
    with perturbation.active(seed=1):
        assert not torch.equal(model(input_ids).logits, plain)


def test_layer_selections():
    assert select_layers("all", 4) == [0, 1, 2, 3]
    assert [select_layers(third, 4) for third in ("early", "middle", "late")] == [[0, 1], [2], [3]]
    assert [select_layers(third, 6) for third in ("early", "middle", "late")] == [[0, 1], [2, 3], [4, 5]]
    assert select_layers([3, 1], 4) == [1, 3]
    for bad in ([4], [-1], [1, 1], [], "first"):
        with pytest.raises(ConfigError, match="perturb_layers"):
            select_layers(bad, 4)
    with pytest.raises(ConfigError, match="no late third"):
        select_layers("late", 2)


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_outside_active_the_model_is_bitwise_unchanged(name, request):
    model = request.getfixturevalue(name)
    input_ids, attention_mask = batch(model.config.vocab_size)
    before = model(input_ids=input_ids, attention_mask=attention_mask).logits
    perturbation = LayerPerturbation(model, init_sigma=0.1)
    assert torch.equal(model(input_ids=input_ids, attention_mask=attention_mask).logits, before)
    with perturbation.active(seed=3):
        noisy = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert not torch.allclose(noisy, before, atol=1e-3)
    assert torch.equal(model(input_ids=input_ids, attention_mask=attention_mask).logits, before)
    perturbation.remove()
    assert torch.equal(model(input_ids=input_ids, attention_mask=attention_mask).logits, before)
    with pytest.raises(RuntimeError, match="removed"), perturbation.active(seed=3):
        pass


def test_same_seed_gives_the_same_noise_and_another_seed_does_not(qwen2):
    input_ids, attention_mask = batch(qwen2.config.vocab_size)
    perturbation = LayerPerturbation(qwen2, init_sigma=0.1)

    def noisy_logits(seed: int) -> torch.Tensor:
        with perturbation.active(seed=seed):
            return qwen2(input_ids=input_ids, attention_mask=attention_mask).logits

    assert torch.equal(noisy_logits(5), noisy_logits(5))
    assert not torch.allclose(noisy_logits(5), noisy_logits(6), atol=1e-3)
    with pytest.raises(RuntimeError, match="nested"), perturbation.active(seed=1), perturbation.active(seed=2):
        pass


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_noise_has_std_sigma_at_the_chosen_layer_input_only(name, request):
    model = request.getfixturevalue(name)
    input_ids, attention_mask = batch(model.config.vocab_size, B=4, T=64)
    clean = layer_inputs(model, input_ids, attention_mask)
    perturbation = LayerPerturbation(model, layers=[1], init_sigma=0.05)
    noisy = layer_inputs(model, input_ids, attention_mask, perturbation)
    assert torch.equal(noisy[0], clean[0])  # upstream of the chosen layer: untouched
    noise = noisy[1] - clean[1]  # (B, T, H): exactly sigma * eps
    assert noise.std().item() == pytest.approx(0.05, rel=0.05)
    assert noise.mean().abs().item() < 0.005
    assert not torch.allclose(noisy[2], clean[2])  # downstream layers see its effect


def test_logits_ablation_perturbs_only_the_last_layer_output(qwen2):
    input_ids, attention_mask = batch(qwen2.config.vocab_size, B=4, T=64)
    clean_inputs = layer_inputs(qwen2, input_ids, attention_mask)
    perturbation = LayerPerturbation(qwen2, layers="logits", init_sigma=0.05)
    final = []  # the last layer's output after the perturbation's hook: registered after it
    handle = find_decoder_layers(qwen2)[-1].register_forward_hook(lambda module, args, output: final.append(output.detach()))
    qwen2(input_ids=input_ids, attention_mask=attention_mask)
    noisy_inputs = layer_inputs(qwen2, input_ids, attention_mask, perturbation)
    handle.remove()
    assert perturbation.names == ["logits"]
    assert all(torch.equal(a, b) for a, b in zip(noisy_inputs, clean_inputs))  # no layer sees noise
    assert (final[1] - final[0]).std().item() == pytest.approx(0.05, rel=0.05)


def test_gradient_reaches_every_log_sigma(qwen2):
    input_ids, attention_mask = batch(qwen2.config.vocab_size)
    perturbation = LayerPerturbation(qwen2, init_sigma=0.05)
    with perturbation.active(seed=0):
        qwen2(input_ids=input_ids, attention_mask=attention_mask).logits.log_softmax(-1)[..., 7].sum().backward()
    grad = perturbation.log_sigma.grad
    assert grad is not None and grad.shape == (qwen2.config.num_hidden_layers,)
    assert torch.isfinite(grad).all() and (grad != 0).all()


def test_noise_gradients_match_finite_differences():
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(2, 3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(_AddScaledNoise.apply, (hidden, sigma, eps))


def test_gradient_checkpointing_recompute_sees_the_same_noise(llama):
    input_ids, attention_mask = batch(llama.config.vocab_size)
    perturbation = LayerPerturbation(llama, init_sigma=0.05)
    llama.train()

    def gradients() -> tuple[torch.Tensor, torch.Tensor]:
        llama.zero_grad()
        perturbation.log_sigma.grad = None
        with perturbation.active(seed=11):
            llama(input_ids=input_ids, attention_mask=attention_mask).logits.log_softmax(-1)[..., 3].sum().backward()
        return perturbation.log_sigma.grad.clone(), llama.model.layers[0].mlp.up_proj.weight.grad.clone()

    plain = gradients()
    llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    recomputed = gradients()
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_nothing_is_exported(qwen2, tmp_path):
    keys = list(qwen2.state_dict())
    qwen2.save_pretrained(tmp_path / "before")
    perturbation = LayerPerturbation(qwen2, init_sigma=0.05)
    with perturbation.active(seed=0):
        qwen2(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    assert list(qwen2.state_dict()) == keys
    assert all(p is not perturbation.log_sigma for p in qwen2.parameters())
    qwen2.save_pretrained(tmp_path / "after")
    digest = [hashlib.sha256((tmp_path / d / "model.safetensors").read_bytes()).hexdigest() for d in ("before", "after")]
    assert digest[0] == digest[1]


def test_calibrate_sets_sigma_relative_to_each_input_rms(qwen2):
    input_ids, attention_mask = batch(qwen2.config.vocab_size)
    real = attention_mask.bool()
    expected = torch.stack([h[real].pow(2).mean().sqrt() for h in layer_inputs(qwen2, input_ids, attention_mask)])
    perturbation = LayerPerturbation(qwen2, init_sigma=1.0)
    rms = perturbation.calibrate(input_ids, attention_mask, relative_sigma=0.01)
    torch.testing.assert_close(rms, expected)
    torch.testing.assert_close(perturbation.sigmas(), 0.01 * expected)
    perturbation.remove()
    final = []
    handle = find_decoder_layers(qwen2)[-1].register_forward_hook(lambda module, args, output: final.append(output))
    logits_rms = LayerPerturbation(qwen2, layers="logits").calibrate(input_ids, attention_mask, relative_sigma=0.01)
    handle.remove()
    torch.testing.assert_close(logits_rms, final[0][real].pow(2).mean().sqrt()[None])


def test_zero_sigma_is_exactly_no_noise_and_learns_nothing(qwen2):
    input_ids, attention_mask = batch(qwen2.config.vocab_size)
    plain = qwen2(input_ids=input_ids, attention_mask=attention_mask).logits
    perturbation = LayerPerturbation(qwen2, init_sigma=0.0)
    assert torch.isneginf(perturbation.log_sigma).all() and torch.equal(perturbation.sigmas(), torch.zeros(4))
    with perturbation.active(seed=3):
        noisy = qwen2(input_ids=input_ids, attention_mask=attention_mask).logits
        noisy.log_softmax(-1)[..., 7].sum().backward()
    assert torch.equal(noisy, plain)  # h + 0 * eps == h, bit for bit
    assert torch.equal(perturbation.log_sigma.grad, torch.zeros(4))  # sigma * <grad, eps> = 0: no NaN
    with pytest.raises(ConfigError, match="init_sigma"):
        LayerPerturbation(qwen2, init_sigma=-1.0)


def shifted_embeddings(model, shift: float = 0.01):
    """The 'engine copy': a deepcopy whose input embeddings are all shifted by `shift`, so layer 0's input differs by it."""
    engine = copy.deepcopy(model)
    with torch.no_grad():
        engine.get_input_embeddings().weight.add_(shift)
    return engine


def test_calibrate_to_recovers_a_known_engine_error(qwen2):
    input_ids, attention_mask = batch(qwen2.config.vocab_size)
    perturbation = LayerPerturbation(qwen2, init_sigma=1.0)
    error = perturbation.calibrate_to(shifted_embeddings(qwen2), input_ids, attention_mask, scale=0.5)
    assert error[0].item() == pytest.approx(0.01, rel=1e-6)  # layer 0 reads the embeddings: off by exactly 0.01
    assert (error[1:] > 0).all()  # the shift propagates to every later layer
    torch.testing.assert_close(perturbation.sigmas(), 0.5 * error)
    bf16 = perturbation.calibrate_to(copy.deepcopy(qwen2).to(torch.bfloat16), input_ids, attention_mask, scale=1.0)
    assert (bf16 > 0).all() and torch.isfinite(bf16).all()  # another dtype: compared in float32


def test_calibrate_to_floors_a_point_the_engine_reproduces_exactly(qwen2):
    input_ids, attention_mask = batch(qwen2.config.vocab_size)
    real = attention_mask.bool()
    rms = torch.stack([h[real].pow(2).mean().sqrt() for h in layer_inputs(qwen2, input_ids, attention_mask)])
    perturbation = LayerPerturbation(qwen2, init_sigma=1.0)
    error = perturbation.calibrate_to(copy.deepcopy(qwen2), input_ids, attention_mask, scale=2.0)
    assert torch.equal(error, torch.zeros(4))
    torch.testing.assert_close(perturbation.sigmas(), 2.0 * 1e-8 * rms)  # finite log(sigma), not -inf
    logits = LayerPerturbation(qwen2, layers="logits", init_sigma=1.0)
    assert logits.calibrate_to(shifted_embeddings(qwen2), input_ids, attention_mask, scale=1.0).shape == (1,)
