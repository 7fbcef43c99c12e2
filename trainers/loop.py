"""The RL training loop, top to bottom: a rollout producer runs ahead; the trainer updates, pushes, logs.

    producer (in the background, trainers/producer.py): collect the batch of each iteration n once the
        engine's policy is at most k versions behind the one batch n trains (n - 1), k = schedule.max_staleness
    for iteration n in 1..N:
        batch   = await producer.batch(n)                       # episodes older than k versions are dropped
        metrics = trainer.step(batch)                           # updates_per_batch AdamW steps: policy n-1 -> n
        engine.update_weights(trainer.policy_state_dict(), n)   # episodes in flight go on with the new weights
        producer.advance(n); log the metrics; evaluate and checkpoint now and then

k = 0 is synchronous, k = 1 one step off (batch n+1 is sampled while the trainer updates on batch n),
and every k trades staleness for throughput; the importance ratio against the engine's log-probs is
what ALP corrects. The trainer is anything with `step`, `policy_state_dict` and `save_checkpoint`
(PolicyTrainer): ALPTrainer in one process, a RankZeroTrainer under torchrun, whose calls the other
ranks mirror on their shards of the policy (alp_agents.trainers.distributed).

Failures stay small: a failed episode is dropped from the batch (counted in rollout/failure_rate;
above rollout.warn_failure_rate a warning gives the first error), but a batch or an evaluation whose
episodes ALL failed stops the run with the first error (EpisodesFailed): it would train on nothing.
A batch without any learning signal (every group's rewards equal) is skipped and counted. Ctrl-C
(SIGINT) or SIGTERM cancels the rollouts, evaluation or weight push in flight (an update step, which
cannot be cut safely, finishes first), saves a checkpoint of the last completed iteration, closes the
engine and raises Interrupted; a second signal exits at once. Any other error also saves a checkpoint
of the last completed iteration first, unless it broke the update step itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from alp_agents.chat import load_tokenizer
from alp_agents.engines.base import InferenceEngine
from alp_agents.engines.factory import start_engine
from alp_agents.engines.quantize import engine_view, serving_exact_weights
from alp_agents.errors import EpisodesFailed, Interrupted
from alp_agents.evaluation import rollout_stats
from alp_agents.plots import plot_run
from alp_agents.rollout import EpisodeEnv, collect
from alp_agents.trajectory import Trajectory
from alp_agents.trainers.batch_shaping import BatchFiller, has_learning_signal, overlong_metrics, shape_overlong
from alp_agents.trainers.producer import RolloutBatch, RolloutProducer
from alp_agents.trainers.run_config import TrainConfig
from alp_agents.trainers.run_dir import LoopState, RunDir
from alp_agents.trainers.stopping import StopRequested, StopSignals, until_stopped
from alp_agents.trainers.trainer import ALPTrainer, load_policy

logger = logging.getLogger(__name__)

class PolicyTrainer(Protocol):
    """What the loop needs from a trainer: ALPTrainer in one process, RankZeroTrainer under torchrun."""

    def step(self, trajectories: Sequence[Trajectory]) -> dict[str, float]: ...

    def policy_state_dict(self) -> dict[str, Tensor]: ...

    def save_checkpoint(self, run: RunDir, tokenizer: PreTrainedTokenizerBase, state: LoopState) -> None: ...


def train(cfg: TrainConfig, run_dir: str | Path, *, env_factory: Callable[[], EpisodeEnv], model_dir: str | Path,
          train_tasks: Sequence[Any], eval_tasks: Sequence[Any], resume: bool = False,
          engine: InferenceEngine | None = None, progress: bool = True,
          trainer: PolicyTrainer | None = None) -> list[dict[str, Any]]:
    """Run (or, with `resume`, continue) the RL loop; return the metrics rows logged by this call.

    `engine`: use this running engine instead of starting one (it is left open and its weights changed).
    `trainer`: train this one (e.g. the sharded trainer of torchrun's rank 0), which already holds
    `model_dir`'s weights (and, when resuming, the checkpoint's trainer state); default: an ALPTrainer.
    """
    run = RunDir(run_dir)
    state, trainer_state = LoopState(iteration=0, policy_version=0), None
    if resume:
        model_dir, trainer_state, state = run.load_checkpoint()
        run.truncate_metrics(after_iteration=state.iteration)
    else:
        run.refuse_a_second_run()
    run.write_config(cfg)  # when resuming: the saved one, with the schedule `--set` may have extended
    tokenizer = load_tokenizer(model_dir, cfg.model.chat_template)  # before the policy loads: a bad template fails in a second
    if trainer is None:
        engine_copy = partial(engine_view, quantization=cfg.engine.quantize, dtype=cfg.engine.dtype)
        trainer = ALPTrainer(load_policy(model_dir), cfg.trainer, engine_copy=engine_copy)
        if trainer_state is not None:
            trainer.load_state_dict(trainer_state)
    job = TrainingJob(cfg, run, trainer, tokenizer, env_factory, train_tasks, eval_tasks)
    return asyncio.run(job.run(state, Path(model_dir), engine, progress))


class TrainingJob:
    """One run's pieces, and the loop that drives them (`run`)."""

    def __init__(self, cfg: TrainConfig, run: RunDir, trainer: PolicyTrainer, tokenizer: PreTrainedTokenizerBase,
                 env_factory: Callable[[], EpisodeEnv], train_tasks: Sequence[Any], eval_tasks: Sequence[Any]) -> None:
        self.cfg, self.run_dir, self.trainer, self.tokenizer = cfg, run, trainer, tokenizer
        self.env_factory, self.train_tasks, self.eval_tasks = env_factory, train_tasks, eval_tasks
        self.engine: InferenceEngine
        self.producer: RolloutProducer | None = None
        self.collecting = asyncio.Lock()
        """Held while rollouts are collected: evaluation takes it to switch the engine to the exact weights."""

    async def run(self, state: LoopState, model_dir: Path, given_engine: InferenceEngine | None, progress: bool) -> list[dict[str, Any]]:
        cfg, run, trainer = self.cfg, self.run_dir, self.trainer
        self.engine = await start_engine(cfg.engine, model_dir, seed=cfg.schedule.seed, version=state.policy_version,
                                         context_tokens=cfg.rollout.limits.max_total_tokens, weights=trainer.policy_state_dict,
                                         running=given_engine)
        k = cfg.schedule.max_staleness
        stop = StopSignals(asyncio.get_running_loop())
        rows: list[dict[str, Any]] = []
        updating = False  # the trainer's weights are half-updated only while a step runs
        bar = tqdm(total=cfg.schedule.iterations, initial=state.iteration, desc="train", unit="it", disable=not progress)
        try:
            if state.iteration == 0:
                rows.append({"iteration": 0, "policy_version": 0, **await until_stopped(self.evaluate(state), stop.event)})
                run.log(rows[-1])
            self.producer = RolloutProducer(self.collect_batch, self.collecting, first=state.iteration + 1,
                                            last=cfg.schedule.iterations, version=state.policy_version, max_staleness=k)
            for iteration in range(state.iteration + 1, cfg.schedule.iterations + 1):
                # -- 1) the batch, collected ahead by the producer; episodes past the staleness bound are dropped --
                start = iteration_start = time.perf_counter()
                batch = await until_stopped(self.producer.batch(iteration), stop.event)
                fresh = [t for t in batch.trajectories if state.policy_version - t.policy_version <= k]
                row: dict[str, Any] = {"iteration": iteration, **rollout_metrics(batch.drawn, state.policy_version), **batch.metrics,
                                       **staleness_metrics(fresh, state.policy_version),
                                       "train/stale_episodes": float(len(batch.trajectories) - len(fresh))}
                wait_s = time.perf_counter() - start

                # -- 2) the update (in a thread: the producer keeps collecting meanwhile) ----------------------
                # A signal meanwhile lets the step finish: one cut half-way would leave no consistent state to save.
                start = time.perf_counter()
                updating = True
                if has_learning_signal(fresh) and len(fresh) >= cfg.trainer.updates_per_batch:
                    row.update(await asyncio.to_thread(trainer.step, fresh))
                    row["train/skipped_batch"] = 0.0
                else:
                    row["train/skipped_batch"] = 1.0  # every group's rewards are equal: no advantage, no update
                updating = False
                state = LoopState(iteration=iteration, policy_version=state.policy_version + 1)
                train_s = time.perf_counter() - start

                # -- 3) weight sync: episodes in flight and the next batches sample from the new policy ----------
                start = time.perf_counter()
                if not stop.is_set():  # stopping: the checkpoint holds the new weights, the engine no longer matters
                    with contextlib.suppress(StopRequested):
                        await until_stopped(self.engine.update_weights(trainer.policy_state_dict(), state.policy_version), stop.event)
                sync_s = time.perf_counter() - start

                # -- 4) log, evaluate, checkpoint ------------------------------------------------------------
                sampled = sum(t.num_sampled_tokens for t in batch.drawn)
                row.update({"policy_version": state.policy_version, "time/rollout_s": wait_s, "time/collect_s": batch.collect_s,
                            "time/train_s": train_s, "time/sync_s": sync_s,
                            "perf/rollout_tokens_per_s": sampled / max(batch.collect_s, 1e-9)})
                if not stop.is_set() and self.evaluation_due(iteration):
                    with contextlib.suppress(StopRequested):
                        row.update(await until_stopped(self.evaluate(state), stop.event))
                row["time/iteration_s"] = time.perf_counter() - iteration_start
                run.log(row)
                run.write_samples(iteration, batch.drawn)
                rows.append(row)
                bar.update()
                bar.set_postfix(reward=f"{row['rollout/mean_reward']:.2f}", acc=f"{row['rollout/avg_at_k']:.2f}",
                                tok_s=f"{row['perf/rollout_tokens_per_s']:.0f}", refresh=False)
                if stop.is_set():
                    raise StopRequested
                if iteration == cfg.schedule.iterations or (cfg.schedule.checkpoint_every and iteration % cfg.schedule.checkpoint_every == 0):
                    trainer.save_checkpoint(run, self.tokenizer, state)
                # Only now may batches that need this policy start: with k = 0 the next batch follows the evaluation, as
                # in a synchronous loop, so that a run and its resumed copy sample the same tokens.
                await self.producer.advance(state.policy_version)
        except Exception as error:
            # A Ctrl-C to the whole process group stops vLLM too: its errors are then part of the stop.
            stopping = stop.is_set() or isinstance(error, StopRequested)
            if not updating:
                print(f"\n{stop.name if stopping else type(error).__name__}: saving a checkpoint of iteration {state.iteration} "
                      f"in {run.checkpoint_path}", flush=True)
                trainer.save_checkpoint(run, self.tokenizer, state)
            if not stopping:
                raise
        finally:
            bar.close()
            if self.producer is not None:
                await self.producer.close()
            if given_engine is None:
                await self.engine.close()
            stop.remove()
            run.close()
        plot_run(run.path)
        if stop.signal_number is not None:
            raise Interrupted(f"{stop.name}: stopped after iteration {state.iteration}, checkpoint in {run.checkpoint_path}; "
                              f"continue with `alp train --run-dir {run.path} --resume`", stop.signal_number)
        return rows

    async def collect_batch(self, iteration: int) -> RolloutBatch:
        """The episodes of `iteration`: tasks_per_batch groups, or with dynamic sampling, draws until that many differ."""
        rollout, seed = self.cfg.rollout, self.cfg.schedule.seed
        filler, drawn = BatchFiller.for_rollout(rollout), []
        while not filler.done:
            draw = filler.draws  # 0, then the extra draws of dynamic sampling, each from its own seeded task order
            tasks = tasks_for_iteration(self.train_tasks, iteration, filler.needed, seed=seed + 104_729 * draw)
            episodes = await collect(self.env_factory, tasks, self.engine, self.tokenizer, sampling=rollout.sampling,
                                     group_size=rollout.group_size, limits=rollout.limits, max_concurrency=rollout.max_concurrency,
                                     seed=seed * 100_003 + iteration + 10**7 * draw, progress=False)
            check_failures(episodes, f"iteration {iteration}'s rollouts", warn_above=rollout.warn_failure_rate)
            drawn += episodes
            shaped, _ = shape_overlong(episodes, rollout.overlong, limits=rollout.limits, buffer_fraction=rollout.overlong_buffer_fraction,
                                       penalty_factor=rollout.overlong_penalty_factor)
            filler.add(shaped)  # shaped first: a length penalty can make a group informative
        trajectories = filler.batch()
        return RolloutBatch(trajectories, drawn, {**filler.metrics(), **overlong_metrics(trajectories)})

    async def evaluate(self, state: LoopState) -> dict[str, float]:
        """eval/* statistics of the held-out tasks, sampled from the trainer's exact weights."""
        if not self.eval_tasks:
            return {}
        schedule, rollout = self.cfg.schedule, self.cfg.rollout
        sampling = rollout.sampling.model_copy(update={"temperature": schedule.eval_temperature})
        # Rollouts being collected finish on the rollout weights before evaluation switches them.
        async with self.collecting, serving_exact_weights(self.engine, self.trainer.policy_state_dict, state.policy_version):
            trajectories = await collect(self.env_factory, self.eval_tasks, self.engine, self.tokenizer, sampling=sampling,
                                         group_size=schedule.eval_k, limits=rollout.limits, max_concurrency=rollout.max_concurrency,
                                         seed=10**6 + schedule.seed, progress=False)
        check_failures(trajectories, f"the evaluation at policy version {state.policy_version}", warn_above=rollout.warn_failure_rate)
        return {f"eval/{k}": float(v) for k, v in rollout_stats(trajectories).model_dump().items()}

    def evaluation_due(self, iteration: int) -> bool:
        schedule = self.cfg.schedule
        return iteration == schedule.iterations or bool(schedule.eval_every and iteration % schedule.eval_every == 0)


