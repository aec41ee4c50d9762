"""Events and routed calls on the hub, frame by frame (docs/guide.md; docs/protocol.md, Events and receipts,
Routed calls, Errors).

Agents here are raw msgpack clients (``RawAgent``) so the test decides when a
``received`` goes out and sees exactly what the hub sends. Every test runs on
both store engines. To prove that a frame did *not* arrive, a test sends a
marker the agent does receive (a broadcast, an event on another key) and
checks it is the next frame: frames on one connection keep their order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import pytest

from dispatcher import CommandInfo, DeliveryTimeout, Dispatcher
from dispatcher.clock import now_ms

from ..conftest import HubFactory, ws_url
from ..support import WAIT, RawAgent, wait_for

SHORT = 0.3  # timeouts that are meant to expire

Connect = Callable[..., Awaitable[RawAgent]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """``await connect(hub, agent_id, **hello_fields)``: a raw agent past ``welcome``.

    It waits for the hub's ``agent-connected``, so the catch-up after
    ``welcome`` is done and the hello's ``subs`` are in force.
    """
    opened: list[RawAgent] = []

    async def factory(hub: Dispatcher, agent_id: str, **fields: Any) -> RawAgent:
        ready = hub_event(hub, "agent-connected", agent_id)
        agent, _ = await RawAgent.hello(ws_url(hub), agent_id, **fields)
        opened.append(agent)
        await bounded(ready, f"agent-connected of {agent_id}")
        return agent

    yield factory
    for agent in opened:
        with contextlib.suppress(Exception):
            await agent.close()


def hub_event(hub: Dispatcher, key: str, agent_id: str) -> asyncio.Future[None]:
    """A future set when the hub raises ``key`` (agent-connected/-disconnected) for the agent."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def handler(agent: Any, *_: Any) -> None:
        if agent.id == agent_id and not fut.done():
            fut.set_result(None)
            hub.off(key, handler)

    hub.on(key, handler)
    return fut


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


async def go_offline(hub: Dispatcher, agent: RawAgent, agent_id: str) -> None:
    """Close the agent's connection and wait until the hub has detached it."""
    gone = hub_event(hub, "agent-disconnected", agent_id)
    await agent.close()
    await bounded(gone, f"agent-disconnected of {agent_id}")


async def still_pending(task: asyncio.Task[Any], what: str) -> None:
    """The task has not finished, even given the hub a moment to (wrongly) finish it."""
    done, _ = await asyncio.wait({task}, timeout=0.05)
    assert not done, f"{what} finished before every target answered 'received': {task}"


async def queued_frames(hub: Dispatcher, agent_id: str) -> list[dict[str, Any]]:
    """The agent's queued frames, decoded (taken from the store and put back at once)."""
    frames, _ = await hub.store.take_frames(agent_id, now=now_ms(), ttl_ms=3_600_000)
    if frames:
        await hub.store.requeue_frames(agent_id, frames, now=now_ms())
    return [msgpack.unpackb(f, raw=False) for f in frames]


async def wait_queued(hub: Dispatcher, agent_id: str, n: int) -> None:
    async def enough() -> bool:
        return len(await queued_frames(hub, agent_id)) >= n

    await wait_for(enough, what=f"{n} frame(s) queued for {agent_id}")


async def expect_marker(agent: RawAgent, key: str, what: str) -> dict[str, Any]:
    """The agent's next frame is the marker event ``key``: nothing came before it."""
    frame = await agent.recv()
    assert frame.get("t") == "event" and frame.get("key") == key, f"{what}: got {frame}"
    return frame


async def recv_events(agent: RawAgent, n: int) -> list[dict[str, Any]]:
    return [await agent.recv_type("event") for _ in range(n)]


# -- emit_to and receipts --------------------------------------------------------------------------


async def test_emit_to_one_agent_resolves_on_received(hub: Dispatcher, connect: Connect) -> None:
    b = await connect(hub, "b")
    task = asyncio.create_task(hub.emit_to("b", "config.set", {"level": 3, "raw": b"\x00\x01"},
                                           timeout=WAIT))
    frame = await b.recv()
    assert frame["t"] == "event"
    assert frame["key"] == "config.set"
    assert frame["data"] == {"level": 3, "raw": b"\x00\x01"}
    assert isinstance(frame["id"], str) and frame["id"]
    assert frame.get("from") is None, "the hub's own events carry no 'from'"
    await still_pending(task, "emit_to")

    await b.send({"t": "received", "id": frame["id"]})
    await bounded(task, "emit_to after 'received'")


