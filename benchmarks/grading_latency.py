"""Benchmark: latency of math grading under concurrency, with a few pathological answers in the mix.

Many threads (rollout workers, reward functions) grade at once. Most answers are ordinary; a few are
pathological (`9^{9^{9^9}}`, `(x+1)^{100000}`) and can only end by hitting the timeout. The question is
whether an ordinary check waits behind them. Each check is timed from call to return in its own thread.

Graders, each over the same shuffled mix in the same run:
- ours: `alp_agents.envs.grading.is_equivalent`, called from `threads` threads;
- before (optional): the same function from an older commit of `envs/grading.py`, loaded as a separate module
  with its own worker pool (its workers import that module, so its pool code runs on both sides);
- math_verify: `verify(parse(gold), parse(pred))`. Its timeouts use `signal.alarm`, which works only on a
  process's main thread, so it runs in a pool of `threads` processes (each check on a process's main
  thread), submitted from `threads` threads; its latency includes the hand-off to the process.

Figures per grader: p50 / p99 / max latency of ordinary and of pathological checks, checks/s over the mix,
and how many ordinary checks were wrong (a check that timed out is wrong). Stages: burn-in (imports,
worker start, untimed), then the measured mix. The last line printed is one JSON object.

    .venv/bin/python benchmarks/grading_latency.py [--checks 400] [--threads 8] [--before ea3d437]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import multiprocessing
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 2.0  # the default of `is_equivalent`; Math-Verify gets the same (its alarm takes whole seconds)
BEFORE_REF = "ea3d437"  # envs/grading.py before issue 14: one queue for every job, restarts paid by the next caller

# (pred, gold, equivalent): ordinary answers, about half of which need a sympy worker.
ORDINARY = [
    ("\\sqrt{8}", "2\\sqrt{2}", True),
    ("(x+1)^2", "x^2+2x+1", True),
    ("\\frac{\\pi}{3}", "\\frac{2\\pi}{6}", True),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True),
    ("x^2-1", "(x-1)(x+1)", True),
    ("\\sqrt{12}", "2\\sqrt{3}", True),
    ("\\frac{3+\\sqrt{5}}{2}", "\\frac{6+2\\sqrt{5}}{4}", True),
    ("3\\pi", "\\pi+2\\pi", True),
    ("2^{10}", "1024", True),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True),
    ("(x+1)^2", "x^2+1", False),
    ("\\sqrt{8}", "3\\sqrt{2}", False),
    ("\\frac{\\pi}{4}", "\\frac{\\pi}{3}", False),
    ("18", "18", True),
    ("1,000", "1000", True),
    ("\\frac12", "0.5", True),
    ("[1,2)", "[1,2)", True),
    ("\\text{(B)}", "B", True),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("-3", "3", False),
    ("\\text{East}", "east", True),
    ("(1,2]", "(1,2)", False),
]
# (pred, gold) that no grader decides within the timeout. The last one passes our cheap bounds (so it
# reaches an ordinary worker) and is only slow because the two are equal: sympy expands both.
PATHOLOGICAL = [
    ("9^{9^{9^9}}", "x^2+1"),
    ("(x+1)^{100000}-x", "x^2+1"),
    ("100000000!", "x^2+1"),
    ("1e999999999", "x^2+1"),
    ("10^{10^{10}} + x^{x^{x^{x}}}", "x^2+1"),
    ("(x+y+z)^{200}", "(x+y+z)^{198}(x^2+y^2+z^2+2xy+2xz+2yz)"),
]

Grader = Callable[[str, str, float], bool]
Check = tuple[str, str, bool, bool]  # pred, gold, expected verdict, pathological


def build_mix(checks: int, pathological_share: float, seed: int) -> list[Check]:
    if not 0 <= pathological_share < 1:
        raise ValueError(f"pathological_share must be in [0, 1), got {pathological_share!r}")
    rng = random.Random(seed)
    bad = round(checks * pathological_share)
    mix = [(pred, gold, False, True) for pred, gold in (PATHOLOGICAL * bad)[:bad]]
    mix += [(*rng.choice(ORDINARY), False) for _ in range(checks - bad)]
    rng.shuffle(mix)
    return mix


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def _summary(latencies: list[float]) -> dict[str, float]:
    return {"p50_s": round(_percentile(latencies, 0.5), 3), "p99_s": round(_percentile(latencies, 0.99), 3),
            "max_s": round(max(latencies, default=float("nan")), 3)}


def measure(grader: Grader, mix: list[Check], threads: int) -> dict[str, object]:
    """Grade `mix` from `threads` threads; latency of each check from call to return in its thread."""

    def timed(check: Check) -> tuple[float, bool]:
        pred, gold, expected, _ = check
        start = time.perf_counter()
        verdict = grader(pred, gold, TIMEOUT_S)
        return time.perf_counter() - start, verdict == expected

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as executor:
        results = list(executor.map(timed, mix))
    seconds = time.perf_counter() - start
    ordinary = [latency for (latency, _), check in zip(results, mix) if not check[3]]
    pathological = [latency for (latency, _), check in zip(results, mix) if check[3]]
    return {
        "ordinary": _summary(ordinary),
        "pathological": _summary(pathological),
        "checks_per_s": round(len(mix) / seconds, 1),
        "ordinary_wrong": sum(not right for (_, right), check in zip(results, mix) if not check[3]),
    }


def _burn_in(grader: Grader, threads: int) -> None:
    """Start every worker or process before timing (imports and process start are not the steady state)."""
    with ThreadPoolExecutor(max_workers=threads) as executor:
        list(executor.map(lambda pair: grader(pair[0], pair[1], TIMEOUT_S), ORDINARY[:threads] * 2))


# ---------------------------------------------------------------------------------------------
# The graders
# ---------------------------------------------------------------------------------------------


def _ours() -> Grader:
    from alp_agents.envs.grading import is_equivalent

    return lambda pred, gold, timeout_s: is_equivalent(pred, gold, timeout_s=timeout_s)


def _wait_until_warm(seconds: float = 120) -> None:
    """Our pool starts its spare workers in the background: measure once all of them are up."""
    from alp_agents.envs import grading

    lanes = (grading._pool().ordinary, grading._pool().slow)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(len(lane.idle) < lane.warm for lane in lanes):
        time.sleep(0.1)


def _load_before(ref: str, directory: Path) -> ModuleType:
    """`envs/grading.py` at `ref` as a module of its own, whose workers import that module too."""
    source = subprocess.run(["git", "show", f"{ref}:envs/grading.py"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    (directory / "_grading_before.py").write_text(source, encoding="utf-8")
    sys.path.insert(0, str(directory))  # the workers inherit sys.path through PYTHONPATH
    spec = importlib.util.spec_from_file_location("_grading_before", directory / "_grading_before.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["_grading_before"] = module
    spec.loader.exec_module(module)
    from alp_agents.envs import grading  # its workers skip the package's heavy __init__: so do the old ones here

    module._WORKER_MAIN = grading._WORKER_MAIN.replace("alp_agents.envs.grading import", "_grading_before import")
    assert module._WORKER_MAIN != grading._WORKER_MAIN
    return module


def _math_verify_check(pred: str, gold: str, timeout_s: float) -> bool:
    """One Math-Verify check on the main thread of a pool process (where `signal.alarm` works)."""
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # it logs every timeout
    seconds = max(1, round(timeout_s))
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=seconds)
    return bool(verify(gold_parsed, parse(f"\\boxed{{{pred}}}", parsing_timeout=seconds), timeout_seconds=seconds))


def _math_verify(executor: ProcessPoolExecutor) -> Grader:
    return lambda pred, gold, timeout_s: executor.submit(_math_verify_check, pred, gold, timeout_s).result()


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def latency_figures(
    threads: int = 8, pathological_share: float = 0.05, checks: int = 400, seed: int = 0, before: str | None = None
) -> dict[str, object]:
    """Latency figures of ours, Math-Verify and (when `before` names a git commit) our grader at that commit."""
    if threads < 1 or checks < 1:
        raise ValueError(f"threads and checks must be positive, got threads={threads}, checks={checks}")
    mix = build_mix(checks, pathological_share, seed)
    figures: dict[str, object] = {"threads": threads, "checks": checks, "pathological_share": pathological_share,
                                  "timeout_s": TIMEOUT_S}
    graders: list[tuple[str, Grader]] = [("ours", _ours())]
    # spawn, not fork: this process has threads (our pool's), and a forked child could inherit a held lock
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as directory, ProcessPoolExecutor(threads, mp_context=spawn) as processes:
        if before is not None:
            old = _load_before(before, Path(directory))
            graders.append((f"before_{before}", lambda p, g, t: old.is_equivalent(p, g, timeout_s=t)))
        graders.append(("math_verify", _math_verify(processes)))
        for name, grader in graders:
            _burn_in(grader, threads)
            if name == "ours":
                _wait_until_warm()
            figures[name] = measure(grader, mix, threads)
        if before is not None:
            old._pool().close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checks", type=int, default=400)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--pathological-share", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--before", default=BEFORE_REF, help="git commit of the grader to compare with ('' for none)")
    args = parser.parse_args()
    figures = latency_figures(args.threads, args.pathological_share, args.checks, args.seed, args.before or None)
    for name, value in figures.items():
        if isinstance(value, dict):
            print(f"{name:<20} ordinary {value['ordinary']}  pathological {value['pathological']}  "
                  f"{value['checks_per_s']} checks/s  ordinary wrong {value['ordinary_wrong']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
