"""The Python sandbox against hostile programs: every attack below must be contained.

Each test runs the real bubblewrap sandbox. Processes a program leaves behind are found on the
host by name: the program writes a unique name to /proc/self/comm, which its children inherit.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from alp_agents.errors import SandboxError
from alp_agents.tools.sandbox import PythonSandbox, _check_bwrap

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sandbox() -> Iterator[PythonSandbox]:
    with PythonSandbox(timeout_s=10.0, memory_mb=256, max_output_chars=2000, max_processes=32) as sandbox:
        yield sandbox


def unique_name(prefix: str) -> str:
    """A process name (at most 15 characters) no other process has."""
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def processes_named(name: str) -> list[int]:
    """Pids of host processes whose comm is `name`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == name:
                pids.append(int(entry.name))
        except OSError:
            pass  # the process ended while we looked
    return pids


def wait_until(condition, timeout_s: float) -> bool:  # noqa: ANN001
    """Poll `condition` until it holds or `timeout_s` passes; True if it held."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def program(source: str) -> str:
    return textwrap.dedent(source).strip() + "\n"


FORK_UNTIL_REFUSED = program("""
    import os, time
    started = 0
    try:
        while started < 500:
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
            started += 1
    except OSError as e:
        print("refused", type(e).__name__)
    print(started)
    """)
"""Forks sleeping children until the process cap refuses one; prints how (if it was refused), then how many it started."""

FOUR_PROCESSES_OF_64_MB = program("""
    import os, time
    pids = []
    for i in range(4):
        pid = os.fork()
        if pid == 0:
            data = b"x" * (64 << 20)
            time.sleep(2)
            os._exit(0)
        pids.append(pid)
    print("finished", sum(os.waitpid(pid, 0)[1] == 0 for pid in pids))
    """)
"""Each process passes a per-process limit of 128 MB; together they exceed a limit on the whole sandbox."""


# ---------------------------------------------------------------------- ordinary programs


def test_runs_a_program_and_reports_its_output(sandbox: PythonSandbox) -> None:
    result = sandbox.run("import sys\nprint(6 * 7)\nprint('careful', file=sys.stderr)")
    assert result.stdout == "42\n"
    assert result.stderr == "careful\n"
    assert result.exit_code == 0
    assert not result.timed_out and not result.truncated and not result.oom_killed
    assert result.ok
    assert result.duration_s > 0


def test_exit_codes_and_tracebacks_show_the_programs_own_lines(sandbox: PythonSandbox) -> None:
    exited = sandbox.run("import sys; sys.exit(3)")
    assert exited.exit_code == 3 and not exited.ok
    failed = sandbox.run("x = 1\ny = x / 0\n")
    assert failed.exit_code == 1 and not failed.ok
    assert 'File "/tmp/main.py", line 2' in failed.stderr
    assert "y = x / 0" in failed.stderr and failed.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "<string>" not in failed.stderr  # the sandbox's own runner frames are hidden
    syntax = sandbox.run("print((1)")
    assert syntax.exit_code == 1 and "SyntaxError" in syntax.stderr


def test_installed_packages_can_be_imported(sandbox: PythonSandbox) -> None:
    result = sandbox.run("import sympy\nprint(sympy.sqrt(8))")
    assert result.stdout == "2*sqrt(2)\n", result.stderr


def test_invalid_utf8_output_is_replaced_not_fatal(sandbox: PythonSandbox) -> None:
    result = sandbox.run("import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe')")
    assert result.stdout == "ok \ufffd\ufffd"


# ---------------------------------------------------------------------- the file system


def test_host_files_are_invisible(sandbox: PythonSandbox) -> None:
    paths = ["/etc/shadow", "/etc/passwd", "/root/.bash_history", str(REPO / "pyproject.toml"), "/home"]
    result = sandbox.run(
        program(f"""
        import json, os
        outcome = {{}}
        for path in {paths!r}:
            try:
                outcome[path] = os.listdir(path) if os.path.isdir(path) else open(path).read()[:50]
            except OSError as e:
                outcome[path] = type(e).__name__
        outcome["/"] = sorted(os.listdir("/"))
        outcome["/root"] = os.listdir("/root")
        print(json.dumps(outcome))
        """)
    )
    outcome = json.loads(result.stdout)
    for path in paths:
        assert outcome[path] in ("FileNotFoundError", "PermissionError"), (path, outcome[path])
    assert "etc" not in outcome["/"] and "home" not in outcome["/"]
    assert outcome["/root"] == [".pyenv"] or outcome["/root"] == []  # at most the Python install


def test_writes_outside_the_scratch_fail_and_the_scratch_does_not_persist(sandbox: PythonSandbox) -> None:
    marker = f"alp-marker-{uuid.uuid4().hex}"
    targets = ["/usr/evil", "/evil", f"{sys.base_prefix}/evil", "/proc/evil", "/dev/evil"]
    result = sandbox.run(
        program(f"""
        import os
        for path in {targets!r}:
            try:
                open(path, "w").write("x")
                print("WROTE", path)
            except OSError as e:
                print("refused", path, type(e).__name__)
        open("/tmp/{marker}", "w").write("x")
        print("scratch ok", os.path.exists("/tmp/{marker}"))
        """)
    )
    assert "WROTE" not in result.stdout, result.stdout
    assert result.stdout.count("refused") == len(targets)
    assert "scratch ok True" in result.stdout
    assert not Path(f"/tmp/{marker}").exists()  # the scratch is not the host's /tmp
    assert sandbox.run(f"import os; print(os.path.exists('/tmp/{marker}'))").stdout == "False\n"


def test_file_size_and_scratch_size_are_limited() -> None:
    with PythonSandbox(max_file_mb=1, scratch_mb=4) as small:
        result = small.run(
            program("""
            import errno
            try:
                open("/tmp/big", "wb").write(b"x" * (2 << 20))
            except OSError as e:
                print("file:", errno.errorcode[e.errno])
            try:
                for i in range(8):
                    open(f"/tmp/part{i}", "wb").write(b"x" * (900 << 10))
            except OSError as e:
                print("scratch:", errno.errorcode[e.errno])
            """)
        )
    assert result.stdout == "file: EFBIG\nscratch: ENOSPC\n", result.stderr


def test_proc_sys_cannot_be_written(sandbox: PythonSandbox) -> None:
    # Host root could write these from a sandbox that only had a user namespace. The program
    # writes back the current values, so that even a broken sandbox would change nothing.
    result = sandbox.run(
        program("""
        import os
        for path in ["/proc/sys/kernel/core_pattern", "/proc/sys/vm/overcommit_memory"]:
            try:
                value = open(path).read()
                open(path, "w").write(value)
                print("WROTE", path)
            except OSError as e:
                print("refused", type(e).__name__)
        print("uid", os.getuid(), os.geteuid(), "groups", os.getgroups())
        """)
    )
    assert result.stdout.splitlines() == ["refused PermissionError"] * 2 + ["uid 65534 65534 groups []"]


# ---------------------------------------------------------------------- network, environment, argv


def test_there_is_no_network(sandbox: PythonSandbox) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = sandbox.run(
            program(f"""
            import socket
            print("interfaces", [name for _, name in socket.if_nameindex()])
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2)
                print("CONNECTED")
            except OSError as e:
                print("refused", type(e).__name__)
            """)
        )
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()  # nothing reached the host's listener
    assert "CONNECTED" not in result.stdout
    assert "interfaces ['lo']" in result.stdout


def test_host_environment_and_code_stay_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("ALP_TEST_SECRET", secret)
    marker = f"code-marker-{uuid.uuid4().hex}"
    with PythonSandbox() as fresh:  # started after the secret was set
        result = fresh.run(
            program(f"""
            # {marker}
            import json, os
            seen = [repr(dict(os.environ))]
            for pid in filter(str.isdigit, os.listdir("/proc")):
                for name in ("environ", "cmdline"):
                    try:
                        seen.append(open(f"/proc/{{pid}}/{{name}}", "rb").read().decode(errors="replace"))
                    except OSError:
                        pass
            text = "\\n".join(seen)
            print("secret visible:", "{secret[:6]}" + "{secret[6:]}" in text)
            print("code in a command line:", "code-" + "marker-{marker[12:]}" in text)
            print(json.dumps(sorted(os.environ)))
            """)
        )
    assert "secret visible: False" in result.stdout
    assert "code in a command line: False" in result.stdout
    environment = json.loads(result.stdout.splitlines()[-1])
    assert set(environment) <= {"HOME", "LANG", "PATH", "PWD", "PYTHONIOENCODING"} | {
        f"{library}_NUM_THREADS" for library in ("OMP", "OPENBLAS", "MKL")
    }


# ---------------------------------------------------------------------- resource exhaustion


def test_infinite_loop_times_out() -> None:
    with PythonSandbox(timeout_s=1.0) as quick:
        result = quick.run("print('started', flush=True)\nwhile True:\n    pass")
    assert result.timed_out
    assert result.exit_code == -signal.SIGKILL
    assert result.stdout == "started\n"  # output before the deadline is kept


def test_output_flood_is_capped_and_stopped(sandbox: PythonSandbox) -> None:
    flood = sandbox.run("while True:\n    print('x' * 1000)")
    assert flood.truncated and not flood.timed_out
    assert 0 < len(flood.stdout) <= 2000
    binary = sandbox.run("import sys\nwhile True:\n    sys.stderr.buffer.write(b'\\xff' * 65536)")
    assert binary.truncated and len(binary.stderr) <= 2000


def test_process_count_is_limited(sandbox: PythonSandbox) -> None:
    result = sandbox.run(FORK_UNTIL_REFUSED)
    refused, started = result.stdout.splitlines()
    assert refused == "refused BlockingIOError"
    assert int(started) < 32  # max_processes of the fixture, the runner itself included


def test_fork_bomb_is_contained_and_leaves_nothing(sandbox: PythonSandbox) -> None:
    name = unique_name("alpbomb")
    with PythonSandbox(timeout_s=2.0, max_processes=32) as bombed:
        result = bombed.run(
            program(f"""
            import os
            open("/proc/self/comm", "w").write("{name}")
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
            """)
        )
    assert result.timed_out and not result.ok
    assert processes_named(name) == []
    assert sandbox.run("print('still fine')").stdout == "still fine\n"


def test_memory_bomb_is_killed() -> None:
    # Generous time: this machine faults memory in at only about 0.5 GB/s.
    with PythonSandbox(timeout_s=30.0, memory_mb=128) as small:
        result = small.run(
            program("""
            chunks = []
            for i in range(64):
                chunks.append(b"x" * (16 << 20))  # written, so really resident
                print(len(chunks) * 16, "MB", flush=True)
            print("SURVIVED")
            """)
        )
    assert result.oom_killed and not result.ok
    assert result.exit_code == -signal.SIGKILL
    assert "SURVIVED" not in result.stdout
    assert int(result.stdout.split()[-2]) <= 128


def test_memory_limit_holds_for_all_processes_together() -> None:
    # Four processes of 64 MB each pass a per-process limit of 128 MB; the cgroup's total does not.
    with PythonSandbox(timeout_s=30.0, memory_mb=128) as small:
        assert small.cgroups
        result = small.run(FOUR_PROCESSES_OF_64_MB)
    assert result.oom_killed
    assert "finished 4" not in result.stdout


# ---------------------------------------------------------------------- nothing survives


def test_daemon_does_not_survive_the_run(sandbox: PythonSandbox) -> None:
    name = unique_name("alpdaemon")
    result = sandbox.run(
        program(f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:  # the classic double fork: a daemon in its own session
                open("/proc/self/comm", "w").write("{name}")
                time.sleep(60)
            os._exit(0)
        print("parent done")
        """)
    )
    assert result.stdout == "parent done\n"
    assert not result.timed_out  # the run ends with the program, not with its daemon
    assert processes_named(name) == []


