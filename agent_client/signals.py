"""Stopping a long-running program by signal: the first asks, the next ones insist."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

__all__ = ["on_stop_signals"]


def on_stop_signals(loop: asyncio.AbstractEventLoop, first: Callable[[], None],
                    again: Callable[[], None]) -> None:
    """On SIGINT or SIGTERM call ``first()`` (stop gracefully) the first time, and
    ``again()`` (stop now) on every later one. Where the loop cannot handle
    signals (Windows), nothing is installed."""
    received = 0

    def handler() -> None:
        nonlocal received
        received += 1
        (first if received == 1 else again)()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, handler)
