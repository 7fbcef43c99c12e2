"""Tools: @tool schemas from hints and docstrings, Tool subclasses, and the registry's error handling."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from pydantic import BaseModel, Field

import alp_agents.tools as tools_package
from alp_agents.errors import ToolError
from alp_agents.tools import Calculator, PythonSandbox, PythonTool, Tool, ToolRegistry, ToolResult, tool
from alp_agents.threads import WorkerThreads
from alp_agents.tools.base import TOOL_THREADS, ToolFailure
from alp_agents.tools.sandbox import ExecResult
from alp_agents.trajectory import ToolCall


@tool
def convert(amount: float, currency: str, rounding: int = 2) -> dict[str, float]:
    """Convert an amount of euros to another currency.

    Rates are fixed for the test.

    Args:
        amount: How many euros.
        currency (str): The ISO code of the target
            currency, e.g. USD.
        rounding: Decimals to keep.

    Returns:
        The converted amount.
    """
    rates = {"USD": 1.1, "GBP": 0.85}
    return {currency: round(amount * rates[currency], rounding)}


@tool
async def echo(text: str) -> str:
    """Repeat the text back."""
    await asyncio.sleep(0)
    return text


class ShoutArgs(BaseModel):
    text: str = Field(description="What to shout.")


class Shout(Tool[ShoutArgs]):
    name = "shout"
    description = "Upper-case the text."
    args_model = ShoutArgs

    def run(self, args: ShoutArgs) -> str:
        return args.text.upper()


def test_exports_are_sorted_and_complete() -> None:
    assert tools_package.__all__ == sorted(tools_package.__all__)
    for name in tools_package.__all__:
        assert hasattr(tools_package, name), name


def test_tool_decorator_builds_the_schema_from_hints_and_docstring() -> None:
    assert convert.schema() == {
        "type": "function",
        "function": {
            "name": "convert",
            "description": "Convert an amount of euros to another currency.",
            "parameters": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "amount": {"type": "number", "description": "How many euros."},
                    "currency": {"type": "string", "description": "The ISO code of the target currency, e.g. USD."},
                    "rounding": {"type": "integer", "default": 2, "description": "Decimals to keep."},
                },
                "required": ["amount", "currency"],
            },
        },
    }


def test_decorated_tools_validate_and_return_text() -> None:
    assert convert(amount="10", currency="USD") == '{"USD": 11.0}'  # "10" coerced to 10.0; JSON result
    assert convert.function(10, "GBP", 1) == {"GBP": 8.5}  # the function itself is unchanged
    assert asyncio.run(convert.acall(amount=1, currency="USD")) == '{"USD": 1.1}'
    assert echo(text="hi") == "hi"  # an async tool called from sync code
    assert asyncio.run(echo.acall(text="hello")) == "hello"


def test_tool_subclass_schema_and_call() -> None:
    shout = Shout()
    assert shout(text="hey") == "HEY"
    assert shout.schema()["function"]["parameters"]["properties"] == {
        "text": {"type": "string", "description": "What to shout."}
    }


def test_bad_tool_functions_are_refused_with_the_reason() -> None:
    def no_doc(x: int) -> int:
        return x

    def no_hint(x) -> int:  # noqa: ANN001
        """Lacks a type hint."""
        return x

    def star(*values: int) -> int:
        """Takes *values."""
        return sum(values)

    def wrong_doc(x: int) -> int:
        """Describes an argument it does not have.

        Args:
            y: Not an argument.
        """
        return x

    with pytest.raises(ToolError, match="no docstring"):
        tool(no_doc)
    with pytest.raises(ToolError, match="'x' needs a type hint"):
        tool(no_hint)
    with pytest.raises(ToolError, match=r"\*values"):
        tool(star)
    with pytest.raises(ToolError, match=r"\['y'\]"):
        tool(wrong_doc)


def test_registry_lookup_and_registration_errors() -> None:
    registry = ToolRegistry([convert, Shout()])
    assert registry.names == ["convert", "shout"]
    assert "shout" in registry and "nope" not in registry and len(registry) == 2
    assert [schema["function"]["name"] for schema in registry.schemas()] == ["convert", "shout"]
    assert registry.get("shout").name == "shout"
    with pytest.raises(ToolError, match="Did you mean 'convert'"):
        registry.get("covnert")
    with pytest.raises(ToolError, match="already registered"):
        registry.register(Shout())
    with pytest.raises(ToolError, match="decorate the function with @tool"):
        registry.register(convert.function)  # type: ignore[arg-type]
    bad = Shout()
    bad.name = "has space"
    with pytest.raises(ToolError, match="invalid"):
        registry.register(bad)


def test_execute_turns_every_mistake_into_a_readable_failure() -> None:
    registry = ToolRegistry([convert, Calculator()])

    unknown = registry.execute(ToolCall(name="calculater", arguments={"expression": "1"}))
    assert not unknown.ok and "Did you mean 'calculator'" in unknown.content

    missing = registry.execute(ToolCall(name="convert", arguments={"amount": 3}))
    assert not missing.ok and "missing required argument 'currency'" in missing.content
    assert "Expected arguments: amount: float, currency: str, rounding: int (optional)" in missing.content

    wrong_type = registry.execute(ToolCall(name="convert", arguments={"amount": "lots", "currency": "USD"}))
    assert not wrong_type.ok and "argument 'amount'" in wrong_type.content and "'lots'" in wrong_type.content

    extra = registry.execute(ToolCall(name="convert", arguments={"amount": 1, "currency": "USD", "fee": 2}))
    assert not extra.ok and "unexpected argument 'fee'" in extra.content

    raised = registry.execute(ToolCall(name="convert", arguments={"amount": 1, "currency": "JPY"}))
    assert raised == ToolResult(name="convert", content="Error: KeyError: 'JPY'", ok=False, error="KeyError: 'JPY'")

    fine = registry.execute(ToolCall(name="calculator", arguments={"expression": "6 * 7"}))
    assert fine == ToolResult(name="calculator", content="42", ok=True)


def test_aexecute_runs_sync_tools_off_the_event_loop() -> None:
    started, release = threading.Event(), threading.Event()

    @tool
    def blocking(x: int) -> int:
        """Wait for the test to release it."""
        started.set()
        release.wait(timeout=10)
        return x

    async def main() -> ToolResult:
        registry = ToolRegistry([blocking])
        call = asyncio.create_task(registry.aexecute(ToolCall(name="blocking", arguments={"x": 5})))
        while not started.is_set():  # the loop keeps running while the tool blocks its thread
            await asyncio.sleep(0.01)
        release.set()
        return await call

    assert asyncio.run(main()).content == "5"


def test_python_tool_reports_output_errors_and_limits() -> None:
    with PythonSandbox(timeout_s=1.0, max_output_chars=100) as sandbox:
        python = PythonTool(sandbox)
        registry = ToolRegistry([python])

        def run(code: str) -> ToolResult:
            return registry.execute(ToolCall(name="python", arguments={"code": code}))

        assert run("print(2 ** 10)") == ToolResult(name="python", content="1024", ok=True)
        assert run("x = 1").content == "[the program printed nothing; use print() to see values]"
        # A program that fails still shows the model its output, and counts as a failed call.
        failed = run("import sys\nprint('partial')\nsys.exit('boom')")
        assert failed == ToolResult(name="python", content="partial\n[stderr]\nboom\n[exit code 1]", ok=False, error="exit code 1")
        looped = run("while True: pass")
        assert not looped.ok and looped.content.endswith("[stopped: the program ran longer than the 1 s time limit]")
        with pytest.raises(ToolFailure, match="exit code 1") as raised:  # called directly, the tool raises
            python(code="raise SystemExit(1)")
        assert raised.value.content == "[exit code 1]"
        flooded = asyncio.run(registry.aexecute(ToolCall(name="python", arguments={"code": "print('y' * 1000)"})))
        assert not flooded.ok and flooded.content.startswith("y" * 100 + "\n[output truncated to its first 100 characters]")
        python.close()  # does not close a sandbox it was given
        assert sandbox.run("print(1)").stdout == "1\n"


def test_python_tool_formats_memory_kills() -> None:
    python = PythonTool(PythonSandbox(memory_mb=64))
    killed = ExecResult(stdout="", stderr="", exit_code=-9, oom_killed=True, duration_s=0.1)
    assert python.format(killed) == "[stopped: the program used more than the 64 MB memory limit]"
    python.sandbox.close()


def test_a_memory_kill_is_a_failed_call() -> None:
    with PythonSandbox(timeout_s=30.0, memory_mb=128) as sandbox:
        result = ToolRegistry([PythonTool(sandbox)]).execute(ToolCall(name="python", arguments={"code": "x = b'x' * (1 << 30)"}))
    assert not result.ok
    if sandbox.cgroups:  # without cgroups, RLIMIT_AS makes the allocation raise MemoryError instead (exit code 1)
        assert result.content.endswith("[stopped: the program used more than the 128 MB memory limit]")


def test_a_call_past_its_timeout_fails_and_the_loop_goes_on() -> None:
    release = threading.Event()

    @tool
    def stuck() -> str:
        """Block until released."""
        release.wait()
        return "late"

    @tool
    async def sleepy() -> str:
        """Sleep far too long."""
        await asyncio.sleep(30)
        return "late"

    stuck.timeout_s = sleepy.timeout_s = 0.2
    registry = ToolRegistry([stuck, sleepy])

    async def main() -> list[ToolResult]:
        try:
            return await asyncio.wait_for(asyncio.gather(*(registry.aexecute(ToolCall(name=name)) for name in ("stuck", "sleepy"))), 5)
        finally:
            release.set()

    started = time.perf_counter()
    results = asyncio.run(main())
    assert time.perf_counter() - started < 2
    assert [r.content for r in results] == ["Error: the tool did not finish within its 0.2 s time limit"] * 2
    assert not any(r.ok for r in results)


def test_worker_threads_are_bounded_and_a_queued_call_that_times_out_never_runs() -> None:
    threads = WorkerThreads(1, "test-worker")
    started, release, ran = threading.Event(), threading.Event(), []

    def hang() -> None:
        started.set()
        release.wait()

    async def main() -> None:
        hung = asyncio.create_task(threads.run(hang))
        while not started.is_set():
            await asyncio.sleep(0.01)
        with pytest.raises(TimeoutError):  # the only thread is taken: the call waits in the queue, bounded by its timeout
            async with asyncio.timeout(0.2):
                await threads.run(ran.append, "queued")
        release.set()
        await hung
        assert await threads.run(lambda: "next") == "next"

    asyncio.run(main())
    assert ran == []
    assert threads._started == 1
    # Daemon threads: a tool that never returns cannot keep the process from exiting.
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith((threads.name, TOOL_THREADS.name)))
