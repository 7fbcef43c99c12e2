"""No head-of-line blocking in the grader's worker pool (issue 14): a check's latency is bounded by its own
timeout whatever other threads send, expensive answers go to a slow lane, the pool's growth is capped and
killed workers are reaped. Margins are wide (a loaded 2-core machine) but fail on the old pool, where an
ordinary check waited 8-10 s behind pathological ones.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import psutil
import pytest

from alp_agents.envs import grading
from alp_agents.envs.grading import is_equivalent

SLACK_S = 1.0  # what a check may take beyond its timeout (kill, thread wake-ups) on a loaded machine
SCREENED = ["9^{9^{9^9}}", "(x+1)^{100000}-x", "100000000!", "1e999999999", "10^{10^{10}} + x^{x^{x^{x}}}"]
# Equal, but sympy expands both (seconds): passes the cheap bounds, so it takes an ordinary worker.
UNSCREENED = ("(x+y+z)^{200}", "(x+y+z)^{198}(x^2+y^2+z^2+2xy+2xz+2yz)")


def _wait_until_warm(seconds: float = 120) -> None:
    """Every warm worker started (they start in the background; the first start is not what is tested)."""
    is_equivalent("\\sqrt{8}", "2\\sqrt{2}")
    is_equivalent("x^{2013} \\cdot x", "x^{2014}")
    lanes = (grading._pool().ordinary, grading._pool().slow)
    deadline = time.monotonic() + seconds
    while any(len(lane.idle) < lane.warm for lane in lanes):
        assert time.monotonic() < deadline, "the grading workers did not start"
        time.sleep(0.1)


def _timed(call: Callable[[], bool]) -> tuple[bool, float]:
    start = time.monotonic()
    verdict = call()
    return verdict, time.monotonic() - start


def _in_background(calls: list[Callable[[], object]]) -> list[threading.Thread]:
    threads = [threading.Thread(target=call, daemon=True) for call in calls]
    for thread in threads:
        thread.start()
    return threads


def _workers() -> list[psutil.Process]:
    """This process's grading workers (pytest has other children; one being killed may be a zombie a moment)."""
    workers = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.ZombieProcess, psutil.NoSuchProcess):
            if "_serve()" in " ".join(child.cmdline()):
                workers.append(child)
    return workers


# ------------------------------------------------------------------------------------------------
# Cheap bounds: which answers go to the slow lane
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", SCREENED + ["x^{2013}", "2^{10^{6}}", "2^{2^{2^{2}}}", "(x+1)^{401}", "20000!", "x" * 301]
)
def test_expensive_looking_answers_go_to_the_slow_lane(text):
    assert grading._looks_expensive(text)


@pytest.mark.parametrize(
    "text",
    ["\\sqrt{8}", "(x+1)^2", "2^{2017}", "\\frac{2^{2011}}{3}", "e^{x^2}", "e^{-x^2/2}", "2^{2^3}", "5!", "1.5e10"],
)
def test_ordinary_answers_stay_in_the_ordinary_lane(text):
    assert not grading._looks_expensive(text)


def test_the_slow_lane_still_decides():
    """Expensive-looking, cheap in fact (a generous timeout: the slow lane runs at low priority on a busy machine)."""
    assert is_equivalent("x^{2013} \\cdot x", "x^{2014}", timeout_s=30)
    assert not is_equivalent("x^{2013} \\cdot x", "x^{2015}", timeout_s=30)


# ------------------------------------------------------------------------------------------------
# Latency: bounded by the check's own timeout, whatever the other threads send
# ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_ordinary_checks_do_not_wait_behind_pathological_ones():
    _wait_until_warm()
    # Six threads of screened inputs (the slow lane has two workers) and stuck ordinary workers (all but one).
    busy = [lambda pred=pred: is_equivalent(pred, "x^2+1", timeout_s=4.0) for pred in SCREENED + SCREENED[:1]]
    busy += [lambda: is_equivalent(*UNSCREENED, timeout_s=4.0)] * (grading._WARM_WORKERS - 1)
    threads = _in_background(busy)
    time.sleep(0.5)  # every one of them has reached a worker or is waiting for one
    ordinary = [("\\sqrt{8}", "2\\sqrt{2}", True), ("x^2-1", "(x-1)(x+1)", True), ("\\sqrt{8}", "3\\sqrt2", False)]
    for pred, gold, expected in ordinary:
        verdict, seconds = _timed(lambda: is_equivalent(pred, gold, timeout_s=2.0))
        assert verdict is expected, (pred, gold)
        assert seconds < 2.0 + SLACK_S, (pred, gold, seconds)
    for thread in threads:
        thread.join()