def tasks_for_iteration(tasks: Sequence[Any], iteration: int, per_batch: int, *, seed: int) -> list[Any]:
    """The tasks of iteration `iteration` (1-based): consecutive slices of a seeded shuffle, reshuffled every epoch.

    A pure function of its arguments, so a resumed run sees exactly the tasks the original would have.
    """
    chosen = []
    for position in range((iteration - 1) * per_batch, iteration * per_batch):
        epoch, index = divmod(position, len(tasks))
        chosen.append(tasks[random.Random(seed * 7919 + epoch).sample(range(len(tasks)), len(tasks))[index]])
    return chosen


def rollout_metrics(trajectories: Sequence[Trajectory], policy_version: int) -> dict[str, float]:
    """rollout/* statistics of a batch, plus staleness: engine versions behind the policy being updated."""
    metrics = {f"rollout/{k}": float(v) for k, v in rollout_stats(trajectories).model_dump().items()}
    lags = [policy_version - t.policy_version for t in trajectories if t.finish_reason != "error" and t.turns]
    metrics["rollout/staleness"] = sum(lags) / max(len(lags), 1)
    return metrics


def staleness_metrics(trained: Sequence[Trajectory], policy_version: int) -> dict[str, float]:
    """How many versions behind the policy being updated its trained tokens were sampled: mean, max, tokens per lag."""
    tokens_at_lag: Counter[int] = Counter()
    for t in trained:
        versions = t.token_policy_versions or [t.policy_version] * len(t.token_ids)  # files from before per-token versions
        tokens_at_lag.update(policy_version - version for mask, version in zip(t.loss_mask, versions) if mask)
    total = sum(tokens_at_lag.values())
    return {
        "staleness/mean": sum(lag * n for lag, n in tokens_at_lag.items()) / max(total, 1),
        "staleness/max": float(max(tokens_at_lag, default=0)),
        **{f"staleness/tokens_at_lag_{lag}": float(n) for lag, n in sorted(tokens_at_lag.items())},
    }


