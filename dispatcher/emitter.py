"""A small event emitter (``on``/``once``/``off``) whose async handlers are owned tasks."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import structlog

__all__ = ["EventEmitter", "Handler"]

log = structlog.get_logger(__name__)

Handler = Callable[..., Any]


class EventEmitter:
    """Node-style emitter. Sync handlers run inline; async ones run as tasks
    this emitter owns, cancelled by :meth:`close`. A failing handler
    is logged and never disturbs the emitter or the other handlers."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[tuple[Handler, bool]]] = {}
        self._handler_tasks: set[asyncio.Task[Any]] = set()

    def on(self, key: str, handler: Handler | None = None) -> Any:
        """Register ``handler`` for ``key``; usable as a decorator when ``handler`` is omitted."""
        if handler is None:
            def decorator(fn: Handler) -> Handler:
                self._listeners.setdefault(key, []).append((fn, False))
                return fn
            return decorator
        self._listeners.setdefault(key, []).append((handler, False))
        return handler

    def once(self, key: str, handler: Handler) -> Handler:
        self._listeners.setdefault(key, []).append((handler, True))
        return handler

    def off(self, key: str, handler: Handler | None = None) -> None:
        """Remove ``handler`` (every handler of ``key`` when omitted)."""
        if handler is None:
            self._listeners.pop(key, None)
            return
        entries = self._listeners.get(key)
        if entries:
            entries[:] = [e for e in entries if e[0] is not handler]
            if not entries:
                del self._listeners[key]

    def listener_count(self, key: str) -> int:
        return len(self._listeners.get(key, ()))

    def emit(self, key: str, *args: Any) -> bool:
        entries = self._listeners.get(key)
        if not entries:
            return False
        if any(once for _, once in entries):
            self._listeners[key] = [e for e in entries if not e[1]]
            if not self._listeners[key]:
                del self._listeners[key]
        for handler, _ in list(entries):
            try:
                out = handler(*args)
            except Exception:
                log.exception("event_handler_failed", key=key)
                continue
            if inspect.isawaitable(out):
                task = asyncio.ensure_future(out)
                self._handler_tasks.add(task)
                task.add_done_callback(self._handler_done)
        return True

    def _handler_done(self, task: asyncio.Task[Any]) -> None:
        self._handler_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event_handler_failed", exc_info=task.exception())

    async def close(self) -> None:
        tasks = list(self._handler_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
