"""Ctrl-C and SIGTERM during a run: the first stops the loop at its next safe point, a second ends the process at once.

    stop = StopSignals(asyncio.get_running_loop())
    batch = await until_stopped(producer.batch(n), stop.event)    # StopRequested once a signal came
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable
from typing import TypeVar

import psutil

from alp_agents.reaper import kill

T = TypeVar("T")


class StopRequested(Exception):
    """Raised inside the loop when SIGINT/SIGTERM arrives; the loop checkpoints and raises alp_agents.errors.Interrupted."""


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
