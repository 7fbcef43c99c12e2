"""One-step-off asynchronous training vs synchronous, iterations per second on the same config.

Both runs share one in-process vLLM engine (started once, outside the measurement) and train the
same tiny model on the same tasks, in the parity environment of the tests (reward: an even-length
reply), so a random model gets a learning signal and every iteration runs a real update; the async
run generates iteration n+1's rollouts while the trainer updates on iteration n. Burn-in: one
iteration of each mode first (vLLM and torch warm up).

Two settings, each measured sync then async:
- compute-bound: the reply is rewarded at once, so rollouts are pure vLLM work on the same CPU cores
  as the trainer;
- tool latency: each reply waits `--tool-latency` seconds before its reward, like an agent's call to
  a remote sandbox or API, which leaves the cores idle unless the trainer uses them meanwhile.
The figure is iterations/s of the async run / iterations/s of the sync run (goal >= 1.3), from the
loop's own `time/iteration_s`, with each run's mean seconds per iteration in rollouts (waiting for
them, when async), update and weight sync.

    .venv/bin/python benchmarks/async_train.py [--iterations 6] [--size tiny] [--tool-latency 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

from alp_agents import jobs
from alp_agents.engines import VLLMEngine
from alp_agents.tiny import build_tiny_model
from alp_agents.trainers.loop import train
from alp_agents.trainers.run_config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # parity_envs: a reward a random model can earn


def config(iterations: int, async_rollouts: bool, tool_latency_s: float) -> TrainConfig:
    return TrainConfig.model_validate({
        "env": {"id": "parity_envs:Parity-v0", "kwargs": {"latency_s": tool_latency_s}},
        "data": {"train_size": 200, "eval_size": 0},
        "rollout": {"tasks_per_batch": 8, "group_size": 8, "sampling": {"temperature": 1.0, "seed": 0, "stop": ["e", "a", "o"]},
                    "limits": {"max_turns": 1, "max_tokens_per_turn": 48, "max_total_tokens": 1024}},
        "trainer": {"algo": "alp", "lr": 1e-5, "micro_batch_size": 16, "updates_per_batch": 4},
        "schedule": {"iterations": iterations, "async_rollouts": async_rollouts, "eval_every": 0, "checkpoint_every": 0},
    })


def timed_run(model_dir: Path, engine: VLLMEngine, iterations: int, async_rollouts: bool, tool_latency_s: float) -> dict[str, float]:
    """Seconds per iteration of a run (the loop's own evaluation is off), and the mean of its phases."""
    cfg = config(iterations, async_rollouts, tool_latency_s)
    train_tasks, _ = jobs.load_tasks(cfg.data)
    with tempfile.TemporaryDirectory() as run_dir:
        rows = train(cfg, run_dir, env_factory=jobs.env_factory(cfg.env), model_dir=model_dir, train_tasks=train_tasks, eval_tasks=[],
                     engine=engine, progress=False)
    # time/iteration_s: rollouts (or waiting for them) to logging, without the plots drawn once at the end
    phases = ("iteration", "rollout", "train", "sync")
    return {f"{phase}_s": round(sum(row[f"time/{phase}_s"] for row in rows[1:]) / iterations, 3) for phase in phases}


def compare(model_dir: Path, engine: VLLMEngine, iterations: int, tool_latency_s: float) -> dict[str, object]:
    timed_run(model_dir, engine, 1, False, tool_latency_s)  # burn-in
    timed_run(model_dir, engine, 2, True, tool_latency_s)
    sync = timed_run(model_dir, engine, iterations, False, tool_latency_s)
    async_ = timed_run(model_dir, engine, iterations, True, tool_latency_s)
    return {"tool_latency_s": tool_latency_s, "sync": sync, "async": async_,
            "async_over_sync_iterations_per_s": round(sync["iteration_s"] / async_["iteration_s"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--tool-latency", type=float, default=0.5, help="seconds each reply waits in the second setting")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", size=args.size)
        engine = asyncio.run(VLLMEngine.start(model_dir))
        try:
            compute_bound = compare(model_dir, engine, args.iterations, 0.0)
            tool_latency = compare(model_dir, engine, args.iterations, args.tool_latency)
        finally:
            asyncio.run(engine.close())
    print(json.dumps({"benchmark": "async_train", "model": args.size, "iterations": args.iterations,
                      "compute_bound": compute_bound, "tool_latency": tool_latency}))


if __name__ == "__main__":
    main()
