"""Find the tool calls in an assistant turn's text; never raises on whatever the model wrote.

The format is chosen by the environment, by name:

- `hermes` (Qwen2.5 / Qwen3 / Hermes chat templates): each call is a JSON object between tags,

      <tool_call>
      {"name": "calculator", "arguments": {"expression": "12 * 34"}}
      </tool_call>

  several per turn allowed. `arguments` given as a JSON string (as some models and the OpenAI API
  write it) is decoded. `parameters` is accepted as another name for `arguments`.
- `python`: each ```python fenced block is a call of the `python` tool with its code.
- the formats of other model families (VLLM_FORMATS: `llama3_json`, `mistral`, `pythonic`,
  `qwen3_coder`), read by vLLM's own tool parser of that name, so that a call is read exactly as a
  vLLM server reads that model's calls.

A call that cannot be read becomes a `ToolCallError` in its place, whose message says what was
wrong, so that the environment can tell the model and the episode goes on. Our own two parsers say
precisely what is wrong; for a vLLM format the message shows the expected form.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel

from alp_agents.trajectory import ToolCall

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

ToolCallStyle = Literal["hermes", "python", "llama3_json", "mistral", "pythonic", "qwen3_coder"]
"""A tool-call format's name: our own `hermes` and `python` parsers, or one of VLLM_FORMATS."""

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
_JSON_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
_PYTHON_OPEN = re.compile(r"```(?:python3?|py)[ \t]*\n")
_FENCE_CLOSE = re.compile(r"^[ \t]*```", re.MULTILINE)


class ToolCallError(BaseModel):
    """A tool call the model tried to write but that cannot be read."""

    raw: str
    """The text of the attempted call, as written."""
    message: str
    """What was wrong, for the model, e.g. 'invalid JSON at char 17: Expecting ...'."""


Parser = Callable[[str], list[ToolCall | ToolCallError]]
"""Reads one assistant turn's text: its tool calls in order, unreadable ones as ToolCallError entries."""


@dataclass(frozen=True)
class VLLMFormat:
    """A tool-call format read by one of vLLM's tool parsers."""

    markers: tuple[str, ...]
    """Tokens the vLLM parser looks up in the tokenizer's vocabulary (it refuses to start without them)."""
    attempt: re.Pattern[str]
    """Text that shows the model tried to call a tool: found in a turn the parser reads no call from, it is a malformed call."""
    example: str
    """A well-formed call, shown to the model when its call cannot be read."""


VLLM_FORMATS: dict[str, VLLMFormat] = {
    "llama3_json": VLLMFormat(("<|python_tag|>",), re.compile(r"<\|python_tag\|>|\{\s*\"name\"\s*:"),
                              '{"name": "calculator", "parameters": {"expression": "12 * 34"}}'),
    "mistral": VLLMFormat(("[TOOL_CALLS]", "[ARGS]"), re.compile(r"\[TOOL_CALLS\]"),
                          '[TOOL_CALLS]calculator[ARGS]{"expression": "12 * 34"}'),
    "pythonic": VLLMFormat((), re.compile(r"^\s*\[\s*[A-Za-z_]\w*\s*\("), '[calculator(expression="12 * 34")]'),
    "qwen3_coder": VLLMFormat(("<tool_call>", "</tool_call>"), re.compile(r"<tool_call>|<function="),
                              "<tool_call>\n<function=calculator>\n<parameter=expression>\n12 * 34\n</parameter>\n</function>\n</tool_call>"),
}
"""The vLLM formats on offer, by vLLM's `--tool-call-parser` name (mistral: the v11+ `[ARGS]` form of
current Mistral models)."""
TOOL_CALL_STYLES: tuple[ToolCallStyle, ...] = get_args(ToolCallStyle)
"""Every tool-call format name `tool_call_parser` accepts."""
assert set(TOOL_CALL_STYLES) == {"hermes", "python", *VLLM_FORMATS}, "ToolCallStyle must name exactly our parsers and VLLM_FORMATS"


def tool_call_parser(style: ToolCallStyle, tools: list[dict[str, Any]] | None = None) -> Parser:
    """The parser of tool-call format `style`; ValueError listing TOOL_CALL_STYLES for an unknown name.

    `tools`: the tools' JSON schemas; a vLLM parser uses them (qwen3_coder converts each argument to
    its schema's type). Build a parser once per environment: a vLLM one costs a tokenizer and an import.
    """
    if style == "hermes":
        return _parse_hermes
    if style == "python":
        return _parse_python
    if style not in VLLM_FORMATS:
        raise ValueError(f"unknown tool-call style {style!r}: choose one of {', '.join(TOOL_CALL_STYLES)}")
    return _VLLMParser(style, VLLM_FORMATS[style], tools or [])


def parse_tool_calls(text: str, style: ToolCallStyle = "hermes") -> list[ToolCall | ToolCallError]:
    """The tool calls in `text`, in order; unreadable ones as ToolCallError entries (one-off use of `tool_call_parser`)."""
    return tool_call_parser(style)(text)


