"""Token ids from chat messages, without ever re-tokenising what the model generated.

The agent loop tokenises the opening prompt once, then extends the token ids turn by turn:
the model's own sampled ids, then the ids of only the *new* text the chat template would insert
(the end of the assistant turn, the tool results, the next generation prompt). That new text is
found by rendering a fixed two-message conversation with and without the new messages and taking
the difference, so it works for any append-only chat template (ChatML, Llama 3, ...).
"""

from __future__ import annotations

import functools
from typing import Any

from transformers import PreTrainedTokenizerBase

from alp_agents.errors import ModelError
from alp_agents.trajectory import Message

_ANCHOR = [Message(role="user", content="."), Message(role="assistant", content=".")]
"""A conversation ending in a finished assistant turn: the fixed prefix new messages are rendered after."""


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of the opening prompt, ending with the template's generation prompt."""
    text = render(tokenizer, messages, tools=tools, add_generation_prompt=True)
    return list(_encode(tokenizer, text))


def continuation_token_ids(tokenizer: PreTrainedTokenizerBase, new_messages: list[Message]) -> list[int]:
    """Ids that follow the model's end-of-turn token: rest of its turn, `new_messages`, and the next generation prompt."""
    eos = tokenizer.eos_token
    before = render(tokenizer, _ANCHOR)
    after = render(tokenizer, _ANCHOR + new_messages, add_generation_prompt=True)
    if not after.startswith(before) or eos not in before:
        raise ModelError(
            "the chat template is not append-only (rendering more messages changed the earlier text), "
            "so turns cannot be added token by token; use a template that renders each message independently"
        )
    end_of_assistant_turn = before[before.rindex(eos) + len(eos) :]  # e.g. the "\n" after <|im_end|>
    return tokenizer.encode(end_of_assistant_turn + after[len(before) :], add_special_tokens=False)


@functools.lru_cache(maxsize=1024)
def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, ...]:
    """A prompt's token ids, cached: the episodes of a group (and repeated evaluations) open with the
    same prompt, and encoding it costs more than everything else in starting an episode."""
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    *,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The chat template's text for `messages` (the reference the token-in/token-out ids are checked against)."""
    return tokenizer.apply_chat_template(
        [m.to_chat() for m in messages], tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
    )
