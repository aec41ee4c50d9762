"""``agent_client.backoff``: the pure generator of reconnection delays."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from agent_client import Agent
from agent_client.backoff import backoff


class BoundsRecorder(random.Random):
    """A seeded ``Random`` that also records the window each delay was drawn from."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.windows: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.windows.append((a, b))
        return super().uniform(a, b)


def take(n: int, gen: object) -> list[float]:
    return list(itertools.islice(gen, n))  # type: ignore[call-overload]


def test_delays_stay_within_quarter_initial_and_ceiling() -> None:
    initial, maximum = 0.5, 30.0
    delays = take(500, backoff(initial, maximum, rng=random.Random(7)))
    ceilings = [min(maximum, initial * 2**n) for n in range(500)]
    for n, (delay, ceiling) in enumerate(zip(delays, ceilings, strict=True)):
        assert initial / 4 <= delay <= ceiling, (n, delay, ceiling)
    # Jitter really spreads the delays: not all at one end of the window.
    late = delays[20:]
    assert min(late) < maximum / 2 < max(late)


def test_ceiling_doubles_up_to_maximum() -> None:
    rng = BoundsRecorder(1)
    take(9, backoff(1.0, 20.0, rng=rng))
    assert rng.windows == [(0.25, c) for c in (1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0, 20.0, 20.0)]


def test_factor_sets_the_growth() -> None:
    rng = BoundsRecorder(2)
    take(5, backoff(0.1, 10.0, factor=3.0, rng=rng))
    ceilings = [b for _, b in rng.windows]
    assert ceilings == pytest.approx([0.1, 0.3, 0.9, 2.7, 8.1])


def test_factor_one_is_a_constant_window() -> None:
    rng = BoundsRecorder(3)
    take(4, backoff(2.0, 5.0, factor=1.0, rng=rng))
    assert rng.windows == [(0.5, 2.0)] * 4


def test_initial_equal_to_maximum_is_allowed() -> None:
    delays = take(20, backoff(1.0, 1.0, rng=random.Random(4)))
    assert all(0.25 <= d <= 1.0 for d in delays)


def test_seeded_rng_is_deterministic() -> None:
    a = take(50, backoff(0.05, 3.0, rng=random.Random(1234)))
    b = take(50, backoff(0.05, 3.0, rng=random.Random(1234)))
    c = take(50, backoff(0.05, 3.0, rng=random.Random(4321)))
    assert a == b
    assert a != c


def test_generator_never_ends() -> None:
    gen = backoff(0.01, 0.02, rng=random.Random(5))
    assert len(take(10_000, gen)) == 10_000
    assert next(gen) <= 0.02


def test_default_rng_works() -> None:
    delays = take(10, backoff(0.2, 1.0))
    assert all(0.05 <= d <= 1.0 for d in delays)


@pytest.mark.parametrize(
    ("initial", "maximum", "factor"),
    [
        (0, 1.0, 2.0),
        (-1.0, 1.0, 2.0),
        (2.0, 1.0, 2.0),
        (0.5, 30.0, 0.5),
        (0.5, 30.0, 0.0),
        (math.nan, 1.0, 2.0),
        (0.5, math.nan, 2.0),
        (0.5, 30.0, math.nan),
        (0.5, math.inf, 2.0),
    ],
)
def test_bad_arguments_raise_value_error_at_call(
    initial: float, maximum: float, factor: float
) -> None:
    # Eagerly, at the call: a generator that only fails on its first next()
    # would let a misconfigured Agent start and die at its first reconnect.
    with pytest.raises(ValueError):
        backoff(initial, maximum, factor)


@pytest.mark.parametrize(("initial", "maximum"), [(0, 1.0), (2.0, 1.0), (-0.1, 5.0)])
def test_agent_rejects_bad_backoff_settings_at_construction(
    initial: float, maximum: float
) -> None:
    with pytest.raises(ValueError):
        Agent("ws://127.0.0.1:1/ws", "a1", backoff_initial=initial, backoff_max=maximum)
