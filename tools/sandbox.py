"""Run untrusted, model-written Python in a throw-away sandbox, one program per sandbox.

Isolation (the default, `isolation="bwrap"`) uses bubblewrap and the kernel's own mechanisms:

- new PID, network, IPC, UTS and cgroup namespaces: the program sees only its own processes, has
  no network (not even the host's loopback), and when its PID 1 dies the kernel kills the rest;
- a fresh root file system: the Python install, its site-packages and /usr read-only, a private
  /proc and /dev, and an empty size-capped tmpfs at /tmp (the working directory) and /dev/shm
  (a Python install under /tmp, e.g. a CI checkout's virtualenv, is bound inside that tmpfs).
  Nothing else of the host is visible: no /etc, no home directories, no project files;
- the first program inside drops to the unprivileged host uid 65534 with `setpriv` (no
  capabilities, no new privileges). A user namespace alone would not do: run as root, it maps the
  sandbox user onto host uid 0, which may still write /proc/sys;
- no host environment variables (bwrap starts with a minimal environment and clears it again);
- the code travels through a pipe, never the command line (which /proc/*/cmdline would show);
- limits: wall time and CPU time, memory and process count for the whole sandbox (a cgroup v1
  per run; where cgroups are not writable, per-process RLIMIT_AS and RLIMIT_NPROC instead), file
  size (RLIMIT_FSIZE), scratch size, and output (read here in bounded chunks with a deadline; a
  program that writes more than its budget is stopped);
- nothing survives a run: at the end every process in the run's process group, cgroup and PID
  namespace is killed, and the scratch tmpfs disappears with its mount namespace.

Python's start-up (tens of milliseconds) would dominate short programs, so a background thread
keeps `pool_size` sandboxes started and waiting for their code. Each still runs exactly one
program and is then destroyed, so pre-starting costs no isolation.

Without bubblewrap the sandbox refuses to run (SandboxError, saying how to install it), unless the
caller explicitly asks for `isolation="none"`: a plain subprocess with the same limits but no
isolation at all, for trusted code or machines where namespaces are unavailable.

Known limits: there is no seccomp filter, so the program can still call any system call its uid
may (including creating an unprivileged user namespace); the kernel is the boundary.
"""

from __future__ import annotations

import enum
import functools
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

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_CGROUP_PARENT = "alp_agents_sandbox"
_CGROUP_CONTROLLERS = ("memory", "pids")

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

_JOIN_CGROUPS = 'for f in "$1" "$2"; do echo $$ > "$f" || exit 125; done; shift 2; exec "$@"'
"""Shell wrapper that moves itself into the run's memory and pids cgroups, then execs bwrap."""

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
    such as sympy and numpy can be imported). The attribute `cgroups` tells whether memory and
    process limits hold for each sandbox as a whole (per-run cgroups: root and cgroup v1) or only
    per process (rlimits).
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
        if isolation == "bwrap":
            _check_bwrap()
        self.cgroups = _cgroups_available()
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
        )
        self._state = _State.UNOPENED
        self._lock = threading.Lock()
        self._pool: _Pool | None = None

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
        argv = [
            shutil.which("bwrap") or "bwrap",
            *_NAMESPACES,
            "--die-with-parent",
            "--new-session",
            *_root_filesystem(outside_scratch),
            "--proc", "/proc",
            "--dev", "/dev",
            "--perms", "1777", "--size", scratch_bytes, "--tmpfs", "/dev/shm",
            "--perms", "1777", "--size", scratch_bytes, "--tmpfs", _SCRATCH,
            *_read_only_binds(inside_scratch, existing=[_SCRATCH]),  # after the tmpfs, which would hide them
            "--chdir", _SCRATCH,
            "--clearenv",
        ]  # fmt: skip
        for key, value in {**_ENV, "HOME": _SCRATCH}.items():
            argv += ["--setenv", key, value]
        return [*argv, "--", *_DROP_PRIVILEGES, *python]


# ---------------------------------------------------------------------- the pool and one sandbox


