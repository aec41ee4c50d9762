"""``agent_client.Agent`` events and routed calls against a real hub (docs/guide.md, The agent library).

Real hubs on port 0 (both store engines), real agents, a ``TcpProxy`` to cut
an agent's connection. Waits are on events, futures, or a bounded predicate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

import agent_client
import dispatcher
from agent_client import Agent, CommandContext, CommandError, EventContext
from dispatcher import (
    AgentOffline,
    CommandCancelled,
    CommandFailed,
    CommandTimeout,
    Dispatcher,
)

from ..conftest import HubFactory, ws_url
from ..support import WAIT, TcpProxy, wait_for

# Run again with the fast paths off in CI (pytest -m fallback).
pytestmark = pytest.mark.fallback

AgentFactory = Callable[..., Agent]
Received = asyncio.Queue[tuple[Any, EventContext]]


# -- helpers -------------------------------------------------------------------
async def bounded(aw: Awaitable[Any], what: str, timeout: float = WAIT) -> Any:
    # The bound's own expiry only: CommandTimeout and DeliveryTimeout are
    # TimeoutErrors too, and are what some callers wait for.
    bound = asyncio.timeout(timeout)
    try:
        async with bound:
            return await aw
    except TimeoutError:
        if bound.expired():
            raise AssertionError(f"timed out waiting for {what}") from None
        raise


def connections(hub: Dispatcher, agent_id: str) -> asyncio.Queue[None]:
    """One item per ``agent-connected`` of ``agent_id`` (raised once the hello's
    subscriptions are in force and the catch-up after ``welcome`` is done)."""
    q: asyncio.Queue[None] = asyncio.Queue()
    hub.on("agent-connected", lambda agent: q.put_nowait(None) if agent.id == agent_id else None)
    return q


async def ready(attached: asyncio.Queue[None], agent: Agent, what: str) -> None:
    """Wait for the hub's next ``agent-connected`` of the agent and for the agent's
    own side of that handshake (the hub may finish first)."""
    await bounded(attached.get(), what)
    await agent.wait_connected(WAIT)


async def started(hub: Dispatcher, agent: Agent) -> Agent:
    """Start the agent and wait until both ends have fully attached it."""
    attached = connections(hub, agent.agent_id)
    await agent.start()
    await ready(attached, agent, f"{agent.agent_id} to connect")
    return agent


def collect(agent: Agent, pattern: str) -> Received:
    """Register an ``@agent.on(pattern)`` handler that queues what it gets."""
    q: Received = asyncio.Queue()

    @agent.on(pattern)
    async def handler(data: Any, ctx: EventContext) -> None:
        q.put_nowait((data, ctx))

    return q


@pytest.fixture
async def proxy(hub: Dispatcher) -> AsyncIterator[TcpProxy]:
    """A cuttable TCP proxy in front of the hub's agent port."""
    p = await TcpProxy(hub.port or 0).start()
    yield p
    await p.close()


