"""trainer.lora: PEFT adapters trained under ALP, merged weights for the engine and the checkpoint, exact resume."""

from __future__ import annotations

import asyncio

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from alp_agents.engines import SamplingConfig
from alp_agents.errors import ConfigError
from alp_agents.trainers import ALPTrainer, collate, token_logprobs
from alp_agents.trainers.perturbation import find_decoder_layers
from alp_agents.trainers.run_dir import LoopState, RunDir
from alp_agents.trainers.trainer import LoRAConfig, load_policy

from conftest import max_abs_diff
from test_alp_trainer import make_trajectories, small_config

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOGPROB_TOLERANCE = 1e-4  # vLLM float32 against HF float32 on the same weights: ~1e-6 (test_engines.py)


@pytest.fixture
def load(tiny_model_dir):
    return lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def lora_config(**overrides):
    return small_config(lora=LoRAConfig(rank=4, alpha=8.0), **overrides)


@pytest.fixture
def trained(load):
    """An ALP trainer with LoRA after one step (lr 1e-2: the merged weights move visibly)."""
    model = load()
    trainer = ALPTrainer(model, lora_config(lr=1e-2))
    trainer.step(make_trajectories(model))
    return trainer


def test_only_the_adapters_and_sigma_are_trained(load):
    trainer = ALPTrainer(load(), lora_config())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    names = {name for name, p in trainer.model.named_parameters() if id(p) in optimized}
    layers = trainer.model.config.num_hidden_layers
    assert all(".lora_A." in name or ".lora_B." in name for name in names)
    assert len(names) == 2 * len(PROJECTIONS) * layers  # A and B of every projection of every layer
    assert id(trainer.perturbation.log_sigma) in optimized
    assert {name for name, p in trainer.model.named_parameters() if p.requires_grad} == names


def test_alp_perturbs_every_decoder_layer_through_the_peft_wrapper(load):
    trainer = ALPTrainer(load(), lora_config(sigma_init="absolute", init_sigma=1e-2))
    layers = find_decoder_layers(trainer.model)
    assert trainer.perturbation.layer_indices == list(range(len(layers))) == list(range(trainer.model.config.num_hidden_layers))
    assert all(any(".lora_A." in name for name, _ in layer.named_parameters()) for layer in layers)  # the adapted layers

    batch = collate(make_trajectories(trainer.model))
    inputs: list[torch.Tensor] = []
    handles = [layer.register_forward_pre_hook(lambda m, args, kwargs: inputs.append((args[0] if args else kwargs["hidden_states"]).clone()),
                                               with_kwargs=True) for layer in layers]  # after ALP's hooks: sees the noisy input
    with torch.no_grad():
        token_logprobs(trainer.model, batch.input_ids, batch.attention_mask)
        with trainer.perturbation.active(seed=3):
            token_logprobs(trainer.model, batch.input_ids, batch.attention_mask)
    for handle in handles:
        handle.remove()
    clean, noisy = inputs[: len(layers)], inputs[len(layers) :]
    # layer 0's input differs by the noise alone; later layers by the noise plus what earlier noise changed
    assert all(float((n - c).abs().max()) > 1e-3 for c, n in zip(clean, noisy))


def test_same_seed_gives_the_same_adapters_and_step_with_or_without_gradient_checkpointing(load):
    """The adapters' random A is drawn from trainer.seed, not the global RNG; the checkpointed recompute changes nothing."""
    trajectories = make_trajectories(load())
    runs = {}
    for name, overrides in (("plain", {}), ("checkpointed", {"gradient_checkpointing": True}), ("seed 1", {"seed": 1})):
        torch.manual_seed(len(runs))  # a different global RNG state each time
        trainer = ALPTrainer(load(), lora_config(**overrides))
        trainer.step(trajectories)
        runs[name] = trainer.policy_state_dict()
    assert all(torch.equal(runs["checkpointed"][name], tensor) for name, tensor in runs["plain"].items())
    assert not all(torch.equal(runs["seed 1"][name], tensor) for name, tensor in runs["plain"].items())


