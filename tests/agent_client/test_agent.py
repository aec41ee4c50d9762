"""``agent_client.Agent`` against a real hub (and, frame by frame, a scripted one).

Everything runs over real loopback sockets: a ``Dispatcher`` on port 0, a
``TcpProxy`` to cut connections, or a small scripted WebSocket server that
plays the hub when a test must see the agent's exact frames. Waits are bounded
and wait on events, futures or a predicate; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve

from agent_client import (
    Agent,
    AgentReplaced,
    CommandContext,
    CommandError,
    NotConnected,
)
from agent_client import protocol as P
from agent_client.cli import build_agent
from dispatcher import (
    CommandCancelled,
    CommandFailed,
    CommandHandle,
    CommandTimeout,
    Dispatcher,
)

from ..conftest import HubFactory, ws_url
from ..support import WAIT, TcpProxy, free_port, wait_for

# Run again with the fast paths off in CI (pytest -m fallback).
pytestmark = pytest.mark.fallback

AgentFactory = Callable[..., Agent]


# -- helpers -------------------------------------------------------------------
async def connected(agent: Agent) -> Agent:
    await agent.start()
    await agent.wait_connected(WAIT)
    return agent


async def wait_event(event: asyncio.Event, what: str = "event") -> None:
    try:
        async with asyncio.timeout(WAIT):
            await event.wait()
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def wait_status(hub: Dispatcher, cmd_id: str, status: str) -> None:
    """Wait until the hub's store shows ``cmd_id`` in ``status`` (bounded)."""
    async with asyncio.timeout(WAIT):
        while True:
            info = await hub.get_command(cmd_id)
            if info is not None and info.status == status:
                return
            await asyncio.sleep(0.005)


async def all_progress(handle: CommandHandle) -> list[Any]:
    return [update async for update in handle.progress()]


class Gate:
    """Counts executions of a blocking handler and lets the test release it."""

    def __init__(self) -> None:
        self.runs = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.contexts: list[CommandContext] = []

    async def handler(self, payload: Any, ctx: CommandContext) -> Any:
        self.runs += 1
        self.contexts.append(ctx)
        self.started.set()
        await self.release.wait()
        return {"done": payload}


@pytest.fixture
async def proxy(hub: Dispatcher) -> AsyncIterator[TcpProxy]:
    """A cuttable TCP proxy in front of the hub's agent port."""
    p = await TcpProxy(hub.port or 0).start()
    yield p
    await p.close()


# -- commands: payload, ctx, results, errors -----------------------------------------
async def test_handler_gets_payload_and_context(hub: Dispatcher, make_agent: AgentFactory) -> None:
    agent = make_agent(ws_url(hub), "ctx-1")
    seen: list[tuple[Any, CommandContext]] = []

    @agent.command("resize")
    async def resize(payload: Any, ctx: CommandContext) -> Any:
        seen.append((payload, ctx))
        return {"ok": True, "echo": payload}

    await connected(agent)
    payload = {"w": 640, "h": 480, "blob": b"\x00\x01\xff", "tags": ["a", "b"]}
    handle = hub.execute_on_agent("ctx-1", "resize", payload, timeout=30)
    assert await handle.result(WAIT) == {"ok": True, "echo": payload}
    [(got, ctx)] = seen
    assert got == payload
    assert isinstance(got["blob"], bytes)  # binary payloads stay binary
    assert ctx.id == handle.id
    assert ctx.key == "resize"
    assert ctx.cancelled is False
    assert isinstance(ctx.ts, int)
    assert ctx.deadline is not None
    assert ctx.deadline - ctx.ts == pytest.approx(30_000, abs=5)


async def test_sync_handler_and_add_command(hub: Dispatcher, make_agent: AgentFactory) -> None:
    agent = make_agent(ws_url(hub), "sync-1")

    def add(payload: Any, ctx: CommandContext) -> Any:
        return payload["a"] + payload["b"]

    agent.add_command("add", add)
    await connected(agent)
    assert await hub.execute_on_agent("sync-1", "add", {"a": 2, "b": 3}).result(WAIT) == 5


async def test_none_result(hub: Dispatcher, make_agent: AgentFactory) -> None:
    agent = make_agent(ws_url(hub), "none-1")

    @agent.command("noop")
    async def noop(payload: Any, ctx: CommandContext) -> None:
        return None

    await connected(agent)
    assert await hub.execute_on_agent("none-1", "noop").result(WAIT) is None


async def test_command_error_becomes_command_failed(
    hub: Dispatcher, make_agent: AgentFactory
) -> None:
    agent = make_agent(ws_url(hub), "err-1")

    @agent.command("resize")
    async def resize(payload: Any, ctx: CommandContext) -> Any:
        raise CommandError("too_big", "the image is too big", {"max": 4096, "got": payload})

    await connected(agent)
    with pytest.raises(CommandFailed) as info:
        await hub.execute_on_agent("err-1", "resize", 9000).result(WAIT)
    assert info.value.code == "too_big"
    assert info.value.message == "the image is too big"
    assert info.value.data == {"max": 4096, "got": 9000}


async def test_command_error_without_data(hub: Dispatcher, make_agent: AgentFactory) -> None:
    agent = make_agent(ws_url(hub), "err-2")

    @agent.command("k")
    def k(payload: Any, ctx: CommandContext) -> Any:
        raise CommandError("nope")

    await connected(agent)
    with pytest.raises(CommandFailed) as info:
        await hub.execute_on_agent("err-2", "k").result(WAIT)
    assert info.value.code == "nope"
    assert info.value.data is None


