"""Token ids from chat messages, without ever re-tokenising what the model generated.

The agent loop tokenises the opening prompt once, then extends the token ids turn by turn:
the model's own sampled ids, then the ids of only the *new* text the chat template would insert
(the end of the assistant turn, the tool results, the next generation prompt). That new text is
found by rendering a fixed two-message conversation with and without the new messages and taking
the difference, so it works for any append-only chat template (ChatML, Llama 3, ...).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from transformers import PreTrainedTokenizerBase

from alp_agents.errors import ModelError
from alp_agents.trajectory import Message

_ANCHOR = [Message(role="user", content="."), Message(role="assistant", content=".")]
"""A conversation ending in a finished assistant turn: the fixed prefix new messages are rendered after."""


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of the opening prompt, ending with the template's generation prompt."""
    return list(_prompt_ids(tokenizer, json.dumps([m.to_chat() for m in messages]), json.dumps(tools or [])))


def continuation_token_ids(tokenizer: PreTrainedTokenizerBase, new_messages: list[Message]) -> list[int]:
    """Ids that follow the model's end-of-turn token: rest of its turn, `new_messages`, and the next generation prompt."""
    eos = tokenizer.eos_token
    before = _anchor_text(tokenizer)
    after = render(tokenizer, _ANCHOR + new_messages, add_generation_prompt=True)
    if not after.startswith(before) or eos not in before:
        raise ModelError(
            "the chat template is not append-only (rendering more messages changed the earlier text), "
            "so turns cannot be added token by token; use a template that renders each message independently"
        )
    end_of_assistant_turn = before[before.rindex(eos) + len(eos) :]  # e.g. the "\n" after <|im_end|>
    return tokenizer.encode(end_of_assistant_turn + after[len(before) :], add_special_tokens=False)


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    *,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The chat template's text for `messages` (the reference the token-in/token-out ids are checked against)."""
    return _render_chat(tokenizer, [m.to_chat() for m in messages], tools, add_generation_prompt)


# The agent loop starts every episode of a group from the same prompt and renders the same anchor on
# every turn; rendering (jinja) and encoding cost more than everything else in starting an episode.


@functools.lru_cache(maxsize=1024)
def _prompt_ids(tokenizer: PreTrainedTokenizerBase, chat_json: str, tools_json: str) -> tuple[int, ...]:
    """Ids of a prompt given as JSON (a hashable cache key): its messages' chat dicts and its tool schemas."""
    text = _render_chat(tokenizer, json.loads(chat_json), json.loads(tools_json), add_generation_prompt=True)
    return tuple(tokenizer.encode(text, add_special_tokens=False))


@functools.lru_cache(maxsize=16)
def _anchor_text(tokenizer: PreTrainedTokenizerBase) -> str:
    return render(tokenizer, _ANCHOR)


def _render_chat(tokenizer: PreTrainedTokenizerBase, chat: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                 add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(chat, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt)
