"""SFT puts loss on exactly the assistant tokens (the RL masking) and learns from demonstrations."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alp_agents import jobs
from alp_agents.demonstrations import TokenizedExample, tokenize_demonstration
from alp_agents.envs import ToolEnv, arithmetic_tasks
from alp_agents.envs.demos import make_demonstrations
from alp_agents.trainers.run_config import EnvSection
from alp_agents.trainers.sft import SFTConfig, pad_examples, run_sft, sft_loss


def test_sft_loss_is_the_mean_nll_of_assistant_tokens_only(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    [demo] = make_demonstrations(ToolEnv, arithmetic_tasks(1, seed=0, difficulty=2))
    example = tokenize_demonstration(tokenizer, demo)
    ids, attention, mask = pad_examples([example], tokenizer.pad_token_id)
    with torch.no_grad():
        loss = sft_loss(model, ids, attention, mask)
        logp = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]  # predicts tokens 1..T-1
    assistant = [i for i, m in enumerate(example.loss_mask) if m]
    assert torch.isclose(loss, -logp[[i - 1 for i in assistant]].mean(), atol=1e-5)
    # Exactly the two assistant replies and their end-of-turn tokens carry loss; the tool result does not.
    replies = [m.content for m in demo.messages if m.role == "assistant"]
    assert tokenizer.decode([example.token_ids[i] for i in assistant]) == "".join(r + "<|im_end|>" for r in replies)


def test_sft_lowers_the_loss_on_its_demonstrations(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    examples = [tokenize_demonstration(tokenizer, d) for d in make_demonstrations(ToolEnv, arithmetic_tasks(8, seed=1, difficulty=1))]
    history = run_sft(model, examples, SFTConfig(lr=3e-3, epochs=6, batch_size=8, warmup_steps=1), pad_token_id=tokenizer.pad_token_id,
                      progress=False)
    assert len(history) == 6
    assert history[-1]["sft/loss"] < 0.7 * history[0]["sft/loss"]


def test_schema_free_epochs_train_first_on_prompts_without_the_tool_schema(tiny_model_dir, tmp_path, monkeypatch):
    demos, _, _ = jobs.make_demos(tmp_path / "demos.jsonl", EnvSection(), n=8, difficulty=1, seed=0)
    stages: list[list[TokenizedExample]] = []

    def recording_run_sft(model, examples, cfg, **kwargs):
        stages.append(list(examples))
        return run_sft(model, examples, cfg, **kwargs)

    monkeypatch.setattr(jobs, "run_sft", recording_run_sft)
    cfg = SFTConfig(lr=1e-3, epochs=1, schema_free_epochs=2, batch_size=4, warmup_steps=0)
    history = jobs.sft(tiny_model_dir, demos, tmp_path / "sft", cfg)

    assert len(history) == 4 + 2  # 2 epochs of 8 without the schema, then 1 epoch with it, 4 per step
    schema_free, full = stages
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tokenizer.decode(e.token_ids[: e.loss_mask.index(1)]) for e in (schema_free[0], full[0])]
    assert '"name": "calculator"' in prompts[1] and '"name": "calculator"' not in prompts[0]
    # The same replies carry the loss in both stages; only the prompt is shorter.
    replies = [[t for t, m in zip(e.token_ids, e.loss_mask) if m] for e in (schema_free[0], full[0])]
    assert replies[0] == replies[1] and len(schema_free[0].token_ids) < len(full[0].token_ids) - 50
    assert (tmp_path / "sft" / "model.safetensors").is_file()