async def test_unexpected_exception_is_handler_error(
    hub: Dispatcher, make_agent: AgentFactory
) -> None:
    agent = make_agent(ws_url(hub), "boom-1")

    @agent.command("boom")
    async def boom(payload: Any, ctx: CommandContext) -> Any:
        raise KeyError("missing")

    @agent.command("echo")
    async def echo(payload: Any, ctx: CommandContext) -> Any:
        return payload

    await connected(agent)
    with pytest.raises(CommandFailed) as info:
        await hub.execute_on_agent("boom-1", "boom").result(WAIT)
    assert info.value.code == "handler_error"
    assert "KeyError" in info.value.message
    # The agent survives its handler's bug.
    assert agent.connected
    assert await hub.execute_on_agent("boom-1", "echo", "still here").result(WAIT) == "still here"


async def test_unencodable_result_is_handler_error(
    hub: Dispatcher, make_agent: AgentFactory
) -> None:
    agent = make_agent(ws_url(hub), "enc-1")

    @agent.command("weird")
    async def weird(payload: Any, ctx: CommandContext) -> Any:
        return {"x": object()}

    await connected(agent)
    with pytest.raises(CommandFailed) as info:
        await hub.execute_on_agent("enc-1", "weird").result(WAIT)
    assert info.value.code == "handler_error"


async def test_unencodable_command_error_data_still_answers(
    hub: Dispatcher, make_agent: AgentFactory
) -> None:
    agent = make_agent(ws_url(hub), "enc-2")

    @agent.command("weird")
    async def weird(payload: Any, ctx: CommandContext) -> Any:
        raise CommandError("bad_input", "cannot do it", {"obj": object()})

    await connected(agent)
    handle = hub.execute_on_agent("enc-2", "weird")
    try:
        await handle.result(WAIT)
    except CommandFailed as exc:
        assert exc.code == "bad_input"
        assert exc.message == "cannot do it"
    except TimeoutError:
        raise AssertionError(
            "a CommandError whose data msgpack cannot encode left the command unanswered "
            "(the handler task crashed and stayed in Agent._running)"
        ) from None
    else:
        raise AssertionError("expected CommandFailed")
    assert handle.id not in agent._running


async def test_handler_raising_cancelled_error_itself_is_answered(
    hub: Dispatcher, make_agent: AgentFactory
) -> None:
    """A CancelledError that is not a cancel of the handler's task (here: awaiting a
    future someone else cancelled) is a handler failure, not a reason to go silent."""
    agent = make_agent(ws_url(hub), "selfcancel-1")

    @agent.command("oops")
    async def oops(payload: Any, ctx: CommandContext) -> Any:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.cancel()
        await fut

    await connected(agent)
    handle = hub.execute_on_agent("selfcancel-1", "oops", timeout=30)
    try:
        await handle.result(WAIT)
    except CommandFailed as exc:
        assert exc.code == "handler_error"
        assert "CancelledError" in exc.message
    except TimeoutError:
        raise AssertionError(
            "a handler that raised CancelledError on its own got no answer: the command "
            "stays in Agent._running and every redelivery is only acked"
        ) from None
    else:
        raise AssertionError("expected CommandFailed")
    assert handle.id not in agent._running


async def test_unknown_key(hub: Dispatcher, make_agent: AgentFactory) -> None:
    agent = make_agent(ws_url(hub), "unk-1")
    await connected(agent)
    with pytest.raises(CommandFailed) as info:
        await hub.execute_on_agent("unk-1", "no-such-command").result(WAIT)
    assert info.value.code == "unknown_key"
    assert "no-such-command" in info.value.message


# -- progress ---------------------------------------------------------------------
async def test_progress_reaches_the_handle(hub: Dispatcher, make_agent: AgentFactory) -> None:
    agent = make_agent(ws_url(hub), "prog-1")
    finish = asyncio.Event()

    @agent.command("work")
    async def work(payload: Any, ctx: CommandContext) -> Any:
        for i in range(3):
            await ctx.progress({"step": i, "of": 3})
        await finish.wait()
        return "finished"

    await connected(agent)
    handle = hub.execute_on_agent("prog-1", "work")
    updates: list[Any] = []
    async with asyncio.timeout(WAIT):
        async for update in handle.progress():
            updates.append(update)
            if len(updates) == 3:
                break
    assert updates == [{"step": i, "of": 3} for i in range(3)]
    assert not handle.done()  # progress arrived while the handler still ran
    finish.set()
    assert await handle.result(WAIT) == "finished"


# -- concurrency ------------------------------------------------------------------
async def test_slow_command_does_not_block_a_quick_one(
    hub: Dispatcher, make_agent: AgentFactory
) -> None:
    agent = make_agent(ws_url(hub), "conc-1")
    slow = Gate()
    agent.add_command("slow", slow.handler)

    @agent.command("quick")
    async def quick(payload: Any, ctx: CommandContext) -> Any:
        return payload * 2

    await connected(agent)
    slow_handle = hub.execute_on_agent("conc-1", "slow", "s")
    await wait_event(slow.started, "the slow handler to start")
    assert await hub.execute_on_agent("conc-1", "quick", 21).result(WAIT) == 42
    assert not slow_handle.done()
    slow.release.set()
    assert await slow_handle.result(WAIT) == {"done": "s"}
    assert slow.runs == 1


