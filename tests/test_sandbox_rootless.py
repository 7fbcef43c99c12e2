"""The Python sandbox started without root: bubblewrap in a user namespace, and the caps it can get.

Each test starts a small host program as an unprivileged user (uid 65534 via `setpriv` when the
tests run as root; otherwise the current user) that imports alp_agents.tools.sandbox, runs
programs in a PythonSandbox, and prints what happened as one JSON line. The tests that choose how
limits are enforced (the fallback warning, `require_limits`, cgroup v2 as root) force the choice
by pointing the detection at another cgroup root, or by making cgroup v1 unavailable to it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_sandbox import FORK_UNTIL_REFUSED, FOUR_PROCESSES_OF_64_MB, processes_named, program, unique_name, wait_until

from alp_agents.errors import SandboxError
from alp_agents.tools import sandbox as sandbox_module
from alp_agents.tools.sandbox import NOBODY, PythonSandbox

SITE_PACKAGES = sysconfig.get_paths()["purelib"]
"""Where the unprivileged host program finds pydantic and (through the editable install) alp_agents."""

UNPRIVILEGED = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if os.geteuid() == 0 else []

PRELUDE = f"""
import site
site.addsitedir({SITE_PACKAGES!r})
import json, logging, os
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
from alp_agents.errors import SandboxError
from alp_agents.tools.sandbox import PythonSandbox
"""


def host_command(python: str, body: str) -> list[str]:
    """The command that runs `body` (after PRELUDE) as a host program of the unprivileged user."""
    return [*UNPRIVILEGED, python, "-I", "-S", "-c", PRELUDE + textwrap.dedent(body)]


def can_run(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `command` with a bare environment from /, capturing its output."""
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}, cwd="/")


