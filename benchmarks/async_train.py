"""One-step-off asynchronous training vs synchronous, iterations per second on the same config.

Both runs share one in-process vLLM engine (started once, outside the measurement) and train the
same tiny model on the same tasks, in the parity environment of the tests (reward: an even-length
reply), so a random model gets a learning signal and every iteration runs a real update; the async run generates iteration n+1's rollouts while the trainer
updates on iteration n. Burn-in: one iteration of each mode first (vLLM and torch warm up). The
figure is iterations/s of the async run / iterations/s of the sync run (goal >= 1.3).

    .venv/bin/python benchmarks/async_train.py [--iterations 6] [--size tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from alp_agents import jobs
from alp_agents.engines import VLLMEngine
from alp_agents.tiny import build_tiny_model
from alp_agents.trainers.loop import train
from alp_agents.trainers.run_config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # parity_envs: a reward a random model can earn


def config(iterations: int, async_rollouts: bool) -> TrainConfig:
    return TrainConfig.model_validate({
        "env": {"id": "parity_envs:Parity-v0"},
        "data": {"train_size": 200, "eval_size": 0},
        "rollout": {"tasks_per_batch": 8, "group_size": 8, "sampling": {"temperature": 1.0, "seed": 0, "stop": ["e", "a", "o"]},
                    "limits": {"max_turns": 1, "max_tokens_per_turn": 48, "max_total_tokens": 1024}},
        "trainer": {"algo": "alp", "lr": 1e-5, "micro_batch_size": 16, "updates_per_batch": 4},
        "schedule": {"iterations": iterations, "async_rollouts": async_rollouts, "eval_every": 0, "checkpoint_every": 0},
    })


def timed_run(model_dir: Path, engine: VLLMEngine, iterations: int, async_rollouts: bool) -> float:
    """Seconds per iteration of a run (the loop's own evaluation is off)."""
    cfg = config(iterations, async_rollouts)
    train_tasks, _ = jobs.load_tasks(cfg.data)
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        train(cfg, run_dir, env_factory=jobs.env_factory(cfg.env), model_dir=model_dir, train_tasks=train_tasks, eval_tasks=[],
              engine=engine, progress=False)
        return (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", size=args.size)
        engine = asyncio.run(VLLMEngine.start(model_dir))
        try:
            timed_run(model_dir, engine, 1, False)  # burn-in
            timed_run(model_dir, engine, 2, True)
            sync_s = timed_run(model_dir, engine, args.iterations, False)
            async_s = timed_run(model_dir, engine, args.iterations, True)
        finally:
            asyncio.run(engine.close())
    print(json.dumps({"benchmark": "async_train", "model": args.size, "iterations": args.iterations,
                      "sync_s_per_iteration": round(sync_s, 3), "async_s_per_iteration": round(async_s, 3),
                      "async_over_sync_iterations_per_s": round(sync_s / async_s, 3)}))


if __name__ == "__main__":
    main()
