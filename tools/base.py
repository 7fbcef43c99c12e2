"""The tool protocol: a named, described callable whose arguments are a pydantic model.

A tool is what the model may call. The JSON schema of its argument model is what the model sees
(rendered by the chat template from `Tool.schema()`), and what it returns is text. Write one by
decorating a type-hinted, docstringed function with `@tool`, or by subclassing `Tool`:

    @tool
    def add(a: int, b: int) -> int:
        '''Add two integers.

        Args:
            a: The first addend.
            b: The second addend.
        '''
        return a + b

`ToolRegistry` holds tools by name and executes the calls the model wrote. Whatever the model got
wrong (an unknown tool, missing or ill-typed arguments), whatever the tool raised, and a call that
outlives the tool's `timeout_s` come back as a failed `ToolResult` whose text says what was wrong:
a bad call is data, not a crash.

Synchronous tools run in TOOL_THREADS, a bounded pool of their own, never in the event loop's
default executor, which grading and the trainer step use: a Python thread cannot be killed, so a
tool that hangs is abandoned when its call times out and keeps its thread, and bounding the pool
keeps hung tools from taking every thread the rest of the program needs.
"""

from __future__ import annotations

import abc
import asyncio
import copy
import difflib
import functools
import inspect
import json
import re
import typing
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from alp_agents.errors import ToolError
from alp_agents.threads import WorkerThreads
from alp_agents.trajectory import ToolCall

A = TypeVar("A", bound=BaseModel)
T = TypeVar("T")

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""What a tool name may look like (the OpenAI function-calling rule)."""


TOOL_THREADS = WorkerThreads(64, "alp-tool")
"""The threads synchronous tools run in: enough for every call of a full rollout batch at once."""


class ToolFailure(Exception):
    """Raised by a tool's `run` to fail the call while still showing the model `content`.

    For a tool whose output is useful even when it failed (a program's stdout before it timed
    out): the registry reports the call as failed (it counts as a tool error) with this text.
    """

    def __init__(self, content: str, reason: str) -> None:
        super().__init__(reason)
        self.content = content
        self.reason = reason


class ToolResult(BaseModel):
    """The outcome of one tool call, ready to become a `tool` message."""

    name: str
    """The tool that was called (as the model named it)."""
    content: str
    """Text to show the model: the tool's output, or the error message."""
    ok: bool
    """False when the call could not be made or the tool failed."""
    error: str | None = None
    """What went wrong, when ok is False."""

    @classmethod
    def failure(cls, name: str, error: str) -> ToolResult:
        """A failed call: the model sees `Error: <error>`."""
        return cls(name=name, content=f"Error: {error}", ok=False, error=error)


class ToolArgs(BaseModel):
    """Base for argument models (`@tool` uses it): an unknown argument is an error the model sees."""

    model_config = ConfigDict(extra="forbid")