@pytest.fixture(scope="module")
def python() -> str:
    """An interpreter the unprivileged user can run with this venv's packages, or a skip saying why."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    # This interpreter may live in a private directory (pyenv under /root, mode 0700): then any
    # other of the same version can load the venv's compiled packages.
    candidates = [os.path.realpath(sys.executable), *(f"{d}/{version}" for d in ("/usr/bin", "/usr/local/bin"))]
    for candidate in dict.fromkeys(candidates):
        # The interpreter must see itself: one started from a private directory may run on another's stdlib.
        usable = "import sys\nassert os.access(sys.executable, os.X_OK) and os.path.isdir(sys.base_prefix)"
        if os.path.exists(candidate) and can_run(host_command(candidate, usable)).returncode == 0:
            break
    else:
        pytest.skip(f"no {version} that uid {NOBODY} can run with {SITE_PACKAGES} (tried {', '.join(candidates)})")
    userns = can_run([*UNPRIVILEGED, "bwrap", "--unshare-user", "--ro-bind", "/", "/", "/bin/true"])
    if userns.returncode != 0:
        pytest.skip(f"unprivileged user namespaces are unavailable here: {userns.stderr.strip()}")
    return candidate


def run_unprivileged(python: str, body: str) -> dict:
    """Run `body` as the unprivileged user; it prints one JSON object as its last line."""
    done = can_run(host_command(python, body))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A directory outside every sandbox mount (not /tmp, not /usr), readable by the unprivileged user."""
    path = Path(tempfile.mkdtemp(prefix="alp-rootless-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


# ---------------------------------------------------------------------- isolation


def test_runs_a_program_as_uid_65534_with_no_privileges(python: str) -> None:
    code = program("""
        import os
        status = dict(line.split(":\\t") for line in open("/proc/self/status").read().splitlines())
        print(os.getuid(), os.getgid(), os.getgroups(), status["CapEff"], status["CapBnd"], status["NoNewPrivs"])
        print(6 * 7)
        """)
    outcome = run_unprivileged(
        python,
        f"""
        with PythonSandbox(timeout_s=10) as sandbox:
            result = sandbox.run({code!r})
            mechanism = sandbox.limits_enforced_by
        print(json.dumps({{"host_uid": os.getuid(), "result": result.model_dump(), "mechanism": mechanism}}))
        """,
    )
    assert outcome["host_uid"] != 0  # the host program really is unprivileged
    result = outcome["result"]
    assert result["exit_code"] == 0 and result["stderr"] == ""
    assert result["stdout"] == "65534 65534 [] 0000000000000000 0000000000000000 1\n42\n"
    assert outcome["mechanism"] in ("cgroup-v1", "cgroup-v2", "rlimit")


def test_host_files_are_invisible_and_the_root_is_read_only(python: str, host_dir: Path) -> None:
    secret = host_dir / "secret.txt"
    secret.write_text(f"secret-{uuid.uuid4().hex}")
    secret.chmod(0o644)
    paths = [str(secret), "/etc/passwd", "/etc", "/home", "/root", "/var", str(Path(__file__).parent)]
    paths = [path for path in paths if not os.path.realpath(python).startswith(path + "/")]  # its install is bound
    targets = ["/evil", "/dev/evil", "/usr/evil", f"{sys.base_prefix}/evil", "/proc/evil"]
    code = program(f"""
        import json, os
        seen, wrote = {{}}, []
        for path in {paths!r}:
            try:
                seen[path] = os.listdir(path) if os.path.isdir(path) else open(path).read()
            except OSError as e:
                seen[path] = type(e).__name__
        for path in {targets!r}:
            try:
                open(path, "w").write("x")
                wrote.append(path)
            except OSError:
                pass
        open("/tmp/scratch.txt", "w").write("the scratch is writable")
        print(json.dumps({{"seen": seen, "wrote": wrote, "root": sorted(os.listdir("/"))}}))
        """)
    outcome = run_unprivileged(
        python,
        f"""
        host_view = open({str(secret)!r}).read()  # the unprivileged user may read it outside the sandbox
        with PythonSandbox(timeout_s=10) as sandbox:
            result = sandbox.run({code!r})
        print(json.dumps({{"host_view": host_view, "result": result.model_dump()}}))
        """,
    )
    assert outcome["host_view"] == secret.read_text()
    inside = json.loads(outcome["result"]["stdout"])
    assert all(inside["seen"][path] == "FileNotFoundError" for path in paths), inside["seen"]
    assert inside["wrote"] == []  # nor may it fill bwrap's own root or /dev tmpfs, which it owns
    assert set(inside["root"]) <= {"bin", "dev", "lib", "lib32", "lib64", "proc", "root", "sbin", "tmp", "usr"}


def test_there_is_no_network(python: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = program(f"""
            import socket
            print([name for _, name in socket.if_nameindex()])
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2)
                print("CONNECTED")
            except OSError as e:
                print("refused", type(e).__name__)
            """)
        outcome = run_unprivileged(
            python,
            f"""
            with PythonSandbox(timeout_s=10) as sandbox:
                print(json.dumps(sandbox.run({code!r}).model_dump()))
            """,
        )
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()  # nothing reached the host's listener
    assert outcome["stdout"] == "['lo']\nrefused ConnectionRefusedError\n", outcome


def test_host_processes_are_invisible_and_out_of_reach(python: str) -> None:
    # The host program's own child runs as the same host user: were it visible, it could be signalled.
    look = program("""
        import json, os
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        names = [open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")[0].decode() for pid in pids]
        print(json.dumps({"pids": pids, "names": names}))
        """)
    kill = program("""
        import os, signal
        try:
            os.kill(HOST_PID, signal.SIGKILL)
            print("SIGNALLED")
        except OSError as e:
            print(type(e).__name__)
        """)
    outcome = run_unprivileged(
        python,
        f"""
        import subprocess
        sleeper = subprocess.Popen(["sleep", "60"])
        with PythonSandbox(timeout_s=10) as sandbox:
            result = sandbox.run({look!r})
            attack = sandbox.run({kill!r}.replace("HOST_PID", str(sleeper.pid)))
        alive = sleeper.poll() is None
        sleeper.kill()
        print(json.dumps({{"result": result.model_dump(), "attack": attack.stdout, "alive": alive}}))
        """,
    )
    inside = json.loads(outcome["result"]["stdout"])
    assert inside["pids"] == [1, 2], inside  # bwrap's init and the program: nothing of the host
    assert "sleep" not in inside["names"]
    assert outcome["attack"] == "ProcessLookupError\n" and outcome["alive"]


def test_sandbox_dies_with_the_unprivileged_host_process(python: str) -> None:
    name = unique_name("alpnoroot")
    sleeper = f"open('/proc/self/comm', 'w').write('{name}')\nimport time\ntime.sleep(120)"
    host = subprocess.Popen(host_command(python, f"PythonSandbox(timeout_s=120).run({sleeper!r})"), cwd="/")
    try:
        assert wait_until(lambda: processes_named(name) != [], timeout_s=60), "the sandboxed program never started"
        host.kill()
        host.wait()
        assert wait_until(lambda: processes_named(name) == [], timeout_s=10)
    finally:
        host.kill()
        host.wait()


# ---------------------------------------------------------------------- caps


def test_fork_bomb_is_stopped_and_leaves_nothing(python: str) -> None:
    name = unique_name("alpubomb")
    code = program(f"""
        import os
        open("/proc/self/comm", "w").write("{name}")
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """)
    outcome = run_unprivileged(
        python,
        f"""
        with PythonSandbox(timeout_s=2.0, max_processes=32) as sandbox:
            bombed = sandbox.run({code!r})
            after = sandbox.run("print('still fine')")
        print(json.dumps({{"bombed": bombed.model_dump(), "after": after.stdout}}))
        """,
    )
    assert outcome["bombed"]["timed_out"] and outcome["bombed"]["exit_code"] != 0
    assert outcome["after"] == "still fine\n"
    assert processes_named(name) == []  # gone by the time run() returned


@pytest.mark.skipif(
    tuple(map(int, platform.release().split(".")[:2])) < (5, 14),
    reason="before Linux 5.14 RLIMIT_NPROC counts every process of the host uid, not each user namespace",
)
def test_process_cap_counts_each_sandbox_alone(python: str) -> None:
    # 40 processes of the same host user exist meanwhile: a budget shared per uid would leave no
    # room under max_processes=32, a cap per sandbox still lets the program start most of its 32.
    outcome = run_unprivileged(
        python,
        f"""
        import subprocess
        sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(40)]
        with PythonSandbox(timeout_s=10, max_processes=32) as sandbox:
            result = sandbox.run({FORK_UNTIL_REFUSED!r})
        for sleeper in sleepers:
            sleeper.kill()
        print(json.dumps(result.model_dump()))
        """,
    )
    refused, started = outcome["stdout"].splitlines()
    assert refused == "refused BlockingIOError"
    assert 20 < int(started) < 32, outcome


def test_two_gib_allocation_fails(python: str) -> None:
    code = "data = b'x' * (2 << 30)\nprint('SURVIVED', len(data))"
    outcome = run_unprivileged(
        python,
        f"""
        with PythonSandbox(timeout_s=30, memory_mb=512) as sandbox:
            result = sandbox.run({code!r})
            print(json.dumps({{"result": result.model_dump(), "mechanism": sandbox.limits_enforced_by}}))
        """,
    )
    result = outcome["result"]
    assert "SURVIVED" not in result["stdout"] and result["exit_code"] != 0
    if outcome["mechanism"] == "rlimit":  # RLIMIT_AS refuses the allocation itself
        assert result["stderr"].rstrip().endswith("MemoryError"), result
    else:  # a cgroup's OOM killer stops the program
        assert result["oom_killed"], result


# ---------------------------------------------------------------------- when no cgroup can be written


def test_without_a_writable_cgroup_the_unprivileged_user_is_warned_or_refused(python: str) -> None:
    outcome = run_unprivileged(
        python,
        """
        records = []

        class Collect(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())

        logging.getLogger("alp_agents.tools.sandbox").addHandler(Collect())
        with PythonSandbox() as first, PythonSandbox() as second:
            mechanism = first.limits_enforced_by
            outputs = [first.run("print(1)").stdout, second.run("print(2)").stdout]
        try:
            PythonSandbox(require_limits=True)
            refusal = None
        except SandboxError as e:
            refusal = str(e)
        print(json.dumps({"mechanism": mechanism, "warnings": records, "outputs": outputs, "refusal": refusal}))
        """,
    )
    if outcome["mechanism"] != "rlimit":
        pytest.skip(f"this user has a writable cgroup here ({outcome['mechanism']}): nothing falls back")
    assert outcome["outputs"] == ["1\n", "2\n"]  # the fallback still runs programs
    [warning] = outcome["warnings"]  # once, not once per sandbox
    assert "cgroup v1: " in warning and "cgroup v2: " in warning  # why each is unusable
    for words in ("RLIMIT_AS", "RLIMIT_NPROC per sandbox", "run as root", "Delegate=yes", "require_limits=True"):
        assert words in warning
    assert outcome["refusal"].startswith("PythonSandbox(require_limits=True): no cgroup can cap")
    assert "require_limits=False" in outcome["refusal"]


@pytest.fixture
def fresh_detection() -> Iterator[None]:
    """Detect the limits mechanism (and warn) anew in this test, and again after it."""
    sandbox_module._find_limits.cache_clear()
    sandbox_module._warn_once.cache_clear()
    yield
    sandbox_module._find_limits.cache_clear()
    sandbox_module._warn_once.cache_clear()


def test_no_cgroup_file_system_falls_back_with_one_warning_or_refuses(
    fresh_detection: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sandbox_module, "_CGROUP_ROOT", tmp_path)  # no cgroup of either version there
    with caplog.at_level(logging.WARNING, logger="alp_agents.tools.sandbox"):
        with PythonSandbox(timeout_s=30, memory_mb=256) as first, PythonSandbox() as second:
            assert (first.limits_enforced_by, first.cgroups, second.limits_enforced_by) == ("rlimit", False, "rlimit")
            allocation = first.run("data = b'x' * (1 << 30)\nprint('SURVIVED')")
        with pytest.raises(SandboxError, match=r"require_limits=True\): no cgroup can cap .* no v1 memory hierarchy"):
            PythonSandbox(require_limits=True)
    assert allocation.stderr.rstrip().endswith("MemoryError") and "SURVIVED" not in allocation.stdout
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert f"no v1 memory hierarchy at {tmp_path / 'memory'}" in record.getMessage()
    assert f"no cgroup2 file system at {tmp_path}" in record.getMessage()


def test_cgroup_v2_caps_each_sandbox_as_a_whole(fresh_detection: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_v1() -> None:
        raise sandbox_module._Unavailable("disabled by this test")

    monkeypatch.setattr(sandbox_module, "_setup_v1", no_v1)
    limits = sandbox_module._find_limits()
    if limits.mechanism != "cgroup-v2":
        pytest.skip(f"no usable cgroup v2 for this process: {'; '.join(limits.unavailable)}")
    # Four processes of 64 MB each pass a per-process limit of 128 MB; the cgroup's total does not.
    with PythonSandbox(timeout_s=30.0, memory_mb=128, max_processes=16) as small:
        assert small.limits_enforced_by == "cgroup-v2"
        memory = small.run(FOUR_PROCESSES_OF_64_MB)
        forks = small.run(FORK_UNTIL_REFUSED)
    assert memory.oom_killed and "finished 4" not in memory.stdout
    assert 0 < int(forks.stdout.split()[-1]) < 16
    assert not [path for path in limits.v2_parent.iterdir() if path.is_dir()]  # every run's cgroup is removed