async def test_emit_to_list_resolves_after_every_target(hub: Dispatcher, connect: Connect) -> None:
    b = await connect(hub, "b")
    c = await connect(hub, "c")
    task = asyncio.create_task(hub.emit_to(["b", "c"], "deploy", [1, 2], timeout=WAIT))
    fb = await b.recv_type("event")
    fc = await c.recv_type("event")
    assert fb["key"] == fc["key"] == "deploy"
    assert fb["data"] == fc["data"] == [1, 2]
    assert fb["id"] != fc["id"], "each target's event has its own id"

    await b.send({"t": "received", "id": fb["id"]})
    await still_pending(task, "emit_to with one receipt of two")
    # A receipt for another agent's event id counts for nobody.
    await c.send({"t": "received", "id": fb["id"]})
    await still_pending(task, "emit_to after c answered with b's event id")

    await c.send({"t": "received", "id": fc["id"]})
    await bounded(task, "emit_to after both receipts")


async def test_delivery_timeout_names_exactly_the_silent_agents(
    hub: Dispatcher, connect: Connect
) -> None:
    b = await connect(hub, "b")
    c = await connect(hub, "c")
    await connect(hub, "d")
    task = asyncio.create_task(hub.emit_to(["b", "c", "d", "gone"], "ping", None, timeout=SHORT))
    await b.send({"t": "received", "id": (await b.recv_type("event"))["id"]})
    await c.send({"t": "received", "id": (await c.recv_type("event"))["id"]})
    with pytest.raises(DeliveryTimeout) as info:
        await bounded(task, "DeliveryTimeout")
    # d is connected but silent; gone is offline (its event waits queued).
    assert sorted(info.value.pending) == ["d", "gone"], info.value.pending


async def test_events_for_offline_agent_follow_its_commands_after_welcome(
    hub: Dispatcher, connect: Connect
) -> None:
    handle = hub.execute_on_agent("b", "job", {"n": 1}, timeout=WAIT)
    await bounded(handle.submitted(), "command stored")
    first = asyncio.create_task(hub.emit_to("b", "ev", 1, timeout=WAIT))
    await wait_queued(hub, "b", 1)
    second = asyncio.create_task(hub.emit_to("b", "ev", 2, timeout=WAIT))
    await wait_queued(hub, "b", 2)

    b, _ = await RawAgent.hello(ws_url(hub), "b")
    try:
        cmd = await b.recv()
        assert cmd["t"] == "cmd" and cmd["id"] == handle.id, f"commands come first: {cmd}"
        e1 = await b.recv()
        e2 = await b.recv()
        assert (e1["t"], e1["data"], e2["t"], e2["data"]) == ("event", 1, "event", 2), \
            f"queued events oldest first: {e1} {e2}"
        assert e1["id"] and e2["id"] and e1["id"] != e2["id"]
        await still_pending(first, "emit_to of a queued event")

        await b.send({"t": "received", "id": e1["id"]})
        await bounded(first, "emit_to after the queued event's receipt")
        await still_pending(second, "emit_to of the second queued event")
        await b.send({"t": "received", "id": e2["id"]})
        await bounded(second, "emit_to of the second event")
        assert await queued_frames(hub, "b") == [], "delivered events left the queue"
        await b.send({"t": "result", "id": cmd["id"], "data": None})
        await bounded(handle, "the command")
    finally:
        await b.close()


async def test_event_queue_is_bounded(make_hub: HubFactory, connect: Connect) -> None:
    hub = await make_hub(max_event_queue=3)
    a = await connect(hub, "a")
    kept = []
    for n in range(3):
        kept.append(asyncio.create_task(hub.emit_to("b", "ev", n, timeout=WAIT)))
        await wait_queued(hub, "b", n + 1)

    # The fourth is refused by the full queue: it can never be received.
    with pytest.raises(DeliveryTimeout) as info:
        await bounded(hub.emit_to("b", "ev", 3, timeout=SHORT), "the fourth emit_to")
    assert info.value.pending == ["b"]

    # An agent's emit to the offline agent is refused too, with an error frame.
    await a.send({"t": "emit", "key": "ev", "data": "from-a", "to": ["b"]})
    err = await a.recv_type("error")
    assert isinstance(err["code"], str) and err["code"], err
    assert "b" in err["message"], f"the error names the agent whose queue is full: {err}"
    assert len(await queued_frames(hub, "b")) == 3, "the queue stays at its limit"

    b = await connect(hub, "b")
    events = await recv_events(b, 3)
    assert [e["data"] for e in events] == [0, 1, 2]
    await hub.broadcast("marker", None)
    await expect_marker(b, "marker", "nothing beyond the queue's limit was delivered")
    for e in events:
        await b.send({"t": "received", "id": e["id"]})
    await bounded(asyncio.gather(*kept), "the three queued emit_to calls")


