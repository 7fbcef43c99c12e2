"""Nothing outlives a killed run: a watchdog process ends whatever this process started once it dies.

    reap_children_on_exit()      # before starting vLLM; idempotent, one watchdog per process

vLLM runs its model in EngineCore and Worker processes that nothing ties to their parent: after a
`kill -9` of `alp` they would live on (reparented to init) with gigabytes of memory and a busy CPU.
A clean exit closes them, but a SIGKILL runs no Python. So a small watchdog process, in a session of
its own (a terminal's Ctrl-C does not reach it), notes this process's descendants twice a second;
when its parent is gone it SIGKILLs the ones it noted (checked by start time, so a reused pid is
never hit) and exits. A child started less than half a second before the kill can escape it.

    python -m alp_agents.reaper PARENT_PID     # what reap_children_on_exit runs
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

POLL_S = 0.5

_watchdog: subprocess.Popen[bytes] | None = None


def reap_children_on_exit() -> None:
    """Start this process's watchdog (once): after this process dies, every descendant it had is killed."""
    global _watchdog
    if _watchdog is not None and _watchdog.poll() is None:
        return
    _watchdog = subprocess.Popen([sys.executable, "-m", "alp_agents.reaper", str(os.getpid())], stdin=subprocess.DEVNULL,
                                 start_new_session=True)


def watch(parent_pid: int) -> None:
    """Note `parent_pid`'s descendants until it dies, then kill them."""
    noted: dict[int, psutil.Process] = {}
    while os.getppid() == parent_pid:  # reparented: the parent is gone
        try:
            noted.update({child.pid: child for child in psutil.Process(parent_pid).children(recursive=True) if child.pid != os.getpid()})
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_S)
    kill(list(noted.values()))


def kill(processes: list[psutil.Process]) -> None:
    """SIGKILL each process still running (psutil compares start times, so a reused pid is left alone), and its children."""
    alive = []
    for process in processes:
        try:
            alive += [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
