"""Demonstrations for supervised warm starts, tokenised exactly the way the agent loop builds episodes.

A demonstration is a conversation (and the tool schemas its system prompt shows). Assistant
messages hold the raw text the model should produce, tool-call markup included. Tokenising one
follows the agent loop: the opening messages through the chat template (mask 0), each assistant
text plus the end-of-turn token (mask 1), and the template text of what follows (mask 0). So SFT
and RL put loss on the same tokens, and tool results never carry loss in either.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import PreTrainedTokenizerBase

from alp_agents.chat import continuation_token_ids, prompt_token_ids
from alp_agents.trajectory import Message, read_jsonl, write_jsonl


class Demonstration(BaseModel):
    """One conversation to imitate."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Message]
    """The conversation; it must contain at least one assistant message, and not as the first message."""
    tools: list[dict[str, Any]] = Field(default_factory=list)
    """JSON schemas of the tools the system prompt shows (as in the environment's reset info)."""

    @model_validator(mode="after")
    def _has_assistant_turns(self) -> Demonstration:
        roles = [m.role for m in self.messages]
        if "assistant" not in roles:
            raise ValueError("a demonstration needs at least one assistant message to learn from")
        if roles[0] == "assistant":
            raise ValueError("a demonstration must open with the prompt (system/user), not an assistant message")
        return self


class TokenizedExample(BaseModel):
    """Token ids and loss mask of one demonstration."""

    token_ids: list[int]
    loss_mask: list[int]


def tokenize_demonstration(tokenizer: PreTrainedTokenizerBase, demo: Demonstration) -> TokenizedExample:
    """Token ids with mask 1 exactly on assistant text and its end-of-turn token."""
    first_reply = next(i for i, m in enumerate(demo.messages) if m.role == "assistant")
    token_ids = prompt_token_ids(tokenizer, demo.messages[:first_reply], demo.tools)
    loss_mask = [0] * len(token_ids)  # the prompt
    pending: list[Message] = []
    for message in demo.messages[first_reply:]:
        if message.role != "assistant":
            pending.append(message)
            continue
        if pending:
            inserted = continuation_token_ids(tokenizer, pending)  # tool results and the next generation prompt
            token_ids += inserted
            loss_mask += [0] * len(inserted)
            pending = []
        reply = tokenizer.encode(message.content, add_special_tokens=False) + [tokenizer.eos_token_id]
        token_ids += reply
        loss_mask += [1] * len(reply)  # what the policy should produce, end of turn included
    return TokenizedExample(token_ids=token_ids, loss_mask=loss_mask)


def write_demonstrations(path: str | Path, demos: Iterable[Demonstration]) -> Path:
    """Write demonstrations as JSON Lines and return the path."""
    return write_jsonl(path, demos)


def read_demonstrations(path: str | Path) -> list[Demonstration]:
    """Read a JSON Lines demonstration file; a malformed line fails naming its line number."""
    return read_jsonl(path, Demonstration, what="demonstration")