def test_merged_weights_have_the_base_checkpoints_names_and_shapes(trained, tiny_model_dir):
    merged = trained.policy_state_dict()
    checkpoint = load_file(tiny_model_dir / "model.safetensors")
    assert sorted(merged) == sorted(checkpoint)
    assert all(merged[name].shape == checkpoint[name].shape and merged[name].dtype == torch.float32 for name in checkpoint)
    changed = {name for name in checkpoint if not torch.equal(merged[name], checkpoint[name])}
    assert changed == {name for name in checkpoint if name.endswith(tuple(f"{p}.weight" for p in PROJECTIONS))}


def test_merged_weights_compute_what_the_adapted_model_computes(trained, load):
    plain = load()
    plain.load_state_dict(trained.policy_state_dict(), strict=False)  # the tied head follows the embedding
    batch = collate(make_trajectories(plain))
    with torch.no_grad():
        adapted, _ = token_logprobs(trained.model, batch.input_ids, batch.attention_mask)
        merged, _ = token_logprobs(plain, batch.input_ids, batch.attention_mask)
        base, _ = token_logprobs(load(), batch.input_ids, batch.attention_mask)
    assert float((merged - adapted).abs().max()) < 1e-5
    assert float((merged - base).abs().max()) > 1e-3  # the adapters did change the policy


def test_merged_weights_push_into_the_engine(trained, vllm_engine, prompts, hf_logprobs, tiny_weights):
    merged = {name: tensor.clone() for name, tensor in trained.policy_state_dict().items()}
    sampling = SamplingConfig(max_tokens=16, ignore_eos=True)
    start_version = vllm_engine.policy_version

    async def run():
        await vllm_engine.update_weights(merged, version=start_version + 1)
        try:
            return await vllm_engine.generate(prompts[0], sampling)
        finally:
            await vllm_engine.update_weights(tiny_weights, version=start_version + 2)

    generation = asyncio.run(run())
    assert generation.policy_version == start_version + 1
    assert max_abs_diff(generation.logprobs, hf_logprobs(prompts[0], generation.token_ids, weights=merged)) < LOGPROB_TOLERANCE
    assert max_abs_diff(generation.logprobs, hf_logprobs(prompts[0], generation.token_ids)) > 1e-3  # not the base weights


def test_checkpoint_holds_merged_model_and_adapter_and_resumes_exactly(trained, tmp_path, load):
    run = RunDir(tmp_path / "run")
    trained.save_checkpoint(run, _tokenizer(trained), LoopState(iteration=1, policy_version=1))
    model_dir, trainer_state, _ = run.load_checkpoint()
    assert (run.checkpoint_path / "adapter" / "adapter_config.json").is_file()
    assert (run.checkpoint_path / "adapter" / "adapter_model.safetensors").is_file()

    merged = trained.policy_state_dict()
    evaluated = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # what `alp eval --model` loads
    assert all(torch.equal(evaluated.state_dict()[name], tensor) for name, tensor in merged.items())

    resumed = ALPTrainer(load_policy(model_dir), lora_config(lr=1e-2))  # as loop.train does on --resume
    resumed.load_state_dict(trainer_state)
    assert all(torch.equal(resumed.policy_state_dict()[name], tensor) for name, tensor in merged.items())
    more = make_trajectories(load(), seed=1)
    trained.step(more)
    resumed.step(more)
    after, after_resumed = trained.policy_state_dict(), resumed.policy_state_dict()
    assert all(torch.equal(after_resumed[name], tensor) for name, tensor in after.items())  # bit for bit


def test_resume_refuses_a_checkpoint_of_another_lora_setting(trained, load):
    other = ALPTrainer(load(), small_config(lr=1e-2))
    with pytest.raises(ConfigError, match=r"trainer\.lora"):
        other.load_state_dict(trained.state_dict())


def test_an_unknown_target_module_names_the_field(load):
    with pytest.raises(ConfigError, match=r"trainer\.lora\.target_modules.*c_attn"):
        ALPTrainer(load(), small_config(lora=LoRAConfig(target_modules=["q_proj", "c_attn"])))


def _tokenizer(trainer):
    return AutoTokenizer.from_pretrained(trainer.model.get_base_model().name_or_path)
