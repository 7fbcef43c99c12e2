"""The `python` tool: runs model-written code in a PythonSandbox and reports what happened as text.

A program that does not end by itself with exit status 0 (it raised, exited non-zero, ran out of
time or memory) is a failed call: the model still reads its output, and it counts as a tool error.
"""

from __future__ import annotations

import threading

from pydantic import Field

from alp_agents.tools.base import Tool, ToolArgs, ToolFailure
from alp_agents.tools.sandbox import ExecResult, PythonSandbox

SANDBOX_START_S = 30.0
"""Slack for waiting for a started sandbox under load: counted in the call's timeout, not the program's."""
SHARED_POOL_SIZE = 4
"""Sandboxes the shared sandbox keeps started: it serves every episode of a rollout batch at once."""

_shared: PythonSandbox | None = None
_shared_lock = threading.Lock()


def shared_sandbox() -> PythonSandbox:
    """The process's one sandbox with the default limits, made on first use and closed at exit.

    Every run gets a fresh sandbox of its own whoever asks, so sharing the pre-started pool between
    episodes costs no isolation; it saves starting and tearing down a pool per episode.
    """
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = PythonSandbox(pool_size=SHARED_POOL_SIZE)
        return _shared


class PythonArgs(ToolArgs):
    """Arguments of the python tool."""

    code: str = Field(description="A complete Python 3 program; print() the values you want to see.")


class PythonTool(Tool[PythonArgs]):
    """Runs Python code in a sandbox; the model sees stdout, stderr and how the program ended.

    Without a `sandbox`, the tool makes its own with the default limits (bubblewrap isolation:
    SandboxError right away if it is unavailable) and closes it in `close()`; a sandbox passed
    in is shared and left open. `run` raises ToolFailure (with the same text) for a program that
    failed, so a registry counts it as a tool error.
    """

    name = "python"
    description = (
        "Run a Python 3 program in a sandbox and return what it printed. Each call starts fresh: no "
        "variables or files are kept between calls, and there is no network. Use print() to see results; "
        "sympy and numpy can be imported when installed."
    )
    args_model = PythonArgs

    @classmethod
    def shared(cls) -> PythonTool:
        """A python tool on the process's shared sandbox (shared_sandbox): what a config's `tools = ["python"]` makes."""
        return cls(shared_sandbox())

    def __init__(self, sandbox: PythonSandbox | None = None) -> None:
        self.sandbox = sandbox if sandbox is not None else PythonSandbox()
        self._owns_sandbox = sandbox is None
        self.timeout_s = self.sandbox.timeout_s + SANDBOX_START_S

    def run(self, args: PythonArgs) -> str:
        result = self.sandbox.run(args.code)
        text = self.format(result)
        if not result.ok:
            raise ToolFailure(text, reason=self._ending(result) or "the program failed")
        return text

    def format(self, result: ExecResult) -> str:
        """The text the model sees: stdout, then stderr, then a line on how the program ended."""
        parts = []
        if result.stdout:
            parts.append(result.stdout.rstrip("\n"))
        if result.stderr:
            stderr = result.stderr.rstrip("\n")
            parts.append(f"[stderr]\n{stderr}")
        if ending := self._ending(result):
            parts.append(f"[{ending}]")
        if not parts:
            parts.append("[the program printed nothing; use print() to see values]")
        return "\n".join(parts)

    def _ending(self, result: ExecResult) -> str | None:
        """How the program ended, when that is worth telling the model; None for a plain exit 0."""
        if result.timed_out:
            return f"stopped: the program ran longer than the {self.sandbox.timeout_s:g} s time limit"
        if result.oom_killed:
            return f"stopped: the program used more than the {self.sandbox.memory_mb} MB memory limit"
        if result.truncated:
            return f"output truncated to its first {self.sandbox.max_output_chars} characters"
        if result.exit_code < 0:
            return f"the program was killed by signal {-result.exit_code}"
        if result.exit_code != 0:
            return f"exit code {result.exit_code}"
        return None

    def close(self) -> None:
        """Close the sandbox if this tool made it."""
        if self._owns_sandbox:
            self.sandbox.close()
