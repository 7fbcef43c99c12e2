"""Bounded-staleness asynchronous training: trained tokens/s at max_staleness k = 0, 1, 2, 4 on the same config.

Every run shares one in-process vLLM engine (started once, outside the measurement, and handed to
`train(..., engine=engine)`) and trains the same tiny model (`--size`) on the same tasks in the
parity environment of the tests (reward: an even-length reply), so a random model gets a learning
signal and every iteration runs a real update. The arms differ only in `schedule.max_staleness = k`:
k = 0 is synchronous, k = 1 one step off, k rollouts up to k policy versions ahead (trainers/producer.py).

Two settings:
- compute-bound: the reply is rewarded at once, so rollouts are pure vLLM work on the same CPU cores
  as the trainer;
- tool latency: each reply waits `--tool-latency` seconds before its reward, like an agent's call to
  a remote sandbox or API, which leaves the cores idle unless the trainer uses them meanwhile.

Measurement: after a burn-in run of each arm (vLLM and torch warm up; discarded), `--rounds` rounds,
round r running every arm once in the order of the arms rotated by r (so no arm always runs first,
or right after the same one, on a machine shared with other work; each run's line shows the
1-minute load average, since other processes on the cores move single runs by 3x). One run = `--iterations`
iterations. Its throughput is trained tokens per second: the sum over its iterations of
`perf/tokens` (the loss tokens of the episodes the trainer updated on: sampled tokens of the fresh
episodes; a skipped batch trains none) over the sum of `time/iteration_s` (the loop's own clock,
from waiting for the batch to logging: the run's wall time without start-up, final checkpoint and
plots). Iterations/s of the same runs is reported too. Per arm: the median, min-max and IQR of the
per-round figures, and the ratio of its median to k = 0's median (goal with tool latency: k = 2 at
>= 1.5). Staleness actually seen, per arm: the policy versions each trained token lags the policy it
trains (`staleness/mean` averaged over iterations, `staleness/max` over the run), and the stale
episodes dropped.

Envelope (a separate, smaller section; compute-bound, one run per algo and k in 0, 2, 4 of the
arms): the importance-ratio envelope P1-P99 that the trainer logs each step, means over the
iterations after the first (the first batch is always fresh): `ratio/p1`, `ratio/p99` (the ratio
the loss used, over all its updates) and `mismatch/token_p1`, `mismatch/token_p99` (trainer vs
engine log-probs before the step's first update: inference mismatch plus staleness), for algo
bypass and alp.

    .venv/bin/python benchmarks/async_train.py [--rounds 3] [--iterations 6] [--size tiny] [--tool-latency 0.5]
        [--arms 0,1,2,4] [--envelope-iterations 6]      # one JSON object on the last line
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from alp_agents import jobs
from alp_agents.engines import VLLMEngine
from alp_agents.tiny import build_tiny_model
from alp_agents.trainers.loop import train
from alp_agents.trainers.run_config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # parity_envs: a reward a random model can earn

ENVELOPE_KEYS = ("ratio/p1", "ratio/p99", "mismatch/token_p1", "mismatch/token_p99")


def config(iterations: int, max_staleness: int, tool_latency_s: float, algo: str = "alp") -> TrainConfig:
    return TrainConfig.model_validate({
        "env": {"id": "parity_envs:Parity-v0", "kwargs": {"latency_s": tool_latency_s}},
        "data": {"train_size": 200, "eval_size": 0},
        "rollout": {"tasks_per_batch": 8, "group_size": 8, "sampling": {"temperature": 1.0, "seed": 0, "stop": ["e", "a", "o"]},
                    "limits": {"max_tokens_per_turn": 48, "max_total_tokens": 1024}},
        "trainer": {"algo": algo, "lr": 1e-5, "micro_batch_size": 16, "updates_per_batch": 4},
        "schedule": {"iterations": iterations, "max_staleness": max_staleness, "eval_every": 0, "checkpoint_every": 0},
    })


def run(model_dir: Path, engine: VLLMEngine, iterations: int, k: int, tool_latency_s: float, algo: str = "alp") -> list[dict[str, Any]]:
    """The metrics rows of one training run's iterations (row 0, the evaluation, left out: it is empty here)."""
    cfg = config(iterations, k, tool_latency_s, algo)
    train_tasks, _ = jobs.load_tasks(cfg.data)
    with tempfile.TemporaryDirectory() as run_dir:
        rows = train(cfg, run_dir, env_factory=jobs.env_factory(cfg.env), model_dir=model_dir, train_tasks=train_tasks, eval_tasks=[],
                     engine=engine, progress=False)
    return [row for row in rows if row["iteration"] > 0]


def run_figures(rows: list[dict[str, Any]]) -> dict[str, float]:
    seconds = sum(row["time/iteration_s"] for row in rows)
    return {"tokens_per_s": sum(row.get("perf/tokens", 0.0) for row in rows) / seconds, "iterations_per_s": len(rows) / seconds,
            "seconds": seconds}


def spread(values: list[float], digits: int) -> dict[str, Any]:
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits), "max": round(max(values), digits),
            "iqr": [round(quartiles[0], digits), round(quartiles[2], digits)], "rounds": [round(v, digits) for v in values]}