async def test_max_concurrency_bounds_running_handlers(
    hub: Dispatcher, make_agent: AgentFactory
) -> None:
    agent = make_agent(ws_url(hub), "bound-1", max_concurrency=2)
    running = 0
    peak = 0
    started: list[int] = []
    gates = {i: asyncio.Event() for i in range(5)}

    @agent.command("work")
    async def work(payload: int, ctx: CommandContext) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        started.append(payload)
        try:
            await gates[payload].wait()
        finally:
            running -= 1
        return payload

    await connected(agent)
    handles = [hub.execute_on_agent("bound-1", "work", i) for i in range(5)]
    # Every command reached the agent and was acked (ACTIVE: the agent took it
    # and its task took a first step), yet only two handlers run.
    for h in handles:
        await wait_status(hub, h.id, "ACTIVE")
    assert len(agent._running) == 5
    assert len(started) == 2, started
    assert running == 2
    # Finishing one lets exactly one more in.
    first = started[0]
    gates[first].set()
    assert await handles[first].result(WAIT) == first
    await wait_for(lambda: len(started) == 3, what="a third handler to start")
    assert running == 2
    for gate in gates.values():
        gate.set()
    results = await asyncio.gather(*(h.result(WAIT) for h in handles))
    assert results == list(range(5))
    assert peak == 2
    assert sorted(started) == list(range(5))


# -- cancel and timeout -------------------------------------------------------------
@pytest.mark.parametrize("how", ["cancel", "timeout"])
async def test_hub_cancel_or_timeout_cancels_the_handler(
    hub: Dispatcher, make_agent: AgentFactory, how: str
) -> None:
    agent = make_agent(ws_url(hub), "cancel-1")
    started = asyncio.Event()
    interrupted = asyncio.Event()
    state: dict[str, Any] = {}

    @agent.command("block")
    async def block(payload: Any, ctx: CommandContext) -> Any:
        state["ctx"] = ctx
        state["task"] = asyncio.current_task()
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            state["cancelled_flag"] = ctx.cancelled
            interrupted.set()
            raise
        return "unreachable"

    @agent.command("echo")
    async def echo(payload: Any, ctx: CommandContext) -> Any:
        return payload

    await connected(agent)
    handle = hub.execute_on_agent("cancel-1", "block", timeout=0.3 if how == "timeout" else 30)
    await wait_event(started, "the handler to start")
    assert state["ctx"].cancelled is False
    if how == "cancel":
        assert await handle.cancel() is True
        with pytest.raises(CommandCancelled):
            await handle.result(WAIT)
    else:
        with pytest.raises(CommandTimeout):
            await handle.result(WAIT)
    await wait_event(interrupted, "the handler task to be cancelled")
    assert state["cancelled_flag"] is True
    assert state["ctx"].cancelled is True
    await wait_for(state["task"].done, what="the handler task to end")
    assert handle.id not in agent._running
    # The agent goes on serving.
    assert await hub.execute_on_agent("cancel-1", "echo", 1).result(WAIT) == 1


async def test_cancel_of_a_command_waiting_for_a_slot(
    hub: Dispatcher, make_agent: AgentFactory
) -> None:
    agent = make_agent(ws_url(hub), "cancel-2", max_concurrency=1)
    gate = Gate()
    agent.add_command("slow", gate.handler)
    await connected(agent)
    busy = hub.execute_on_agent("cancel-2", "slow", "first")
    await wait_event(gate.started)
    queued = hub.execute_on_agent("cancel-2", "slow", "second")
    await wait_status(hub, queued.id, "ACTIVE")
    assert await queued.cancel() is True
    await wait_for(lambda: queued.id not in agent._running, what="the queued command to go")
    gate.release.set()
    assert await busy.result(WAIT) == {"done": "first"}
    assert gate.runs == 1  # the cancelled one never ran


# -- connection state and hooks ----------------------------------------------------------
async def test_connected_flag_hooks_and_wait_connected(
    hub: Dispatcher, make_agent: AgentFactory
) -> None:
    agent = make_agent(ws_url(hub), "hooks-1", meta={"version": "1.4"})
    events: list[tuple[str, bool]] = []
    disconnected = asyncio.Event()

    def on_connect() -> None:
        events.append(("connect", agent.connected))

    async def on_disconnect() -> None:
        events.append(("disconnect", agent.connected))
        disconnected.set()

    agent.on_connect = on_connect
    agent.on_disconnect = on_disconnect
    assert agent.connected is False
    await agent.start()
    await agent.wait_connected(WAIT)
    assert agent.connected is True
    assert events == [("connect", True)]
    assert agent.hub_id == hub.hub_id
    session = hub._connections.get("hooks-1")
    assert session is not None
    assert agent.session == session.session_id
    [info] = [a for a in await hub.list_connected_agents() if a.id == "hooks-1"]
    assert info.meta == {"version": "1.4"}
    await agent.stop()
    assert agent.connected is False
    await wait_event(disconnected, "on_disconnect")
    assert events == [("connect", True), ("disconnect", False)]
    await wait_for(lambda: hub._connections.get("hooks-1") is None, what="the hub to see the agent go")


