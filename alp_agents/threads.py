"""WorkerThreads: bounded pools of daemon threads for the blocking calls of asyncio code."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class WorkerThreads:
    """A bounded pool of daemon threads that runs blocking calls for asyncio code.

    Like `asyncio.to_thread`, but apart from the loop's default executor, so that calls which may
    hang (a tool) or wait long (grading) cannot starve the rest of the program (the trainer step).
    A call waits in a queue while every thread is busy; cancelling it there (a timeout) drops it.
    The threads are daemons because a hung call can never be joined: `ThreadPoolExecutor` would
    join it at exit, and the process would never end.
    """

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._started = 0

    async def run(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`function(*args, **kwargs)` in one of the threads (in a copy of the caller's context, as
        `asyncio.to_thread` does); the loop runs on meanwhile."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((future, functools.partial(contextvars.copy_context().run, function, *args, **kwargs)))
        self._ensure_thread()
        return await asyncio.wrap_future(future)

    def _ensure_thread(self) -> None:
        if self._idle.acquire(blocking=False):  # an idle thread will take the job
            return
        with self._lock:
            if self._started < self.size:
                self._started += 1
                threading.Thread(target=self._work, name=f"{self.name}-{self._started}", daemon=True).start()

    def _work(self) -> None:
        while True:
            future, call = self._jobs.get()
            if future.set_running_or_notify_cancel():  # False: cancelled while it waited in the queue
                try:
                    future.set_result(call())
                except BaseException as error:  # noqa: BLE001 - handed to the awaiting caller
                    future.set_exception(error)
            self._idle.release()
