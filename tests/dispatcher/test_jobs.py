"""Jobs: one command on many agents, rolled out in batches (docs/fleets.md).

Real hubs, real agents (``agent_client``) that record every execution, both
engines. The takeover after a hub's death is in ``test_jobs_takeover.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent_client import Agent, CommandError
from dispatcher import (
    AgentOffline,
    CommandInfo,
    Dispatcher,
    JobInfo,
    NoAgentsMatched,
)

from ..conftest import HubFactory, ws_url
from ..support import WAIT

AGENTS = {
    "web-1": {"role": "web", "region": "eu-west"},
    "web-2": {"role": "web", "region": "us-east"},
    "db-1": {"role": "db", "region": "eu-west"},
}


@dataclass
class Fleet:
    """Agents that run ``work``: each run is recorded; ``payload["fail"]`` lists the
    agents that fail; ``gate`` (when set) holds every run until it is set."""

    runs: list[str] = field(default_factory=list)
    running: int = 0
    max_running: int = 0
    gate: asyncio.Event | None = None
    started: asyncio.Queue[str] = field(default_factory=asyncio.Queue)


async def start_fleet(hub: Dispatcher, make_agent: Callable[..., Agent],
                      agents: dict[str, dict[str, Any]]) -> Fleet:
    fleet = Fleet()
    started: list[Agent] = []
    for agent_id, meta in agents.items():
        agent = make_agent(ws_url(hub), agent_id, meta=meta)

        async def work(payload: Any, ctx: Any, agent_id: str = agent_id) -> Any:
            fleet.runs.append(agent_id)
            fleet.started.put_nowait(agent_id)
            fleet.running += 1
            fleet.max_running = max(fleet.max_running, fleet.running)
            try:
                await ctx.progress({"at": agent_id})
                if fleet.gate is not None:
                    await asyncio.wait_for(fleet.gate.wait(), WAIT)
                else:
                    await asyncio.sleep(0.01)  # work long enough to overlap others
                if agent_id in ((payload or {}).get("fail") or ()):
                    raise CommandError("boom", f"{agent_id} failed")
                return {"agent": agent_id}
            finally:
                fleet.running -= 1

        agent.command("work")(work)
        await agent.start()
        started.append(agent)
    for agent in started:
        await agent.wait_connected(WAIT)
    return fleet


async def run_job(hub: Dispatcher, target: Any, payload: Any = None,
                  **kwargs: Any) -> tuple[JobInfo, dict[str, CommandInfo]]:
    handle = hub.execute_on_agents(target, "work", payload, **kwargs)
    results = {}
    async with asyncio.timeout(WAIT):
        async for info in handle.results():
            assert info.agent_id not in results, "a result twice"
            results[info.agent_id] = info
        job = await handle
    return job, results


@pytest.fixture
async def fleet_hub(make_hub: HubFactory,
                    make_agent: Callable[..., Agent]) -> tuple[Dispatcher, Fleet]:
    hub = await make_hub()
    return hub, await start_fleet(hub, make_agent, AGENTS)


async def test_every_target_form(fleet_hub: tuple[Dispatcher, Fleet]) -> None:
    hub, fleet = fleet_hub
    cases: list[tuple[Any, list[str]]] = [
        ("web-1", ["web-1"]),
        (["db-1", "web-2"], ["db-1", "web-2"]),
        ("db-1,web-1", ["db-1", "web-1"]),
        ("web-*", ["web-1", "web-2"]),
        ("*", ["db-1", "web-1", "web-2"]),
        ({"role": "web", "region": "eu*"}, ["web-1"]),
        ("region=eu-*", ["db-1", "web-1"]),
        ("id=web-*,region=us-east", ["web-2"]),
    ]
    for target, expected in cases:
        fleet.runs.clear()
        job, results = await run_job(hub, target)
        assert job.agents == expected, target
        assert sorted(fleet.runs) == sorted(expected), target
        assert {a: r.outcome for a, r in results.items()} == dict.fromkeys(expected, "ok")
        assert all(r.job == job.id and r.result == {"agent": r.agent_id}
                   for r in results.values())
        assert job.status == "COMPLETE" and job.counts["ok"] == len(expected)
        assert job.counts["pending"] == job.counts["active"] == job.counts["skipped"] == 0


async def test_no_agent_matched(fleet_hub: tuple[Dispatcher, Fleet]) -> None:
    hub, _ = fleet_hub
    for target in ("cache-*", {"role": "cache"}, "role=web,region=asia"):
        handle = hub.execute_on_agents(target, "work")
        with pytest.raises(NoAgentsMatched):
            await asyncio.wait_for(handle.resolved(), WAIT)
        with pytest.raises(NoAgentsMatched):
            await asyncio.wait_for(handle, WAIT)
    assert await hub.list_jobs() == []


@pytest.mark.parametrize("batch", [2, "40%"])
async def test_batch_is_never_exceeded(make_hub: HubFactory, make_agent: Callable[..., Agent],
                                       batch: int | str) -> None:
    hub = await make_hub()
    fleet = await start_fleet(hub, make_agent, {f"n-{i}": {} for i in range(5)})
    job, results = await run_job(hub, "n-*", batch=batch)
    assert job.batch == 2
    assert fleet.max_running == 2
    assert sorted(fleet.runs) == [f"n-{i}" for i in range(5)]
    assert [r.outcome for r in results.values()] == ["ok"] * 5


@pytest.mark.parametrize("max_failures", [1, "20%"])
async def test_max_failures_stops_the_rollout(make_hub: HubFactory,
                                              make_agent: Callable[..., Agent],
                                              max_failures: int | str) -> None:
    hub = await make_hub()
    fleet = await start_fleet(hub, make_agent, {f"n-{i}": {} for i in range(6)})
    job, results = await run_job(hub, "n-*", {"fail": ["n-1", "n-2", "n-4"]}, batch=1,
                                 max_failures=max_failures)
    # n-0 ok, n-1 fails (1: not more than 1), n-2 fails (2 > 1): nothing starts after.
    assert job.max_failures == 1
    assert fleet.runs == ["n-0", "n-1", "n-2"]
    assert {a: r.outcome for a, r in results.items()} == {
        "n-0": "ok", "n-1": "error", "n-2": "error",
        "n-3": "skipped", "n-4": "skipped", "n-5": "skipped"}
    assert results["n-1"].error is not None and results["n-1"].error["code"] == "boom"
    assert job.counts == {"pending": 0, "active": 0, "skipped": 3, "ok": 1, "error": 2,
                          "timeout": 0, "cancelled": 0, "dropped": 0}
    stored = await hub.get_job(job.id)
    assert stored is not None and stored.counts == job.counts and stored.status == "COMPLETE"
    # Skipped agents got no command.
    assert [c.agent_id for c in await hub.list_job_commands(job.id)] == ["n-0", "n-1", "n-2"]


async def test_cancel_skips_the_agents_not_started(make_hub: HubFactory,
                                                   make_agent: Callable[..., Agent]) -> None:
    hub = await make_hub()
    fleet = await start_fleet(hub, make_agent, {f"n-{i}": {} for i in range(4)})
    fleet.gate = asyncio.Event()  # never set: the first part runs until cancelled
    handle = hub.execute_on_agents("n-*", "work", batch=1)
    assert await asyncio.wait_for(fleet.started.get(), WAIT) == "n-0"
    assert await handle.cancel() is True
    job = await asyncio.wait_for(handle, WAIT)
    results = {r.agent_id: r.outcome async for r in handle.results()}
    assert results == {"n-0": "cancelled", "n-1": "skipped", "n-2": "skipped",
                       "n-3": "skipped"}
    assert fleet.runs == ["n-0"]
    assert job.status == "COMPLETE" and job.counts["skipped"] == 3
    assert job.counts["cancelled"] == 1
    assert await handle.cancel() is False  # ended already
    assert await hub.cancel_job(job.id) is None


async def test_job_id_is_idempotent(fleet_hub: tuple[Dispatcher, Fleet]) -> None:
    hub, fleet = fleet_hub
    first = hub.execute_on_agents("web-*", "work", job_id="deploy-42")
    again = hub.execute_on_agents("*", "work", job_id="deploy-42")  # same id: same job
    assert first.id == again.id == "deploy-42"
    job = await asyncio.wait_for(first, WAIT)
    assert (await asyncio.wait_for(again, WAIT)).agents == job.agents == ["web-1", "web-2"]
    later = hub.execute_on_agents("*", "work", job_id="deploy-42")  # after it ended
    assert (await asyncio.wait_for(later, WAIT)).agents == ["web-1", "web-2"]
    assert sorted({r.agent_id async for r in later.results()}) == ["web-1", "web-2"]
    assert sorted(fleet.runs) == ["web-1", "web-2"]
    assert [j.id for j in await hub.list_jobs()] == ["deploy-42"]


async def test_bad_input_is_refused_with_a_clear_message(make_hub: HubFactory,
                                                         make_agent: Callable[..., Agent]
                                                         ) -> None:
    hub = await make_hub(max_job_agents=2)
    await start_fleet(hub, make_agent, AGENTS)
    bad: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"target": "we b"}, ValueError, "is not an agent id"),
        ({"target": []}, ValueError, "empty"),
        ({"target": "role=db,region"}, ValueError, "is not key=value"),
        ({"target": {"role": ""}}, ValueError, "the value of 'role'"),
        ({"target": 7}, TypeError, "invalid target"),
        ({"batch": 0}, ValueError, "batch must be at least 1"),
        ({"batch": "0%"}, ValueError, "between 1% and 100%"),
        ({"batch": "150%"}, ValueError, "between 1% and 100%"),
        ({"batch": "x"}, ValueError, "is not a number"),
        ({"max_failures": -1}, ValueError, "max_failures must be at least 0"),
        ({"target": ["a", "b", "c"]}, ValueError, "more than max_job_agents (2)"),
        ({"job_id": "x" * 101}, ValueError, "invalid job_id"),
        ({"timeout": 0}, ValueError, "timeout"),
    ]
    for overrides, kind, message in bad:
        args: dict[str, Any] = {"target": "web-1", **overrides}
        target = args.pop("target")
        with pytest.raises(kind, match=message.replace("(", r"\(").replace(")", r"\)")):
            hub.execute_on_agents(target, "work", **args)
    handle = hub.execute_on_agents("*", "work")  # 3 connected agents match, more than 2
    with pytest.raises(ValueError, match="matches 3 agents"):
        await asyncio.wait_for(handle.resolved(), WAIT)
    assert await hub.list_jobs() == []


async def test_offline_ids_wait_unless_require_online(
        fleet_hub: tuple[Dispatcher, Fleet]) -> None:
    hub, fleet = fleet_hub
    handle = hub.execute_on_agents(["web-1", "away-1"], "work", require_online=True)
    with pytest.raises(AgentOffline, match="away-1"):
        await asyncio.wait_for(handle.resolved(), WAIT)
    handle = hub.execute_on_agents(["web-1", "away-1"], "work", timeout=30)
    first = await asyncio.wait_for(anext(handle.results()), WAIT)
    assert (first.agent_id, first.outcome) == ("web-1", "ok")
    job = await hub.get_job(handle.id)
    assert job is not None and job.status == "RUNNING"
    assert job.counts["active"] == 1 and job.counts["ok"] == 1
    pending = await hub.list_pending_commands("away-1")
    assert [(c.job, c.status) for c in pending] == [(handle.id, "PENDING")]
    assert await hub.cancel_job(handle.id) is not None
    job = await asyncio.wait_for(handle, WAIT)
    assert job.counts["cancelled"] == 1 and fleet.runs == ["web-1"]


async def test_progress_and_queries(fleet_hub: tuple[Dispatcher, Fleet]) -> None:
    hub, _ = fleet_hub
    changes: list[JobInfo] = []
    remove = hub.on_job_changed(changes.append)
    handle = hub.execute_on_agents("web-*", "work")
    seen: list[tuple[str, Any]] = []

    async def follow() -> None:
        async for update in handle.progress():
            seen.append(update)

    follower: Awaitable[None] = asyncio.ensure_future(follow())
    job = await asyncio.wait_for(handle, WAIT)
    await asyncio.wait_for(follower, WAIT)
    remove()
    assert sorted(seen, key=lambda u: u[0]) == [("web-1", {"at": "web-1"}),
                                                ("web-2", {"at": "web-2"})]
    assert changes[-1].status == "COMPLETE" and changes[-1].id == job.id
    assert await handle.resolved() == ["web-1", "web-2"]
    listed = await hub.list_jobs(limit=5)
    assert [j.id for j in listed] == [job.id] and listed[0].counts["ok"] == 2
    cmds = await hub.list_job_commands(job.id)
    assert [(c.agent_id, c.outcome, c.job) for c in cmds] == [
        ("web-1", "ok", job.id), ("web-2", "ok", job.id)]
    assert await hub.get_job("nope") is None
    assert await hub.list_job_commands("nope") == []