class Tool(abc.ABC, Generic[A]):
    """Base class of every tool: set `name`, `description`, `args_model`, and implement `run`.

    Derive the argument model from ToolArgs, so that an argument the model invents is refused.

    Override `arun` too when the tool has a native async form; by default it runs `run` in one
    of TOOL_THREADS, so a slow tool never blocks the event loop.
    """

    name: str
    """How the model calls the tool (letters, digits, `_` and `-`)."""
    description: str
    """What the tool does and when to use it, for the model."""
    args_model: type[A]
    """The arguments; its JSON schema is what the model sees."""
    timeout_s: float = 30.0
    """Longest one call may take in `ToolRegistry.aexecute`, waiting for a free thread included; past
    it the call fails with a message the model sees. A synchronous `run` cannot be stopped: its
    thread is abandoned to finish (or hang) on its own."""

    @abc.abstractmethod
    def run(self, args: A) -> str:
        """Do the work for validated arguments and return text for the model."""

    async def arun(self, args: A) -> str:
        """`run` without blocking the event loop."""
        return await TOOL_THREADS.run(self.run, args)

    def __call__(self, **kwargs: Any) -> str:
        """Validate keyword arguments (pydantic ValidationError if invalid) and run the tool."""
        return self.run(self.args_model.model_validate(kwargs))

    async def acall(self, **kwargs: Any) -> str:
        """Async twin of `__call__`."""
        return await self.arun(self.args_model.model_validate(kwargs))

    def schema(self) -> dict[str, Any]:
        """The OpenAI function schema, as chat templates render it in the system prompt."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": copy.deepcopy(_parameters_schema(self.args_model)),
            },
        }

    def close(self) -> None:
        """Release what the tool holds (processes, connections); the default holds nothing."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class FunctionTool(Tool[ToolArgs]):
    """A tool made from a function by `@tool`; the function itself stays available as `.function`."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.is_async = inspect.iscoroutinefunction(function)
        self.name = function.__name__
        self.description, arg_docs = _parse_docstring(function)
        self.args_model = _args_model(function, arg_docs)
        self.__wrapped__ = function
        self.__doc__ = function.__doc__

    def run(self, args: ToolArgs) -> str:
        if self.is_async:
            return asyncio.run(self.arun(args))  # from sync code only; inside a loop, use acall
        return _as_text(self.function(**_fields(args)))

    async def arun(self, args: ToolArgs) -> str:
        if self.is_async:
            result = await typing.cast(Awaitable[Any], self.function(**_fields(args)))
            return _as_text(result)
        return await super().arun(args)


def tool(function: Callable[..., Any]) -> FunctionTool:
    """Turn a type-hinted function with a docstring into a Tool (sync or async functions).

    The tool's name is the function's name; its description is the docstring's first paragraph;
    each argument's type and default come from the signature and its description from the
    docstring's Google-style `Args:` section. A return value that is not a str is shown to the
    model as JSON. Raises ToolError when the function lacks a docstring or a type hint.
    """
    return FunctionTool(function)


class ToolRegistry:
    """Tools by name; executes the model's tool calls without ever raising on its mistakes."""

    def __init__(self, tools: Iterable[Tool[Any]] = ()) -> None:
        self._tools: dict[str, Tool[Any]] = {}
        for t in tools:
            self.register(t)

    def register(self, tool: Tool[Any]) -> Tool[Any]:
        """Add a tool (and return it); its name must be valid and not taken."""
        if not isinstance(tool, Tool):
            hint = " (decorate the function with @tool first)" if callable(tool) else ""
            raise ToolError(f"expected a Tool, got {type(tool).__name__}{hint}")
        if not TOOL_NAME.match(tool.name):
            raise ToolError(f"tool name {tool.name!r} is invalid: use 1 to 64 letters, digits, '_' or '-'")
        if tool.name in self._tools:
            raise ToolError(f"a tool named {tool.name!r} is already registered: give one of them another name")
        self._tools[tool.name] = tool
        return tool

    def get(self, name: str) -> Tool[Any]:
        """The tool called `name`; ToolError naming the available tools (and the closest) if none."""
        try:
            return self._tools[name]
        except KeyError:
            raise ToolError(self._unknown(name)) from None

    @property
    def names(self) -> list[str]:
        """Names of the registered tools, in registration order."""
        return list(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        """The function schemas of all tools, for the chat template's `tools=`."""
        return [t.schema() for t in self._tools.values()]

    def execute(self, call: ToolCall) -> ToolResult:
        """Run one call; every failure comes back as a ToolResult with ok=False."""
        prepared = self._prepare(call)
        if isinstance(prepared, ToolResult):
            return prepared
        tool, args = prepared
        try:
            return ToolResult(name=call.name, content=tool.run(args), ok=True)
        except Exception as e:
            return _failed(call.name, e)

    async def aexecute(self, call: ToolCall) -> ToolResult:
        """Async twin of `execute`: the tool runs without blocking the event loop, for at most its `timeout_s`."""
        prepared = self._prepare(call)
        if isinstance(prepared, ToolResult):
            return prepared
        tool, args = prepared
        deadline = asyncio.timeout(tool.timeout_s)
        try:
            async with deadline:
                return ToolResult(name=call.name, content=await tool.arun(args), ok=True)
        except Exception as e:
            if deadline.expired():
                return ToolResult.failure(call.name, f"the tool did not finish within its {tool.timeout_s:g} s time limit")
            return _failed(call.name, e)

    def close(self) -> None:
        """Close every tool."""
        for t in self._tools.values():
            t.close()

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def __iter__(self) -> Iterator[Tool[Any]]:
        return iter(self._tools.values())

    def __repr__(self) -> str:
        return f"ToolRegistry({self.names})"

    def _prepare(self, call: ToolCall) -> tuple[Tool[Any], BaseModel] | ToolResult:
        """The tool and its validated arguments, or the failed result to show the model."""
        tool = self._tools.get(call.name)
        if tool is None:
            return ToolResult.failure(call.name, self._unknown(call.name))
        try:
            return tool, tool.args_model.model_validate(call.arguments)
        except ValidationError as e:
            return ToolResult.failure(call.name, _describe_invalid_arguments(tool, e))

    def _unknown(self, name: str) -> str:
        message = f"unknown tool {name!r}; available tools: {', '.join(self._tools) or 'none'}"
        close = difflib.get_close_matches(name, self._tools, n=1, cutoff=0.5)
        return f"{message}. Did you mean {close[0]!r}?" if close else message


# ---------------------------------------------------------------------- helpers


_SECTION = re.compile(r"^(?P<name>Args|Arguments|Parameters|Returns|Yields|Raises|Examples?|Notes?|Attributes):\s*$")
_ARG_LINE = re.compile(r"^(?P<name>\w+)\s*(?:\([^)]*\))?\s*:\s*(?P<doc>.*)$")


def _parse_docstring(function: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """(description, {argument: its description}) from a docstring with a Google-style `Args:` section."""
    doc = inspect.getdoc(function)
    if not doc:
        raise ToolError(
            f"tool function {function.__name__!r} has no docstring: its first paragraph is the description the model sees"
        )
    if _SECTION.match(doc.splitlines()[0]):
        raise ToolError(f"the docstring of tool function {function.__name__!r} must start with a description")
    description = " ".join(doc.split("\n\n", 1)[0].split())
    arg_docs: dict[str, str] = {}
    in_args, arg_indent, current = False, None, None
    for line in doc.splitlines():
        if header := _SECTION.match(line):
            in_args, arg_indent, current = header["name"] in ("Args", "Arguments", "Parameters"), None, None
            continue
        indent = len(line) - len(line.lstrip())
        if not in_args or not line.strip():
            continue
        if indent == 0:  # unindented text ends the section
            in_args = False
            continue
        arg_indent = indent if arg_indent is None else arg_indent
        item = _ARG_LINE.match(line.strip())
        if indent == arg_indent and item:
            current = item["name"]
            arg_docs[current] = item["doc"]
        elif current is not None:  # a continuation line of the current argument
            arg_docs[current] = f"{arg_docs[current]} {line.strip()}".strip()
    return description, arg_docs


def _args_model(function: Callable[..., Any], arg_docs: dict[str, str]) -> type[ToolArgs]:
    """A pydantic model of the function's parameters: types and defaults from the signature."""
    name = function.__name__
    try:
        hints = typing.get_type_hints(function)
    except NameError as e:
        raise ToolError(f"tool function {name!r}: a type hint cannot be resolved ({e})") from e
    fields: dict[str, Any] = {}
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise ToolError(
                f"tool function {name!r}: *{parameter.name} cannot be described to the model; list each argument"
            )
        if parameter.name not in hints:
            raise ToolError(f"tool function {name!r}: argument {parameter.name!r} needs a type hint")
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[parameter.name] = (hints[parameter.name], Field(default, description=arg_docs.get(parameter.name)))
    unknown = sorted(set(arg_docs) - set(fields))
    if unknown:
        raise ToolError(f"tool function {name!r}: the docstring describes {unknown}, which are not arguments")
    model_name = "".join(part.title() for part in name.split("_")) + "Args"
    return create_model(model_name, __base__=ToolArgs, **fields)


def _fields(args: BaseModel) -> dict[str, Any]:
    """The validated arguments as keyword arguments (nested models stay models)."""
    return {field: getattr(args, field) for field in type(args).model_fields}


def _as_text(value: Any) -> str:
    """What a function tool returned, as text for the model: str as is, anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    return json.dumps(value, default=str, ensure_ascii=False)


@functools.cache
def _parameters_schema(args_model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of an arguments model, built once: pydantic rebuilds it on every call (~1 ms),
    and every episode's reset asks for every tool's schema. Callers get a copy."""
    return _without_titles(args_model.model_json_schema())


def _without_titles(schema: Any) -> Any:
    """A pydantic JSON schema without its auto-generated `title`s (noise in the prompt)."""
    if isinstance(schema, list):
        return [_without_titles(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    cleaned = {}
    for key, value in schema.items():
        if key == "title":
            continue
        if key in ("properties", "$defs"):  # keys here are names, not schema keywords
            cleaned[key] = {name: _without_titles(sub) for name, sub in value.items()}
        else:
            cleaned[key] = _without_titles(value)
    return cleaned


def _describe_invalid_arguments(tool: Tool[Any], error: ValidationError) -> str:
    """Name each bad argument, what was wrong with it, and what the tool expects."""
    problems = []
    for e in error.errors():
        where = ".".join(str(part) for part in e["loc"])
        if e["type"] == "missing":
            problems.append(f"missing required argument {where!r}")
        elif e["type"] == "extra_forbidden":
            problems.append(f"unexpected argument {where!r}")
        elif not where:
            problems.append(f"arguments must be a JSON object, got {_short(e['input'])}")
        else:
            problems.append(f"argument {where!r}: {e['msg'][0].lower()}{e['msg'][1:]} (got {_short(e['input'])})")
    fields = tool.args_model.model_fields
    expected = ", ".join(
        f"{field}: {_type_name(info.annotation)}{'' if info.is_required() else ' (optional)'}"
        for field, info in fields.items()
    )
    return f"invalid arguments for tool {tool.name!r}: {'; '.join(problems)}. Expected arguments: {expected or 'none'}"


def _failed(name: str, error: Exception) -> ToolResult:
    if isinstance(error, ToolFailure):
        return ToolResult(name=name, content=error.content, ok=False, error=error.reason)
    return ToolResult.failure(name, _describe_exception(error))


def _describe_exception(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
