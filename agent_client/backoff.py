"""Reconnection delays: exponential backoff with full jitter, as a pure generator."""

from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["backoff"]


def backoff(
    initial: float = 0.5,
    maximum: float = 30.0,
    factor: float = 2.0,
    rng: random.Random | None = None,
) -> Iterator[float]:
    """Yield delays in ``[0, min(maximum, initial * factor**n)]`` (full jitter).

    Full jitter spreads the reconnections of many agents after a hub restart
    over the whole window instead of synchronised waves.
    """
    if initial <= 0 or maximum < initial or factor < 1:
        raise ValueError("need 0 < initial <= maximum and factor >= 1")
    uniform = (rng or random.Random()).uniform
    ceiling = initial
    while True:
        yield uniform(initial / 4, ceiling)
        ceiling = min(maximum, ceiling * factor)