@pytest.mark.timeout(120)
def test_a_timed_out_check_is_false_within_its_timeout():
    _wait_until_warm()
    verdict, seconds = _timed(lambda: is_equivalent(*UNSCREENED, timeout_s=0.5))
    assert verdict is False
    assert seconds < 0.5 + SLACK_S


@pytest.mark.timeout(120)
def test_waiting_for_a_worker_counts_against_the_timeout():
    _wait_until_warm()
    hogs = _in_background([lambda: is_equivalent("9^{9^{9^9}}", "1", timeout_s=6.0)] * grading._SLOW_LANE_WORKERS)
    time.sleep(0.5)  # every slow-lane worker is taken for 6 s
    verdict, seconds = _timed(lambda: is_equivalent("(x+1)^{100000}-x", "1", timeout_s=0.5))
    assert verdict is False
    assert seconds < 0.5 + SLACK_S  # the old pool waited for a worker first: 6 s and more
    for thread in hogs:
        thread.join()


@pytest.mark.timeout(120)
def test_a_job_past_its_deadline_is_interrupted_and_its_worker_kept():
    """Sympy stuck in Python code ends on SIGUSR1: no kill, no ~1 s restart for the next callers to wait for."""
    _wait_until_warm()
    verdicts: list[bool] = []
    thread = _in_background([lambda: verdicts.append(is_equivalent(*UNSCREENED, timeout_s=1.0))])[0]
    time.sleep(0.5)
    stuck = [worker for worker, since in grading._pool().ordinary.busy.items() if time.monotonic() - since > 0.4]
    thread.join()
    assert verdicts == [False]
    assert len(stuck) == 1 and stuck[0].process.poll() is None
    assert stuck[0] in grading._pool().workers
    assert is_equivalent("\\sqrt{8}", "2\\sqrt{2}")


def test_the_first_start_is_not_counted_in_the_timeout():
    """A fresh process: starting Python and sympy (~1 s) must not turn the first answers into False."""
    code = "from alp_agents.envs.grading import is_equivalent; print(is_equivalent('\\\\sqrt8', '2\\\\sqrt2', timeout_s=0.05))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == ["True"]


# ------------------------------------------------------------------------------------------------
# Processes: growth is capped, killed workers are reaped
# ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_the_pool_grows_while_workers_are_stuck_up_to_its_cap_and_reaps_what_it_kills():
    _wait_until_warm()
    before = {worker.pid for worker in _workers()}
    assert len(before) == grading._WARM_WORKERS + grading._SLOW_LANE_WORKERS
    threads = _in_background([lambda: is_equivalent(*UNSCREENED, timeout_s=3.0)] * 12)
    threads += _in_background([lambda: is_equivalent("9^{9^{9^9}}", "1", timeout_s=3.0)] * 4)
    counts, seen = [], set()
    while any(thread.is_alive() for thread in threads):
        workers = _workers()
        counts.append(len(workers))
        seen |= {worker.pid for worker in workers}
        time.sleep(0.05)
    assert max(counts) > len(before)  # stuck workers made it start more
    assert max(counts) <= grading._POOL_SIZE
    gone = (before | seen) - {worker.process.pid for worker in grading._pool().workers}
    assert gone & before  # the workers that timed out were killed...
    children = {child.pid: child for child in psutil.Process().children()}
    zombies = [pid for pid in gone if pid in children and children[pid].status() == psutil.STATUS_ZOMBIE]
    assert zombies == [] and not gone & set(children)  # ...and reaped
    _wait_until_warm()
    assert len(_workers()) == grading._WARM_WORKERS + grading._SLOW_LANE_WORKERS  # the extra ones retired