async def test_failing_hook_does_not_break_the_connection(
    hub: Dispatcher, make_agent: AgentFactory
) -> None:
    agent = make_agent(ws_url(hub), "hooks-2")

    async def on_connect() -> None:
        raise RuntimeError("hook bug")

    agent.on_connect = on_connect

    @agent.command("echo")
    async def echo(payload: Any, ctx: CommandContext) -> Any:
        return payload

    await connected(agent)
    assert await hub.execute_on_agent("hooks-2", "echo", "ok").result(WAIT) == "ok"


async def test_wait_connected_times_out_without_a_hub(make_agent: AgentFactory) -> None:
    agent = make_agent(f"ws://127.0.0.1:{free_port()}/ws", "nohub-1")
    await agent.start()
    with pytest.raises(TimeoutError):
        await agent.wait_connected(0.2)
    assert agent.connected is False
    with pytest.raises(NotConnected):
        await agent.send_frame(P.AckFrame("x"))
    async with asyncio.timeout(WAIT):  # stopping between attempts ends at once
        await agent.stop()
    assert agent._loop_task is None


# -- reconnection and failover --------------------------------------------------------
async def test_reconnects_after_the_connection_is_cut(
    hub: Dispatcher, proxy: TcpProxy, make_agent: AgentFactory
) -> None:
    agent = make_agent(proxy.url, "rc-1")
    sessions: list[str | None] = []
    disconnects = 0
    second = asyncio.Event()

    def on_connect() -> None:
        sessions.append(agent.session)
        if len(sessions) == 2:
            second.set()

    def on_disconnect() -> None:
        nonlocal disconnects
        disconnects += 1

    agent.on_connect = on_connect
    agent.on_disconnect = on_disconnect

    @agent.command("echo")
    async def echo(payload: Any, ctx: CommandContext) -> Any:
        return payload

    await connected(agent)
    proxy.cut()
    await wait_event(second, "the agent to reconnect")
    assert agent.connected
    assert disconnects == 1
    assert proxy.connections == 2
    assert sessions[0] != sessions[1]
    assert await hub.execute_on_agent("rc-1", "echo", [1, 2]).result(WAIT) == [1, 2]


@pytest.mark.parametrize("first", ["dead_port", "refusing"])
async def test_failover_to_the_next_url(
    hub: Dispatcher, proxy: TcpProxy, make_agent: AgentFactory, first: str
) -> None:
    if first == "dead_port":
        bad = f"ws://127.0.0.1:{free_port()}/ws"
    else:
        proxy.refuse = True
        bad = proxy.url
    agent = make_agent([bad, ws_url(hub)], "fo-1")

    @agent.command("echo")
    async def echo(payload: Any, ctx: CommandContext) -> Any:
        return payload

    await connected(agent)
    assert agent.hub_id == hub.hub_id
    assert proxy.connections == 0
    assert await hub.execute_on_agent("fo-1", "echo", "b").result(WAIT) == "b"


async def test_failover_when_the_hub_shuts_down(
    make_hub: HubFactory, make_agent: AgentFactory
) -> None:
    hub_a = await make_hub()
    hub_b = await make_hub()
    agent = make_agent([ws_url(hub_a), ws_url(hub_b)], "fo-2")
    hubs_seen: list[str | None] = []
    on_b = asyncio.Event()

    def on_connect() -> None:
        hubs_seen.append(agent.hub_id)
        if agent.hub_id == hub_b.hub_id:
            on_b.set()

    agent.on_connect = on_connect

    @agent.command("echo")
    async def echo(payload: Any, ctx: CommandContext) -> Any:
        return payload

    await connected(agent)
    assert hubs_seen == [hub_a.hub_id]
    await hub_a.close()  # closes agents with 1001: reconnect, to another hub
    await wait_event(on_b, "the agent to fail over to hub B")
    assert hubs_seen == [hub_a.hub_id, hub_b.hub_id]
    assert await hub_b.execute_on_agent("fo-2", "echo", 3).result(WAIT) == 3


# -- commands across a cut: run once, answer once connected again ---------------------
async def test_command_running_across_a_cut_answers_after_reconnect(
    hub: Dispatcher, proxy: TcpProxy, make_agent: AgentFactory
) -> None:
    agent = make_agent(proxy.url, "cut-1")
    gate = Gate()
    agent.add_command("job", gate.handler)
    connects = 0
    reconnected = asyncio.Event()

    def on_connect() -> None:
        nonlocal connects
        connects += 1
        if connects == 2:
            reconnected.set()

    agent.on_connect = on_connect

    @agent.command("echo")
    async def echo(payload: Any, ctx: CommandContext) -> Any:
        return payload

    await connected(agent)
    handle = hub.execute_on_agent("cut-1", "job", 7)
    await wait_event(gate.started, "the handler to start")
    proxy.cut()
    await wait_event(reconnected, "the agent to reconnect")
    # The hub redelivers the unfinished command after welcome; a command sent
    # now queues behind it, so its answer proves the redelivery was handled.
    assert await hub.execute_on_agent("cut-1", "echo", "probe").result(WAIT) == "probe"
    assert gate.runs == 1, "a redelivered command that is still running was run again"
    assert not handle.done()
    info = await hub.get_command(handle.id)
    assert info is not None
    assert info.status == "ACTIVE"  # redelivery of a running command: acked only
    gate.release.set()
    assert await handle.result(WAIT) == {"done": 7}
    assert gate.runs == 1


