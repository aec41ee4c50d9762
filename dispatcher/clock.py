"""The hub's one wall clock: unix milliseconds, as the store and the wire use them."""

from __future__ import annotations

import time

__all__ = ["now_ms"]


def now_ms() -> int:
    return int(time.time() * 1000)