def check_failures(episodes: Sequence[Trajectory], what: str, *, warn_above: float) -> None:
    """Raise EpisodesFailed when every episode failed (a run would train on nothing); warn when more than `warn_above` did."""
    failed = [t for t in episodes if t.finish_reason == "error"]
    if not failed:
        return
    first = failed[0].error or "no error recorded"
    if len(failed) == len(episodes):
        raise EpisodesFailed(f"every episode of {what} failed ({len(failed)} of {len(failed)}); the first error: {first}. "
                             "Fix the environment or its tools (check it with alp_agents.envs.check_env on one task), then rerun")
    if len(failed) / len(episodes) > warn_above:
        logger.warning("%d of %d episodes of %s failed (above rollout.warn_failure_rate = %g); the first error: %s",
                       len(failed), len(episodes), what, warn_above, first)


def held_out_summary(rows: Sequence[dict[str, Any]]) -> str | None:
    """The held-out accuracy at the first and the last evaluation among `rows`, in one line; None if none evaluated."""
    evaluated = [row for row in rows if "eval/avg_at_k" in row]
    if not evaluated:
        return None
    first, last = evaluated[0], evaluated[-1]
    return (f"held-out avg@k {first['eval/avg_at_k']:.3f} at iteration {first['iteration']} -> {last['eval/avg_at_k']:.3f} at iteration "
            f"{last['iteration']} (pass@k {first['eval/pass_at_k']:.3f} -> {last['eval/pass_at_k']:.3f}; every evaluation is in "
            "metrics.jsonl, eval/*)")


def why_never_updated(rows: Sequence[dict[str, Any]]) -> str | None:
    """Why a run's iterations never updated the policy (every batch skipped), or None if one did (or none ran)."""
    iterations = [row for row in rows if row["iteration"] > 0]
    if not iterations or any(row["train/skipped_batch"] == 0 for row in iterations):
        return None
    reward = sum(row["rollout/mean_reward"] for row in iterations) / len(iterations)
    # (A run whose episodes all failed stops at once with EpisodesFailed: it never gets here.)
    cause = (f"no group of episodes had rewards that differ (mean reward {reward:.2f}): the tasks are "
             f"{'too hard' if reward < 0.5 else 'too easy'} for the model, or group_size is too small to tell them apart")
    return f"the policy was never updated in {len(iterations)} iterations: {cause}"