async def test_expired_queued_event_is_not_delivered(
    make_hub: HubFactory, connect: Connect
) -> None:
    ttl = 0.2
    hub = await make_hub(event_queue_ttl=ttl)
    # Queued at once; the timeout (2 * ttl) starts after it is queued, so by the
    # time emit_to gives up the event has been in the queue longer than its ttl.
    with pytest.raises(DeliveryTimeout):
        await bounded(hub.emit_to("b", "old", 1, timeout=2 * ttl), "DeliveryTimeout")

    b = await connect(hub, "b")
    fresh = asyncio.create_task(hub.emit_to("b", "new", 2, timeout=WAIT))
    frame = await expect_marker(b, "new", "the expired event must not be delivered")
    await b.send({"t": "received", "id": frame["id"]})
    await bounded(fresh, "emit_to of the fresh event")


async def test_expired_events_make_room_in_a_full_queue(
    make_hub: HubFactory, connect: Connect
) -> None:
    ttl = 0.8
    hub = await make_hub(max_event_queue=3, event_queue_ttl=ttl)
    # Each DeliveryTimeout proves its events were queued at least `timeout` before:
    # event 0 is older than the ttl once the second batch gives up, 1 and 2 are not.
    with pytest.raises(DeliveryTimeout):
        await bounded(hub.emit_to("b", "ev", 0, timeout=0.4), "the first DeliveryTimeout")
    second = now_ms()
    with pytest.raises(DeliveryTimeout):
        await bounded(asyncio.gather(hub.emit_to("b", "ev", 1, timeout=0.5),
                                     hub.emit_to("b", "ev", 2, timeout=0.5)),
                      "the second DeliveryTimeout")
    # The queue is full, but its oldest entry has expired: the new one takes its place.
    fresh = asyncio.create_task(hub.emit_to("b", "ev", 3, timeout=WAIT))
    b = await connect(hub, "b")
    assert now_ms() - second < 1000 * ttl, "the machine was too slow for this test's timing"
    await hub.broadcast("marker", None)
    got = []
    while (frame := await b.recv_type("event"))["key"] != "marker":
        got.append(frame["data"])
        await b.send({"t": "received", "id": frame["id"]})
    assert got == [1, 2, 3], (
        "an expired event must not hold a place in a full queue (the memory engine "
        f"makes room, Redis must too); b got {got}")
    await bounded(fresh, "emit_to of the fresh event")


async def test_unreceived_event_is_delivered_again_on_next_connection(
    hub: Dispatcher, connect: Connect
) -> None:
    b1 = await connect(hub, "b")
    task = asyncio.create_task(hub.emit_to("b", "ev", {"v": 1}, timeout=WAIT))
    sent = await b1.recv_type("event")
    await go_offline(hub, b1, "b")  # dropped without answering 'received'
    await still_pending(task, "emit_to whose agent dropped before its receipt")

    b2 = await connect(hub, "b")
    again = await b2.recv()
    assert again["t"] == "event" and again["id"] == sent["id"] and again["data"] == {"v": 1}, again
    await b2.send({"t": "received", "id": again["id"]})
    await bounded(task, "emit_to after the redelivered event's receipt")

    # Received means delivered: the next connection does not get it again.
    await go_offline(hub, b2, "b")
    b3 = await connect(hub, "b")
    await hub.broadcast("marker", None)
    await expect_marker(b3, "marker", "a received event must not come again")


async def test_unreceived_events_come_back_before_newer_queued_ones(
    hub: Dispatcher, connect: Connect
) -> None:
    b1 = await connect(hub, "b")
    first = asyncio.create_task(hub.emit_to("b", "ev", 1, timeout=WAIT))
    await b1.recv_type("event")
    await go_offline(hub, b1, "b")
    second = asyncio.create_task(hub.emit_to("b", "ev", 2, timeout=WAIT))
    await wait_queued(hub, "b", 2)

    b2 = await connect(hub, "b")
    events = await recv_events(b2, 2)
    assert [e["data"] for e in events] == [1, 2], "oldest first, the requeued one included"
    for e in events:
        await b2.send({"t": "received", "id": e["id"]})
    await bounded(asyncio.gather(first, second), "both emit_to calls")


