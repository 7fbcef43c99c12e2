"""Run untrusted, model-written Python in a throw-away sandbox, one program per sandbox.

Isolation (the default, `isolation="bwrap"`) uses bubblewrap and the kernel's own mechanisms:

- new PID, network, IPC, UTS and cgroup namespaces: the program sees only its own processes, has
  no network (not even the host's loopback), and when its PID 1 dies the kernel kills the rest;
- a fresh root file system: the Python install, its site-packages and /usr read-only, a private
  /proc and /dev, and an empty size-capped tmpfs at /tmp (the working directory) and /dev/shm
  (a Python install under /tmp, e.g. a CI checkout's virtualenv, is bound inside that tmpfs).
  Nothing else of the host is visible: no /etc, no home directories, no project files;
- the program runs as uid 65534 with no capabilities and no new privileges. As root, bwrap makes
  no user namespace and the first program inside drops to host uid 65534 with `setpriv`: a user
  namespace alone would not do, since run as root it maps the sandbox user onto host uid 0, which
  may still write /proc/sys. As any other user, bwrap runs unprivileged in a new user namespace
  (uid 65534 inside, the calling user on the host, no capabilities) and with `--disable-userns`,
  so the program cannot create user namespaces of its own;
- no host environment variables (bwrap starts with a minimal environment and clears it again);
- the code travels through a pipe, never the command line (which /proc/*/cmdline would show);
- limits: wall time and CPU time, memory and process count for the whole sandbox, file size
  (RLIMIT_FSIZE), scratch size, and output (read here in bounded chunks with a deadline; a program
  that writes more than its budget is stopped). Memory and processes are capped by a cgroup per
  run: cgroup v1 where its memory and pids hierarchies are writable (root), else cgroup v2 in this
  process's own cgroup where it is writable and offers the memory and pids controllers (root on a
  v2 host, or a delegated subtree such as `systemd-run --user --scope -p Delegate=yes`). Without
  either, per-process RLIMIT_AS and RLIMIT_NPROC stand in, with a warning logged once (or a
  SandboxError, with `require_limits=True`); `limits_enforced_by` says which mechanism holds;
- nothing survives a run: at the end every process in the run's process group, cgroup and PID
  namespace is killed, and the scratch tmpfs disappears with its mount namespace.

Python's start-up (tens of milliseconds) would dominate short programs, so a background thread
keeps `pool_size` sandboxes started and waiting for their code. Each still runs exactly one
program and is then destroyed, so pre-starting costs no isolation.

Without bubblewrap the sandbox refuses to run (SandboxError, saying how to install it), unless the
caller explicitly asks for `isolation="none"`: a plain subprocess with the same limits but no
isolation at all, for trusted code or machines where namespaces are unavailable.

Known limits: there is no seccomp filter, so the program can still call any system call its uid
may (started as root, that includes creating an unprivileged user namespace); the kernel is the
boundary. Without cgroups, RLIMIT_AS caps each process, not their sum; RLIMIT_NPROC counts the
processes of uid 65534 on the whole host when started as root, and only the sandbox's own (its
user namespace, Linux 5.14 or later) otherwise.
"""

from __future__ import annotations

import abc
import enum
import errno
import functools
import json
import logging
import math
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from itertools import count
from pathlib import Path
from types import TracebackType
from typing import Annotated, Literal, NamedTuple

from pydantic import BaseModel, Field, validate_call

from alp_agents.errors import SandboxError
from alp_agents.tools.base import TOOL_THREADS

NOBODY = 65534
"""The unprivileged host uid and gid the sandboxed program runs as."""

INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`, Fedora: `dnf install bubblewrap`; "
    "`make setup` does it for you), or pass isolation='none' to run code without any isolation"
)

LimitsMechanism = Literal["cgroup-v1", "cgroup-v2", "rlimit"]
"""What caps a sandbox's memory and process count: a per-run cgroup (v1 or v2) for the sandbox as a
whole, or per-process rlimits where no cgroup can be written."""

logger = logging.getLogger(__name__)

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_CGROUP_PARENT = "alp_agents_sandbox"
_CGROUP_CONTROLLERS = ("memory", "pids")
_CGROUP_V2_HOST_LEAF = "alp_agents_host"
"""The v2 cgroup this process moves into, beside the sandboxes' parent: cgroup v2 lets a cgroup
hand memory and pids to children only while no process sits in it directly."""

_SCRATCH = "/tmp"
"""Working directory of the program inside the bwrap sandbox: a fresh tmpfs."""

_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONIOENCODING": "utf-8",
    # One thread per numeric library: their default of one per core would exceed max_processes.
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
"""The whole environment of the sandboxed program (plus HOME, set to its scratch directory)."""

_JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
"""Shell wrapper that moves itself into the run's cgroups (the cgroup.procs files before `--`), then
execs bwrap."""

# The first Python code run inside the sandbox (trusted: ours). It starts before the model's code
# is known, waits for it on stdin, sets the per-process limits, and runs it as `__main__` from
# main.py in the scratch directory, so that tracebacks show the model's own lines. It imports
# nothing costly (the interpreter's C excepthook prints tracebacks), to keep start-up cheap.
# argv: cpu_s file_bytes memory_bytes max_processes import_path...  (0 = no rlimit of that kind)
_RUNNER = r"""
def _run():
    import os, resource, sys
    cpu_s, file_bytes, memory_bytes, max_processes = map(int, sys.argv[1:5])
    sys.path.extend(sys.argv[5:])
    source = sys.stdin.buffer.read()
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    if max_processes:
        resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
    path = os.path.join(os.getcwd(), "main.py")
    with open(path, "wb") as f:
        f.write(source)

    def excepthook(kind, value, tb):
        while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":  # hide the runner
            tb = tb.tb_next
        sys.__excepthook__(kind, value.with_traceback(tb), tb)

    sys.excepthook = excepthook
    main = sys.modules["__main__"].__dict__
    del main["_run"]
    main["__file__"] = path
    sys.argv = [path]
    exec(compile(source, path, "exec"), main)
_run()
"""


class ExecResult(BaseModel):
    """What one program did in the sandbox."""

    stdout: str
    """Standard output, decoded as UTF-8 (invalid bytes replaced), at most max_output_chars."""
    stderr: str
    """Standard error, decoded and capped like stdout."""
    exit_code: int
    """The program's exit status; -N when it was killed by signal N (also when stopped for a limit)."""
    timed_out: bool = False
    """True when the program ran out of wall time or CPU time and was killed."""
    truncated: bool = False
    """True when stdout or stderr was cut to max_output_chars (a flood also stops the program)."""
    oom_killed: bool = False
    """True when the kernel killed a process of the program for exceeding the memory limit."""
    duration_s: float = Field(ge=0)
    """Wall time from handing over the code to the program's end, in seconds."""

    @property
    def ok(self) -> bool:
        """True when the program ended by itself with exit status 0: no error, and no limit stopped it."""
        return self.exit_code == 0 and not (self.timed_out or self.oom_killed)


class _State(enum.Enum):
    UNOPENED = "unopened"  # no process started yet: the pool starts on the first run
    OPEN = "open"
    CLOSED = "closed"


class PythonSandbox:
    """Runs Python programs, each in a fresh sandbox with resource limits; thread- and asyncio-safe.

    >>> with PythonSandbox(timeout_s=2.0) as sandbox:
    ...     sandbox.run("print(6 * 7)").stdout
    '42\\n'

    `close()` (or leaving the `with` block) kills the pre-started sandboxes and any program still
    running, and a closed sandbox refuses new runs; an unclosed one is cleaned up when garbage
    collected or at exit. Keyword-only limits: `max_processes` (processes and threads alive at
    once), `max_file_mb` (largest file the program may write), `scratch_mb` (size of its /tmp),
    `pool_size` (sandboxes kept started), `import_paths` (read-only directories added to the
    program's sys.path; default: this interpreter's site-packages, so that installed packages
    such as sympy and numpy can be imported), `require_limits` (True: raise SandboxError where no
    cgroup can cap memory and processes per sandbox, instead of falling back to per-process
    rlimits with a warning). `limits_enforced_by` names the mechanism in use, and the attribute
    `cgroups` tells whether it is a cgroup (limits for each sandbox as a whole).
    """

    @validate_call
    def __init__(
        self,
        timeout_s: Annotated[float, Field(gt=0)] = 5.0,
        memory_mb: Annotated[int, Field(ge=16)] = 512,
        max_output_chars: Annotated[int, Field(gt=0)] = 4096,
        isolation: Literal["bwrap", "none"] = "bwrap",
        *,
        max_processes: Annotated[int, Field(ge=1)] = 64,
        max_file_mb: Annotated[int, Field(ge=1)] = 16,
        scratch_mb: Annotated[int, Field(ge=1)] = 64,
        pool_size: Annotated[int, Field(ge=1)] = 2,
        import_paths: Sequence[str] | None = None,
        require_limits: bool = False,
    ) -> None:
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_output_chars = max_output_chars
        self.isolation = isolation
        self.max_processes = max_processes
        self.max_file_mb = max_file_mb
        self.scratch_mb = scratch_mb
        self.pool_size = pool_size
        self.import_paths = tuple(_default_import_paths() if import_paths is None else import_paths)
        self.require_limits = require_limits
        if isolation == "bwrap":
            _check_bwrap()
        self._limits = _find_limits()
        if self._limits.mechanism == "rlimit":
            if require_limits:
                raise SandboxError(_refusal_message(self._limits.unavailable))
            _warn_once(_fallback_message(self._limits.unavailable, isolation))
        self.cgroups = self._limits.mechanism != "rlimit"
        limits = _RunnerLimits(
            cpu_s=math.ceil(timeout_s) + 1,
            file_bytes=max_file_mb << 20,
            # Without cgroups, fall back to per-process limits (weaker: they do not add up).
            memory_bytes=0 if self.cgroups else memory_mb << 20,
            max_processes=0 if self.cgroups else max_processes,
        )
        python = _python_argv(limits, self.import_paths)
        self._launch = _Launch(
            argv=self._bwrap_argv(python) if isolation == "bwrap" else python,
            private_scratch=isolation == "none",
            cgroup_limits=(memory_mb << 20, max_processes) if self.cgroups else None,
            cgroup_v2_parent=self._limits.v2_parent,
            bwrap=isolation == "bwrap",
        )
        self._state = _State.UNOPENED
        self._lock = threading.Lock()
        self._pool: _Pool | None = None

    @property
    def limits_enforced_by(self) -> LimitsMechanism:
        """What caps memory and processes: "cgroup-v1" or "cgroup-v2" (a cgroup per run, for the
        sandbox as a whole), or "rlimit" (RLIMIT_AS per process, RLIMIT_NPROC per uid or user namespace)."""
        return self._limits.mechanism

    def run(self, code: str) -> ExecResult:
        """Run `code` as a Python program in a fresh sandbox and return what it did.

        Never raises for anything the program does (errors, timeouts, floods and crashes are in
        the result); raises SandboxError only when the sandbox is closed or cannot be started.
        """
        with self._lock:
            if self._state is _State.CLOSED:
                raise SandboxError("this PythonSandbox is closed: create a new one to run more code")
            if self._pool is None:
                self._pool = _Pool(self._launch, self.pool_size)
                self._state = _State.OPEN
                weakref.finalize(self, self._pool.close)
            pool = self._pool
        sandbox = pool.take()
        try:
            return sandbox.execute(code, timeout_s=self.timeout_s, max_output_chars=self.max_output_chars)
        finally:
            pool.release(sandbox)

    async def arun(self, code: str) -> ExecResult:
        """`run` without blocking the event loop: the program runs while other tasks proceed (in one
        of the tools' threads, never the loop's default executor)."""
        return await TOOL_THREADS.run(self.run, code)

    def close(self) -> None:
        """Kill the pre-started sandboxes and any program still running; idempotent."""
        with self._lock:
            self._state = _State.CLOSED
            pool = self._pool
        if pool is not None:
            pool.close()

    def __enter__(self) -> PythonSandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"PythonSandbox(timeout_s={self.timeout_s}, memory_mb={self.memory_mb}, "
            f"max_output_chars={self.max_output_chars}, isolation={self.isolation!r}, state={self._state.value!r})"
        )

    def _bwrap_argv(self, python: list[str]) -> list[str]:
        scratch_bytes = str(self.scratch_mb << 20)
        interpreter_dir = os.path.dirname(os.path.realpath(sys.executable))
        read_only = sorted({os.path.realpath(p) for p in [sys.base_prefix, interpreter_dir, *self.import_paths] if os.path.isdir(p)})
        inside_scratch = [p for p in read_only if p.startswith(_SCRATCH + "/")]  # e.g. a virtualenv under /tmp
        outside_scratch = [p for p in read_only if p not in inside_scratch]
        privileged = os.geteuid() == 0
        argv = [
            shutil.which("bwrap") or "bwrap",
            *_namespaces(privileged),
            "--die-with-parent",
            "--new-session",
            *_root_filesystem(outside_scratch),
            "--proc", "/proc",
            "--dev", "/dev",
            "--perms", "1777", "--size", scratch_bytes, "--tmpfs", "/dev/shm",
            "--perms", "1777", "--size", scratch_bytes, "--tmpfs", _SCRATCH,
            *_read_only_binds(inside_scratch, existing=[_SCRATCH]),  # after the tmpfs, which would hide them
            # Unprivileged, bwrap's own root and /dev tmpfs belong to the sandbox user: without this the
            # program could fill them (they have no size cap). As root they belong to root already.
            *(() if privileged else ("--remount-ro", "/", "--remount-ro", "/dev")),
            "--chdir", _SCRATCH,
            "--clearenv",
        ]  # fmt: skip
        for key, value in {**_ENV, "HOME": _SCRATCH}.items():
            argv += ["--setenv", key, value]
        # Unprivileged, bwrap itself leaves the program as uid 65534 without capabilities.
        return [*argv, "--", *(_DROP_PRIVILEGES if privileged else ()), *python]


# ---------------------------------------------------------------------- the pool and one sandbox


class _Launch(BaseModel):
    """How to start one sandbox: fixed for the life of a PythonSandbox."""

    argv: list[str]
    private_scratch: bool
    """Make a host temporary directory for the program to work in (isolation="none")."""
    cgroup_limits: tuple[int, int] | None
    """(memory bytes, max processes) of a per-run cgroup, or None when cgroups are unavailable."""
    cgroup_v2_parent: Path | None
    """The v2 cgroup under which each run gets its own; None: cgroup v1 (or none)."""
    bwrap: bool
    """argv starts bwrap: ask it for its PID namespace's init, so that a run ends only once that is empty."""

    def start(self) -> _Sandbox:
        """Start one sandbox; its Python starts up and waits for code on stdin."""
        cgroup = self._new_cgroup()
        scratch = tempfile.mkdtemp(prefix="alp-sandbox-") if self.private_scratch else None
        info, info_child = os.pipe() if self.bwrap else (-1, -1)
        argv = [self.argv[0], "--info-fd", str(info_child), *self.argv[1:]] if self.bwrap else self.argv
        if cgroup is not None:
            argv = ["/bin/sh", "-c", _JOIN_CGROUPS, "sh", *cgroup.procs_files, "--", *argv]
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**_ENV, "HOME": scratch or _SCRATCH},
                cwd=scratch or "/",
                start_new_session=True,
                pass_fds=(info_child,) if self.bwrap else (),
            )
        except BaseException:
            if self.bwrap:
                os.close(info)
            if cgroup is not None:
                cgroup.remove()
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        finally:
            if self.bwrap:
                os.close(info_child)  # bwrap holds it now: the report ends when bwrap closes its copy
        return _Sandbox(popen, cgroup, scratch, info=info if self.bwrap else None)

    def _new_cgroup(self) -> _Cgroup | None:
        if self.cgroup_limits is None:
            return None
        if self.cgroup_v2_parent is None:
            return _CgroupV1(*self.cgroup_limits)
        return _CgroupV2(self.cgroup_v2_parent, *self.cgroup_limits)


class _Pool:
    """Keeps `size` sandboxes started, from one long-lived thread, and hands each out once."""

    def __init__(self, launch: _Launch, size: int) -> None:
        self._launch = launch
        self._ready: queue.Queue[_Sandbox | Exception] = queue.Queue(maxsize=size)
        self._running: set[_Sandbox] = set()
        self._lock = threading.Lock()
        self._closed = False
        # Every sandbox is started from this one thread: bwrap's --die-with-parent fires when the
        # *thread* that started it ends, so sandboxes started from a short-lived thread would die.
        self._thread = threading.Thread(target=self._fill, name="alp-sandbox-pool", daemon=True)
        self._thread.start()

    def take(self) -> _Sandbox:
        """The next started sandbox (waits for one when all are taken)."""
        while True:
            try:
                item = self._ready.get(timeout=0.1)
                break
            except queue.Empty:
                if self._closed:  # close() ran while this caller waited
                    raise SandboxError("the PythonSandbox was closed while this run waited for a sandbox") from None
        if isinstance(item, Exception):
            raise SandboxError(f"could not start a sandbox: {item}") from item
        with self._lock:
            if not self._closed:
                self._running.add(item)
                return item
        item.destroy()
        raise SandboxError("the PythonSandbox was closed while this run waited for a sandbox")

    def release(self, sandbox: _Sandbox) -> None:
        """Destroy a sandbox that has run its program."""
        with self._lock:
            self._running.discard(sandbox)
        sandbox.destroy()

    def close(self) -> None:
        """Kill running programs, destroy started sandboxes, stop the thread; idempotent."""
        with self._lock:
            self._closed = True
            running = list(self._running)
        for sandbox in running:
            sandbox.kill()  # their run() calls then finish and release them
        self._drain()  # makes room, so the thread is not stuck putting into a full queue
        self._thread.join()
        self._drain()

    def _fill(self) -> None:
        while not self._closed:
            try:
                item: _Sandbox | Exception = self._launch.start()
            except Exception as e:  # handed to the caller of take(), who raises SandboxError
                item = e
            self._ready.put(item)

    def _drain(self) -> None:
        while True:
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Sandbox):
                item.destroy()


class _Sandbox:
    """One started sandbox: runs exactly one program, then is destroyed."""

    def __init__(
        self, popen: subprocess.Popen[bytes], cgroup: _Cgroup | None, scratch: str | None, *, info: int | None
    ) -> None:
        self.popen = popen
        self.cgroup = cgroup
        self.scratch = scratch
        self._info = info
        """The read end of bwrap's --info-fd, until read (read late, so that starting never waits for bwrap)."""
        self._init: int | None = None
        """A pidfd of bwrap's init, PID 1 of the sandbox's PID namespace (None: not bwrap, or it failed to start)."""
        self._init_lock = threading.Lock()  # close() may kill while the run's own thread destroys

    def _open_init(self) -> int | None:
        """The init's pidfd; opened while the init is alive for sure (its program waits for code, or is running)."""
        with self._init_lock:
            if self._info is not None:
                self._init = _init_pidfd(self._info)
                self._info = None
            return self._init

    def execute(self, code: str, *, timeout_s: float, max_output_chars: int) -> ExecResult:
        """Hand `code` over and collect bounded output until the program ends or the deadline."""
        self._open_init()
        start = time.monotonic()
        # UTF-8 takes at most 4 bytes a character: past this many bytes a stream is surely too long.
        output = _exchange(self.popen, code.encode(), start + timeout_s, 4 * max_output_chars)
        self.kill()  # the main process has ended or must end now; stop whatever it left behind
        exit_code = _exit_code(self.popen.wait())
        duration_s = time.monotonic() - start
        out, out_cut = _decode(output.stdout, max_output_chars)
        err, err_cut = _decode(output.stderr, max_output_chars)
        return ExecResult(
            stdout=out,
            stderr=err,
            exit_code=exit_code,
            timed_out=not (output.ended or output.flooded) or exit_code == -signal.SIGXCPU,
            truncated=output.flooded or out_cut or err_cut,
            oom_killed=self.cgroup is not None and self.cgroup.oom_killed(),
            duration_s=duration_s,
        )

    def kill(self) -> None:
        """SIGKILL the process group: bwrap and its init, and with the init its PID namespace."""
        self._open_init()
        with self._init_lock:
            if self._init is not None:
                try:
                    signal.pidfd_send_signal(self._init, signal.SIGKILL)  # a pidfd names the init, never a reused pid
                except ProcessLookupError:
                    pass
        if self.popen.returncode is not None:
            return  # reaped: its pid may already belong to another process
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def destroy(self) -> None:
        """Kill everything this sandbox started; remove its cgroup and scratch directory."""
        self.kill()
        if self.cgroup is not None:
            self.cgroup.kill_all()
        self.popen.wait()
        for pipe in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()
        if self._init is not None:
            try:
                _wait_for_namespace(self._init)
            finally:
                with self._init_lock:
                    os.close(self._init)
                    self._init = None
        if self.cgroup is not None:
            self.cgroup.remove()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _init_pidfd(info: int) -> int | None:
    """Read bwrap's --info-fd report and open a pidfd of the init it names (None if bwrap failed first)."""
    with os.fdopen(info, "rb") as report:  # bwrap closes its end once written, early in its start
        data = report.read()
    try:
        return os.pidfd_open(json.loads(data)["child-pid"])
    except (ValueError, KeyError, ProcessLookupError):  # bwrap died before reporting: the run reports it
        return None


def _wait_for_namespace(init: int, timeout_s: float = 10.0) -> None:
    """Wait until the killed init (a pidfd) has exited.

    bwrap reports a program's end as soon as the program exits, and its outer process may end
    before the kernel has killed the rest of the PID namespace; the init's pidfd becomes readable
    only once the namespace is empty. Without a cgroup to wait on, this is what ends a run cleanly.
    """
    with selectors.DefaultSelector() as selector:
        selector.register(init, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            raise SandboxError(
                f"the sandbox's PID namespace still has processes {timeout_s} s after its init was killed"
            )


class _Output(NamedTuple):
    stdout: bytes
    stderr: bytes
    ended: bool
    """The main process ended before the deadline (it is left unreaped)."""
    flooded: bool
    """A stream passed the byte cap, where reading stopped."""


def _exchange(popen: subprocess.Popen[bytes], code: bytes, deadline: float, cap_bytes: int) -> _Output:
    """Write `code` to stdin; read stdout and stderr until the main process ends or the deadline.

    Nothing here blocks past the deadline, even when a grandchild holds the pipes open.
    """
    assert popen.stdin is not None and popen.stdout is not None and popen.stderr is not None
    outputs = {popen.stdout.fileno(): bytearray(), popen.stderr.fileno(): bytearray()}
    stdin = popen.stdin.fileno()
    exited = os.pidfd_open(popen.pid)  # becomes readable when the main process ends
    sent = 0
    ended = flooded = False
    with selectors.DefaultSelector() as selector:
        for fd in (stdin, *outputs):
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_WRITE if fd == stdin else selectors.EVENT_READ)
        selector.register(exited, selectors.EVENT_READ)
        while not (ended or flooded) and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(remaining):
                if key.fd == exited:
                    ended = True
                elif key.fd == stdin:
                    try:
                        sent += os.write(stdin, code[sent : sent + 65536])
                    except BrokenPipeError:  # the program ended before reading all its code
                        sent = len(code)
                    if sent == len(code):
                        selector.unregister(stdin)
                        popen.stdin.close()
                elif not _read_available(key.fd, outputs[key.fd], cap_bytes):
                    selector.unregister(key.fd)
            flooded = any(len(out) > cap_bytes for out in outputs.values())
        if ended and not flooded:  # take what the program left in the pipes
            for fd in outputs.keys() & selector.get_map().keys():
                _read_available(fd, outputs[fd], cap_bytes)
            flooded = any(len(out) > cap_bytes for out in outputs.values())
    os.close(exited)
    stdout, stderr = (bytes(out[:cap_bytes]) for out in outputs.values())
    return _Output(stdout, stderr, ended, flooded)


def _read_available(fd: int, sink: bytearray, cap_bytes: int) -> bool:
    """Append what can be read from `fd` now (never past cap_bytes + 1); False at end of file."""
    while len(sink) <= cap_bytes:
        try:
            chunk = os.read(fd, cap_bytes + 1 - len(sink))
        except BlockingIOError:
            return True
        if not chunk:
            return False
        sink += chunk
    return True


def _decode(data: bytes, max_chars: int) -> tuple[str, bool]:
    """Decode program output (invalid UTF-8 replaced) and cut it to max_chars; True if cut."""
    text = data.decode("utf-8", errors="replace")
    if len(text) > max_chars:
        return text[:max_chars], True
    return text, False


def _exit_code(returncode: int) -> int:
    # bwrap reports a child killed by signal N as exit status 128 + N; report it as -N, like subprocess.
    if 128 < returncode < 128 + signal.NSIG:
        return 128 - returncode
    return returncode


# ---------------------------------------------------------------------- command lines


_NAMESPACES = ("--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--unshare-pid", "--unshare-net")
"""Listed one by one: as root, no user namespace, so that the uid drop below is a drop on the host."""

_USER_NAMESPACE = ("--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY))
"""Unprivileged bwrap's own user namespace, in which the program is uid and gid 65534."""

_DROP_PRIVILEGES = (
    "/usr/bin/setpriv",
    f"--reuid={NOBODY}",
    f"--regid={NOBODY}",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
    "--no-new-privs",
)


class _RunnerLimits(BaseModel):
    """Per-process limits the runner sets before the model's code starts (0: not set)."""

    cpu_s: int
    file_bytes: int
    memory_bytes: int
    max_processes: int


def _python_argv(limits: _RunnerLimits, import_paths: Sequence[str]) -> list[str]:
    # -I: ignore PYTHON* variables and the user's site; -S: skip site (fast start, no .pth code);
    # -u: unbuffered, so a program killed at its deadline still shows what it printed.
    python = os.path.realpath(sys.executable)
    numbers = [limits.cpu_s, limits.file_bytes, limits.memory_bytes, limits.max_processes]
    return [python, "-I", "-S", "-u", "-B", "-c", _RUNNER, *map(str, numbers), *import_paths]


def _root_filesystem(read_only: Sequence[str]) -> list[str]:
    """bwrap arguments for a fresh root: /usr and the `read_only` directories (real paths) bound read-only."""
    argv = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    return argv + _read_only_binds(read_only, covered=["/usr"])


def _read_only_binds(paths: Sequence[str], *, covered: Sequence[str] = (), existing: Sequence[str] = ()) -> list[str]:
    """bwrap arguments binding each of `paths` read-only, unless a `covered` bind (or an earlier path) holds it.

    Parent directories are created world-traversable: on the host they may be private (/root is
    0700) and the program runs as nobody. The `existing` directories (mount points) are left as they are.
    """
    argv: list[str] = []
    bound = list(covered)
    made = {*covered, *existing}
    for path in paths:
        if any(path == b or path.startswith(b + "/") for b in bound):
            continue
        for parent in reversed(Path(path).parents[:-1]):  # from the top, excluding "/"
            if str(parent) not in made:
                made.add(str(parent))
                argv += ["--perms", "0755", "--dir", str(parent)]
        argv += ["--ro-bind", path, path]
        bound.append(path)
    return argv


def _default_import_paths() -> list[str]:
    """This interpreter's site-packages (the venv's, when running in one)."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


@functools.cache
def _namespaces(privileged: bool) -> tuple[str, ...]:
    """bwrap's namespace arguments: as root, no user namespace (setpriv drops to uid 65534 on the host);
    otherwise its own user namespace, in which the program may not create another where bwrap can forbid it."""
    if privileged:
        return _NAMESPACES
    bwrap = shutil.which("bwrap") or "bwrap"
    usage = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=30).stdout
    disable = ("--disable-userns",) if "--disable-userns" in usage else ()  # bubblewrap 0.8.0 and later
    return (*_USER_NAMESPACE, *disable, *_NAMESPACES)


@functools.cache
def _check_bwrap() -> None:
    """Fail with a clear SandboxError unless bwrap can build the sandbox on this machine."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxError(f"the Python sandbox needs bubblewrap (`bwrap`), which is not installed: {INSTALL_HINT}")
    privileged = os.geteuid() == 0
    if privileged and not os.path.exists(_DROP_PRIVILEGES[0]):
        raise SandboxError(f"{_DROP_PRIVILEGES[0]} is missing: install util-linux (it drops the program's privileges)")
    drop = _DROP_PRIVILEGES if privileged else ()
    probe = subprocess.run(
        [bwrap, *_namespaces(privileged), "--ro-bind", "/", "/", "--", *drop, "/bin/true"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=_ENV,
        timeout=30,
    )
    if probe.returncode == 0:
        return
    message = probe.stderr.decode(errors="replace").strip() or f"exit {probe.returncode}"
    if privileged:
        raise SandboxError(
            f"bubblewrap cannot create the sandbox's namespaces here ({message}); "
            "inside a container, allow namespaces (e.g. docker --privileged or a seccomp/apparmor profile "
            "that permits unshare), or pass isolation='none' to run code without isolation"
        )
    raise SandboxError(
        f"bubblewrap cannot create the sandbox's user namespace as uid {os.geteuid()} ({message}): unprivileged "
        "user namespaces must be allowed (/proc/sys/user/max_user_namespaces above 0; Debian's "
        "kernel.unprivileged_userns_clone=1; on Ubuntu 23.10+ kernel.apparmor_restrict_unprivileged_userns=0 or "
        "an AppArmor profile for bwrap; in a container, a seccomp profile that permits unshare); or run as root, "
        "or pass isolation='none' to run code without isolation"
    )


# ---------------------------------------------------------------------- cgroups (v1 and v2)


_cgroup_names = count()


class _Cgroup(abc.ABC):
    """One run's cgroup directories: the memory and process limits hold for all its processes together."""

    dirs: list[Path]

    @property
    def procs_files(self) -> list[str]:
        """The files a process writes its pid to in order to join."""
        return [str(path / "cgroup.procs") for path in self.dirs]

    @abc.abstractmethod
    def oom_killed(self) -> bool:
        """True when the kernel's OOM killer killed a process of this cgroup."""

    def kill_all(self) -> None:
        """SIGKILL every process still in the cgroup (it cannot fork past its pids limit meanwhile)."""
        for path in self.dirs:
            try:
                pids = (path / "cgroup.procs").read_text().split()
            except FileNotFoundError:  # already removed
                continue
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def remove(self, timeout_s: float = 10.0) -> None:
        """Remove the cgroup, killing stragglers until it is empty (dying processes take a moment)."""
        deadline = time.monotonic() + timeout_s
        for path in self.dirs:
            while path.exists():
                try:
                    path.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        raise SandboxError(f"cgroup {path} still has processes after {timeout_s} s") from None
                    self.kill_all()
                    time.sleep(0.001)


class _CgroupV1(_Cgroup):
    """A run's memory and pids cgroups in the v1 hierarchies."""

    def __init__(self, memory_bytes: int, max_processes: int) -> None:
        name = f"{os.getpid()}-{next(_cgroup_names)}"
        self.dirs = [_CGROUP_ROOT / controller / _CGROUP_PARENT / name for controller in _CGROUP_CONTROLLERS]
        memory, pids = self.dirs
        try:
            for path in self.dirs:
                path.mkdir()
            (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
            memsw = memory / "memory.memsw.limit_in_bytes"  # present only with swap accounting
            if memsw.exists():
                memsw.write_text(str(memory_bytes))
            (pids / "pids.max").write_text(str(max_processes))
        except OSError:
            self.remove()
            raise

    def oom_killed(self) -> bool:
        return _counter(self.dirs[0] / "memory.oom_control", "oom_kill") > 0


class _CgroupV2(_Cgroup):
    """A run's cgroup in the v2 hierarchy, under `parent` (which hands it memory and pids)."""

    def __init__(self, parent: Path, memory_bytes: int, max_processes: int) -> None:
        path = parent / f"{os.getpid()}-{next(_cgroup_names)}"
        self.dirs = [path]
        try:
            path.mkdir()
            (path / "memory.max").write_text(str(memory_bytes))
            swap = path / "memory.swap.max"  # present only with swap accounting
            if swap.exists():
                swap.write_text("0")  # like v1's memsw limit: swap cannot stretch the memory cap
            (path / "pids.max").write_text(str(max_processes))
        except OSError:
            self.remove()
            raise

    def oom_killed(self) -> bool:
        return _counter(self.dirs[0] / "memory.events", "oom_kill") > 0

    def kill_all(self) -> None:
        # cgroup.kill (Linux 5.14+) kills every process at once, forking ones included.
        try:
            (self.dirs[0] / "cgroup.kill").write_text("1")
        except FileNotFoundError:  # an older kernel, or the cgroup is already removed
            super().kill_all()


def _counter(path: Path, key: str) -> int:
    """The value of `key` in a cgroup file of "key value" lines (0 when absent)."""
    for line in path.read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


class _Limits(NamedTuple):
    """How memory and processes are capped in this process (found once)."""

    mechanism: LimitsMechanism
    v2_parent: Path | None = None
    """The v2 cgroup under which each run gets its own (cgroup-v2 only)."""
    unavailable: tuple[str, ...] = ()
    """Why each kind of cgroup cannot be used (rlimit only)."""


class _Unavailable(Exception):
    """A kind of cgroup cannot be used here; the message says why."""


@functools.cache
def _find_limits() -> _Limits:
    """cgroup v1 where it works as it always has (root), else cgroup v2, else rlimits."""
    reasons = []
    try:
        _setup_v1()
        return _Limits("cgroup-v1")
    except _Unavailable as e:
        reasons.append(f"cgroup v1: {e}")
    try:
        return _Limits("cgroup-v2", v2_parent=_setup_v2())
    except _Unavailable as e:
        reasons.append(f"cgroup v2: {e}")
    return _Limits("rlimit", unavailable=tuple(reasons))


def _setup_v1() -> None:
    """Make the v1 memory and pids parents and a trial run cgroup, or raise _Unavailable saying why."""
    for controller in _CGROUP_CONTROLLERS:
        if not (_CGROUP_ROOT / controller / "tasks").exists():  # a file only v1 hierarchies have
            raise _Unavailable(f"no v1 {controller} hierarchy at {_CGROUP_ROOT / controller}")
    try:
        for controller in _CGROUP_CONTROLLERS:
            parent = _CGROUP_ROOT / controller / _CGROUP_PARENT
            parent.mkdir(exist_ok=True)
            _remove_stale_cgroups(parent)
        _CgroupV1(1 << 30, 1).remove()
    except OSError as e:
        raise _Unavailable(f"cannot make a cgroup as uid {os.geteuid()} ({e})") from None


def _setup_v2() -> Path:
    """The v2 cgroup to make run cgroups in, set up inside this process's own cgroup.

    This process's cgroup (or, when it already sits in our host leaf, that leaf's parent) must be
    writable and offer memory and pids. Handing those to children needs the cgroup to hold no
    process itself, so its processes move into the leaf `alp_agents_host` first; the sandboxes
    go under `alp_agents_sandbox` beside it. Raises _Unavailable saying why not.
    """
    mount = next((m for m in (_CGROUP_ROOT, _CGROUP_ROOT / "unified") if (m / "cgroup.controllers").exists()), None)
    if mount is None:
        raise _Unavailable(f"no cgroup2 file system at {_CGROUP_ROOT} or {_CGROUP_ROOT / 'unified'}")
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    own = next((line[3:] for line in lines if line.startswith("0::")), None)
    if own is None:
        raise _Unavailable("this process is in no v2 cgroup (/proc/self/cgroup has no 0:: line)")
    base = mount / own.lstrip("/")
    if base.name == _CGROUP_V2_HOST_LEAF:
        base = base.parent
    try:
        offered = (base / "cgroup.controllers").read_text().split()
        missing = [c for c in _CGROUP_CONTROLLERS if c not in offered]
        if missing:
            plural = "s" if len(missing) > 1 else ""
            raise _Unavailable(
                f"{base} does not offer the {' and '.join(missing)} controller{plural} "
                f"(its cgroup.controllers: {' '.join(offered) or 'none'})"
            )
        if not os.access(base, os.W_OK) or not os.access(base / "cgroup.subtree_control", os.W_OK):
            raise _Unavailable(f"{base} is not writable by uid {os.geteuid()} (not delegated)")
        _hand_controllers_down(base)
        parent = base / _CGROUP_PARENT
        parent.mkdir(exist_ok=True)
        _enable_controllers(parent)
        _remove_stale_cgroups(parent)
        _CgroupV2(parent, 1 << 30, 1).remove()
    except OSError as e:
        raise _Unavailable(f"cannot make a cgroup under {base} as uid {os.geteuid()} ({e})") from None
    return parent


def _hand_controllers_down(base: Path, tries: int = 3) -> None:
    """Enable memory and pids for base's children, moving base's own processes into the leaf if need be."""
    leaf = base / _CGROUP_V2_HOST_LEAF
    for attempt in range(tries):
        try:
            _enable_controllers(base)
            return
        except OSError as e:
            if e.errno != errno.EBUSY or attempt == tries - 1:
                busy = f": its processes could not all be moved into {leaf}" if e.errno == errno.EBUSY else ""
                raise _Unavailable(
                    f"cannot enable memory and pids for the children of {base} ({e.strerror}){busy}"
                ) from None
        # EBUSY: processes sit in base itself (this one among them), which v2 forbids (except in its
        # root). Move them into the leaf, still inside base, so base's own limits still cover them.
        leaf.mkdir(exist_ok=True)
        for pid in (base / "cgroup.procs").read_text().split():
            try:
                (leaf / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # ended meanwhile, or not ours to move: the next try fails and says so


def _enabled(cgroup: Path) -> bool:
    return set(_CGROUP_CONTROLLERS) <= set((cgroup / "cgroup.subtree_control").read_text().split())


def _enable_controllers(cgroup: Path) -> None:
    if not _enabled(cgroup):
        (cgroup / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in _CGROUP_CONTROLLERS))


def _remove_stale_cgroups(parent: Path) -> None:
    """Remove empty cgroups left by processes that died without cleaning up (e.g. SIGKILLed)."""
    for child in parent.iterdir():
        owner = child.name.partition("-")[0]
        if child.is_dir() and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            try:
                child.rmdir()
            except OSError:
                pass  # still has processes: leave it


# ---------------------------------------------------------------------- the fallback, said once


_FIX = (
    "to cap each sandbox as a whole, run as root (cgroup v1 or v2), or start this program in a delegated "
    "cgroup v2 subtree that offers the memory and pids controllers, e.g. "
    "`systemd-run --user --scope -p Delegate=yes python ...`"
)


def _refusal_message(unavailable: Sequence[str]) -> str:
    return (
        f"PythonSandbox(require_limits=True): no cgroup can cap each sandbox's memory and processes here "
        f"({'; '.join(unavailable)}); {_FIX}, or pass require_limits=False to fall back to per-process rlimits"
    )


def _fallback_message(unavailable: Sequence[str], isolation: Literal["bwrap", "none"]) -> str:
    uid = os.geteuid()
    if isolation == "none" and uid == 0:
        processes = "not capped at all (RLIMIT_NPROC does not bind root)"
    elif isolation == "none":
        processes = f"capped by RLIMIT_NPROC over every process of uid {uid} on this host"
    elif uid == 0:
        processes = (
            f"capped by RLIMIT_NPROC over every process of host uid {NOBODY}, shared by all sandboxes running at once"
        )
    else:
        processes = (
            "capped by RLIMIT_NPROC per sandbox, in its own user namespace (Linux 5.14+; older kernels "
            f"count every process of uid {uid})"
        )
    return (
        f"PythonSandbox: no cgroup can cap each sandbox's memory and processes here ({'; '.join(unavailable)}). "
        "Falling back to rlimits: memory is capped per process (RLIMIT_AS), so a program's processes together "
        f"may use more; processes are {processes}. {_FIX[0].upper()}{_FIX[1:]}; pass require_limits=True to "
        "refuse instead of falling back."
    )


@functools.cache
def _warn_once(message: str) -> None:
    """Log `message` as a warning the first time only (many sandboxes share one cause)."""
    logger.warning(message)