async def test_answer_computed_while_disconnected_is_sent_after_reconnect(
    hub: Dispatcher, proxy: TcpProxy, make_agent: AgentFactory
) -> None:
    agent = make_agent(proxy.url, "cut-2")
    gate = Gate()
    agent.add_command("job", gate.handler)
    await connected(agent)
    handle = hub.execute_on_agent("cut-2", "job", "x")
    await wait_event(gate.started, "the handler to start")
    proxy.refuse = True  # stay disconnected until the answer exists
    proxy.cut()
    await wait_for(lambda: not agent.connected, what="the agent to see the cut")
    gate.release.set()
    await wait_for(lambda: handle.id in agent._finished, what="the handler to finish offline")
    assert not handle.done()
    proxy.refuse = False
    assert await handle.result(WAIT) == {"done": "x"}
    assert gate.runs == 1


@pytest.mark.parametrize("acked", [False, True], ids=["before_ack", "after_ack"])
async def test_answer_lost_in_a_cut_is_resent_not_rerun(
    hub: Dispatcher, proxy: TcpProxy, make_agent: AgentFactory, acked: bool
) -> None:
    """The handler finishes and the connection dies as it returns: its answer
    never reaches the hub, which redelivers; the agent answers from its cache."""
    agent = make_agent(proxy.url, "cut-3")
    runs = 0
    go = asyncio.Event()

    @agent.command("job")
    async def job(payload: Any, ctx: CommandContext) -> Any:
        nonlocal runs
        runs += 1
        if acked:
            await go.wait()
        proxy.cut()  # the network dies right as the handler returns
        return {"n": payload}

    await connected(agent)
    handle = hub.execute_on_agent("cut-3", "job", 5)
    if acked:
        await wait_status(hub, handle.id, "ACTIVE")
        go.set()
    assert await handle.result(WAIT) == {"n": 5}
    assert runs == 1, "the redelivered command ran a second time"
    assert proxy.connections >= 2  # the answer really came over a new connection


async def test_every_cut_during_a_command_still_runs_it_once(
    hub: Dispatcher, proxy: TcpProxy, make_agent: AgentFactory
) -> None:
    agent = make_agent(proxy.url, "cut-4")
    gate = Gate()
    agent.add_command("job", gate.handler)
    await connected(agent)
    handle = hub.execute_on_agent("cut-4", "job", 1)
    await wait_event(gate.started)
    for n in range(3):
        proxy.cut()
        await wait_for(lambda n=n: proxy.connections >= n + 2 and agent.connected,
                       what=f"reconnect #{n + 1}")
    gate.release.set()
    assert await handle.result(WAIT) == {"done": 1}
    assert gate.runs == 1


# -- replaced (4409) --------------------------------------------------------------------
async def test_replaced_agent_raises_and_stops_reconnecting(
    hub: Dispatcher, proxy: TcpProxy, make_agent: AgentFactory
) -> None:
    old = make_agent(proxy.url, "dup-1")
    new = make_agent(ws_url(hub), "dup-1")

    @new.command("echo")
    async def echo(payload: Any, ctx: CommandContext) -> Any:
        return ("new", payload)

    run_task = asyncio.create_task(old.run())
    await old.wait_connected(WAIT)
    await connected(new)
    with pytest.raises(AgentReplaced):
        async with asyncio.timeout(WAIT):
            await run_task
    assert old.connected is False
    assert proxy.connections == 1  # it never tried again
    session = hub._connections.get("dup-1")
    assert session is not None
    assert session.session_id == new.session
    assert new.connected
    assert await hub.execute_on_agent("dup-1", "echo", 1).result(WAIT) == ["new", 1]
    await old.stop()  # fine after the loop ended on its own


# -- stop / async with ---------------------------------------------------------------------
async def test_stop_is_idempotent_and_ends_every_task(
    hub: Dispatcher, make_agent: AgentFactory
) -> None:
    agent = make_agent(ws_url(hub), "stop-1")
    started = asyncio.Event()
    handler_tasks: list[asyncio.Task[Any]] = []

    @agent.command("block")
    async def block(payload: Any, ctx: CommandContext) -> Any:
        task = asyncio.current_task()
        assert task is not None
        handler_tasks.append(task)
        started.set()
        await asyncio.Event().wait()

    await agent.stop()  # before start: nothing to do, no error
    await connected(agent)
    hub.execute_on_agent("stop-1", "block", timeout=30)
    await wait_event(started)
    [loop_task] = [t for t in asyncio.all_tasks() if t.get_name() == "agent:stop-1"]
    async with asyncio.timeout(WAIT):
        await agent.stop()
    assert agent.connected is False
    assert loop_task.done()
    assert all(t.done() for t in handler_tasks)
    assert agent._running == {}
    assert agent._loop_task is None
    assert not agent._tasks
    await agent.stop()  # idempotent
    await agent.stop()
    assert agent.connected is False
    await wait_for(lambda: hub._connections.get("stop-1") is None, what="the hub to see the agent go")


async def test_restart_after_stop_does_not_rerun_an_interrupted_command(
    hub: Dispatcher, make_agent: AgentFactory
) -> None:
    agent = make_agent(ws_url(hub), "stop-2")
    runs = 0
    started = asyncio.Event()

    @agent.command("block")
    async def block(payload: Any, ctx: CommandContext) -> Any:
        nonlocal runs
        runs += 1
        started.set()
        await asyncio.Event().wait()

    @agent.command("echo")
    async def echo(payload: Any, ctx: CommandContext) -> Any:
        return payload

    await connected(agent)
    handle = hub.execute_on_agent("stop-2", "block", timeout=30)
    await wait_event(started)
    await agent.stop()
    await connected(agent)  # the same Agent object serves again
    assert await hub.execute_on_agent("stop-2", "echo", "probe").result(WAIT) == "probe"
    assert runs == 1, (
        "after stop() and start() the hub's redelivery ran the interrupted command again "
        "in the same process (docs/protocol.md, Commands and redelivery)"
    )
    # Instead the redelivery gets a definite answer: the work was interrupted.
    with pytest.raises(CommandFailed) as info:
        await handle.result(WAIT)
    assert info.value.code == "agent_stopped"


