"""Rollouts ahead of the trainer, by at most `max_staleness` policy versions: the producer half of the RL loop.

    producer = RolloutProducer(collect_batch, asyncio.Lock(), first=1, last=N, version=0, max_staleness=k)
    batch = await producer.batch(n)          # the batch of iteration n, collected in the background
    ...                                      # the trainer updates policy n-1 -> n, the engine gets it
    await producer.advance(n)                # the engine now samples from policy n

The batch of iteration n trains policy n-1. The producer starts collecting it once the engine holds
policy n-1-k or newer, so no episode of it starts more than k versions behind the policy it trains:
k = 0 is synchronous (batch n is sampled by policy n-1 only, while the trainer waits), k = 1 is one
step off (batch n+1 is sampled while the trainer updates on batch n), and so on. At most k + 1 batches
are collected or waiting at any time: the buffer is bounded by construction. Weights pushed during a
collection reach the episodes in flight (the engine's in-flight update), so one episode may span
versions; the loop drops any episode whose oldest token is older than k versions (`stale_episodes`).

    collect_batch(n) -> RolloutBatch        what the loop gives the producer: collect iteration n's episodes
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from alp_agents.trajectory import Trajectory


@dataclass
class RolloutBatch:
    """The episodes of one iteration."""

    trajectories: list[Trajectory]
    """What the trainer gets: shaped (dynamic sampling, overlong handling), failed episodes left out."""
    drawn: list[Trajectory]
    """Every episode collected for it, failed ones included (rollout metrics, samples/iter_N.jsonl)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The batch shaping's counts (batch/*)."""
    collect_s: float = 0.0
    """Seconds spent collecting it."""


class RolloutProducer:
    """Collects the batch of each iteration in the background, never more than `max_staleness` versions ahead."""

    def __init__(self, collect_batch: Callable[[int], Awaitable[RolloutBatch]], collecting: asyncio.Lock, *, first: int, last: int,
                 version: int, max_staleness: int) -> None:
        """`collecting` is held while a batch is collected: whoever switches the engine's weights for something else
        (evaluation on the exact weights) takes it too."""
        self.max_staleness = max_staleness
        self._collecting = collecting
        self._collect_batch = collect_batch
        self._version = version
        self._advanced = asyncio.Condition()
        self._batches: dict[int, asyncio.Future[RolloutBatch]] = {}
        self._task = asyncio.ensure_future(self._run(first, last))

    async def batch(self, iteration: int) -> RolloutBatch:
        """The batch of `iteration`, once collected; the producer's own error if collecting failed (e.g. no engine left)."""
        ready = self._future(iteration)
        await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            self._task.result()  # raises the error that ended the producer
        return self._batches.pop(iteration).result()

    async def advance(self, version: int) -> None:
        """The engine now samples from policy `version`: batches waiting for it may start."""
        async with self._advanced:
            self._version = version
            self._advanced.notify_all()

    async def close(self) -> None:
        """Cancel the collection in flight (its episodes are lost; a resumed run collects them again)."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self, first: int, last: int) -> None:
        for iteration in range(first, last + 1):
            async with self._advanced:  # batch n trains policy n-1: start it from policy n-1-k at the oldest
                await self._advanced.wait_for(lambda: self._version >= iteration - 1 - self.max_staleness)
            async with self._collecting:
                start = time.perf_counter()
                batch = await self._collect_batch(iteration)
                batch.collect_s = time.perf_counter() - start
            self._future(iteration).set_result(batch)

    def _future(self, iteration: int) -> asyncio.Future[RolloutBatch]:
        return self._batches.setdefault(iteration, asyncio.get_running_loop().create_future())
