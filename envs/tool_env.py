"""ToolEnv: multi-turn tool-integrated reasoning on math problems.

Each assistant turn may call tools; every call gets one `tool` message back, and the episode goes on.

    turn with tool calls             -> run them (concurrently), reply with one tool message per call
    no call, a marked final answer   -> terminated; reward 1.0 if the answer equals the gold answer, else 0.0
    no call and no answer            -> terminated; reward -format_penalty (0 by default); a void turn
    `max_turns` turns without ending -> truncated (by TextEnv); reward 0

A call that cannot be parsed, names an unknown tool, has invalid arguments, or fails in the tool
comes back as a tool message saying exactly what was wrong; it never raises. Such calls count in
`info["tool_errors"]`, and a turn none of whose calls succeeded is a void turn. (A Python program
that raises, exits non-zero or hits a sandbox limit is a failed call too; the model still reads its output.) Tool output longer than
`max_tool_output_chars` is cut there and marked `...[truncated]`.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import math
from collections.abc import Sequence
from typing import Any

from alp_agents.envs.base import GRADING_THREADS, TextEnv, ToolCallStyle, TurnResult
from alp_agents.envs.grading import extract_answer
from alp_agents.envs.matching import AnswerMatch, Matcher, answer_matcher
from alp_agents.envs.tasks import Task
from alp_agents.errors import EnvError, ToolError
from alp_agents.importing import import_target
from alp_agents.tools import BUILTIN_TOOLS, Tool, ToolCallError, ToolRegistry
from alp_agents.tools.parsing import TOOL_CALL_STYLES, VLLM_FORMATS, tool_call_parser
from alp_agents.trajectory import Message, ToolCall

SYSTEM_PROMPTS: dict[ToolCallStyle, str] = {
    "hermes": (
        "Solve the problem step by step. Call the tools whenever they help; each result comes back in a "
        "tool message. When you are done, put your final answer within \\boxed{}."
    ),
    "python": (
        "Solve the problem step by step. To compute, write a Python program in a ```python code block: it runs, "
        "and what it prints comes back in a tool message. When you are done, put your final answer within \\boxed{}."
    ),
}
"""The default system prompt for each tool-call style (the vLLM formats, whose chat templates explain them, take hermes')."""
TRUNCATION_MARKER = "...[truncated]"
CHARS_PER_TOKEN = 4
"""Rough characters per token of English and numbers, to turn a token budget into characters."""


class ToolEnv(TextEnv):
    """Math problems solved with tools (default: the calculator) over several turns."""

    def __init__(
        self,
        *,
        tasks: Sequence[Task] | None = None,
        tools: ToolRegistry | str | Sequence[str] | None = None,
        tool_call_style: ToolCallStyle = "hermes",
        max_turns: int = 4,
        max_tool_output_chars: int = 256 * CHARS_PER_TOKEN,
        format_penalty: float = 0.0,
        system_prompt: str | None = None,
        grade_timeout_s: float = 2.0,
        answer_match: AnswerMatch | str | Matcher = "math",
    ) -> None:
        """`tools`: the registry the model may call (default: a calculator; the caller keeps
        ownership of a registry it passes, so one registry can serve many envs), or tool names as a
        config writes them (see `tool_registry`), from which the env makes a registry of its own and
        closes it in `close()`; `tool_call_style`:
        "hermes" for `<tool_call>{json}</tool_call>`, "python" for ```python fences run by the
        "python" tool, or a vLLM format read by vLLM's parser of that name (VLLM_FORMATS: "llama3_json",
        "mistral", "pythonic", "qwen3_coder"; the model's chat template shows it the tools);
        `max_tool_output_chars`: the budget of one tool message (256 tokens' worth);
        `format_penalty`: subtracted when the model stops with neither a call nor an answer;
        `system_prompt`: None for the style's SYSTEM_PROMPTS entry, "" for no system message."""
        if tool_call_style not in TOOL_CALL_STYLES:
            raise EnvError(f"tool_call_style must be 'hermes' or 'python' (our own parsers) or a vLLM format "
                           f"({', '.join(VLLM_FORMATS)}), got {tool_call_style!r}")
        default_prompt = SYSTEM_PROMPTS.get(tool_call_style, SYSTEM_PROMPTS["hermes"])
        super().__init__(tasks=tasks, max_turns=max_turns, system_prompt=default_prompt if system_prompt is None else system_prompt)
        self._owns_tools = not isinstance(tools, ToolRegistry)
        self.tools = tools if isinstance(tools, ToolRegistry) else tool_registry(["calculator"] if tools is None else tools)
        if len(self.tools) == 0:
            raise EnvError("ToolEnv got an empty tool registry: register at least one tool, or use MathEnv for problems without tools")
        if tool_call_style == "python" and "python" not in self.tools:
            raise EnvError(
                f"tool_call_style='python' sends ```python blocks to a tool named 'python', but the registry has only "
                f"{self.tools.names}: register PythonTool() (alp_agents.tools; in a config, tools = [\"python\"]) "
                "or use tool_call_style='hermes'"
            )
        if max_tool_output_chars < 1:
            raise EnvError(f"max_tool_output_chars must be at least 1, got {max_tool_output_chars}")
        if not (math.isfinite(format_penalty) and format_penalty >= 0):
            raise EnvError(f"format_penalty must be a finite number >= 0 (it is subtracted), got {format_penalty}")
        self.tool_call_style: ToolCallStyle = tool_call_style
        self._parse = tool_call_parser(tool_call_style, self.tool_schemas())  # once per env: a vLLM parser takes a moment to build
        self.max_tool_output_chars = max_tool_output_chars
        self.format_penalty = format_penalty
        self.grade_timeout_s = grade_timeout_s
        self.answer_matches = answer_matcher(answer_match, timeout_s=grade_timeout_s)
        """(answer, gold) -> bool: how a final answer is graded (`answer_match`: math, exact, numeric, or a function)."""

    def close(self) -> None:
        """Close the tools (and their sandboxes) if this env made them; a registry passed in stays open."""
        if self._owns_tools:
            self.tools.close()
        super().close()

    def opening(self, task: Task) -> list[Message]:
        """TextEnv's opening; a task that lists tools (Task.tools) may use only those: the others are neither shown nor run."""
        unknown = [name for name in task.tools or [] if name not in self.tools]
        if unknown:
            raise EnvError(f"task {task.id!r} lists tools {unknown} that this env does not have; its tools: {', '.join(self.tools.names)}")
        return super().opening(task)

    def expert_action(self, conversation: list[Message]) -> str | None:
        """The calculator expert (calculator_expert) on tasks whose metadata holds their `expression` (synthetic arithmetic
        tasks, or a task file with an `expression` column); EnvError saying so on others."""
        expression = self.task.metadata.get("expression")
        if not expression:
            raise EnvError(f"ToolEnv's built-in expert computes a task's metadata['expression'] with the calculator, and task "
                           f"{self.task.id!r} has none (a task file gives it with an `expression` column); for other tasks, "
                           "subclass ToolEnv and define expert_action (README: 'A ToolEnv gets an expert')")
        return calculator_expert(str(expression), conversation, self.tool_call_style)

    def tool_schemas(self) -> list[dict[str, Any]]:
        """The registry's function schemas (the chat template shows them to the model), less those the current
        task does not list; none for python style, whose ```python blocks need no schema (the system prompt explains them)."""
        schemas = [] if self.tool_call_style == "python" else self.tools.schemas()
        return [schema for schema in schemas if self._task_allows(schema["function"]["name"])]

    def _task_allows(self, tool_name: str) -> bool:
        return self._task is None or self._task.tools is None or tool_name in self._task.tools

    async def respond(self, action: str) -> TurnResult:
        """Run the turn's tool calls, or grade its final answer."""
        calls = self._parse(action)
        if calls:
            replies = await asyncio.gather(*(self._reply(call) for call in calls))
            failures = sum(not ok for _, ok in replies)
            return TurnResult(
                messages=[message for message, _ in replies],
                tool_calls=len(calls),
                parsed_tool_calls=[call for call in calls if isinstance(call, ToolCall)],
                tool_errors=failures,
                void=failures == len(calls),
            )
        answer = extract_answer(action)
        if answer is None:  # the model stopped without calling a tool or answering
            return TurnResult(reward=-self.format_penalty, terminated=True, void=True)
        correct = bool(await GRADING_THREADS.run(self.answer_matches, answer, self.task.answer))
        return TurnResult(reward=float(correct), terminated=True, answer=answer, correct=correct)

    async def _reply(self, call: ToolCall | ToolCallError) -> tuple[Message, bool]:
        """The tool message answering one call, and whether the call succeeded."""
        if isinstance(call, ToolCallError):
            return Message(role="tool", content=self._clip(f"Error: {call.message}")), False
        if not self._task_allows(call.name):
            available = ", ".join(self.task.tools or [])
            return Message(role="tool", name=call.name, tool_call_id=call.id,
                           content=self._clip(f"Error: tool {call.name!r} is not available for this task; available: {available}")), False
        result = await self.tools.aexecute(call)
        return Message(role="tool", name=call.name, tool_call_id=call.id, content=self._clip(result.content)), result.ok

    def _clip(self, text: str) -> str:
        if len(text) <= self.max_tool_output_chars:
            return text
        return text[: self.max_tool_output_chars] + TRUNCATION_MARKER


def tool_registry(names: str | Sequence[str]) -> ToolRegistry:
    """A fresh registry from tool names, as a config writes them (`tools = ["calculator", "python"]`).

    Each name is a built-in tool (BUILTIN_TOOLS) or `module:attribute` for your own, where the
    attribute is a Tool (e.g. a `@tool` function), a Tool class, or a function returning a Tool or a
    ToolRegistry (e.g. "my_tools:make_registry"). Name a class or a function for a tool that holds
    processes or connections: each env then makes its own and closes it.
    """
    registry = ToolRegistry()
    for name in [names] if isinstance(names, str) else names:
        made = _make_tools(name)
        for t in made if isinstance(made, ToolRegistry) else [made]:
            registry.register(t)
    return registry


def _make_tools(name: str) -> Tool[Any] | ToolRegistry:
    if ":" not in name:
        if name not in BUILTIN_TOOLS:
            close = difflib.get_close_matches(name, list(BUILTIN_TOOLS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ToolError(f"unknown tool {name!r}; {hint}built-in tools: {', '.join(BUILTIN_TOOLS)}, "
                            "or 'module:attribute' for your own")
        return BUILTIN_TOOLS[name]()
    try:
        target = import_target(name)
    except ImportError as e:
        raise ToolError(f"tool {name!r} cannot be imported: {e}") from e
    made = target() if callable(target) and not isinstance(target, Tool) else target
    if not isinstance(made, (Tool, ToolRegistry)):
        raise ToolError(f"tool {name!r} is a {type(made).__name__}: expected a Tool, a Tool class, "
                        "or a function returning a Tool or a ToolRegistry")
    return made


def calculator_expert(expression: str, conversation: list[Message], style: str) -> str:
    """ToolEnv's expert: compute `expression` with the tool, then box the tool's reply."""
    results = [message for message in conversation if message.role == "tool"]
    if results:
        return f"The answer is \\boxed{{{results[-1].content.strip()}}}."
    if style == "python":
        return f"```python\nprint({expression})\n```"
    return f"<tool_call>\n{json.dumps({'name': 'calculator', 'arguments': {'expression': expression}})}\n</tool_call>"
