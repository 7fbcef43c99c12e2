"""Other models' chat templates: `model.chat_template`, and token-level history for templates that re-render it.

The templates in tests/data are verbatim copies (sources in tests/data/README.md): Qwen3's, which drops
`<think>...</think>` from assistant turns before the last user message, and a Llama 3.1 one. Each runs
on the tiny model's tokenizer (for Llama, with Llama's header and end-of-turn tokens added).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from alp_agents.chat import continuation_token_ids, load_tokenizer, prompt_token_ids, render
from alp_agents.engines import Generation, SamplingConfig
from alp_agents.envs import Task, TextEnv, TurnResult
from alp_agents.errors import ModelError
from alp_agents.rollout import collect_sync
from alp_agents.tiny import chat_template
from alp_agents.tools import Calculator, ToolRegistry
from alp_agents.trajectory import Message

DATA = Path(__file__).parent / "data"
QWEN3 = DATA / "qwen3_chat_template.jinja"
LLAMA31 = DATA / "llama3.1_json_chat_template.jinja"
TASK = Task(id="bags", prompt="Ava has 1234 bags with 56 apples in each bag. How many apples?", answer="69104")
NUDGE = "Put the final answer in \\boxed{}."


class CoachEnv(TextEnv):
    """A tool result after the first turn, a user's nudge after the second, the end after the third.

    The nudge is a new user message: from then on Qwen3's template renders the first two assistant
    turns without their reasoning.
    """

    tool_call_style = "hermes"

    def __init__(self) -> None:
        super().__init__(tasks=[TASK], max_turns=3, system_prompt="Use the calculator.")

    def tool_schemas(self) -> list[dict]:
        return ToolRegistry([Calculator()]).schemas()

    async def respond(self, action: str) -> TurnResult:
        if self.turn == 1:
            return TurnResult(messages=[Message(role="tool", name="calculator", content="69104")])
        if self.turn == 2:
            return TurnResult(messages=[Message(role="user", content=NUDGE)])
        return TurnResult(reward=1.0, terminated=True)


class ReplayEngine:
    """Returns the given token ids turn after turn (each ending with the end-of-turn token) and keeps every prompt it saw."""

    def __init__(self, turns: list[list[int]]) -> None:
        self.turns = turns
        self.prompts: list[list[int]] = []

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingConfig) -> Generation:
        ids = self.turns[len(self.prompts)]
        self.prompts.append(list(prompt_token_ids))
        return Generation(token_ids=ids, logprobs=[-0.5] * len(ids), finish_reason="stop", policy_version=0)


@pytest.fixture(scope="module")
def llama_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tokenizer with Llama 3's control tokens, `<|eot_id|>` as its end of turn, saved on its own."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                  "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
    out = tmp_path_factory.mktemp("llama-tokenizer")
    tokenizer.save_pretrained(out)
    return out


def sampled_turns(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id] for text in texts]


def play(tokenizer, turns: list[list[int]]):
    engine = ReplayEngine(turns)
    [trajectory] = collect_sync(CoachEnv, [TASK], engine, tokenizer, sampling=SamplingConfig(temperature=1.0), progress=False)
    assert trajectory.finish_reason == "terminated", trajectory.error
    return trajectory, engine


def assert_token_level_history(trajectory, engine: ReplayEngine, turns: list[list[int]]) -> None:
    """What the engine saw is what the trainer gets: every prompt extends the previous one by the sampled ids,
    the episode is the last prompt plus the last turn, and the trained (mask 1) ids are exactly the sampled ones."""
    for before, after, sampled in zip(engine.prompts, engine.prompts[1:], turns):
        assert after[: len(before) + len(sampled)] == before + sampled
    assert trajectory.token_ids == engine.prompts[-1] + turns[-1]
    trained = [token for token, mask in zip(trajectory.token_ids, trajectory.loss_mask) if mask]
    assert trained == [token for turn in turns for token in turn]


@pytest.mark.parametrize("template", ["chatml", "llama3.1"])
def test_append_only_templates_give_the_ids_the_template_renders(template, tiny_model_dir, llama_model_dir) -> None:
    if template == "chatml":
        tokenizer = load_tokenizer(tiny_model_dir, chat_template())
        texts = ['<tool_call>\n{"name": "calculator", "arguments": {"expression": "1234 * 56"}}\n</tool_call>', "It is 69104.",
                 "\\boxed{69104}"]
    else:
        tokenizer = load_tokenizer(llama_model_dir, str(LLAMA31))
        texts = ['{"name": "calculator", "parameters": {"expression": "1234 * 56"}}', "It is 69104.", "\\boxed{69104}"]
    turns = sampled_turns(tokenizer, texts)
    trajectory, engine = play(tokenizer, turns)
    assert_token_level_history(trajectory, engine, turns)
    # the reference: the template rendering the whole history at the last turn, tokenised at once
    history = trajectory.messages[:-1]
    reference = tokenizer.encode(render(tokenizer, history, tools=CoachEnv().tool_schemas(), add_generation_prompt=True), add_special_tokens=False)
    assert engine.prompts[-1] == reference


def test_shipped_template_continuation_ids_are_unchanged(tiny_model_dir) -> None:
    """The ChatML ids the agent loop inserts after a turn, pinned as text: end of turn, tool turn, next generation prompt."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = continuation_token_ids(tokenizer, [Message(role="tool", content="69104"), Message(role="tool", content="2")])
    assert tokenizer.decode(ids) == ("\n<|im_start|>tool\n<tool_response>\n69104\n</tool_response>\n<tool_response>\n2\n"
                                     "</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert ids == tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)


def test_qwen3_history_keeps_the_sampled_reasoning_that_its_template_would_drop(tiny_model_dir) -> None:
    tokenizer = load_tokenizer(tiny_model_dir, str(QWEN3))
    # Qwen3's generation prompt opens <think>: each turn samples its reasoning, </think>, then the reply
    texts = ['I will multiply.\n</think>\n\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "1234 * 56"}}\n</tool_call>',
             "The tool says 69104.\n</think>\n\nIt is 69104.", "The format.\n</think>\n\n\\boxed{69104}"]
    turns = sampled_turns(tokenizer, texts)
    trajectory, engine = play(tokenizer, turns)
    assert_token_level_history(trajectory, engine, turns)
    assert tokenizer.decode(engine.prompts[0]).endswith("<|im_start|>assistant\n<think>\n")
    # the tool results and the nudge arrive in Qwen3's own form
    assert tokenizer.decode(engine.prompts[1][len(engine.prompts[0]) + len(turns[0]):]) == (
        "\n<|im_start|>user\n<tool_response>\n69104\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert tokenizer.decode(engine.prompts[2][len(engine.prompts[1]) + len(turns[1]):]) == (
        f"\n<|im_start|>user\n{NUDGE}<|im_end|>\n<|im_start|>assistant\n<think>\n")
    # re-rendered after the nudge, the first two turns lose their reasoning; our ids keep every sampled token
    history = trajectory.messages[:-1]
    rerendered = tokenizer.encode(render(tokenizer, history, tools=CoachEnv().tool_schemas(), add_generation_prompt=True),
                                  add_special_tokens=False)
    reasoning = tokenizer.encode("I will multiply.", add_special_tokens=False)
    assert contains(engine.prompts[-1], reasoning) and not contains(rerendered, reasoning)
    assert len(rerendered) < len(engine.prompts[-1])
    opening = tokenizer.encode(render(tokenizer, history[:2], tools=CoachEnv().tool_schemas()), add_special_tokens=False)
    assert engine.prompts[-1][: len(opening)] == rerendered[: len(opening)] == opening  # they differ from the first assistant turn on


def test_sampled_ids_are_kept_even_when_not_canonical(tiny_model_dir) -> None:
    """An engine may sample a tokenisation the tokenizer would never produce; the history keeps it, id for id."""
    tokenizer = load_tokenizer(tiny_model_dir, str(QWEN3))
    spelled = [tokenizer.convert_tokens_to_ids(c) for c in "apples"]  # one token per letter; canonically fewer
    first = spelled + tokenizer.encode(".\n</think>\n\nIt is 69104.", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert tokenizer.encode(tokenizer.decode(first[:-1]), add_special_tokens=False) != first[:-1]
    turns = [first, *sampled_turns(tokenizer, ["Ok.\n</think>\n\n69104", "Done.\n</think>\n\n\\boxed{69104}"])]
    trajectory, engine = play(tokenizer, turns)
    assert_token_level_history(trajectory, engine, turns)
    start = len(engine.prompts[0])
    assert trajectory.token_ids[start : start + len(first)] == first


def test_chat_template_is_a_file_or_the_text_and_the_saved_tokenizer_carries_it(tiny_model_dir, tmp_path) -> None:
    text = QWEN3.read_text(encoding="utf-8")
    from_file, from_text = load_tokenizer(tiny_model_dir, str(QWEN3)), load_tokenizer(tiny_model_dir, text)
    assert from_file.chat_template == from_text.chat_template == text
    assert load_tokenizer(tiny_model_dir).chat_template == chat_template()  # no override: the model's own
    from_file.save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert reloaded.chat_template == text
    messages = [Message(role="user", content="Hi")]
    assert prompt_token_ids(reloaded, messages) == prompt_token_ids(from_file, messages) != prompt_token_ids(load_tokenizer(tiny_model_dir), messages)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("no/such/template.jinja", r"model.chat_template 'no/such/template.jinja' is neither a file nor a Jinja template"),
        ("{% for m in messages %}{{ m.content }", r"model.chat_template: the chat template cannot render a tool exchange \(TemplateSyntaxError"),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", r"does not end an assistant turn with the tokenizer's end-of-sequence token '<\|im_end\|>'"),
    ],
)
def test_a_bad_chat_template_fails_at_load_naming_the_option(template, message, tiny_model_dir) -> None:
    with pytest.raises(ModelError, match=message):
        load_tokenizer(tiny_model_dir, template)