def test_program_killing_its_parents_is_harmless(sandbox: PythonSandbox) -> None:
    result = sandbox.run(
        program("""
        import os, signal
        for target in (os.getppid(), 1, -1):
            try:
                os.kill(target, signal.SIGKILL)
                print("signalled", target)
            except OSError as e:
                print("refused", target, type(e).__name__)
        """)
    )
    # Whatever it reached lies inside its own PID namespace; the host and this sandbox go on.
    assert "refused 1 PermissionError" in result.stdout
    assert sandbox.run("print(1)").stdout == "1\n"


def test_sandbox_dies_with_the_host_process() -> None:
    name = unique_name("alporphan")
    sleeper = f"open('/proc/self/comm', 'w').write('{name}')\nimport time\ntime.sleep(120)"
    host_program = f"from alp_agents.tools.sandbox import PythonSandbox\nPythonSandbox(timeout_s=120).run({sleeper!r})"
    host = subprocess.Popen([sys.executable, "-c", host_program])
    try:
        assert wait_until(lambda: processes_named(name) != [], timeout_s=60), "the sandboxed program never started"
        host.kill()
        host.wait()
        assert wait_until(lambda: processes_named(name) == [], timeout_s=10)
    finally:
        host.kill()
        host.wait()


def test_close_kills_a_running_program_and_refuses_new_runs() -> None:
    name = unique_name("alpclose")
    closing = PythonSandbox(timeout_s=60)
    results = []
    code = f"open('/proc/self/comm', 'w').write('{name}')\nimport time\ntime.sleep(60)"
    worker = threading.Thread(target=lambda: results.append(closing.run(code)))
    worker.start()
    assert wait_until(lambda: processes_named(name) != [], timeout_s=30), "the program never started"
    closing.close()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert results[0].exit_code == -signal.SIGKILL
    with pytest.raises(SandboxError, match="closed"):
        closing.run("print(1)")
    closing.close()  # idempotent