async def test_unreceived_events_are_bounded_like_the_queue(
    make_hub: HubFactory, connect: Connect
) -> None:
    """An agent that never answers 'received' must not grow the hub without bound:
    what the hub keeps for it to redeliver obeys ``max_event_queue`` too."""
    hub = await make_hub(max_event_queue=3)
    b1 = await connect(hub, "b")
    results = await bounded(asyncio.gather(
        *(hub.emit_to("b", "ev", n, timeout=SHORT) for n in range(6)), return_exceptions=True,
    ), "the emit_to calls to time out")
    assert all(isinstance(r, DeliveryTimeout) for r in results), results
    assert [e["data"] for e in await recv_events(b1, 6)] == list(range(6))
    await go_offline(hub, b1, "b")

    b2 = await connect(hub, "b")
    await hub.broadcast("marker", None)
    got = []
    while (frame := await b2.recv_type("event"))["key"] != "marker":
        got.append(frame["data"])
    assert got == [0, 1, 2], (
        f"at most max_event_queue=3 unreceived events are kept for redelivery; got {got}")


async def test_queued_event_delivered_then_dropped_comes_again(
    hub: Dispatcher, connect: Connect
) -> None:
    task = asyncio.create_task(hub.emit_to("b", "ev", "q", timeout=WAIT))
    await wait_queued(hub, "b", 1)
    b1 = await connect(hub, "b")
    first = await b1.recv_type("event")
    await go_offline(hub, b1, "b")
    b2 = await connect(hub, "b")
    again = await b2.recv_type("event")
    assert again["id"] == first["id"]
    await b2.send({"t": "received", "id": again["id"]})
    await bounded(task, "emit_to after the second delivery")


async def test_unreceived_event_moves_to_the_replacing_connection(
    hub: Dispatcher, connect: Connect
) -> None:
    b1 = await connect(hub, "b")
    task = asyncio.create_task(hub.emit_to("b", "ev", "x", timeout=WAIT))
    sent = await b1.recv_type("event")
    b2 = await connect(hub, "b")  # replaces b1 (4409) while b1 never answered
    again = await b2.recv_type("event")
    assert again["id"] == sent["id"]
    await b2.send({"t": "received", "id": again["id"]})
    await bounded(task, "emit_to answered on the replacing connection")


# -- broadcast ---------------------------------------------------------------------------------------


async def test_broadcast_reaches_every_connected_agent(hub: Dispatcher, connect: Connect) -> None:
    agents = [await connect(hub, name) for name in ("b", "c", "d")]
    n = await bounded(hub.broadcast("news", {"headline": "hi"}), "broadcast")
    assert n == 3
    for agent in agents:
        frame = await agent.recv()
        assert frame == {"t": "event", "key": "news", "data": {"headline": "hi"}}, \
            "a broadcast has no id and needs no receipt"


# -- agent emits and subscriptions --------------------------------------------------------------------


async def test_agent_emit_reaches_hub_and_subscribers_not_sender(
    hub: Dispatcher, connect: Connect
) -> None:
    seen: asyncio.Queue[tuple[Any, str]] = asyncio.Queue()
    hub.on("job.done", lambda data, sender: seen.put_nowait((data, sender)))
    a = await connect(hub, "a", subs=["job.*", "job.done"])  # the sender never gets its own
    exact = await connect(hub, "exact", subs=["job.done"])
    prefix = await connect(hub, "prefix", subs=["job.*"])
    both = await connect(hub, "both", subs=["job.*", "job.done"])
    other = await connect(hub, "other", subs=["jobs", "job.done.x", "x.*"])

    await a.send({"t": "emit", "key": "job.done", "data": {"n": 1}})
    assert await bounded(seen.get(), "the hub's own emitter") == ({"n": 1}, "a")
    for agent in (exact, prefix, both):
        frame = await agent.recv()
        assert frame == {"t": "event", "key": "job.done", "data": {"n": 1}, "from": "a"}, frame
    await hub.broadcast("marker", None)
    for agent, why in ((a, "the sender"), (both, "an agent matching twice gets it once"),
                       (other, "a non-matching subscriber")):
        await expect_marker(agent, "marker", f"{why} must not get the event")


