"""Throughput of the Python sandbox: isolated runs per second vs a plain `python -c` subprocess.

The baseline is what an unsandboxed code tool does: `subprocess.run([python, "-c", code])` with
this interpreter ("plain"). A second baseline, "bare", starts Python without site imports
(`-I -S`), as the sandbox does, so that the cost of isolation itself can be read off too. All
run the same short program, one after the other (serial) and from 4 threads at once
(concurrent), alternating in rounds so that load from other work on the machine hits them alike;
each figure is the median over rounds. The last line printed is one JSON object.

    python benchmarks/sandbox.py [--runs 100] [--rounds 3] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from alp_agents.tools.sandbox import PythonSandbox

PROGRAM = "print(sum(i * i for i in range(1000)))"
EXPECTED = f"{sum(i * i for i in range(1000))}\n"


def run_plain() -> None:
    """One program in a plain subprocess (no isolation, no limits): what an unsandboxed tool does."""
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60)
    assert done.stdout == EXPECTED, done


def run_bare() -> None:
    """The fastest plain start-up: no site imports (`-I -S`), like the sandbox's interpreter."""
    done = subprocess.run([sys.executable, "-I", "-S", "-c", PROGRAM], capture_output=True, text=True, timeout=60)
    assert done.stdout == EXPECTED, done


def runs_per_second(run_one: Callable[[], None], runs: int, concurrency: int) -> float:
    """Completed runs per second with `concurrency` runs in flight."""
    start = time.perf_counter()
    if concurrency == 1:
        for _ in range(runs):
            run_one()
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            for future in [pool.submit(run_one) for _ in range(runs)]:
                future.result()
    return runs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="runs per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; figures are medians")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    with PythonSandbox() as sandbox:

        def run_isolated() -> None:
            result = sandbox.run(PROGRAM)
            assert result.stdout == EXPECTED and result.exit_code == 0, result

        kinds = {"plain": run_plain, "bare": run_bare, "isolated": run_isolated}
        # burn-in: start the sandbox pool, warm the page cache for every interpreter
        for _ in range(10):
            for run_one in kinds.values():
                run_one()

        figures: dict[str, list[float]] = defaultdict(list)
        for round_ in range(args.rounds):
            for mode, concurrency in (("serial", 1), ("concurrent", args.concurrency)):
                for kind, run_one in kinds.items():
                    rate = runs_per_second(run_one, args.runs, concurrency)
                    figures[f"{kind}_{mode}"].append(rate)
                    print(f"round {round_}: {kind:8s} {mode:10s} {rate:7.1f} runs/s", flush=True)
        cgroups = sandbox.cgroups

    median = {key: statistics.median(rates) for key, rates in figures.items()}
    summary = {
        "benchmark": "sandbox",
        "program": PROGRAM,
        "runs": args.runs,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "cgroups": cgroups,
        **{f"{key}_per_s": round(value, 1) for key, value in median.items()},
        "ratio_serial": round(median["isolated_serial"] / median["plain_serial"], 3),
        "ratio_concurrent": round(median["isolated_concurrent"] / median["plain_concurrent"], 3),
        "ratio_vs_bare_serial": round(median["isolated_serial"] / median["bare_serial"], 3),
        "ratio_vs_bare_concurrent": round(median["isolated_concurrent"] / median["bare_concurrent"], 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