def _parse_hermes(text: str) -> list[ToolCall | ToolCallError]:
    calls: list[ToolCall | ToolCallError] = []
    start = text.find(OPEN_TAG)
    while start != -1:
        body_start = start + len(OPEN_TAG)
        close = text.find(CLOSE_TAG, body_start)
        next_open = text.find(OPEN_TAG, body_start)
        if close == -1 or (next_open != -1 and next_open < close):
            end = len(text) if next_open == -1 else next_open
            calls.append(ToolCallError(raw=text[start:end], message=f"{OPEN_TAG} is not closed by {CLOSE_TAG}"))
            start = next_open
            continue
        calls.append(_read_hermes_call(text[body_start:close], raw=text[start : close + len(CLOSE_TAG)]))
        start = text.find(OPEN_TAG, close)
    return calls


def _read_hermes_call(body: str, raw: str) -> ToolCall | ToolCallError:
    body = body.strip()
    if fenced := _JSON_FENCE.match(body):  # tolerate ```json ... ``` inside the tags
        body = fenced.group(1)
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCallError(raw=raw, message=f"invalid JSON at char {e.pos}: {e.msg}")
    if not isinstance(call, dict):
        return ToolCallError(raw=raw, message=f'expected a JSON object with "name" and "arguments", got {_json_type(call)}')
    name = call.get("name")
    if not isinstance(name, str) or not name:
        return ToolCallError(raw=raw, message='the call has no "name" string (expected {"name": ..., "arguments": {...}})')
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):  # arguments encoded as a JSON string
        arguments = _decode_arguments(arguments, raw, '"arguments" (a JSON string)')
    elif not isinstance(arguments, dict):
        arguments = ToolCallError(raw=raw, message=f'"arguments" must be a JSON object, got {_json_type(arguments)}')
    if isinstance(arguments, ToolCallError):
        return arguments
    call_id = call.get("id")
    return ToolCall(name=name, arguments=arguments, id=call_id if isinstance(call_id, str) else None)


def _decode_arguments(text: str, raw: str, subject: str) -> dict[str, Any] | ToolCallError:
    """Arguments written as JSON text ("" for none) as a dict, or a ToolCallError whose message starts with `subject`."""
    try:
        decoded = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        return ToolCallError(raw=raw, message=f"{subject}: not valid JSON (at char {e.pos}: {e.msg})")
    if not isinstance(decoded, dict):
        return ToolCallError(raw=raw, message=f"{subject}: {_json_type(decoded)}, not a JSON object")
    return decoded


def _parse_python(text: str) -> list[ToolCall | ToolCallError]:
    calls: list[ToolCall | ToolCallError] = []
    position = 0
    while opening := _PYTHON_OPEN.search(text, position):
        closing = _FENCE_CLOSE.search(text, opening.end())
        if closing is None:
            calls.append(ToolCallError(raw=text[opening.start() :], message="the ```python block is not closed by ```"))
            break
        calls.append(ToolCall(name="python", arguments={"code": text[opening.end() : closing.start()]}))
        position = closing.end()
    return calls


class _VLLMParser:
    """One of vLLM's tool parsers, its answers turned into ToolCall / ToolCallError entries."""

    def __init__(self, name: str, spec: VLLMFormat, tools: list[dict[str, Any]]) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest  # vLLM costs seconds to import
        from vllm.tool_parsers import ToolParserManager

        self.name, self.spec = name, spec
        parser_class = ToolParserManager.get_tool_parser(name)
        self._parser = parser_class(_marker_tokenizer(spec.markers), None)
        self._request = ChatCompletionRequest(model=name, messages=[], tools=tools or None)
        _quiet(logging.getLogger(parser_class.__module__))

    def __call__(self, text: str) -> list[ToolCall | ToolCallError]:
        try:
            with _parsing():
                found = self._parser.extract_tool_calls(text, self._request)
        except Exception:  # noqa: BLE001 - a parser that breaks on odd text read no call; the episode goes on
            found = None
        if found is not None and found.tools_called:
            return [self._read(call.function.name, call.function.arguments) for call in found.tool_calls]
        attempt = self.spec.attempt.search(text)
        if attempt is None and found is not None:
            return []
        raw = text[attempt.start() :] if attempt else text
        return [ToolCallError(raw=raw, message=f"this {self.name} tool call cannot be read; write a call as {self.spec.example}")]

    def _read(self, name: str, arguments: str) -> ToolCall | ToolCallError:
        decoded = _decode_arguments(arguments, f"{name} {arguments}", f"the arguments of {name!r}")
        if isinstance(decoded, ToolCallError):
            return decoded
        return ToolCall(name=name, arguments=decoded)  # vLLM's random call ids are dropped: the model never wrote them


def _marker_tokenizer(markers: tuple[str, ...]) -> PreTrainedTokenizerFast:
    """The smallest tokenizer a vLLM parser accepts: a vocabulary of the format's markers.

    The parsers read the text; the tokenizer only tells them the markers' token ids (for streaming,
    which we do not use), so the model's own tokenizer is not needed and the env need not know it.
    """
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocabulary = {"<unk>": 0, **{marker: i + 1 for i, marker in enumerate(markers)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>")), unk_token="<unk>")


# vLLM's parsers log a stack trace for every call they cannot read. For an RL run that is data
# (the model reads an error message), not an incident: their loggers stay quiet while we parse,
# in the parsing thread only.
_PARSING = threading.local()


@contextmanager
def _parsing() -> Iterator[None]:
    _PARSING.active = True
    try:
        yield
    finally:
        _PARSING.active = False


@functools.cache
def _quiet(logger: logging.Logger) -> None:
    logger.addFilter(lambda record: not getattr(_PARSING, "active", False))


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
