"""The embedded default model: a small Qwen2 model and its tokenizer, built locally from a seed.

No weights can be downloaded, so the project makes its own. The tokenizer is a byte-level BPE
trained on a corpus this module generates deterministically from the kind of text the framework
deals in (arithmetic word problems, LaTeX answers, tool-call JSON, short Python programs, chat
markup); digits are split one per token so numbers copy cleanly. The model is a randomly
initialised `Qwen2ForCausalLM`. The same seed gives byte-identical `model.safetensors` and
`tokenizer.json`. Any Hugging Face causal-LM directory can be used wherever this one is.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path
from typing import Literal

import jinja2
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from alp_agents.errors import ModelError

ModelSize = Literal["tiny", "small", "0.5b"]

CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
"""Special tokens: skipped when decoding with skip_special_tokens."""
TOOL_MARKUP_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
"""Single tokens that stay visible in decoded text (the tool-call parser reads them)."""

VOCAB_SIZE = 1024

SIZES: dict[str, dict[str, int]] = {
    # ~1M parameters: fast enough for unit tests on a CPU.
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384),
    # ~10M parameters: the demo model, still trainable on 2 CPU cores in minutes.
    "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2, intermediate_size=1024),
    # Qwen2.5-0.5B's shape (494M parameters, its 151,936-row embedding): for memory and weight-push measurements, not training.
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                 vocab_size=151_936),
}

EMBEDDING_STD = 0.06  # tied embeddings: 0.02 gives near-uniform outputs, 0.5 makes the model copy its input


def chat_template() -> str:
    """The ChatML (Qwen2.5-style) Jinja template shipped with the package."""
    return resources.files("alp_agents").joinpath("chat_template.jinja").read_text(encoding="utf-8")


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, size: str = "tiny") -> Path:
    """Build the default model (tokenizer, config, weights) into `out_dir` and return its path.

    >>> path = build_tiny_model("models/tiny", seed=0)   # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained(path)       # doctest: +SKIP
    """
    if size not in SIZES:
        raise ModelError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = _build_model(tokenizer, seed=seed, size=size)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on the generated corpus and wrap it with the chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(TOOL_MARKUP_TOKENS),
        special_tokens=CONTROL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: any UTF-8 text round-trips
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(), trainer=trainer)
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_MARKUP_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tokenizer.chat_template = chat_template()
    return tokenizer


def _build_model(tokenizer: PreTrainedTokenizerFast, *, seed: int, size: str) -> Qwen2ForCausalLM:
    shape = {"vocab_size": len(tokenizer), **SIZES[size]}  # a larger vocab_size pads the embedding (rows no token uses)
    config = Qwen2Config(
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        **shape,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        model.get_input_embeddings().weight.normal_(0.0, EMBEDDING_STD, generator=generator)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


# ---------------------------------------------------------------------------------------------
# The tokenizer's training corpus: the text the framework's tasks and tools produce.
# ---------------------------------------------------------------------------------------------

_NAMES = ["Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena"]
_ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "tickets", "boxes", "eggs", "cards"]
_TOOL_SCHEMAS = [  # shaped like the built-in tools' schemas, so their words become single tokens
    {"type": "function", "function": {"name": "calculator", "description": (
        "Evaluate an arithmetic expression exactly. Operators + - * / // % ** ( ); functions sqrt, abs, round, "
        "min, max, floor, ceil, log, log2, log10, exp, sin, cos, tan, factorial, gcd, lcm; constants pi, e."),
     "parameters": {"additionalProperties": False, "description": "Arguments of the calculator tool.", "properties": {
         "expression": {"description": "The expression, e.g. '(1234 + 5678) * 9'.", "type": "string"}},
         "required": ["expression"], "type": "object"}}},
    {"type": "function", "function": {"name": "python", "description": "Run a Python program and return what it prints.",
     "parameters": {"additionalProperties": False, "description": "Arguments of the python tool.", "properties": {
         "code": {"description": "The program to run.", "type": "string"}}, "required": ["code"], "type": "object"}}},
]


def corpus(n_problems: int = 1500) -> list[str]:
    """The deterministic text the BPE is trained on (always the same, whatever the model seed)."""
    rng = random.Random(1234)
    texts = [_render_chat(rng) for _ in range(300)]  # chat markup and the tool preamble: rendered in every prompt
    for _ in range(n_problems):
        texts.extend(_problem_texts(rng))
    return texts


def _render_chat(rng: random.Random) -> str:
    """One conversation rendered by the chat template, with the tool schemas in its system prompt."""
    environment = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = json.dumps  # what transformers' chat-template renderer uses
    problem, call, value = _problem_texts(rng)[0], {"name": "calculator", "arguments": {"expression": "1 + 2"}}, "3"
    messages = [
        {"role": "user", "content": problem},
        {"role": "assistant", "content": "", "tool_calls": [{"function": call}]},
        {"role": "tool", "content": value},
        {"role": "assistant", "content": f"The answer is \\boxed{{{value}}}."},
    ]
    return environment.from_string(chat_template()).render(messages=messages, tools=_TOOL_SCHEMAS, add_generation_prompt=True)


def _problem_texts(rng: random.Random) -> list[str]:
    a, b, c = rng.randint(2, 9999), rng.randint(2, 999), rng.randint(2, 99)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    expression = f"{a} * {b} + {c}"
    value = a * b + c
    problem = f"{name} has {a} bags with {b} {item} in each bag and finds {c} more {item}. How many {item} does {name} have?"
    call = {"name": "calculator", "arguments": {"expression": expression}}
    code = f"x = {a} * {b}\nprint(x + {c})"
    return [
        problem,
        f"<tool_call>\n{json.dumps(call)}\n</tool_call>",
        f"<tool_response>\n{value}\n</tool_response>",
        f"```python\n{code}\n```",
        json.dumps({"name": "python", "arguments": {"code": code}}),
        f"The answer is \\boxed{{{value}}}.",
        f"The final answer is {value}. #### {value}",
        f"Compute $\\frac{{{a}}}{{{b}}} + \\sqrt{{{c}}}$. Answer: \\boxed{{\\dfrac{{{a}}}{{{b}}}}}",
        f"{a} - {b} = {a - b}, {a} + {b} = {a + b}, {a} / {b} = {a / b:.3f}",
    ]
