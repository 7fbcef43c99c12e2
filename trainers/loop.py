"""The RL training loop, top to bottom: rollouts -> update -> weight sync -> log, every iteration.

    for iteration in 1..N:
        trajectories = collect(this iteration's tasks, group_size episodes each)    # engine: policy v
        metrics      = trainer.step(trajectories)                                   # updates_per_batch AdamW steps
        engine.update_weights(trainer.policy_state_dict(), v + 1)                   # in memory / over HTTP
        log the metrics; evaluate on held-out tasks and checkpoint now and then

With `schedule.async_rollouts`, iteration n+1's rollouts are generated while the trainer updates on
iteration n (one step off: staleness <= 1, recorded in every trajectory's policy_version); the
importance ratio against the engine's log-probs is exactly what ALP corrects.

Under torchrun the loop runs on rank 0 with a `RankZeroTrainer`, whose calls the other ranks mirror
on their shards of the policy (alp_agents.trainers.distributed).

Failures stay small: a failed episode is dropped from the batch (counted in rollout/failure_rate);
a batch without any learning signal (every group's rewards equal) is skipped and counted. Ctrl-C
(SIGINT) or SIGTERM cancels the rollouts, evaluation or weight push in flight (an update step, which
cannot be cut safely, finishes first), saves a checkpoint of the last completed iteration, closes the
engine and raises Interrupted; a second signal exits at once. Any other error also saves a checkpoint
of the last completed iteration first, unless it broke the update step itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import psutil
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from alp_agents.engines import OpenAIServerEngine, VLLMEngine
from alp_agents.engines.base import InferenceEngine
from alp_agents.engines.quantize import FakeQuantizedEngine, engine_view, serving_exact_weights
from alp_agents.errors import Interrupted
from alp_agents.evaluation import rollout_stats
from alp_agents.plots import plot_run
from alp_agents.reaper import kill
from alp_agents.rollout import EpisodeEnv, collect
from alp_agents.trajectory import Trajectory
from alp_agents.trainers.run_config import EngineSection, TrainConfig
from alp_agents.trainers.run_dir import LoopState, RunDir
from alp_agents.trainers.distributed import RankZeroTrainer
from alp_agents.trainers.trainer import ALPTrainer, load_policy

T = TypeVar("T")


class StopRequested(Exception):
    """Raised inside the loop when SIGINT/SIGTERM arrives; the loop checkpoints and raises alp_agents.errors.Interrupted."""


def train(cfg: TrainConfig, run_dir: str | Path, *, env_factory: Callable[[], EpisodeEnv], model_dir: str | Path,
          train_tasks: Sequence[Any], eval_tasks: Sequence[Any], resume: bool = False,
          engine: InferenceEngine | None = None, progress: bool = True,
          sharded_trainer: RankZeroTrainer | None = None) -> list[dict[str, Any]]:
    """Run (or, with `resume`, continue) the RL loop; return the metrics rows logged by this call.

    `engine`: use this running engine instead of starting one (it is left open and its weights changed).
    `sharded_trainer`: on rank 0 of torchrun, the trainer spread over the ranks, already holding
    `model_dir`'s weights (and, when resuming, the checkpoint's trainer state).
    """
    return asyncio.run(_train(cfg, RunDir(run_dir), env_factory, Path(model_dir), train_tasks, eval_tasks, resume, engine, progress,
                              sharded_trainer))


async def _train(cfg: TrainConfig, run: RunDir, env_factory: Callable[[], EpisodeEnv], model_dir: Path,
                 train_tasks: Sequence[Any], eval_tasks: Sequence[Any], resume: bool,
                 given_engine: InferenceEngine | None, progress: bool, sharded_trainer: RankZeroTrainer | None) -> list[dict[str, Any]]:
    # -- state: fresh, or from the last checkpoint ---------------------------------------------------
    state, trainer_state = LoopState(iteration=0, policy_version=0), None
    if resume:
        model_dir, trainer_state, state = run.load_checkpoint()
        run.truncate_metrics(after_iteration=state.iteration)
    else:
        run.write_config(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if sharded_trainer is None:
        model = load_policy(model_dir)
        engine_copy = partial(engine_view, quantization=cfg.engine.quantize, dtype=cfg.engine.dtype)
        trainer: ALPTrainer | RankZeroTrainer = ALPTrainer(model, cfg.trainer, engine_copy=engine_copy)
        if trainer_state is not None:
            trainer.load_state_dict(trainer_state)
    else:
        trainer = sharded_trainer

    def save_checkpoint(state: LoopState) -> None:
        if isinstance(trainer, RankZeroTrainer):  # gathered from the shards of every rank
            trainer.save_checkpoint(run, tokenizer, state)
        else:
            run.save_checkpoint(model, tokenizer, trainer.state_dict(), state)
    engine = given_engine or await start_engine(cfg.engine, model_dir, seed=cfg.schedule.seed, version=state.policy_version)
    if cfg.engine.quantize is not None:
        engine = FakeQuantizedEngine(engine, cfg.engine.quantize)
    if given_engine is not None or cfg.engine.quantize is not None:  # the engine holds other weights, or unquantised ones
        await engine.update_weights(trainer.policy_state_dict(), state.policy_version)

    schedule, rollout = cfg.schedule, cfg.rollout
    sampling = rollout.sampling
    eval_sampling = sampling.model_copy(update={"temperature": schedule.eval_temperature})

    def rollouts(iteration: int) -> Awaitable[list[Trajectory]]:
        tasks = tasks_for_iteration(train_tasks, iteration, rollout.tasks_per_batch, seed=schedule.seed)
        return collect(env_factory, tasks, engine, tokenizer, sampling=sampling, group_size=rollout.group_size,
                       limits=rollout.limits, max_concurrency=rollout.max_concurrency, seed=schedule.seed * 100_003 + iteration,
                       progress=False)

    async def evaluate() -> dict[str, float]:
        if not eval_tasks:
            return {}
        # Async rollouts of the next batch finish on the rollout weights before evaluation switches them.
        async with serving_exact_weights(engine, trainer.policy_state_dict, state.policy_version, in_flight=pending):
            trajectories = await collect(env_factory, eval_tasks, engine, tokenizer, sampling=eval_sampling, group_size=schedule.eval_k,
                                         limits=rollout.limits, max_concurrency=rollout.max_concurrency, seed=10**6 + schedule.seed,
                                         progress=False)
        return {f"eval/{k}": float(v) for k, v in rollout_stats(trajectories).model_dump().items()}

    stop = StopSignals(asyncio.get_running_loop())
    rows: list[dict[str, Any]] = []
    pending: asyncio.Task[list[Trajectory]] | None = None
    updating = False  # the trainer's weights are half-updated only while a step runs
    bar = tqdm(total=schedule.iterations, initial=state.iteration, desc="train", unit="it", disable=not progress)
    try:
        if state.iteration == 0:
            rows.append({"iteration": 0, "policy_version": 0, **await until_stopped(evaluate(), stop.event)})
            run.log(rows[-1])
        for iteration in range(state.iteration + 1, schedule.iterations + 1):
            # -- 1) rollouts with the current policy (already running if async) ----------------------
            start = iteration_start = time.perf_counter()
            pending = pending or asyncio.ensure_future(rollouts(iteration))
            trajectories = await until_stopped(pending, stop.event)
            pending = None
            rollout_s = time.perf_counter() - start
            if schedule.async_rollouts and iteration < schedule.iterations:
                pending = asyncio.ensure_future(rollouts(iteration + 1))  # generated while we train
            row: dict[str, Any] = {"iteration": iteration, **rollout_metrics(trajectories, state.policy_version)}

            # -- 2) the update (in a thread: the event loop keeps feeding async rollouts) ----------------
            # A signal meanwhile lets the step finish: one cut half-way would leave no consistent state to save.
            start = time.perf_counter()
            usable = [t for t in trajectories if t.finish_reason != "error"]
            updating = True
            if has_learning_signal(usable) and len(usable) >= cfg.trainer.updates_per_batch:
                row.update(await asyncio.to_thread(trainer.step, usable))
                row["train/skipped_batch"] = 0.0
            else:
                row["train/skipped_batch"] = 1.0  # every group's rewards are equal: no advantage, no update
            updating = False
            state = LoopState(iteration=iteration, policy_version=state.policy_version + 1)
            train_s = time.perf_counter() - start

            # -- 3) weight sync: the engine samples the next rollouts from the new policy ---------------
            start = time.perf_counter()
            if not stop.is_set():  # stopping: the checkpoint holds the new weights, the engine no longer matters
                with contextlib.suppress(StopRequested):
                    await until_stopped(engine.update_weights(trainer.policy_state_dict(), state.policy_version), stop.event)
            sync_s = time.perf_counter() - start

            # -- 4) log, evaluate, checkpoint --------------------------------------------------------
            sampled = sum(t.num_sampled_tokens for t in trajectories)
            row.update({"policy_version": state.policy_version, "time/rollout_s": rollout_s, "time/train_s": train_s,
                        "time/sync_s": sync_s, "perf/rollout_tokens_per_s": sampled / max(rollout_s, 1e-9)})
            if not stop.is_set() and (iteration == schedule.iterations or (schedule.eval_every and iteration % schedule.eval_every == 0)):
                with contextlib.suppress(StopRequested):
                    row.update(await until_stopped(evaluate(), stop.event))
            row["time/iteration_s"] = time.perf_counter() - iteration_start
            run.log(row)
            run.write_samples(iteration, trajectories)
            rows.append(row)
            bar.update()
            bar.set_postfix(reward=f"{row['rollout/mean_reward']:.2f}", acc=f"{row['rollout/avg_at_k']:.2f}",
                            tok_s=f"{row['perf/rollout_tokens_per_s']:.0f}", refresh=False)
            if stop.is_set():
                raise StopRequested
            if iteration == schedule.iterations or (schedule.checkpoint_every and iteration % schedule.checkpoint_every == 0):
                save_checkpoint(state)
    except Exception as error:
        # A Ctrl-C to the whole process group stops vLLM too: its errors are then part of the stop.
        stopping = stop.is_set() or isinstance(error, StopRequested)
        if not updating:
            print(f"\n{stop.name if stopping else type(error).__name__}: saving a checkpoint of iteration {state.iteration} "
                  f"in {run.checkpoint_path}", flush=True)
            save_checkpoint(state)
        if not stopping:
            raise
    finally:
        bar.close()
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        if given_engine is None:
            await engine.close()
        stop.remove()
        run.close()
    plot_run(run.path)
    if stop.signal_number is not None:
        raise Interrupted(f"{stop.name}: stopped after iteration {state.iteration}, checkpoint in {run.checkpoint_path}; "
                          f"continue with `alp train --run-dir {run.path} --resume`", stop.signal_number)
    return rows


class StopSignals:
    """SIGINT and SIGTERM during the loop: the first stops it at the next safe point, a second ends the process at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.event = asyncio.Event()
        self.signal_number: int | None = None
        self._loop = loop
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._received, sig)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number is not None else "stop"

    def is_set(self) -> bool:
        return self.event.is_set()

    def remove(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._loop.remove_signal_handler(sig)

    def _received(self, sig: int) -> None:
        if self.signal_number is not None:
            print(f"\n{signal.Signals(sig).name} again: exiting now, without a checkpoint", flush=True)
            kill(psutil.Process().children(recursive=True))
            os._exit(128 + sig)
        self.signal_number = sig
        self.event.set()
        print(f"\n{self.name}: cancelling the work in flight and saving a checkpoint (send it again to exit at once)", flush=True)


async def start_engine(cfg: EngineSection, model_dir: Path, *, seed: int, version: int) -> InferenceEngine:
    """vLLM servers over HTTP when `cfg.servers` lists any (they get the weights pushed), else vLLM in this process."""
    if cfg.servers:
        engine = OpenAIServerEngine(cfg.servers, timeout_s=cfg.request_timeout_s or 600.0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        await engine.update_weights(model.state_dict(), version)  # the servers may hold other weights
        return engine
    return await VLLMEngine.start(model_dir, seed=seed, dtype=cfg.dtype, request_timeout_s=cfg.request_timeout_s,
                                  weights_timeout_s=cfg.weights_timeout_s, version=version)


async def until_stopped(work: Awaitable[T], stop: asyncio.Event) -> T:
    """Await `work`, unless `stop` is set first: then cancel it and raise StopRequested.

    Stopping wins over the work's own failure: a Ctrl-C to the process group reaches vLLM too, and
    the engine errors that follow are part of the stop, not a fault of their own.
    """
    job = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({job, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if stop.is_set():
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
        raise StopRequested
    return job.result()


def tasks_for_iteration(tasks: Sequence[Any], iteration: int, per_batch: int, *, seed: int) -> list[Any]:
    """The tasks of iteration `iteration` (1-based): consecutive slices of a seeded shuffle, reshuffled every epoch.

    A pure function of its arguments, so a resumed run sees exactly the tasks the original would have.
    """
    chosen = []
    for position in range((iteration - 1) * per_batch, iteration * per_batch):
        epoch, index = divmod(position, len(tasks))
        chosen.append(tasks[random.Random(seed * 7919 + epoch).sample(range(len(tasks)), len(tasks))[index]])
    return chosen


def has_learning_signal(trajectories: Sequence[Trajectory]) -> bool:
    """Whether any group's rewards differ (otherwise every GRPO advantage is zero)."""
    rewards: dict[str, set[float]] = defaultdict(set)
    for t in trajectories:
        rewards[t.group_id].add(t.reward)
    return any(len(values) > 1 for values in rewards.values())


def rollout_metrics(trajectories: Sequence[Trajectory], policy_version: int) -> dict[str, float]:
    """rollout/* statistics of a batch, plus staleness: engine versions behind the policy being updated."""
    metrics = {f"rollout/{k}": float(v) for k, v in rollout_stats(trajectories).model_dump().items()}
    sampled = [t for t in trajectories if t.finish_reason != "error" and t.turns]
    metrics["rollout/staleness"] = sum(policy_version - t.policy_version for t in sampled) / max(len(sampled), 1)
    return metrics


def why_never_updated(rows: Sequence[dict[str, Any]]) -> str | None:
    """Why a run's iterations never updated the policy (every batch skipped), or None if one did (or none ran)."""
    iterations = [row for row in rows if row["iteration"] > 0]
    if not iterations or any(row["train/skipped_batch"] == 0 for row in iterations):
        return None
    reward = sum(row["rollout/mean_reward"] for row in iterations) / len(iterations)
    if all(row["rollout/failure_rate"] == 1 for row in iterations):
        cause = "every episode failed (the error is in samples/iter_N.jsonl; `alp show` prints it)"
    else:
        cause = (f"no group of episodes had rewards that differ (mean reward {reward:.2f}): the tasks are "
                 f"{'too hard' if reward < 0.5 else 'too easy'} for the model, or group_size is too small to tell them apart")
    return f"the policy was never updated in {len(iterations)} iterations: {cause}"