def test_a_training_run_checkpoints_the_tokenizer_with_its_chat_template(tmp_path, tiny_model_dir, vllm_engine, tiny_weights) -> None:
    from test_train_loop import train_in_process

    template = tmp_path / "my_template.jinja"
    template.write_text(chat_template().replace("You are a helpful assistant.", "You are a careful assistant."), encoding="utf-8")
    try:
        train_in_process(tmp_path, tiny_model_dir, [f'model.chat_template="{template}"'], iterations=1, engine=vllm_engine)
    finally:  # the shared engine gets its weights back for the tests after this one
        asyncio.run(vllm_engine.update_weights(tiny_weights, vllm_engine.policy_version + 1))
    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "checkpoint" / "model")
    assert saved.chat_template == template.read_text(encoding="utf-8")


def contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


@pytest.mark.parametrize("command", ["eval", "rollout"])
def test_alp_eval_and_rollout_take_a_chat_template(command, tiny_model_dir, tmp_path) -> None:
    """A bad --chat-template stops the command in seconds, before an engine starts, with the option's name."""
    out = ["--out", str(tmp_path / "t.jsonl")] if command == "rollout" else []
    done = subprocess.run([sys.executable, "-m", "alp_agents.cli", command, "--model", str(tiny_model_dir), "--data", "arithmetic:1", *out,
                           "--chat-template", "no/such.jinja"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "error: --chat-template 'no/such.jinja' is neither a file nor a Jinja template" in " ".join(done.stderr.split())