class Gate:
    """A command handler that waits until the test opens the gate."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.open = asyncio.Event()
        self.runs = 0

    async def handler(self, payload: Any, ctx: CommandContext) -> Any:
        self.runs += 1
        self.started.set()
        await self.open.wait()
        return {"done": payload}


# -- events ---------------------------------------------------------------------
async def test_on_handler_gets_data_and_context_with_automatic_receipts(
    hub: Dispatcher, make_agent: AgentFactory
) -> None:
    listener = make_agent(ws_url(hub), "listener")
    got = collect(listener, "config.*")
    await started(hub, listener)
    assert hub._events.subscriptions("listener") == {"config.*"}

    # emit_to resolves on the library's own 'received': no user code sends it.
    await bounded(hub.emit_to("listener", "config.db", {"pool": 5}, timeout=WAIT), "emit_to")
    data, ctx = await bounded(got.get(), "the handler")
    assert data == {"pool": 5}
    assert ctx.key == "config.db" and ctx.sender is None and ctx.id

    # An event no handler wants is still receipted.
    await bounded(hub.emit_to("listener", "nobody.listens", 1, timeout=WAIT), "emit_to")

    sender = await started(hub, make_agent(ws_url(hub), "sender"))
    await sender.emit("config.cache", [1, 2])
    data, ctx = await bounded(got.get(), "the handler for an agent's emit")
    assert data == [1, 2]
    assert ctx.key == "config.cache" and ctx.sender == "sender" and ctx.id is None


async def test_emit_reaches_hub_subscribers_and_to_list(
    hub: Dispatcher, make_agent: AgentFactory
) -> None:
    seen: asyncio.Queue[tuple[Any, str]] = asyncio.Queue()
    hub.on("job.done", lambda data, sender: seen.put_nowait((data, sender)))
    a = make_agent(ws_url(hub), "a")
    a_got = collect(a, "job.*")
    b = make_agent(ws_url(hub), "b")
    b_got = collect(b, "job.done")
    c = make_agent(ws_url(hub), "c")
    c_got = collect(c, "job.*")
    for agent in (a, b, c):
        await started(hub, agent)

    await a.emit("job.done", {"id": 1})
    assert await bounded(seen.get(), "the hub's emitter") == ({"id": 1}, "a")
    for q in (b_got, c_got):
        data, ctx = await bounded(q.get(), "a subscriber")
        assert (data, ctx.key, ctx.sender) == ({"id": 1}, "job.done", "a")

    await a.emit("job.done", {"id": 2}, to=["c"])
    data, ctx = await bounded(c_got.get(), "the listed agent")
    assert (data, ctx.sender) == ({"id": 2}, "a")
    # b is subscribed but not listed; the sender never gets its own events.
    await b.emit("job.marker", None)
    for q, who in ((a_got, "a"), (c_got, "c")):
        data, ctx = await bounded(q.get(), f"the marker at {who}")
        assert ctx.key == "job.marker", f"{who} got an event it should not have: {ctx.key} {data}"
    assert b_got.empty(), "b was not in 'to' and must not get the event"


async def test_subscribe_and_unsubscribe_at_runtime(
    hub: Dispatcher, make_agent: AgentFactory
) -> None:
    listener = make_agent(ws_url(hub), "listener")
    news = collect(listener, "news")
    marks = collect(listener, "marker")
    await started(hub, listener)
    sender = await started(hub, make_agent(ws_url(hub), "sender"))

    await listener.unsubscribe("news")
    await wait_for(lambda: hub._events.subscriptions("listener") == {"marker"},
                   what="the hub to drop the subscription")
    await sender.emit("news", 1)
    await sender.emit("marker", None)
    await bounded(marks.get(), "the marker")
    assert news.empty(), "an unsubscribed key must not be delivered"

    await listener.subscribe("news", "late.*")
    await wait_for(lambda: hub._events.subscriptions("listener") == {"marker", "news", "late.*"},
                   what="the hub to add the subscriptions")
    await sender.emit("news", 2)
    data, ctx = await bounded(news.get(), "news after subscribe")
    assert (data, ctx.key) == (2, "news")

    # @agent.on while connected subscribes at once.
    late = collect(listener, "later")
    await wait_for(lambda: "later" in hub._events.subscriptions("listener"),
                   what="the hub to see the new handler's subscription")
    await sender.emit("later", 3)
    assert (await bounded(late.get(), "the late handler"))[0] == 3


async def test_subscriptions_restored_after_reconnect(
    hub: Dispatcher, proxy: TcpProxy, make_agent: AgentFactory
) -> None:
    listener = make_agent(proxy.url, "listener")
    cfg = collect(listener, "cfg.*")
    attached = connections(hub, "listener")
    await listener.start()
    await ready(attached, listener, "the first connection")
    await listener.subscribe("extra")
    extra: Received = asyncio.Queue()
    listener.on("extra")(lambda data, ctx: extra.put_nowait((data, ctx)))
    await wait_for(lambda: hub._events.subscriptions("listener") == {"cfg.*", "extra"},
                   what="the runtime subscription")

    proxy.refuse = True
    proxy.cut()
    await wait_for(lambda: not listener.connected, what="the listener to see the cut")
    # Changed while away: sent with the next hello.
    offline: Received = asyncio.Queue()
    listener.on("offline.*")(lambda data, ctx: offline.put_nowait((data, ctx)))
    await listener.unsubscribe("cfg.*")
    await listener.subscribe("cfg.*")
    proxy.refuse = False
    await ready(attached, listener, "the reconnection")
    assert hub._events.subscriptions("listener") == {"cfg.*", "extra", "offline.*"}, \
        "the hello after a reconnect carries every subscription"
    sender = await started(hub, make_agent(ws_url(hub), "sender"))
    await sender.emit("cfg.x", 1)
    await sender.emit("extra", 2)
    await sender.emit("offline.y", 3)
    assert (await bounded(cfg.get(), "cfg.x after the reconnect"))[0] == 1
    assert (await bounded(extra.get(), "extra after the reconnect"))[0] == 2
    assert (await bounded(offline.get(), "offline.y after the reconnect"))[0] == 3


# -- routed calls --------------------------------------------------------------------
def test_call_errors_are_the_hubs_classes() -> None:
    for name in ("CommandFailed", "CommandTimeout", "AgentOffline", "CommandCancelled",
                 "DispatcherError"):
        assert getattr(dispatcher, name) is getattr(agent_client, name), name


async def test_call_returns_the_result(hub: Dispatcher, make_agent: AgentFactory) -> None:
    worker = make_agent(ws_url(hub), "worker")

    @worker.command("add")
    async def add(payload: Any, ctx: CommandContext) -> Any:
        return sum(payload)

    await started(hub, worker)
    caller = await started(hub, make_agent(ws_url(hub), "caller"))
    assert await bounded(caller.call("worker", "add", [2, 3], timeout=WAIT), "the call") == 5
    assert await bounded(caller.call("worker", "add", [1]), "a call without timeout") == 1


async def test_call_raises_the_hubs_exceptions(hub: Dispatcher, make_agent: AgentFactory) -> None:
    worker = make_agent(ws_url(hub), "worker")
    gate = Gate()
    worker.add_command("wait", gate.handler)

    @worker.command("fail")
    async def fail(payload: Any, ctx: CommandContext) -> Any:
        raise CommandError("not_allowed", "no way", {"why": payload})

    await started(hub, worker)
    caller = await started(hub, make_agent(ws_url(hub), "caller"))

    with pytest.raises(CommandFailed) as failed:
        await bounded(caller.call("worker", "fail", "x"), "a failing call")
    assert (failed.value.code, failed.value.message, failed.value.data) == \
        ("not_allowed", "no way", {"why": "x"})

    with pytest.raises(CommandTimeout):
        await bounded(caller.call("worker", "wait", None, timeout=0.3), "a call that times out")

    with pytest.raises(AgentOffline):
        await bounded(caller.call("ghost", "anything"), "a call to an offline agent")

    gate.started.clear()
    cancelled = asyncio.create_task(caller.call("worker", "wait", "c", timeout=WAIT))
    await bounded(gate.started.wait(), "the command to start")
    [cmd] = [c for c in await hub.list_pending_commands("worker") if c.payload == "c"]
    assert await hub.cancel_command(cmd.id)
    with pytest.raises(CommandCancelled):
        await bounded(cancelled, "a cancelled call")

    with pytest.raises(CommandFailed) as itself:
        await bounded(caller.call("caller", "anything"), "a call to oneself")
    assert itself.value.code == "bad_request"


async def test_call_with_invalid_target_fails_fast(
    hub: Dispatcher, make_agent: AgentFactory
) -> None:
    caller = await started(hub, make_agent(ws_url(hub), "caller"))
    # Refused before sending, like hub.execute_on_agent refuses it.
    with pytest.raises(ValueError, match="agent id"):
        await bounded(caller.call("not a valid id!", "anything"), "the invalid call")
    # A call frame the hub refuses gets an error frame, not a reply: the call
    # must fail with it instead of waiting forever.
    with pytest.raises(CommandFailed) as refused:
        await bounded(caller.call("worker", "k" * 300), "a call the hub refuses")
    assert refused.value.code == "bad_frame"


async def test_call_reply_survives_caller_reconnect(
    hub: Dispatcher, proxy: TcpProxy, make_agent: AgentFactory
) -> None:
    worker = make_agent(ws_url(hub), "worker")
    gate = Gate()
    worker.add_command("slow", gate.handler)
    await started(hub, worker)
    caller = make_agent(proxy.url, "caller")
    attached = connections(hub, "caller")
    await caller.start()
    await ready(attached, caller, "the caller to connect")

    call = asyncio.create_task(caller.call("worker", "slow", 1, timeout=WAIT))
    await bounded(gate.started.wait(), "the worker to start")
    proxy.cut()
    await ready(attached, caller, "the caller to reconnect")
    gate.open.set()
    assert await bounded(call, "the call after the caller reconnected") == {"done": 1}
    assert gate.runs == 1


async def test_call_reply_waits_queued_while_caller_is_away(
    hub: Dispatcher, proxy: TcpProxy, make_agent: AgentFactory
) -> None:
    worker = make_agent(ws_url(hub), "worker")
    gate = Gate()
    worker.add_command("slow", gate.handler)
    await started(hub, worker)
    caller = make_agent(proxy.url, "caller")
    attached = connections(hub, "caller")
    await caller.start()
    await ready(attached, caller, "the caller to connect")
    gone: asyncio.Queue[None] = asyncio.Queue()
    hub.on("agent-disconnected",
           lambda agent, reason: gone.put_nowait(None) if agent.id == "caller" else None)

    call = asyncio.create_task(caller.call("worker", "slow", 2, timeout=WAIT))
    await bounded(gate.started.wait(), "the worker to start")
    [cmd] = await hub.list_pending_commands("worker")
    proxy.refuse = True
    proxy.cut()
    await bounded(gone.get(), "the hub to see the caller go")
    gate.open.set()

    async def complete() -> bool:
        info = await hub.get_command(cmd.id)
        return info is not None and info.status == "COMPLETE"

    await wait_for(complete, what="the routed command to complete while the caller is away")
    assert not call.done()
    proxy.refuse = False
    assert await bounded(call, "the queued reply after the reconnect") == {"done": 2}


async def test_call_reply_survives_a_silent_network_drop(
    make_hub: HubFactory, make_agent: AgentFactory
) -> None:
    # The reply is written into a connection that is already dead but not yet
    # noticed (no FIN, no RST): only the heartbeats find out.
    hub = await make_hub(heartbeat=0.2)
    proxy = await TcpProxy(hub.port or 0).start()
    try:
        worker = make_agent(ws_url(hub), "worker")
        gate = Gate()
        worker.add_command("slow", gate.handler)
        await started(hub, worker)
        caller = make_agent(proxy.url, "caller", heartbeat=0.2)
        attached = connections(hub, "caller")
        await caller.start()
        await ready(attached, caller, "the caller to connect")

        gone: asyncio.Queue[None] = asyncio.Queue()
        hub.on("agent-disconnected",
               lambda agent, reason: gone.put_nowait(None) if agent.id == "caller" else None)
        call = asyncio.create_task(caller.call("worker", "slow", 3, timeout=WAIT))
        await bounded(gate.started.wait(), "the worker to start")
        [cmd] = await hub.list_pending_commands("worker")
        proxy.pause()
        gate.open.set()

        async def complete() -> bool:
            info = await hub.get_command(cmd.id)
            return info is not None and info.status == "COMPLETE"

        await wait_for(complete, what="the routed command to complete")
        # The hub wrote the reply into the dead connection, then its heartbeat noticed.
        await bounded(gone.get(), "the hub's heartbeat to drop the caller")
        # The library's own dead-hub detection takes heartbeat + its 5 s close
        # timeout; the test does not wait for that: the network comes back broken.
        proxy.cut()
        await ready(attached, caller, "the caller to reconnect")
        try:
            result = await bounded(call, "the reply", timeout=1.0)
        except AssertionError:
            raise AssertionError(
                "the call's reply was lost: the hub wrote it into a connection that was "
                "dead but not yet detected, and replies (unlike events without "
                "'received') are never sent again; agent.call() now waits for its "
                "timeout + 30 s (forever without a timeout)") from None
        assert result == {"done": 3}
    finally:
        await proxy.close()


async def test_redelivered_event_runs_its_handlers_once(hub: Dispatcher,
                                                        make_agent: AgentFactory) -> None:
    """An event comes again when its receipt was lost with a connection: the
    library acknowledges it again but runs its handlers once."""
    from agent_client import protocol as P

    listener = make_agent(ws_url(hub), "dedupe")
    got = collect(listener, "cfg.*")
    await started(hub, listener)
    frame = P.encode(P.EventFrame("cfg.a", {"n": 1}, id="e.test.1"))
    acks: list[str] = []
    original = hub._events.on_received

    def spy(session: Any, event_id: str) -> None:
        acks.append(event_id)
        original(session, event_id)

    hub._events.on_received = spy  # type: ignore[method-assign]
    assert hub._connections.send("dedupe", frame)
    assert hub._connections.send("dedupe", frame)  # as after a lost receipt
    second = P.encode(P.EventFrame("cfg.b", {"n": 2}, id="e.test.2"))
    assert hub._connections.send("dedupe", second)
    assert (await bounded(got.get(), "the first event"))[0] == {"n": 1}
    assert (await bounded(got.get(), "the second event"))[0] == {"n": 2}  # not {"n": 1} again
    await wait_for(lambda: acks == ["e.test.1", "e.test.1", "e.test.2"], what="three receipts")
    assert got.empty()
