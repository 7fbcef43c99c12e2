"""The `python` tool: runs model-written code in a PythonSandbox and reports what happened as text."""

from __future__ import annotations

from pydantic import Field

from alp_agents.tools.base import Tool, ToolArgs
from alp_agents.tools.sandbox import ExecResult, PythonSandbox


class PythonArgs(ToolArgs):
    """Arguments of the python tool."""

    code: str = Field(description="A complete Python 3 program; print() the values you want to see.")


class PythonTool(Tool[PythonArgs]):
    """Runs Python code in a sandbox; the model sees stdout, stderr and how the program ended.

    Without a `sandbox`, the tool makes its own with the default limits (bubblewrap isolation:
    SandboxError right away if it is unavailable) and closes it in `close()`; a sandbox passed
    in is shared and left open.
    """

    name = "python"
    description = (
        "Run a Python 3 program in a sandbox and return what it printed. Each call starts fresh: no "
        "variables or files are kept between calls, and there is no network. Use print() to see results; "
        "sympy and numpy can be imported when installed."
    )
    args_model = PythonArgs

    def __init__(self, sandbox: PythonSandbox | None = None) -> None:
        self.sandbox = sandbox if sandbox is not None else PythonSandbox()
        self._owns_sandbox = sandbox is None

    def run(self, args: PythonArgs) -> str:
        return self.format(self.sandbox.run(args.code))

    async def arun(self, args: PythonArgs) -> str:
        return self.format(await self.sandbox.arun(args.code))

    def format(self, result: ExecResult) -> str:
        """The text the model sees: stdout, then stderr, then a line on how the program ended."""
        parts = []
        if result.stdout:
            parts.append(result.stdout.rstrip("\n"))
        if result.stderr:
            stderr = result.stderr.rstrip("\n")
            parts.append(f"[stderr]\n{stderr}")
        if result.timed_out:
            parts.append(f"[stopped: the program ran longer than the {self.sandbox.timeout_s:g} s time limit]")
        elif result.oom_killed:
            parts.append(f"[stopped: the program used more than the {self.sandbox.memory_mb} MB memory limit]")
        elif result.truncated:
            parts.append(f"[output truncated to its first {self.sandbox.max_output_chars} characters]")
        elif result.exit_code < 0:
            parts.append(f"[the program was killed by signal {-result.exit_code}]")
        elif result.exit_code != 0:
            parts.append(f"[exit code {result.exit_code}]")
        if not parts:
            parts.append("[the program printed nothing; use print() to see values]")
        return "\n".join(parts)

    def close(self) -> None:
        """Close the sandbox if this tool made it."""
        if self._owns_sandbox:
            self.sandbox.close()
