"""The hub's task owner: every background task is spawned here and ended on close."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

__all__ = ["TaskOwner"]

log = structlog.get_logger(__name__)


class TaskOwner:
    """A tracked set of tasks (no fire-and-forget tasks). After :meth:`close`
    began, a spawned task is cancelled before it runs: nothing outlives the hub."""

    __slots__ = ("_closed", "_loop", "_tasks")

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The hub's event loop (cached: ``get_running_loop`` is not free on 3.11)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro, name=name)
        if self._closed:
            task.cancel()
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            exc = task.exception()
            if exc is not None:
                log.error("hub_task_failed", task=task.get_name(), exc_info=exc)

    async def close(self, timeout: float = 5.0) -> None:
        """Cancel every task (and those spawned meanwhile) and wait for them, at most
        ``timeout`` seconds: a task that ignores its cancellation cannot hang close."""
        self._closed = True
        try:
            async with asyncio.timeout(timeout):
                while self._tasks:
                    tasks = list(self._tasks)
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
        except TimeoutError:
            log.error("hub_tasks_stuck", count=len(self._tasks))
