"""Reconnection delays: exponential backoff with jitter, as a pure generator."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

__all__ = ["backoff"]


def backoff(
    initial: float = 0.5,
    maximum: float = 30.0,
    factor: float = 2.0,
    rng: random.Random | None = None,
) -> Iterator[float]:
    """Yield delays in ``[initial / 4, min(maximum, initial * factor**n)]`` (jitter).

    Jitter spreads the reconnections of many agents after a hub restart over
    the whole window instead of synchronised waves. Bad arguments raise
    ``ValueError`` here, at the call, not at the first ``next()``.
    """
    # Written so that NaN fails every comparison and is refused too.
    if not (0 < initial <= maximum and math.isfinite(maximum) and factor >= 1):
        raise ValueError("need 0 < initial <= maximum < inf and factor >= 1")
    return _delays(initial, maximum, factor, rng or random.Random())


def _delays(initial: float, maximum: float, factor: float, rng: random.Random) -> Iterator[float]:
    uniform = rng.uniform
    ceiling = initial
    while True:
        yield uniform(initial / 4, ceiling)
        ceiling = min(maximum, ceiling * factor)
