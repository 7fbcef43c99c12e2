"""Tools the model can call, how its calls are read, and the sandbox that runs its code.

Installed as `alp_agents.tools`:

- `Tool`, `@tool`, `ToolRegistry`, `ToolResult` (base.py): define tools and execute calls; a bad
  call becomes a failed result the model can read, never an exception.
- `parse_tool_calls`, `ToolCallError` (parsing.py): the calls in an assistant turn (Hermes/Qwen
  `<tool_call>` JSON, or ```python blocks).
- `Calculator` (calculator.py): exact arithmetic through a parser, never `eval`.
- `PythonSandbox`, `ExecResult` (sandbox.py): untrusted code in a bubblewrap sandbox with limits.
- `PythonTool` (python_tool.py): the `python` tool on top of the sandbox.
- `BUILTIN_TOOLS`: the built-in tools by name, as configs name them (`tools = ["calculator", "python"]`).
"""

from collections.abc import Callable

from alp_agents.tools.base import FunctionTool, Tool, ToolArgs, ToolRegistry, ToolResult, tool
from alp_agents.tools.calculator import Calculator, CalculatorError
from alp_agents.tools.parsing import ToolCallError, ToolCallStyle, parse_tool_calls
from alp_agents.tools.python_tool import PythonTool, shared_sandbox
from alp_agents.tools.sandbox import ExecResult, PythonSandbox

BUILTIN_TOOLS: dict[str, Callable[[], Tool]] = {Calculator.name: Calculator, PythonTool.name: PythonTool.shared}
"""The built-in tools by name, each a function of no arguments making a working tool (the python tool runs on the
process's shared sandbox, so the episodes of a batch do not each start and tear down a sandbox pool)."""

__all__ = [
    "BUILTIN_TOOLS",
    "Calculator",
    "CalculatorError",
    "ExecResult",
    "FunctionTool",
    "PythonSandbox",
    "PythonTool",
    "Tool",
    "ToolArgs",
    "ToolCallError",
    "ToolCallStyle",
    "ToolRegistry",
    "ToolResult",
    "parse_tool_calls",
    "shared_sandbox",
    "tool",
]