async def test_emit_with_to_goes_only_to_the_listed_agents(
    hub: Dispatcher, connect: Connect
) -> None:
    seen: asyncio.Queue[tuple[Any, str]] = asyncio.Queue()
    hub.on("note", lambda data, sender: seen.put_nowait((data, sender)))
    a = await connect(hub, "a", subs=["note"])
    b = await connect(hub, "b")
    c = await connect(hub, "c", subs=["note"])

    await a.send({"t": "emit", "key": "note", "data": "hi", "to": ["b", "a"]})
    assert await bounded(seen.get(), "the hub's own emitter") == ("hi", "a")
    frame = await b.recv()
    assert frame == {"t": "event", "key": "note", "data": "hi", "from": "a"}, \
        "an event routed by 'to' needs no receipt"
    await hub.broadcast("marker", None)
    await expect_marker(c, "marker", "a subscriber not in 'to' must not get it")
    await expect_marker(a, "marker", "the sender must not get it even when listed in 'to'")


async def test_to_offline_agent_is_queued(hub: Dispatcher, connect: Connect) -> None:
    a = await connect(hub, "a")
    await a.send({"t": "emit", "key": "note", "data": 7, "to": ["later"]})
    await wait_queued(hub, "later", 1)
    later = await connect(hub, "later")
    frame = await later.recv()
    assert frame == {"t": "event", "key": "note", "data": 7, "from": "a"}, frame


async def test_hello_subs_are_in_force_when_welcome_arrives(
    hub: Dispatcher, connect: Connect
) -> None:
    seen: asyncio.Queue[Any] = asyncio.Queue()
    hub.on("k", lambda data, sender: seen.put_nowait(data))
    a = await connect(hub, "a")
    # Not through ``connect``: act on the welcome alone, as an agent would.
    b, _ = await RawAgent.hello(ws_url(hub), "b", subs=["k"])
    try:
        await a.send({"t": "emit", "key": "k", "data": 1})
        await bounded(seen.get(), "the hub to handle the emit")
        await hub.broadcast("marker", None)
        frame = await b.recv()
        assert frame.get("key") == "k", (
            "an emit sent after b got 'welcome' must reach b through the 'subs' of its "
            f"hello (subscriptions must be in force before welcome is sent); got {frame}")
    finally:
        await b.close()


async def test_sub_and_unsub_frames(hub: Dispatcher, connect: Connect) -> None:
    a = await connect(hub, "a")
    b = await connect(hub, "b", subs=["marker"])
    await b.send({"t": "sub", "keys": ["k.*", "exact"]})
    await wait_for(lambda: hub._events.subscriptions("b") == {"marker", "k.*", "exact"},
                   what="b's subscriptions")
    await a.send({"t": "emit", "key": "k.1", "data": 1})
    await a.send({"t": "emit", "key": "exact", "data": 2})
    assert [(f["key"], f["data"]) for f in await recv_events(b, 2)] == [("k.1", 1), ("exact", 2)]

    await b.send({"t": "unsub", "keys": ["k.*", "not-subscribed"]})
    await wait_for(lambda: hub._events.subscriptions("b") == {"marker", "exact"},
                   what="b's subscriptions after unsub")
    await a.send({"t": "emit", "key": "k.2", "data": 3})
    await a.send({"t": "emit", "key": "marker", "data": None})
    await expect_marker(b, "marker", "an unsubscribed key must not be delivered")


async def test_subscriptions_end_with_the_connection(hub: Dispatcher, connect: Connect) -> None:
    b1 = await connect(hub, "b", subs=["k"])
    await go_offline(hub, b1, "b")
    assert hub._events.subscriptions("b") == set()
    a = await connect(hub, "a")
    await a.send({"t": "emit", "key": "k", "data": 1})
    b2 = await connect(hub, "b")  # no subs this time: nothing was queued for it
    await hub.broadcast("marker", None)
    await expect_marker(b2, "marker", "subscriptions must not outlive the connection")


@pytest.mark.parametrize("key", ["agent-connected", "agent-disconnected", "internal.db.error",
                                 "internal.x"])
