"""Find the tool calls in an assistant turn's text; never raises on whatever the model wrote.

Two styles, chosen by the environment:

- `hermes` (Qwen2.5 / Hermes chat templates): each call is a JSON object between tags,

      <tool_call>
      {"name": "calculator", "arguments": {"expression": "12 * 34"}}
      </tool_call>

  several per turn allowed. `arguments` given as a JSON string (as some models and the OpenAI API
  write it) is decoded. `parameters` is accepted as another name for `arguments`.
- `python`: each ```python fenced block is a call of the `python` tool with its code.

A call that cannot be read becomes a `ToolCallError` in its place, whose message says what was
wrong, so that the environment can tell the model and the episode goes on.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel

from alp_agents.trajectory import ToolCall

ParseStyle = Literal["hermes", "python"]

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


def parse_tool_calls(text: str, style: ParseStyle = "hermes") -> list[ToolCall | ToolCallError]:
    """The tool calls in `text`, in order; unreadable ones as ToolCallError entries."""
    if style == "hermes":
        return _parse_hermes(text)
    if style == "python":
        return _parse_python(text)
    raise ValueError(f"unknown tool-call style {style!r}: use 'hermes' or 'python'")


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
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return ToolCallError(raw=raw, message=f'"arguments" is a string but not valid JSON (at char {e.pos}: {e.msg})')
    if not isinstance(arguments, dict):
        return ToolCallError(raw=raw, message=f'"arguments" must be a JSON object, got {_json_type(arguments)}')
    call_id = call.get("id")
    return ToolCall(name=name, arguments=arguments, id=call_id if isinstance(call_id, str) else None)


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


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
