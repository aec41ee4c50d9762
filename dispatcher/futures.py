"""Futures as the store's one calling convention, and continuing after them.

Every store method returns an :class:`asyncio.Future`: the Redis engine's
resolves when its pipelined reply is read, the in-memory engine's is already
finished when returned. The hub core continues after a store call with
:func:`then`, never by asking which engine it has.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

__all__ = ["StoreFuture", "failed", "resolved", "run_continuation", "then"]

T = TypeVar("T")

log = structlog.get_logger(__name__)


class StoreFuture(asyncio.Future[T]):
    """The future of a store whose answers arrive from a connection (Redis): it can
    hold one continuation from :func:`then`, which the store runs itself, at once,
    as soon as it settles the future (:func:`run_continuation`), instead of one
    event-loop turn later through ``add_done_callback`` (a ``call_soon`` and a
    ``functools.partial`` per store call: ~1.5 µs of the hub's CPU per call,
    benchmark rows "roundtrip 100x10" and "1x100" of the Redis engine). The
    continuation runs where the done-callback would have, only sooner: nothing
    of the same command can run in between either way."""

    # A class attribute until then() sets one: no Python __init__ per future.
    continuation: tuple[Callable[..., None], tuple[Any, ...]] | None = None


def run_continuation(fut: StoreFuture[Any]) -> None:
    """The store settled ``fut``: run the continuation :func:`then` left on it, if any.
    A continuation that raises is logged, and the store's reader goes on."""
    cont = fut.continuation
    if cont is not None:
        fut.continuation = None
        try:
            cont[0](*cont[1], fut)
        except Exception:
            log.exception("store_continuation_failed", continuation=repr(cont[0]))


def then(fut: asyncio.Future[T], fn: Callable[..., None], *args: Any) -> None:
    """Call ``fn(*args, fut)`` once ``fut`` is done.

    The one shortcut of the command path (benchmark rows "roundtrip 100x10" and
    "1x1 p50" of the in-memory engine): a future that is already finished, as
    the in-memory engine's always are, continues at once instead of one
    event-loop turn later through ``add_done_callback``. Same order either
    way: nothing else of this command can run in between.

    The two calls made for every command (``Commands._create`` and
    ``Commands.complete``) spell the ``done()`` test out before calling
    ``then``: the ``*args`` call costs ~0.2 µs a command there (rows
    "roundtrip 1x100" and "100x10"). They continue with the same function
    either way: one path, not a variant.
    """
    if fut.done():
        fn(*args, fut)  # no partial made for the finished case (the hot one)
    elif type(fut) is StoreFuture and fut.continuation is None:
        fut.continuation = (fn, args)  # the store runs it (StoreFuture)
    else:
        fut.add_done_callback(functools.partial(fn, *args) if args else fn)


def resolved(loop: asyncio.AbstractEventLoop, value: T) -> asyncio.Future[T]:
    """A future that already holds ``value``."""
    fut: asyncio.Future[T] = loop.create_future()
    fut.set_result(value)
    return fut


def failed(loop: asyncio.AbstractEventLoop, exc: BaseException) -> asyncio.Future[Any]:
    """A future that already holds ``exc``, marked retrieved: a caller that never
    awaits it (fire and forget) leaves no "never retrieved" log behind."""
    fut: asyncio.Future[Any] = loop.create_future()
    fut.set_exception(exc)
    fut.exception()
    return fut