def staleness(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Staleness of the trained tokens over a run, and what the loop dropped or skipped."""
    return {"mean": round(sum(row["staleness/mean"] for row in rows) / len(rows), 3),
            "max": max(row["staleness/max"] for row in rows),
            "stale_episodes_dropped": int(sum(row["train/stale_episodes"] for row in rows)),
            "skipped_batches": int(sum(row["train/skipped_batch"] for row in rows))}


def compare(model_dir: Path, engine: VLLMEngine, args: argparse.Namespace, arms: list[int], tool_latency_s: float) -> dict[str, Any]:
    """Burn-in, then `args.rounds` rounds of every arm in a rotated order; per-arm spreads and ratios of medians to k = 0."""
    label = f"tool latency {tool_latency_s}s" if tool_latency_s else "compute-bound"
    for k in arms:  # burn-in, discarded
        run(model_dir, engine, 2, k, tool_latency_s)
    runs: dict[int, list[list[dict[str, Any]]]] = {k: [] for k in arms}
    for r in range(args.rounds):
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for k in order:
            rows = run(model_dir, engine, args.iterations, k, tool_latency_s)
            runs[k].append(rows)
            figures = run_figures(rows)
            print(f"[{label}] round {r} k={k}: {figures['tokens_per_s']:.1f} trained tok/s, {figures['iterations_per_s']:.3f} it/s, "
                  f"staleness {staleness(rows)['mean']}, load average {os.getloadavg()[0]:.1f}", flush=True)
    per_arm: dict[str, Any] = {}
    for k in arms:
        figures = [run_figures(rows) for rows in runs[k]]
        all_rows = [row for rows in runs[k] for row in rows]
        phases = {f"{phase}_s": round(sum(row[f"time/{phase}_s"] for row in all_rows) / len(all_rows), 3)
                  for phase in ("iteration", "rollout", "collect", "train", "sync")}
        per_arm[f"k{k}"] = {"tokens_per_s": spread([f["tokens_per_s"] for f in figures], 1),
                            "iterations_per_s": spread([f["iterations_per_s"] for f in figures], 4),
                            "mean_phase_s": phases, "staleness": staleness(all_rows)}
    result: dict[str, Any] = {"tool_latency_s": tool_latency_s, "arms": per_arm}
    if 0 in arms:
        base_tok, base_it = per_arm["k0"]["tokens_per_s"]["median"], per_arm["k0"]["iterations_per_s"]["median"]
        result["median_tokens_per_s_over_k0"] = {f"k{k}": round(per_arm[f"k{k}"]["tokens_per_s"]["median"] / base_tok, 3) for k in arms}
        result["median_iterations_per_s_over_k0"] = {f"k{k}": round(per_arm[f"k{k}"]["iterations_per_s"]["median"] / base_it, 3)
                                                     for k in arms}
    return result


def envelope(model_dir: Path, engine: VLLMEngine, iterations: int, arms: list[int]) -> dict[str, Any]:
    """Ratio percentiles (means over iterations after the first) and staleness, one compute-bound run per algo and k."""
    result: dict[str, Any] = {}
    for algo in ("bypass", "alp"):
        for k in [k for k in (0, 2, 4) if k in arms]:
            rows = run(model_dir, engine, iterations, k, 0.0, algo)
            later = [row for row in rows[1:] if "ratio/p1" in row] or [row for row in rows if "ratio/p1" in row]
            figures = {key: round(sum(row[key] for row in later) / len(later), 4) if later else None for key in ENVELOPE_KEYS}
            figures["ratio_max"] = round(max(row["ratio/max"] for row in later), 4) if later else None
            figures["staleness"] = staleness(rows)
            result[f"{algo}_k{k}"] = figures
            print(f"[envelope] {algo} k={k}: {figures}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=6, help="iterations per run")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--tool-latency", type=float, default=0.5, help="seconds each reply waits in the second setting")
    parser.add_argument("--arms", default="0,1,2,4", help="values of schedule.max_staleness, comma-separated")
    parser.add_argument("--envelope-iterations", type=int, default=6, help="iterations per envelope run (0: no envelope section)")
    parser.add_argument("--settings", default="compute,tool", help="which settings to run: compute, tool or both")
    args = parser.parse_args()
    arms = [int(k) for k in args.arms.split(",")]
    settings = args.settings.split(",")
    started = time.perf_counter()
    figures: dict[str, Any] = {"benchmark": "async_train", "model": args.size, "rounds": args.rounds, "iterations": args.iterations,
                               "arms": arms, "throughput": "trained tokens/s = sum perf/tokens / sum time/iteration_s per run"}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", size=args.size)
        engine = asyncio.run(VLLMEngine.start(model_dir))
        try:
            if "compute" in settings:
                figures["compute_bound"] = compare(model_dir, engine, args, arms, 0.0)
            if "tool" in settings:
                figures["tool_latency"] = compare(model_dir, engine, args, arms, args.tool_latency)
            if args.envelope_iterations:
                figures["envelope"] = envelope(model_dir, engine, args.envelope_iterations, arms)
        finally:
            asyncio.run(engine.close())
    figures["total_s"] = round(time.perf_counter() - started, 1)
    figures["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)  # other work on the machine moves single runs
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
