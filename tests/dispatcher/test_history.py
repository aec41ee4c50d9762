"""Command history (``list_commands``), ``command_ended`` logs and ``last_seen``, on a real
hub with real agents, on both engines (docs/guide.md, History)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent_client import Agent, CommandError
from dispatcher import CommandCancelled, CommandFailed, CommandTimeout, Dispatcher

from ..conftest import HubFactory, ws_url
from ..support import wait_for


async def started(make_agent: Callable[..., Agent], hub: Dispatcher, agent_id: str) -> Agent:
    agent = make_agent(ws_url(hub), agent_id)
    release = asyncio.Event()

    @agent.command("echo")
    async def echo(payload: Any, ctx: Any) -> Any:
        await ctx.progress({"echo": payload})
        return payload

    @agent.command("fail")
    async def fail(payload: Any, ctx: Any) -> Any:
        raise CommandError("nope", "it failed")

    @agent.command("hang")
    async def hang(payload: Any, ctx: Any) -> Any:
        await release.wait()

    await agent.start()
    await agent.wait_connected(5)
    return agent


async def run_every_outcome(hub: Dispatcher) -> dict[str, str]:
    """One command per outcome on agent a1 (dropped ones wait for the offline a9)."""
    ids: dict[str, str] = {}
    ok = hub.execute_on_agent("a1", "echo", 1)
    ids["ok"] = ok.id
    assert await ok == 1
    err = hub.execute_on_agent("a1", "fail")
    ids["error"] = err.id
    with pytest.raises(CommandFailed):
        await err
    slow = hub.execute_on_agent("a1", "hang", timeout=0.2)
    ids["timeout"] = slow.id
    with pytest.raises(CommandTimeout):
        await slow
    cancelled = hub.execute_on_agent("a1", "hang")
    ids["cancelled"] = cancelled.id
    await cancelled.submitted()
    await cancelled.cancel()
    with pytest.raises(CommandCancelled):
        await cancelled
    waiting = hub.execute_on_agent("a9", "echo")
    ids["dropped"] = waiting.id
    await waiting.submitted()
    hub.execute_on_agent("a9", "other", drop_all_pending=True)
    assert await waiting == {"dropped": True}
    return ids


async def test_history_filters_and_pages(make_hub: HubFactory,
                                         make_agent: Callable[..., Agent]) -> None:
    hub = await make_hub()
    await started(make_agent, hub, "a1")
    ids = await run_every_outcome(hub)
    page = await hub.list_commands()
    newest_first = [c.id for c in page.commands]
    assert newest_first[-1] == ids["ok"] and newest_first[0] != ids["ok"]
    assert len(newest_first) == 6 and page.next is None  # + the PENDING "other" on a9
    assert [c.id for c in (await hub.list_commands(agent_id="a9")).commands][1] \
        == ids["dropped"]
    for outcome, cmd_id in ids.items():
        got = await hub.list_commands(outcome=outcome)
        assert [c.id for c in got.commands] == [cmd_id], outcome
    assert [c.key for c in (await hub.list_commands(status="PENDING")).commands] == ["other"]
    assert [c.id for c in (await hub.list_commands(key="hang", outcome="timeout")
                           ).commands] == [ids["timeout"]]
    # Paging: two at a time, stable while a new command arrives.
    first = await hub.list_commands(limit=2)
    assert first.next is not None
    hub.execute_on_agent("a1", "echo", 2)
    rest: list[str] = []
    cursor: str | None = first.next
    while cursor is not None:
        more = await hub.list_commands(limit=2, cursor=cursor)
        rest += [c.id for c in more.commands]
        cursor = more.next
    assert [c.id for c in first.commands] + rest == newest_first


async def test_bad_filters_are_value_errors(hub: Dispatcher) -> None:
    for kwargs, word in (({"status": "DONE"}, "status"), ({"outcome": "fine"}, "outcome"),
                         ({"limit": 0}, "limit"), ({"limit": 1001}, "limit"),
                         ({"limit": True}, "limit"), ({"cursor": "%%%"}, "cursor"),
                         ({"cursor": "AAAA"}, "cursor"), ({"agent_id": ""}, "agent_id")):
        with pytest.raises(ValueError, match=word):
            await hub.list_commands(**kwargs)


async def test_job_field_is_stored_and_filtered(hub: Dispatcher,
                                                make_agent: Callable[..., Agent]) -> None:
    await started(make_agent, hub, "a1")
    job = hub.execute_on_agents(["a1"], "echo", 3, job_id="job-1")
    assert (await job).counts["ok"] == 1
    [part] = await hub.list_job_commands("job-1")
    info = await hub.get_command(part.id)
    assert info is not None and info.job == "job-1" and info.result == 3
    assert [c.id for c in (await hub.list_commands(job="job-1")).commands] == [part.id]
    assert (await hub.list_commands(job="job-2")).commands == []


async def test_command_ended_is_logged_once_per_outcome(
        make_hub: HubFactory, make_agent: Callable[..., Agent]) -> None:
    hub = await make_hub()
    await started(make_agent, hub, "a1")
    with capture_logs() as logs:
        ids = await run_every_outcome(hub)
        await hub.execute_on_agents(["a1"], "echo", 5, job_id="j7")
        [part] = await hub.list_job_commands("j7")
    ended = [e for e in logs if e["event"] == "command_ended"]
    by_id = {e["command_id"]: e for e in ended}
    assert len(ended) == len(by_id) == 6  # once each
    for outcome, cmd_id in ids.items():
        entry = by_id[cmd_id]
        assert entry["outcome"] == outcome
        assert entry["agent_id"] in ("a1", "a9") and entry["key"] and "job" in entry
    assert by_id[part.id]["job"] == "j7" and by_id[part.id]["key"] == "echo"


async def test_last_seen_moves_while_connected_and_idle(
        make_hub: HubFactory, make_agent: Callable[..., Agent]) -> None:
    hub = await make_hub(heartbeat=0.2)
    await started(make_agent, hub, "idle")
    first = await hub.get_agent("idle")
    assert first is not None

    async def moved() -> bool:
        info = await hub.get_agent("idle")
        return info is not None and info.last_seen > first.last_seen

    await wait_for(moved, what="last_seen to move forward")
    listed = [a for a in await hub.list_connected_agents() if a.id == "idle"]
    assert listed and listed[0].last_seen > first.last_seen


async def test_last_seen_is_one_store_call_per_heartbeat(
        make_hub: HubFactory, make_agent: Callable[..., Agent]) -> None:
    hub = await make_hub()
    for i in range(3):
        await started(make_agent, hub, f"t{i}")
    calls: list[int] = []
    store = hub.store
    original = store.touch_agents

    def counting(agents: Any, now: int) -> Any:
        calls.append(len(agents))
        return original(agents, now)

    store.touch_agents = counting  # type: ignore[method-assign]
    try:
        assert await hub._sessions.touch_once() == 3
    finally:
        with contextlib.suppress(AttributeError):
            del store.touch_agents  # type: ignore[method-assign]
    assert calls == [3]