async def test_async_with(hub: Dispatcher, make_agent: AgentFactory) -> None:
    agent = make_agent(ws_url(hub), "ctxm-1")

    @agent.command("echo")
    async def echo(payload: Any, ctx: CommandContext) -> Any:
        return payload

    async with agent as a:
        assert a is agent
        await agent.wait_connected(WAIT)
        assert agent.connected
        assert await hub.execute_on_agent("ctxm-1", "echo", 9).result(WAIT) == 9
    assert agent.connected is False
    assert agent._loop_task is None


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError):
        Agent("ws://127.0.0.1:1/ws", "bad id with spaces")
    with pytest.raises(ValueError):
        Agent([], "a1")


# -- frame level, against a scripted hub ---------------------------------------------------
class ScriptedHub:
    """A real WebSocket server on port 0 that the test drives frame by frame."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[ServerConnection] = asyncio.Queue()
        self.server: Server | None = None

    async def __aenter__(self) -> ScriptedHub:
        self.server = await serve(self._handler, "127.0.0.1", 0, compression=None,
                                  ping_interval=None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = next(iter(self.server.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}/ws"

    async def _handler(self, ws: ServerConnection) -> None:
        await self.connections.put(ws)
        await ws.wait_closed()

    async def accept(self) -> tuple[ServerConnection, P.HelloFrame]:
        """The next connection, welcomed after its hello."""
        async with asyncio.timeout(WAIT):
            ws = await self.connections.get()
            hello = P.decode(await ws.recv())
        assert isinstance(hello, P.HelloFrame)
        await ws.send(P.encode(P.WelcomeFrame(v=1, hub="scripted", session="s1", heartbeat=20)))
        return ws, hello


async def recv_frame(ws: ServerConnection) -> P.Frame:
    async with asyncio.timeout(WAIT):
        data = await ws.recv()
    assert isinstance(data, bytes), "agents send binary messages only"
    return P.decode(data)


def cmd(cmd_id: str, key: str, payload: Any = None) -> bytes:
    return P.encode(P.CmdFrame(cmd_id, key, payload, 1, None))


async def probe(ws: ServerConnection, n: int) -> None:
    """Send a quick echo command and expect its result as the very next frame:
    everything the agent had to say about earlier frames came before it."""
    await ws.send(cmd(f"probe-{n}", "echo", n))
    frame = await recv_frame(ws)
    assert frame == P.ResultFrame(f"probe-{n}", n), f"unexpected frame {frame}"


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedHub]:
    async with ScriptedHub() as s:
        yield s


def echo_agent(make_agent: AgentFactory, url: str, agent_id: str, **kwargs: Any) -> Agent:
    agent = make_agent(url, agent_id, **kwargs)

    @agent.command("echo")
    async def echo(payload: Any, ctx: CommandContext) -> Any:
        return payload

    return agent


async def test_hello_carries_id_token_and_meta(
    scripted: ScriptedHub, make_agent: AgentFactory
) -> None:
    agent = make_agent(scripted.url, "hello-1", token="s3cret", meta={"version": "2"})
    await agent.start()
    _, hello = await scripted.accept()
    assert hello == P.HelloFrame(v=1, agent="hello-1", token="s3cret", meta={"version": "2"})
    await agent.wait_connected(WAIT)
    assert agent.session == "s1"
    assert agent.hub_id == "scripted"


async def test_quick_command_skips_the_ack_slow_one_acks_first(
    scripted: ScriptedHub, make_agent: AgentFactory
) -> None:
    agent = echo_agent(make_agent, scripted.url, "ack-1")
    gate = Gate()
    agent.add_command("slow", gate.handler)
    await agent.start()
    ws, _ = await scripted.accept()
    await ws.send(cmd("c1", "echo", "hi"))
    assert await recv_frame(ws) == P.ResultFrame("c1", "hi")  # no ack before it
    await ws.send(cmd("c2", "slow", 2))
    assert await recv_frame(ws) == P.AckFrame("c2")
    gate.release.set()
    assert await recv_frame(ws) == P.ResultFrame("c2", {"done": 2})


async def test_redelivery_of_a_running_command_gets_only_an_ack(
    scripted: ScriptedHub, make_agent: AgentFactory
) -> None:
    agent = echo_agent(make_agent, scripted.url, "redo-1")
    gate = Gate()
    agent.add_command("slow", gate.handler)
    await agent.start()
    ws, _ = await scripted.accept()
    await ws.send(cmd("c1", "slow", 1))
    assert await recv_frame(ws) == P.AckFrame("c1")
    await wait_event(gate.started)
    for n in range(2):
        await ws.send(cmd("c1", "slow", 1))
        assert await recv_frame(ws) == P.AckFrame("c1")
        await probe(ws, n)
    assert gate.runs == 1
    gate.release.set()
    assert await recv_frame(ws) == P.ResultFrame("c1", {"done": 1})
    await probe(ws, 9)  # exactly one result: nothing else came before the probe's
    assert gate.runs == 1


async def test_redelivery_of_a_finished_command_resends_its_answer(
    scripted: ScriptedHub, make_agent: AgentFactory
) -> None:
    agent = echo_agent(make_agent, scripted.url, "redo-2")
    runs = 0

    @agent.command("count")
    async def count(payload: Any, ctx: CommandContext) -> Any:
        nonlocal runs
        runs += 1
        return runs

    @agent.command("fails")
    async def fails(payload: Any, ctx: CommandContext) -> Any:
        nonlocal runs
        runs += 1
        raise CommandError("bad", "no", {"d": 1})

    await agent.start()
    ws, _ = await scripted.accept()
    await ws.send(cmd("c1", "count"))
    assert await recv_frame(ws) == P.ResultFrame("c1", 1)
    await ws.send(cmd("c2", "fails"))
    fail = P.FailFrame("c2", {"code": "bad", "message": "no", "data": {"d": 1}})
    assert await recv_frame(ws) == fail
    for _ in range(2):
        await ws.send(cmd("c1", "count"))
        assert await recv_frame(ws) == P.ResultFrame("c1", 1)
        await ws.send(cmd("c2", "fails"))
        assert await recv_frame(ws) == fail
    assert runs == 2


async def test_cancel_frame_cancels_and_a_later_redelivery_does_not_run(
    scripted: ScriptedHub, make_agent: AgentFactory
) -> None:
    agent = echo_agent(make_agent, scripted.url, "cancel-3")
    gate = Gate()
    agent.add_command("slow", gate.handler)
    await agent.start()
    ws, _ = await scripted.accept()
    await ws.send(cmd("c1", "slow", 1))
    assert await recv_frame(ws) == P.AckFrame("c1")
    await wait_event(gate.started)
    await ws.send(P.encode(P.CancelFrame("c1")))
    await probe(ws, 0)  # no terminal frame for a cancelled command
    assert gate.contexts[0].cancelled is True
    assert "c1" not in agent._running
    await ws.send(cmd("c1", "slow", 1))
    await probe(ws, 1)  # neither run nor answered again
    assert gate.runs == 1
    await ws.send(P.encode(P.CancelFrame("never-seen")))  # harmless
    await probe(ws, 2)


async def test_handler_that_swallows_the_cancel_sends_no_answer(
    scripted: ScriptedHub, make_agent: AgentFactory
) -> None:
    agent = echo_agent(make_agent, scripted.url, "cancel-4")
    started = asyncio.Event()
    finished = asyncio.Event()

    @agent.command("stubborn")
    async def stubborn(payload: Any, ctx: CommandContext) -> Any:
        started.set()
        with contextlib.suppress(asyncio.CancelledError):  # ignores the cancel
            await asyncio.Event().wait()
        finished.set()
        return "late"

    await agent.start()
    ws, _ = await scripted.accept()
    await ws.send(cmd("c1", "stubborn"))
    assert await recv_frame(ws) == P.AckFrame("c1")
    await wait_event(started)
    await ws.send(P.encode(P.CancelFrame("c1")))
    await wait_event(finished, "the handler to return after the cancel")
    await probe(ws, 0)  # the hub asked it to stop: its late answer is not sent
    await ws.send(cmd("c1", "stubborn"))
    await probe(ws, 1)  # nor sent on a redelivery


async def test_hub_error_frames_and_junk_do_not_break_the_connection(
    scripted: ScriptedHub, make_agent: AgentFactory
) -> None:
    agent = echo_agent(make_agent, scripted.url, "junk-1")
    await agent.start()
    ws, _ = await scripted.accept()
    await ws.send(P.encode(P.ErrorFrame("unknown_command", "no such command", "x")))
    await ws.send(b"\xc1")  # not msgpack
    await ws.send(P.pack({"t": "no-such-type"}))
    await probe(ws, 0)
    assert agent.connected


async def test_close_4409_is_final_other_closes_reconnect(
    scripted: ScriptedHub, make_agent: AgentFactory
) -> None:
    agent = echo_agent(make_agent, scripted.url, "dup-2")
    run_task = asyncio.create_task(agent.run())
    ws, _ = await scripted.accept()
    await ws.close(P.CloseCode.GOING_AWAY, "draining")  # 1001: come back
    ws, _ = await scripted.accept()
    await probe(ws, 0)
    await ws.send(P.encode(P.ErrorFrame("replaced", "replaced by a newer connection")))
    await ws.close(P.CloseCode.REPLACED, "replaced")
    with pytest.raises(AgentReplaced):
        async with asyncio.timeout(WAIT):
            await run_task
    assert scripted.connections.empty()  # no third connection
    assert agent.connected is False


async def test_answer_finished_while_disconnected_is_sent_on_redelivery(
    scripted: ScriptedHub, make_agent: AgentFactory
) -> None:
    agent = echo_agent(make_agent, scripted.url, "offline-1")
    gate = Gate()
    agent.add_command("slow", gate.handler)
    await agent.start()
    ws, _ = await scripted.accept()
    await ws.send(cmd("c1", "slow", 1))
    assert await recv_frame(ws) == P.AckFrame("c1")
    ws.transport.abort()  # the connection dies without a closing handshake
    await wait_for(lambda: not agent.connected, what="the agent to see the cut")
    gate.release.set()
    await wait_for(lambda: "c1" in agent._finished, what="the handler to finish offline")
    ws, _ = await scripted.accept()
    await probe(ws, 0)  # it waits for the redelivery: nothing is sent unasked
    await ws.send(cmd("c1", "slow", 1))
    assert await recv_frame(ws) == P.ResultFrame("c1", {"done": 1})
    assert gate.runs == 1


async def test_progress_while_disconnected_is_dropped_quietly(
    scripted: ScriptedHub, make_agent: AgentFactory
) -> None:
    agent = echo_agent(make_agent, scripted.url, "offline-2")
    step = asyncio.Event()
    reported = asyncio.Event()

    @agent.command("job")
    async def job(payload: Any, ctx: CommandContext) -> Any:
        await ctx.progress("online")
        await step.wait()
        await ctx.progress("offline")  # must neither raise nor block
        reported.set()
        return "ok"

    await agent.start()
    ws, _ = await scripted.accept()
    await ws.send(cmd("c1", "job"))
    assert await recv_frame(ws) == P.ProgressFrame("c1", "online")
    assert await recv_frame(ws) == P.AckFrame("c1")
    ws.transport.abort()
    await wait_for(lambda: not agent.connected, what="the agent to see the cut")
    step.set()
    await wait_event(reported, "the offline progress call to return")
    ws, _ = await scripted.accept()
    await ws.send(cmd("c1", "job"))
    assert await recv_frame(ws) == P.ResultFrame("c1", "ok")


# -- the built-in agent (dispatcher-agent) -------------------------------------------------
async def test_builtin_echo_sleep_sysinfo(hub: Dispatcher, make_agent: AgentFactory) -> None:
    agent = build_agent([ws_url(hub)], "builtin-1", backoff_initial=0.05, backoff_max=0.2)
    try:
        await connected(agent)
        payload = {"a": [1, 2], "b": b"\x00"}
        assert await hub.execute_on_agent("builtin-1", "echo", payload).result(WAIT) == payload

        handle = hub.execute_on_agent("builtin-1", "sleep", {"seconds": 0.2})
        updates = await asyncio.wait_for(all_progress(handle), WAIT)
        assert await handle.result(WAIT) == {"slept": 0.2}
        assert updates, "sleep reports progress"
        assert all(u["total"] == 0.2 and 0 <= u["elapsed"] <= 0.2 for u in updates), updates
        assert [u["elapsed"] for u in updates] == sorted(u["elapsed"] for u in updates)

        assert await hub.execute_on_agent("builtin-1", "sleep", 0).result(WAIT) == {"slept": 0}
        for bad in ({"seconds": -1}, "soon", {"seconds": True}):
            with pytest.raises(CommandFailed) as info:
                await hub.execute_on_agent("builtin-1", "sleep", bad).result(WAIT)
            assert info.value.code == "bad_payload"

        info_ = await hub.execute_on_agent("builtin-1", "sysinfo").result(WAIT)
        assert info_["pid"] == os.getpid()
        assert info_["python"] == platform.python_version()
        assert info_["cpus"] == os.cpu_count()
        assert {"hostname", "platform", "loadavg", "time"} <= set(info_)
    finally:
        await agent.stop()


def _agent_executable() -> str:
    exe = Path(sys.executable).parent / "dispatcher-agent"
    assert exe.exists(), f"{exe} is missing: pip install -e '.[dev]'"
    return str(exe)


def test_cli_help_exits_zero() -> None:
    out = subprocess.run([_agent_executable(), "--help"], capture_output=True, text=True,
                         timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    for word in ("--url", "--id", "--token", "--concurrency", "echo", "sleep", "sysinfo"):
        assert word in out.stdout


async def test_cli_agent_serves_a_hub_and_exits_cleanly_on_sigint(hub: Dispatcher) -> None:
    connected_ev = asyncio.Event()

    def on_connected(agent: Any) -> None:
        if agent.id == "cli-1":
            connected_ev.set()

    hub.on("agent-connected", on_connected)
    proc = await asyncio.create_subprocess_exec(
        _agent_executable(), "--url", ws_url(hub), "--id", "cli-1", "--log-level", "warning",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_event(connected_ev, "the dispatcher-agent process to connect")
        assert await hub.execute_on_agent("cli-1", "echo", {"x": 1}).result(WAIT) == {"x": 1}
        info = await hub.execute_on_agent("cli-1", "sysinfo").result(WAIT)
        assert info["pid"] == proc.pid
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(WAIT):
            _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode(errors="replace")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_answer_is_sent_again_after_an_internal_error(
    scripted: ScriptedHub, make_agent: AgentFactory
) -> None:
    """The hub answers `internal` when its store could not take an answer: the
    library sends the stored answer again (after about a second), once per error."""
    agent = echo_agent(make_agent, scripted.url, "retrier")
    await agent.start()
    ws, _ = await scripted.accept()
    await ws.send(cmd("c-1", "echo", {"n": 1}))
    assert await recv_frame(ws) == P.ResultFrame("c-1", {"n": 1})
    await ws.send(P.encode(P.ErrorFrame(P.ErrorCode.INTERNAL, "store unavailable", "c-1")))
    assert await recv_frame(ws) == P.ResultFrame("c-1", {"n": 1})  # the same answer again
    # An unrelated internal error (no stored answer for that ref) sends nothing.
    await ws.send(P.encode(P.ErrorFrame(P.ErrorCode.INTERNAL, "oops", "not-a-command")))
    await probe(ws, 1)