async def test_reserved_keys_are_refused(hub: Dispatcher, connect: Connect, key: str) -> None:
    a = await connect(hub, "a")
    b = await connect(hub, "b")
    raised: list[Any] = []  # the hub's own agent-connected events are behind us now
    hub.on(key, lambda *args: raised.append(args))
    await a.send({"t": "emit", "key": key, "data": None, "to": ["b"]})
    err = await a.recv()
    assert err["t"] == "error" and err["code"] == "reserved_key", err
    await a.send({"t": "sub", "keys": [key]})
    err = await a.recv()
    assert err["t"] == "error" and err["code"] == "reserved_key", err
    await hub.broadcast("marker", None)
    await expect_marker(b, "marker", "a reserved key must not be forwarded")
    await expect_marker(a, "marker", "the connection stays usable")
    assert raised == [], "a reserved key must not reach the hub's emitter from an agent"


@pytest.mark.parametrize("frame", [
    {"t": "emit", "data": 1},
    {"t": "emit", "key": 5, "data": 1},
    {"t": "emit", "key": "", "data": 1},
    {"t": "emit", "key": "k"},
    {"t": "emit", "key": "k", "data": 1, "to": "b"},
    {"t": "emit", "key": "k", "data": 1, "to": ["bad id!"]},
    {"t": "sub"},
    {"t": "sub", "keys": "k"},
    {"t": "sub", "keys": [1]},
    {"t": "unsub", "keys": None},
    {"t": "received"},
    {"t": "call", "id": "c1"},
    {"t": "call", "id": "c1", "agent": "b", "payload": None},
    {"t": "call", "id": "c1", "agent": "b", "key": "k"},
    {"t": "call", "id": "c1", "agent": "b", "key": "k", "payload": None, "timeout": -1},
    {"t": "call", "id": "c1", "agent": "b", "key": "k", "payload": None, "timeout": "soon"},
    {"t": "call", "id": 7, "agent": "b", "key": "k", "payload": None},
], ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items() if k != "t") or "empty")
async def test_malformed_frames_get_bad_frame_and_connection_stays(
    hub: Dispatcher, connect: Connect, frame: dict[str, Any]
) -> None:
    a = await connect(hub, "a")
    b = await connect(hub, "b")
    await a.send(frame)
    err = await a.recv()
    assert err["t"] == "error" and err["code"] == "bad_frame", err
    assert isinstance(err["message"], str) and err["message"]
    if frame["t"] == "call" and isinstance(frame["id"], str):
        assert err.get("ref") == "c1", f"the error echoes the call's id: {err}"
    # Still usable: a valid emit goes through and a valid call is answered.
    await a.send({"t": "emit", "key": "ok", "data": 1, "to": ["b"]})
    assert (await b.recv())["key"] == "ok"
    await a.send({"t": "call", "id": "c2", "agent": "b", "key": "k", "payload": None})
    cmd = await b.recv_type("cmd")
    await b.send({"t": "result", "id": cmd["id"], "data": "fine"})
    assert await a.recv_type("reply") == {"t": "reply", "id": "c2", "ok": True, "data": "fine"}


# -- routed calls ----------------------------------------------------------------------------------------


async def test_call_runs_as_a_command_and_replies(hub: Dispatcher, connect: Connect) -> None:
    a = await connect(hub, "a")
    b = await connect(hub, "b")
    await a.send({"t": "call", "id": "c1", "agent": "b", "key": "add", "payload": [2, 3],
                  "timeout": WAIT})
    cmd = await b.recv_type("cmd")
    assert cmd["key"] == "add" and cmd["payload"] == [2, 3]
    pending: list[CommandInfo] = await hub.list_pending_commands("b")
    assert [(p.id, p.key, p.payload) for p in pending] == [(cmd["id"], "add", [2, 3])]
    await b.send({"t": "ack", "id": cmd["id"]})
    await b.send({"t": "progress", "id": cmd["id"], "data": 0.5})
    await b.send({"t": "result", "id": cmd["id"], "data": 5})
    reply = await a.recv()
    assert reply == {"t": "reply", "id": "c1", "ok": True, "data": 5}
    info = await hub.get_command(cmd["id"])
    assert info is not None and info.status == "COMPLETE" and info.outcome == "ok"
    assert await hub.list_pending_commands("b") == []