class _Launch(BaseModel):
    """How to start one sandbox: fixed for the life of a PythonSandbox."""

    argv: list[str]
    private_scratch: bool
    """Make a host temporary directory for the program to work in (isolation="none")."""
    cgroup_limits: tuple[int, int] | None
    """(memory bytes, max processes) of a per-run cgroup, or None when cgroups are unavailable."""

    def start(self) -> _Sandbox:
        """Start one sandbox; its Python starts up and waits for code on stdin."""
        cgroup = None if self.cgroup_limits is None else _Cgroup(*self.cgroup_limits)
        scratch = tempfile.mkdtemp(prefix="alp-sandbox-") if self.private_scratch else None
        argv = self.argv if cgroup is None else ["/bin/sh", "-c", _JOIN_CGROUPS, "sh", *cgroup.procs_files, *self.argv]
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**_ENV, "HOME": scratch or _SCRATCH},
                cwd=scratch or "/",
                start_new_session=True,
            )
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        return _Sandbox(popen, cgroup, scratch)


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

    def __init__(self, popen: subprocess.Popen[bytes], cgroup: _Cgroup | None, scratch: str | None) -> None:
        self.popen = popen
        self.cgroup = cgroup
        self.scratch = scratch

    def execute(self, code: str, *, timeout_s: float, max_output_chars: int) -> ExecResult:
        """Hand `code` over and collect bounded output until the program ends or the deadline."""
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
        if self.cgroup is not None:
            self.cgroup.remove()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


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
"""Listed one by one: no user namespace, so that the uid drop below is a drop on the host."""

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
def _check_bwrap() -> None:
    """Fail with a clear SandboxError unless bwrap can build the sandbox on this machine."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxError(f"the Python sandbox needs bubblewrap (`bwrap`), which is not installed: {INSTALL_HINT}")
    if os.geteuid() != 0:
        raise SandboxError(
            "the bwrap sandbox must be started as root, so that the program can be moved to the unprivileged "
            f"uid {NOBODY} and into its own cgroup; run as root, or pass isolation='none' to run code without isolation"
        )
    if not os.path.exists(_DROP_PRIVILEGES[0]):
        raise SandboxError(f"{_DROP_PRIVILEGES[0]} is missing: install util-linux (it drops the program's privileges)")
    probe = subprocess.run(
        [bwrap, *_NAMESPACES, "--ro-bind", "/", "/", "--", *_DROP_PRIVILEGES, "/bin/true"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=_ENV,
        timeout=30,
    )
    if probe.returncode != 0:
        message = probe.stderr.decode(errors="replace").strip()
        raise SandboxError(
            f"bubblewrap cannot create the sandbox's namespaces here ({message or f'exit {probe.returncode}'}); "
            "inside a container, allow namespaces (e.g. docker --privileged or a seccomp/apparmor profile "
            "that permits unshare), or pass isolation='none' to run code without isolation"
        )


# ---------------------------------------------------------------------- cgroups (v1)


_cgroup_names = count()


class _Cgroup:
    """One run's memory and pids cgroups: the limits hold for all its processes together."""

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

    @property
    def procs_files(self) -> list[str]:
        """The files a process writes its pid to in order to join."""
        return [str(path / "cgroup.procs") for path in self.dirs]

    def oom_killed(self) -> bool:
        """True when the kernel's OOM killer killed a process of this cgroup."""
        for line in (self.dirs[0] / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value) > 0
        return False

    def kill_all(self) -> None:
        """SIGKILL every process still in the cgroup (it cannot fork past pids.max meanwhile)."""
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


@functools.cache
def _cgroups_available() -> bool:
    """True when this process may create v1 memory and pids cgroups (root, cgroup v1 mounted)."""
    try:
        for controller in _CGROUP_CONTROLLERS:
            parent = _CGROUP_ROOT / controller / _CGROUP_PARENT
            parent.mkdir(exist_ok=True)
            _remove_stale_cgroups(parent)
        _Cgroup(1 << 30, 1).remove()
    except OSError:
        return False
    return True


def _remove_stale_cgroups(parent: Path) -> None:
    """Remove empty cgroups left by processes that died without cleaning up (e.g. SIGKILLed)."""
    for child in parent.iterdir():
        owner = child.name.partition("-")[0]
        if child.is_dir() and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            try:
                child.rmdir()
            except OSError:
                pass  # still has processes: leave it
