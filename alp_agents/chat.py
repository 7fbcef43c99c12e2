"""Token ids from chat messages, without ever re-tokenising what the model generated.

The agent loop tokenises the opening prompt once, then extends the token ids turn by turn:
the model's own sampled ids, then the ids of only the *new* text the chat template would insert
(the end of the assistant turn, the tool results, the next generation prompt). The history is
token-level: what the engine saw is what the trainer sees, even for templates that render earlier
turns differently once the conversation goes on (Qwen3 drops `<think>...</think>` from assistant
turns before the last user message). The new text is the template's rendering of a fixed
conversation followed by the new messages, cut right after the fixed assistant turn's end-of-turn
token, so the template is never asked to render that turn twice and never has to be append-only.

`load_tokenizer` gives a run its tokenizer, with `model.chat_template` (a file or the template
itself) in place of the model's own.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from alp_agents.errors import ModelError
from alp_agents.trajectory import Message

_ANCHOR_TEXT = "ALP-ANCHOR-TURN"
"""Content of the fixed assistant turn: a word no template rewrites and no new message is likely to contain."""
_ANCHOR = [Message(role="user", content="."), Message(role="assistant", content=_ANCHOR_TEXT)]
"""A conversation ending in a finished assistant turn: the fixed prefix new messages are rendered after."""


def load_tokenizer(model_dir: str | Path, chat_template: str = "", *, option: str = "model.chat_template") -> PreTrainedTokenizerBase:
    """The tokenizer of `model_dir`, with `chat_template` (a file's path, or the Jinja text itself) replacing its own.

    The override is checked here, by rendering a tool exchange, so that a broken template stops the
    run at its start (ModelError naming `option`) rather than failing every episode. A tokenizer
    saved from the result (`save_pretrained`, as checkpoints do) carries the override.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if chat_template:
        tokenizer.chat_template = _template_text(chat_template, option)
        try:
            continuation_token_ids(tokenizer, [Message(role="tool", content="1")])
        except Exception as e:  # jinja errors, template exceptions, ModelError: all mean this template cannot serve a run
            raise ModelError(f"{option}: the chat template cannot render a tool exchange ({type(e).__name__}: {e})") from e
    return tokenizer


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of the opening prompt, ending with the template's generation prompt."""
    return list(_prompt_ids(tokenizer, json.dumps([m.to_chat() for m in messages]), json.dumps(tools or [])))


def continuation_token_ids(tokenizer: PreTrainedTokenizerBase, new_messages: list[Message]) -> list[int]:
    """Ids that follow the model's end-of-turn token: rest of its turn, `new_messages`, and the next generation prompt.

    Rendered after the fixed anchor conversation and cut after the anchor assistant's end-of-turn
    token: what the template writes there does not depend on how it renders earlier turns.
    """
    eos = tokenizer.eos_token
    text = render(tokenizer, _ANCHOR + new_messages, add_generation_prompt=True)
    anchor_at = text.find(_ANCHOR_TEXT)
    end_of_turn = text.find(eos, anchor_at) if anchor_at != -1 and eos else -1
    if end_of_turn == -1:
        raise ModelError(
            f"the chat template does not end an assistant turn with the tokenizer's end-of-sequence token {eos!r} "
            f"(rendered: {text[-200:]!r}), so the model's turns cannot be followed token by token; set the "
            "tokenizer's eos_token to the template's end-of-turn token"
        )
    return tokenizer.encode(text[end_of_turn + len(eos) :], add_special_tokens=False)  # e.g. "\n<|im_start|>tool\n..."


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    *,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The chat template's text for `messages` (the reference the token-in/token-out ids are checked against)."""
    return _render_chat(tokenizer, [m.to_chat() for m in messages], tools, add_generation_prompt)


def _template_text(chat_template: str, option: str) -> str:
    """The template itself: the file's text when `chat_template` names a file, else `chat_template` when it is Jinja."""
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    path = Path(chat_template)
    if not path.is_file():
        raise ModelError(f"{option} {chat_template!r} is neither a file nor a Jinja template (no '{{{{' or '{{%'): "
                         "give the path of a .jinja file or the template's text")
    return path.read_text(encoding="utf-8")


# The agent loop starts every episode of a group from the same prompt; rendering (jinja) and
# encoding cost more than everything else in starting an episode.


@functools.lru_cache(maxsize=1024)
def _prompt_ids(tokenizer: PreTrainedTokenizerBase, chat_json: str, tools_json: str) -> tuple[int, ...]:
    """Ids of a prompt given as JSON (a hashable cache key): its messages' chat dicts and its tool schemas."""
    text = _render_chat(tokenizer, json.loads(chat_json), json.loads(tools_json), add_generation_prompt=True)
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def _render_chat(tokenizer: PreTrainedTokenizerBase, chat: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                 add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(chat, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt)
