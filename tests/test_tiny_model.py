"""The embedded default model: deterministic, loadable by transformers and vLLM, with a working chat template."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alp_agents.tiny import CONTROL_TOKENS, TOOL_MARKUP_TOKENS, build_tiny_model

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_gives_identical_bytes(tiny_model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json"):
        assert sha256(again / name) == sha256(tiny_model_dir / name), name
    assert sha256(other / "model.safetensors") != sha256(tiny_model_dir / "model.safetensors")
    assert sha256(other / "tokenizer.json") == sha256(tiny_model_dir / "tokenizer.json")  # tokenizer does not depend on the seed


def test_loads_in_transformers_with_the_documented_size(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert 0.5e6 < model.num_parameters() < 2e6
    logits = model(torch.tensor([[1, 5, 9, 12]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size)
    top1 = torch.softmax(logits[0, -1], dim=-1).max().item()
    assert 1.5 / model.config.vocab_size < top1 < 0.99  # neither uniform nor a copy machine


def test_special_tokens_are_single_tokens(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for token in CONTROL_TOKENS + TOOL_MARKUP_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    assert tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.encode("<tool_call>\n{}\n</tool_call>", add_special_tokens=False)
    assert "<tool_call>" in tokenizer.decode(ids, skip_special_tokens=True)  # tool markup survives decoding


@pytest.mark.parametrize("text", ["héllo wörld 日本語 🎉", "12345 + 678 = 13023", "  two  spaces\n\ttab", "\\boxed{\\dfrac{1}{2}}", "\x00\x7f"])
def test_any_utf8_text_round_trips(tiny_model_dir, text):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_chat_template_renders_tools_calls_and_results(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "user", "content": "What is 12*34?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12*34"}}}]},
        {"role": "tool", "content": "408"},
        {"role": "assistant", "content": "The answer is \\boxed{408}."},
    ]
    text = tokenizer.apply_chat_template(messages, tools=[CALCULATOR], tokenize=False)
    system, rest = text.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools")
    assert json.dumps(CALCULATOR) in system
    assert rest == (
        "<|im_start|>user\nWhat is 12*34?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*34"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>tool\n<tool_response>\n408\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nThe answer is \\boxed{408}.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is 12*34?<|im_end|>\n<|im_start|>assistant\n")
    assert "# Tools" not in prompt


VLLM_SCRIPT = """
import json, sys
from alp_agents.generate import generate_chat
report = generate_chat(sys.argv[1], ["What is 2 + 2?", "Hello"], max_tokens=12, temperature=1.0)
print(json.dumps(report.model_dump()))
"""


def test_vllm_serves_the_model_with_logprobs(tiny_model_dir):
    # A separate process: the offline engine runs in-process and must not share this one with other engines.
    out = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, str(tiny_model_dir)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    vocab_size = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    for completion in report["completions"]:
        assert 1 <= len(completion["token_ids"]) <= 12
        assert len(completion["logprobs"]) == len(completion["token_ids"])
        assert all(0 <= t < vocab_size for t in completion["token_ids"])
        assert all(-50 < lp <= 0 for lp in completion["logprobs"])
        assert completion["finish_reason"] in ("stop", "length")
    assert report["tokens_per_second"] > 0