async def test_call_fail_code_comes_back(hub: Dispatcher, connect: Connect) -> None:
    a = await connect(hub, "a")
    b = await connect(hub, "b")
    await a.send({"t": "call", "id": "c1", "agent": "b", "key": "div", "payload": [1, 0]})
    cmd = await b.recv_type("cmd")
    await b.send({"t": "fail", "id": cmd["id"],
                  "error": {"code": "div_by_zero", "message": "no", "data": {"at": 1}}})
    reply = await a.recv_type("reply")
    assert reply["id"] == "c1" and reply["ok"] is False
    assert reply["error"]["code"] == "div_by_zero"
    assert reply["error"]["message"] == "no"
    assert reply["error"].get("data") == {"at": 1}


async def test_call_timeout(hub: Dispatcher, connect: Connect) -> None:
    a = await connect(hub, "a")
    b = await connect(hub, "b")
    await a.send({"t": "call", "id": "c1", "agent": "b", "key": "slow", "payload": None,
                  "timeout": SHORT})
    cmd = await b.recv_type("cmd")
    reply = await a.recv_type("reply")
    assert reply["id"] == "c1" and reply["ok"] is False
    assert reply["error"]["code"] == "timeout", reply
    assert (await b.recv_type("cancel"))["id"] == cmd["id"]


async def test_call_to_offline_agent(hub: Dispatcher, connect: Connect) -> None:
    a = await connect(hub, "a")
    await a.send({"t": "call", "id": "c1", "agent": "ghost", "key": "k", "payload": None})
    reply = await a.recv()
    assert reply["t"] == "reply" and reply["id"] == "c1" and reply["ok"] is False, reply
    assert reply["error"]["code"] == "agent_offline", reply
    assert await hub.list_pending_commands("ghost") == [], "no command left waiting for it"


async def test_call_to_oneself_is_refused(hub: Dispatcher, connect: Connect) -> None:
    a = await connect(hub, "a")
    await a.send({"t": "call", "id": "c1", "agent": "a", "key": "k", "payload": None})
    reply = await a.recv()
    assert reply["t"] == "reply" and reply["id"] == "c1" and reply["ok"] is False, reply
    assert reply["error"]["code"] == "bad_request"
    assert "itself" in reply["error"]["message"]
    assert await hub.list_pending_commands("a") == []


async def test_call_to_invalid_agent_id(hub: Dispatcher, connect: Connect) -> None:
    a = await connect(hub, "a")
    await a.send({"t": "call", "id": "c1", "agent": "no spaces!", "key": "k", "payload": None})
    err = await a.recv()
    assert err["t"] == "error" and err["code"] == "bad_frame" and err.get("ref") == "c1", err
    assert "agent" in err["message"]


# -- a flood must not grow the hub ------------------------------------------------------------------------


async def test_emit_flood_stays_bounded_and_commands_still_run(
    make_hub: HubFactory, connect: Connect
) -> None:
    limit, n = 20, 2000
    hub = await make_hub(max_event_queue=limit)
    flooder = await connect(hub, "flooder")
    sub = await connect(hub, "sub", subs=["flood.*"])
    worker = await connect(hub, "worker")

    async def flood() -> None:
        for i in range(n):
            await flooder.send({"t": "emit", "key": "flood.x", "data": i})
            await flooder.send({"t": "emit", "key": "flood.y", "data": i, "to": ["ghost"]})

    async def count_errors() -> int:
        errors = 0
        while errors < n - limit:
            frame = await flooder.recv()
            assert frame["t"] == "error", frame
            errors += 1
        return errors

    async def count_events() -> list[Any]:
        return [(await sub.recv_type("event"))["data"] for _ in range(n)]

    flooding = asyncio.create_task(flood())
    errors = asyncio.create_task(count_errors())
    events = asyncio.create_task(count_events())
    handle = hub.execute_on_agent("worker", "work", None, timeout=WAIT)
    cmd = await worker.recv_type("cmd")
    await worker.send({"t": "result", "id": cmd["id"], "data": "done"})
    assert await bounded(handle, "the worker's command during the flood") == "done"

    await bounded(flooding, "the flood to be sent")
    assert await bounded(events, "the subscriber's events") == list(range(n))
    assert await bounded(errors, "the refusals") == n - limit
    assert hub._events.dropped == n - limit

    ghost = await connect(hub, "ghost")
    got = [(await ghost.recv_type("event"))["data"] for _ in range(limit)]
    assert got == list(range(limit)), "the oldest events were kept, up to the limit"
    await hub.broadcast("marker", None)
    await expect_marker(ghost, "marker", f"at most {limit} events were queued")