# ---------------------------------------------------------------------- async, modes, set-up errors


def test_arun_runs_concurrently_without_blocking_the_loop(sandbox: PythonSandbox) -> None:
    async def main() -> tuple[list[str], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        results = await asyncio.gather(*(sandbox.arun(f"import time\ntime.sleep(0.3)\nprint({i})") for i in range(4)))
        ticking.cancel()
        return [r.stdout for r in results], ticks

    outputs, ticks = asyncio.run(main())
    assert outputs == ["0\n", "1\n", "2\n", "3\n"]
    assert ticks > 5  # the loop kept running while the programs slept


def test_isolation_none_runs_code_unisolated_in_a_temporary_directory() -> None:
    with PythonSandbox(isolation="none") as plain:
        result = plain.run("import os\nprint(os.getuid())\nprint(os.getcwd())")
    uid, cwd = result.stdout.split()
    assert int(uid) == os.getuid()  # no privilege drop: this mode is for trusted code only
    assert "alp-sandbox-" in cwd and not Path(cwd).exists()  # its scratch directory is removed


def test_missing_bubblewrap_is_refused_with_install_instructions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on this PATH
    _check_bwrap.cache_clear()
    try:
        with pytest.raises(SandboxError, match="apt-get install bubblewrap"):
            PythonSandbox()
        PythonSandbox(isolation="none").close()  # an explicit opt-out still works
    finally:
        _check_bwrap.cache_clear()


def test_invalid_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        PythonSandbox(timeout_s=0)
    with pytest.raises(ValueError, match="isolation"):
        PythonSandbox(isolation="docker")  # type: ignore[arg-type]


def test_import_paths_under_the_scratch_directory_stay_visible(tmp_path) -> None:
    # A virtualenv under /tmp (a CI checkout, say) must not vanish under the sandbox's fresh /tmp.
    assert str(tmp_path).startswith("/tmp/")
    (tmp_path / "pkgs").mkdir()
    (tmp_path / "pkgs" / "answer_module.py").write_text("ANSWER = 42\n")
    with PythonSandbox(import_paths=[str(tmp_path / "pkgs")]) as sandbox:
        result = sandbox.run("import answer_module\nprint(answer_module.ANSWER)\nopen('note.txt', 'w').write('scratch is writable')")
    assert (result.stdout, result.stderr) == ("42\n", "")
