"""The agent loop: token-in/token-out ids, loss masks and log-probs, limits, failures, and a real vLLM rollout."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alp_agents.chat import render
from alp_agents.demonstrations import Demonstration, tokenize_demonstration
from alp_agents.engines import Generation, SamplingConfig
from alp_agents.envs import Task, ToolEnv
from alp_agents.errors import EngineError, EngineTimeout
from alp_agents.evaluation import rollout_stats
from alp_agents.rollout import RolloutLimits, collect, collect_sync
from alp_agents.trajectory import Message

TASK = Task(id="bags", prompt="Ava has 1234 bags with 56 apples in each bag. How many apples?", answer="69104")
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1234 * 56"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


class ScriptedEngine:
    """Replies with fixed assistant texts, tokenised canonically, with log-prob -0.01 * (index + 1) per token.

    It stands in for a real engine only where a test needs a known conversation (the reference).
    """

    def __init__(self, tokenizer, replies: list[str], *, finish: str = "stop", fail_on: str | None = None,
                 failure: EngineError = EngineTimeout("request timed out")) -> None:
        self.tokenizer, self.replies, self.finish, self.fail_on, self.failure = tokenizer, replies, finish, fail_on, failure
        self.policy_version = 7
        self.prompts: list[list[int]] = []

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingConfig) -> Generation:
        self.prompts.append(list(prompt_token_ids))
        turn = self.tokenizer.decode(prompt_token_ids).count("<|im_start|>assistant") - 1  # assistant turns so far
        text = self.replies[min(turn, len(self.replies) - 1)]
        if self.fail_on is not None and self.fail_on in self.tokenizer.decode(prompt_token_ids):
            raise self.failure
        ids = self.tokenizer.encode(text, add_special_tokens=False)[: sampling.max_tokens]
        if self.finish == "stop" and len(ids) < sampling.max_tokens:
            ids.append(self.tokenizer.eos_token_id)
        finish = "stop" if ids[-1] == self.tokenizer.eos_token_id else "length"
        return Generation(token_ids=ids, logprobs=[-0.01 * (i + 1) for i in range(len(ids))], finish_reason=finish, policy_version=self.policy_version)


def tool_env() -> ToolEnv:
    return ToolEnv(max_turns=4)


# ---------------------------------------------------------------------------------------------
# Token-in/token-out equals the chat template's rendering for typical conversations
# ---------------------------------------------------------------------------------------------

CONVERSATIONS = {
    "plain": [Message(role="user", content="Say hi."), Message(role="assistant", content="Hi!")],
    "tool call": [
        Message(role="system", content="Use tools."),
        Message(role="user", content="What is 1234 * 56?"),
        Message(role="assistant", content=CALL),
        Message(role="tool", content="69104"),
        Message(role="assistant", content="The answer is \\boxed{69104}."),
    ],
    "several turns and two results": [
        Message(role="user", content="Add then multiply."),
        Message(role="assistant", content=CALL + "\n" + CALL),
        Message(role="tool", content="69104"),
        Message(role="tool", content="69104"),
        Message(role="assistant", content="Let me check.\n" + CALL),
        Message(role="tool", content="69104"),
        Message(role="assistant", content="\\boxed{69104}"),
    ],
    "truncated tool output": [
        Message(role="user", content="Print a lot."),
        Message(role="assistant", content="```python\nprint('x' * 5000)\n```"),
        Message(role="tool", content="x" * 1024 + "...[truncated]"),
        Message(role="assistant", content="Done."),
    ],
    "unicode": [
        Message(role="user", content="Übersetze: 日本語 🎉 — «ok»"),
        Message(role="assistant", content="Ça marche: 日本語 🎉"),
        Message(role="user", content="Encore ?"),
        Message(role="assistant", content="Oui ✓"),
    ],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_incremental_ids_equal_the_full_rendering(tokenizer, name):
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    messages = CONVERSATIONS[name]
    example = tokenize_demonstration(tokenizer, Demonstration(messages=messages, tools=tools))
    full = tokenizer.encode(render(tokenizer, messages, tools=tools), add_special_tokens=False)
    # The full rendering ends the last turn with "<|im_end|>\n"; the episode ends at the sampled <|im_end|>.
    assert example.token_ids == full[:-1]
    sampled = tokenizer.decode([t for t, m in zip(example.token_ids, example.loss_mask) if m == 1])
    assert sampled == "".join(m.content + "<|im_end|>" for m in messages if m.role == "assistant")


def test_where_they_legitimately_differ_the_sampled_ids_are_kept(tokenizer):
    # A model may sample a text as a non-canonical split ("apples" letter by letter): re-tokenising the
    # text would hand the trainer different ids than the engine scored. The loop keeps the engine's ids.
    split = [tokenizer.convert_tokens_to_ids(c) for c in "apples"]
    assert len(tokenizer.encode("apples", add_special_tokens=False)) < len(split)
    engine = ScriptedEngine(tokenizer, ["apples"])

    async def sampled_as_split(prompt_token_ids, sampling):
        return Generation(token_ids=split + [tokenizer.eos_token_id], logprobs=[-1.0] * 7, finish_reason="stop", policy_version=0)

    engine.generate = sampled_as_split
    math_task = Task(id="t", prompt="Say hi.", answer="hi")
    from alp_agents.envs import MathEnv

    [trajectory] = collect_sync(MathEnv, [math_task], engine, tokenizer, sampling=SamplingConfig(), progress=False)
    assert trajectory.token_ids[trajectory.prompt_length :] == split + [tokenizer.eos_token_id]


# ---------------------------------------------------------------------------------------------
# Masks and log-probs of a hand-built tool conversation, through a real ToolEnv and calculator
# ---------------------------------------------------------------------------------------------


def test_masks_and_logprobs_of_a_tool_episode(tokenizer):
    replies = [CALL, "The answer is \\boxed{69104}."]
    engine = ScriptedEngine(tokenizer, replies)
    [t] = collect_sync(tool_env, [TASK], engine, tokenizer, sampling=SamplingConfig(), progress=False)

    assert t.finish_reason == "terminated" and t.reward == 1.0 and t.correct is True
    assert [m.role for m in t.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert t.messages[3].content == "69104"  # the real calculator ran
    assert t.turns[0].tool_calls[0].arguments == {"expression": "1234 * 56"} and t.turns[0].tool_results == ["69104"]
    # The ids are exactly the chat template's rendering of the conversation (minus the final newline).
    reference = tokenizer.encode(render(tokenizer, t.messages, tools=tool_env().tool_schemas()), add_special_tokens=False)
    assert t.token_ids == reference[:-1]
    # Mask 1 exactly on the two sampled turns (their text plus <|im_end|>), with the engine's log-probs in order.
    spans = [tokenizer.encode(r, add_special_tokens=False) + [tokenizer.eos_token_id] for r in replies]
    masked = [i for i, m in enumerate(t.loss_mask) if m]
    assert [t.token_ids[i] for i in masked] == spans[0] + spans[1]
    assert [t.infer_logprobs[i] for i in masked] == pytest.approx([-0.01 * (i + 1) for i in range(len(spans[0]))] + [-0.01 * (i + 1) for i in range(len(spans[1]))])
    assert all(t.infer_logprobs[i] == 0.0 for i, m in enumerate(t.loss_mask) if not m)
    assert t.prompt_length == len(engine.prompts[0]) and t.policy_version == t.policy_version_last == 7
    # The second prompt is the first one plus the sampled turn plus the template's tool turn: nothing re-rendered.
    assert engine.prompts[1][: len(engine.prompts[0])] == engine.prompts[0]
    tool_turn = tokenizer.decode(engine.prompts[1][len(engine.prompts[0]) + len(spans[0]) :])
    assert tool_turn == "\n<|im_start|>tool\n<tool_response>\n69104\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


def test_limits_set_the_finish_reason(tokenizer):
    engine = ScriptedEngine(tokenizer, [CALL])  # calls the tool forever
    [t] = collect_sync(lambda: ToolEnv(max_turns=2), [TASK], engine, tokenizer, sampling=SamplingConfig(), progress=False)
    assert t.finish_reason == "max_turns" and len(t.turns) == 2  # the env's budget ends the episode: the loop has none of its own

    [t] = collect_sync(tool_env, [TASK], engine, tokenizer, sampling=SamplingConfig(), limits=RolloutLimits(max_tokens_per_turn=5), progress=False)
    assert t.finish_reason == "max_tokens" and t.num_sampled_tokens == 5 and t.reward == 0.0

    context = t.prompt_length + 30
    [t] = collect_sync(tool_env, [TASK], engine, tokenizer, sampling=SamplingConfig(), limits=RolloutLimits(max_total_tokens=context), progress=False)
    assert t.finish_reason == "context" and len(t.token_ids) <= context


def test_the_step_info_is_read_typed_and_a_malformed_one_fails_its_episode_naming_the_field(tokenizer):
    class ExtraInfoEnv(ToolEnv):
        async def astep(self, action):
            messages, reward, terminated, truncated, info = await super().astep(action)
            return messages, reward, terminated, truncated, {**info, "latency_ms": 3}  # an env's own key: kept as metadata

    class MalformedInfoEnv(ToolEnv):
        async def astep(self, action):
            messages, reward, terminated, truncated, info = await super().astep(action)
            return messages, reward, terminated, truncated, {**info, "tool_errors": "many"}

    engine = ScriptedEngine(tokenizer, [CALL, "\\boxed{69104}"])
    [good] = collect_sync(ExtraInfoEnv, [TASK], engine, tokenizer, sampling=SamplingConfig(), progress=False)
    assert (good.finish_reason, good.correct, good.answer, good.metadata) == ("terminated", True, "69104", {"latency_ms": 3})
    assert [(turn.tool_errors, turn.void, [c.name for c in turn.tool_calls]) for turn in good.turns] == [(0, False, ["calculator"]), (0, False, [])]
    [bad] = collect_sync(MalformedInfoEnv, [TASK], engine, tokenizer, sampling=SamplingConfig(), progress=False)
    assert bad.finish_reason == "error" and "tool_errors" in bad.error and "valid integer" in bad.error


def test_a_failed_episode_does_not_fail_the_batch(tokenizer):
    engine = ScriptedEngine(tokenizer, [CALL, "\\boxed{69104}"], fail_on="poison")
    tasks = [TASK, Task(id="poison", prompt="poison pill", answer="1")]
    trajectories = collect_sync(tool_env, tasks, engine, tokenizer, sampling=SamplingConfig(), group_size=2, progress=False)
    assert [t.group_id for t in trajectories] == ["0:bags", "0:bags", "1:poison", "1:poison"]
    assert [t.finish_reason for t in trajectories] == ["terminated", "terminated", "error", "error"]
    assert "EngineTimeout: request timed out" in trajectories[2].error
    stats = rollout_stats(trajectories)
    assert stats.failure_rate == 0.5 and stats.avg_at_k == 1.0 and stats.pass_at_k == 0.5 and stats.tool_calls_per_episode == 1.0


def test_cancelling_collect_closes_every_environment(tokenizer):
    closed = []

    class SlowEngine(ScriptedEngine):
        async def generate(self, prompt_token_ids, sampling):
            await asyncio.sleep(30)

    def env() -> ToolEnv:
        e = ToolEnv()
        e.close = lambda: closed.append(True)
        return e

    async def cancel_soon():
        job = asyncio.create_task(collect(env, [TASK] * 3, SlowEngine(tokenizer, ["x"]), tokenizer, sampling=SamplingConfig(), progress=False))
        await asyncio.sleep(0.5)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]  # no orphan tasks

    asyncio.run(cancel_soon())
    assert len(closed) == 3


# ---------------------------------------------------------------------------------------------
# A real rollout on vLLM, checked against an HF float32 recompute
# ---------------------------------------------------------------------------------------------


def test_vllm_rollout_logprobs_match_a_trainer_recompute(vllm_engine, tiny_model_dir, tokenizer):
    tasks = [TASK, Task(id="two", prompt="What is 17 * 23?", answer="391")]
    sampling = SamplingConfig(temperature=1.0)
    limits = RolloutLimits(max_tokens_per_turn=24, max_total_tokens=1024)
    trajectories = collect_sync(lambda: ToolEnv(max_turns=3), tasks, vllm_engine, tokenizer, sampling=sampling, group_size=2, limits=limits, progress=False)
    assert len(trajectories) == 4 and all(t.finish_reason != "error" for t in trajectories), [t.metadata for t in trajectories]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    worst, compared = 0.0, 0
    for t in trajectories:
        assert t.policy_version == vllm_engine.policy_version
        with torch.no_grad():
            logits = model(torch.tensor([t.token_ids])).logits[0, :-1]  # position i predicts token i+1
        recomputed = logits.log_softmax(-1).gather(1, torch.tensor(t.token_ids[1:])[:, None])[:, 0]
        for i, m in enumerate(t.loss_mask):
            if m:
                worst = max(worst, abs(recomputed[i - 1].item() - t.infer_logprobs[i]))
                compared += 1
    print(json.dumps({"max_abs_logprob_diff_vllm_vs_hf_float32": worst, "tokens_compared": compared}))
    assert compared >= 8
    assert worst < 1e-4  # measured: 1.9e-6 over 96 tokens (float32 on both sides)
    assert not math.isnan(worst)
