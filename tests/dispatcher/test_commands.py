"""The command lifecycle end to end, frame by frame (docs/guide.md; docs/protocol.md, Commands and redelivery).

Agents here are raw msgpack clients (``RawAgent``) so that every frame the hub
sends and accepts is checked as docs/protocol.md writes it. Every test runs against
each store engine; none reaches into an engine's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from dispatcher import (
    AgentOffline,
    CommandCancelled,
    CommandFailed,
    CommandHandle,
    CommandInfo,
    CommandTimeout,
    Dispatcher,
    HubClosed,
    UnknownCommand,
)

from ..conftest import ws_url
from ..support import WAIT, RawAgent

pytestmark = pytest.mark.fallback  # run again with the fast paths off (CI)

SHORT = 0.3  # timeout of the commands that are meant to time out


class Peer(RawAgent):
    """A raw agent that remembers the ``welcome`` frame it got."""

    welcome: dict[str, Any]


Connect = Callable[..., Awaitable[Peer]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """``await connect(hub, agent_id, **hello_fields)``: a raw agent past the handshake."""
    opened: list[Peer] = []

    async def factory(hub: Dispatcher, agent_id: str, **fields: Any) -> Peer:
        agent, welcome = await Peer.hello(ws_url(hub), agent_id, **fields)
        assert isinstance(agent, Peer)
        agent.welcome = welcome
        opened.append(agent)
        return agent

    yield factory
    for agent in opened:
        with contextlib.suppress(Exception):
            await agent.close()


async def outcome(handle: CommandHandle, timeout: float = WAIT) -> Any:
    """What awaiting the handle gives, bounded."""
    async with asyncio.timeout(timeout):
        return await handle


async def stored(hub: Dispatcher, cmd_id: str) -> CommandInfo:
    info = await hub.get_command(cmd_id)
    assert info is not None, f"command {cmd_id} is not in the store"
    return info


async def eventually(
    probe: Callable[[], Awaitable[Any]], check: Callable[[Any], bool],
    timeout: float = WAIT, what: str = "condition",
) -> Any:
    """Poll an async ``probe`` until ``check`` accepts its value (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await probe()
        if check(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last value: {value!r}")
        await asyncio.sleep(0.01)


def disconnected(hub: Dispatcher, agent_id: str) -> asyncio.Event:
    """An event set once the hub reports ``agent-disconnected`` for ``agent_id``."""
    event = asyncio.Event()

    def handler(agent: Any, reason: str) -> None:
        if agent.id == agent_id:
            event.set()

    hub.on("agent-disconnected", handler)
    return event


async def go_offline(hub: Dispatcher, agent: RawAgent, agent_id: str) -> None:
    """Close the agent's connection and wait until the hub has noticed."""
    gone = disconnected(hub, agent_id)
    await agent.close()
    async with asyncio.timeout(WAIT):
        await gone.wait()


async def expect_unknown_command(agent: RawAgent, cmd_id: str) -> None:
    frame = await agent.recv_type("error")
    assert frame["code"] == "unknown_command", frame
    assert frame.get("ref") == cmd_id, frame
    assert isinstance(frame["message"], str)


async def recv_cmds(agent: RawAgent, n: int) -> list[dict[str, Any]]:
    return [await agent.recv_type("cmd") for _ in range(n)]


# -- submit and deliver ----------------------------------------------------------------------------


async def test_handle_at_once_and_cmd_frame(hub: Dispatcher, connect: Connect) -> None:
    agent = await connect(hub, "a1")
    before = int(time.time() * 1000)
    handle = hub.execute_on_agent("a1", "resize", {"w": 640, "raw": b"\x00\xff"}, timeout=5)
    # A plain method: the handle and its id exist before anything is awaited.
    assert isinstance(handle, CommandHandle)
    assert isinstance(handle.id, str) and handle.id
    assert not handle.done()
    async with asyncio.timeout(WAIT):
        await handle.submitted()
    after = int(time.time() * 1000)

    frame = await agent.recv()
    assert set(frame) == {"t", "id", "key", "payload", "ts", "deadline"}, frame
    assert frame["t"] == "cmd"
    assert frame["id"] == handle.id
    assert frame["key"] == "resize"
    assert frame["payload"] == {"w": 640, "raw": b"\x00\xff"}  # bin stays bin
    assert isinstance(frame["ts"], int) and before <= frame["ts"] <= after
    assert isinstance(frame["deadline"], int)
    assert abs(frame["deadline"] - (frame["ts"] + 5000)) <= 50, frame

    info = await stored(hub, handle.id)
    assert info.status == "PENDING"
    assert info.outcome is None

    await agent.send({"t": "ack", "id": handle.id})
    info = await eventually(lambda: stored(hub, handle.id), lambda i: i.status == "ACTIVE",
                            what="ACTIVE after ack")
    assert info.outcome is None

    await agent.send({"t": "result", "id": handle.id, "data": {"ok": True, "b": b"\x01"}})
    assert await outcome(handle) == {"ok": True, "b": b"\x01"}
    assert handle.done()
    info = await stored(hub, handle.id)
    assert info.status == "COMPLETE"
    assert info.outcome == "ok"
    assert info.result == {"ok": True, "b": b"\x01"}
    assert info.error is None
    await agent.expect_silence(0.1)  # an answered command is not cancelled


async def test_result_without_ack(hub: Dispatcher, connect: Connect) -> None:
    agent = await connect(hub, "a1")
    handle = hub.execute_on_agent("a1", "echo", 7)
    cmd = await agent.recv_type("cmd")
    await agent.send({"t": "result", "id": cmd["id"], "data": 8})
    assert await outcome(handle) == 8
    assert (await stored(hub, handle.id)).outcome == "ok"


async def test_progress_reaches_handle_in_order(hub: Dispatcher, connect: Connect) -> None:
    agent = await connect(hub, "a1")
    handle = hub.execute_on_agent("a1", "job")

    async def follow() -> list[Any]:
        return [update async for update in handle.progress()]

    follower = asyncio.create_task(follow())
    cmd = await agent.recv_type("cmd")
    await agent.send({"t": "ack", "id": cmd["id"]})
    for i in range(5):
        await agent.send({"t": "progress", "id": cmd["id"], "data": {"step": i}})
    await agent.send({"t": "result", "id": cmd["id"], "data": "done"})

    assert await outcome(handle) == "done"
    async with asyncio.timeout(WAIT):
        updates = await follower  # the iteration ends with the command
    assert updates == [{"step": i} for i in range(5)]
    await agent.expect_silence(0.1)  # no error frame for any of them


async def test_fail_raises_command_failed(hub: Dispatcher, connect: Connect) -> None:
    agent = await connect(hub, "a1")
    handle = hub.execute_on_agent("a1", "resize", {"w": -1})
    cmd = await agent.recv_type("cmd")
    await agent.send({"t": "ack", "id": cmd["id"]})
    await agent.send({"t": "fail", "id": cmd["id"],
                      "error": {"code": "bad_size", "message": "width < 0", "data": {"w": -1}}})
    with pytest.raises(CommandFailed) as caught:
        await outcome(handle)
    assert caught.value.code == "bad_size"
    assert caught.value.message == "width < 0"
    assert caught.value.data == {"w": -1}

    info = await stored(hub, handle.id)
    assert info.status == "COMPLETE"
    assert info.outcome == "error"
    assert info.error is not None
    assert info.error["code"] == "bad_size"
    assert info.error["message"] == "width < 0"
    assert info.error.get("data") == {"w": -1}
    await agent.expect_silence(0.1)


# -- timeout and cancel ----------------------------------------------------------------------------


async def test_timeout_completes_and_cancels(hub: Dispatcher, connect: Connect) -> None:
    agent = await connect(hub, "a1")
    handle = hub.execute_on_agent("a1", "slow", timeout=SHORT)
    cmd = await agent.recv_type("cmd")
    assert abs(cmd["deadline"] - cmd["ts"] - SHORT * 1000) <= 50, cmd
    await agent.send({"t": "ack", "id": cmd["id"]})

    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        await outcome(handle, timeout=SHORT + 1.5)
    assert time.monotonic() - started < SHORT + 1.0

    cancel = await agent.recv_type("cancel", timeout=1.0)
    assert cancel == {"t": "cancel", "id": handle.id}
    info = await stored(hub, handle.id)
    assert info.status == "COMPLETE"
    assert info.outcome == "timeout"
    assert await hub.list_pending_commands("a1") == []

    # A terminal frame after the timeout is refused and changes nothing.
    await agent.send({"t": "result", "id": handle.id, "data": "late"})
    await expect_unknown_command(agent, handle.id)
    info = await stored(hub, handle.id)
    assert info.outcome == "timeout"
    assert info.result is None


async def test_timeout_of_a_command_for_an_offline_agent(hub: Dispatcher, connect: Connect) -> None:
    handle = hub.execute_on_agent("a1", "slow", timeout=SHORT)
    with pytest.raises(CommandTimeout):
        await outcome(handle, timeout=SHORT + 1.5)
    assert (await stored(hub, handle.id)).outcome == "timeout"
    assert await hub.list_pending_commands("a1") == []
    agent = await connect(hub, "a1")
    await agent.expect_silence(0.2)  # a timed-out command is never delivered


async def test_cancel(hub: Dispatcher, connect: Connect) -> None:
    agent = await connect(hub, "a1")
    handle = hub.execute_on_agent("a1", "job")
    cmd = await agent.recv_type("cmd")
    await agent.send({"t": "ack", "id": cmd["id"]})
    await eventually(lambda: stored(hub, handle.id), lambda i: i.status == "ACTIVE")

    async with asyncio.timeout(WAIT):
        assert await handle.cancel() is True
    with pytest.raises(CommandCancelled):
        await outcome(handle)
    cancel = await agent.recv_type("cancel")
    assert cancel == {"t": "cancel", "id": handle.id}
    info = await stored(hub, handle.id)
    assert info.status == "COMPLETE"
    assert info.outcome == "cancelled"

    await agent.send({"t": "fail", "id": handle.id,
                      "error": {"code": "cancelled", "message": "stopped"}})
    await expect_unknown_command(agent, handle.id)
    assert (await stored(hub, handle.id)).outcome == "cancelled"
    async with asyncio.timeout(WAIT):
        assert await handle.cancel() is False


async def test_cancel_while_the_caller_waits(hub: Dispatcher, connect: Connect) -> None:
    agent = await connect(hub, "a1")
    handle = hub.execute_on_agent("a1", "job")
    waiter = asyncio.create_task(outcome(handle))
    await agent.recv_type("cmd")
    async with asyncio.timeout(WAIT):
        assert await handle.cancel() is True
    with pytest.raises(CommandCancelled):
        await waiter
    assert (await agent.recv_type("cancel"))["id"] == handle.id


async def test_cancel_after_completion_returns_false(hub: Dispatcher, connect: Connect) -> None:
    agent = await connect(hub, "a1")
    handle = hub.execute_on_agent("a1", "echo", 1)
    cmd = await agent.recv_type("cmd")
    await agent.send({"t": "result", "id": cmd["id"], "data": 1})
    assert await outcome(handle) == 1
    async with asyncio.timeout(WAIT):
        assert await handle.cancel() is False
    info = await stored(hub, handle.id)
    assert info.outcome == "ok"
    assert info.result == 1
    await agent.expect_silence(0.1)  # no cancel for a finished command


# -- idempotent submit -----------------------------------------------------------------------------


async def test_command_id_is_idempotent(hub: Dispatcher, connect: Connect) -> None:
    agent = await connect(hub, "a1")
    first = hub.execute_on_agent("a1", "deploy", {"v": 1}, command_id="deploy-42")
    second = hub.execute_on_agent("a1", "deploy", {"v": 1}, command_id="deploy-42")
    assert first.id == second.id == "deploy-42"
    async with asyncio.timeout(WAIT):
        await first.submitted()
        await second.submitted()

    cmd = await agent.recv_type("cmd")
    assert cmd["id"] == "deploy-42"
    await agent.expect_silence(0.2)  # delivered once
    assert [c.id for c in await hub.list_pending_commands("a1")] == ["deploy-42"]

    await agent.send({"t": "result", "id": "deploy-42", "data": "v1 live"})
    assert await outcome(first) == "v1 live"
    assert await outcome(second) == "v1 live"

    # Once COMPLETE, the same id gives the stored outcome: never a second run.
    third = hub.execute_on_agent("a1", "deploy", {"v": 2}, command_id="deploy-42")
    assert third.id == "deploy-42"
    assert await outcome(third) == "v1 live"
    await agent.expect_silence(0.2)
    info = await stored(hub, "deploy-42")
    assert info.payload == {"v": 1}
    assert info.result == "v1 live"


async def test_command_id_idempotent_for_an_offline_agent(
    hub: Dispatcher, connect: Connect
) -> None:
    handles = [hub.execute_on_agent("a1", "deploy", i, command_id="once") for i in range(3)]
    async with asyncio.timeout(WAIT):
        for h in handles:
            await h.submitted()
    assert [c.id for c in await hub.list_pending_commands("a1")] == ["once"]
    agent = await connect(hub, "a1")
    cmd = await agent.recv_type("cmd")
    assert cmd["id"] == "once"
    assert cmd["payload"] == 0
    await agent.expect_silence(0.2)
    await agent.send({"t": "result", "id": "once", "data": "x"})
    for h in handles:
        assert await outcome(h) == "x"


# -- groups ----------------------------------------------------------------------------------------


async def test_group_coalesces_commands_for_an_offline_agent(
    hub: Dispatcher, connect: Connect
) -> None:
    handles = [hub.execute_on_agent("a1", "sync", {"n": i}, group="sync-all") for i in range(3)]
    async with asyncio.timeout(WAIT):
        for h in handles:
            await h.submitted()
    pending = await hub.list_pending_commands("a1")
    assert [c.id for c in pending] == [h.id for h in handles]
    assert all(c.group == "sync-all" for c in pending)

    agent = await connect(hub, "a1")
    cmd = await agent.recv_type("cmd")
    assert cmd["id"] == handles[0].id  # only the first of the group runs
    assert cmd["payload"] == {"n": 0}
    await agent.expect_silence(0.2)

    await agent.send({"t": "ack", "id": cmd["id"]})
    await agent.send({"t": "result", "id": cmd["id"], "data": {"synced": 3}})
    for h in handles:
        assert await outcome(h) == {"synced": 3}
    for h in handles:
        info = await stored(hub, h.id)
        assert info.status == "COMPLETE"
        assert info.outcome == "ok"
        assert info.result == {"synced": 3}
    assert await hub.list_pending_commands("a1") == []
    # The other members were never sent, so there is nothing to cancel either
    # (docs/protocol.md, Commands and redelivery: cancel is for timeouts, cancels and drops).
    await agent.expect_silence(0.2)


async def test_group_coalesces_commands_for_an_online_agent(
    hub: Dispatcher, connect: Connect
) -> None:
    agent = await connect(hub, "a1")
    first = hub.execute_on_agent("a1", "sync", 1, group="g")
    cmd = await agent.recv_type("cmd")
    assert cmd["id"] == first.id
    second = hub.execute_on_agent("a1", "sync", 2, group="g")
    async with asyncio.timeout(WAIT):
        await second.submitted()
    await agent.expect_silence(0.2)  # the group already has a command in flight
    await agent.send({"t": "fail", "id": first.id,
                      "error": {"code": "disk_full", "message": "no space"}})
    for h in (first, second):
        with pytest.raises(CommandFailed) as caught:
            await outcome(h)
        assert caught.value.code == "disk_full"
    assert (await stored(hub, second.id)).outcome == "error"


async def test_group_true_means_agent_and_key(hub: Dispatcher, connect: Connect) -> None:
    a = hub.execute_on_agent("a1", "refresh", 1, group=True)
    b = hub.execute_on_agent("a1", "refresh", 2, group=True)
    other_key = hub.execute_on_agent("a1", "restart", 3, group=True)
    other_agent = hub.execute_on_agent("a2", "refresh", 4, group=True)
    async with asyncio.timeout(WAIT):
        for h in (a, b, other_key, other_agent):
            await h.submitted()
    ga, gb, g_key, g_agent = [
        (await stored(hub, h.id)).group for h in (a, b, other_key, other_agent)]
    assert ga is not None
    assert ga == gb
    assert len({ga, g_key, g_agent}) == 3, (ga, g_key, g_agent)

    agent = await connect(hub, "a1")
    cmds = await recv_cmds(agent, 2)
    assert [c["id"] for c in cmds] == [a.id, other_key.id]
    await agent.expect_silence(0.2)

    await agent.send({"t": "result", "id": a.id, "data": "refreshed"})
    assert await outcome(a) == "refreshed"
    assert await outcome(b) == "refreshed"
    assert not other_key.done()
    assert [c.id for c in await hub.list_pending_commands("a1")] == [other_key.id]
    assert [c.id for c in await hub.list_pending_commands("a2")] == [other_agent.id]


async def test_an_answer_for_any_member_completes_the_group(
    hub: Dispatcher, connect: Connect
) -> None:
    agent = await connect(hub, "a1")
    leader = hub.execute_on_agent("a1", "sync", 1, group="g")
    assert (await agent.recv_type("cmd"))["id"] == leader.id
    member = hub.execute_on_agent("a1", "sync", 2, group="g")
    async with asyncio.timeout(WAIT):
        await member.submitted()
    assert await hub.apply_command_response(member.id, "via member") is True
    assert await outcome(member) == "via member"
    assert await outcome(leader) == "via member"
    # The agent had the leader: it is told to stop, and its late answer is refused.
    assert await agent.recv_type("cancel") == {"t": "cancel", "id": leader.id}
    await agent.send({"t": "result", "id": leader.id, "data": "late"})
    await expect_unknown_command(agent, leader.id)
    assert (await stored(hub, leader.id)).result == "via member"


async def test_ending_a_waiting_member_leaves_the_leader_alone(
    hub: Dispatcher, connect: Connect
) -> None:
    agent = await connect(hub, "a1")
    leader = hub.execute_on_agent("a1", "sync", 1, group="g", timeout=5)
    assert (await agent.recv_type("cmd"))["id"] == leader.id
    cancelled = hub.execute_on_agent("a1", "sync", 2, group="g", timeout=5)
    timed_out = hub.execute_on_agent("a1", "sync", 3, group="g", timeout=SHORT)
    waiting = hub.execute_on_agent("a1", "sync", 4, group="g", timeout=5)
    async with asyncio.timeout(WAIT):
        await waiting.submitted()
        assert await cancelled.cancel() is True
    with pytest.raises(CommandCancelled):
        await outcome(cancelled)
    with pytest.raises(CommandTimeout):
        await outcome(timed_out, timeout=SHORT + 1.5)
    # The leader is still in flight: it must not be sent a second time, and
    # no waiting member may start beside it.
    frames: list[dict[str, Any]] = []
    with contextlib.suppress(TimeoutError):
        while True:
            frames.append(await agent.recv(0.2))
    assert [f for f in frames if f["t"] == "cmd"] == [], frames
    assert {f["id"] for f in frames} <= {cancelled.id, timed_out.id}, frames

    await agent.send({"t": "result", "id": leader.id, "data": "synced"})
    assert await outcome(leader) == "synced"
    assert await outcome(waiting) == "synced"
    assert (await stored(hub, cancelled.id)).outcome == "cancelled"
    assert (await stored(hub, timed_out.id)).outcome == "timeout"


async def test_group_leader_timeout_lets_the_next_member_run(
    hub: Dispatcher, connect: Connect
) -> None:
    agent = await connect(hub, "a1")
    leader = hub.execute_on_agent("a1", "sync", 1, group="g", timeout=SHORT)
    assert (await agent.recv_type("cmd"))["id"] == leader.id
    follower = hub.execute_on_agent("a1", "sync", 2, group="g", timeout=5)
    with pytest.raises(CommandTimeout):
        await outcome(leader, timeout=SHORT + 1.5)
    assert not follower.done()  # a timeout is not an answer for the group
    frames = [await agent.recv(timeout=1.0) for _ in range(2)]
    assert {"t": "cancel", "id": leader.id} in frames
    nxt = next(f for f in frames if f["t"] == "cmd")
    assert nxt["id"] == follower.id
    await agent.send({"t": "result", "id": follower.id, "data": 2})
    assert await outcome(follower) == 2


# -- drop_all_pending ------------------------------------------------------------------------------


async def test_drop_all_pending(hub: Dispatcher, connect: Connect) -> None:
    agent = await connect(hub, "a1")
    active = hub.execute_on_agent("a1", "long", 0)
    plain = hub.execute_on_agent("a1", "resize", 1)
    other_group = hub.execute_on_agent("a1", "sync", 2, group="x")
    cmds = await recv_cmds(agent, 3)
    assert [c["id"] for c in cmds] == [active.id, plain.id, other_group.id]
    await agent.send({"t": "ack", "id": active.id})
    await eventually(lambda: stored(hub, active.id), lambda i: i.status == "ACTIVE")

    newest = hub.execute_on_agent("a1", "resize", 3, group="y", drop_all_pending=True)
    for h in (plain, other_group):
        assert await outcome(h) == {"dropped": True}
        info = await stored(hub, h.id)
        assert info.status == "COMPLETE"
        assert info.outcome == "dropped"
    # The agent had both dropped commands: it is told to stop them.
    frames = [await agent.recv() for _ in range(3)]
    cancels = sorted(f["id"] for f in frames if f["t"] == "cancel")
    assert cancels == sorted([plain.id, other_group.id]), frames
    assert [f["id"] for f in frames if f["t"] == "cmd"] == [newest.id]
    await agent.expect_silence(0.1)

    # ACTIVE commands are not PENDING: they keep running.
    assert not active.done()
    assert [c.id for c in await hub.list_pending_commands("a1")] == [active.id, newest.id]


@pytest.mark.parametrize("selector", [{"drop_all_pending": True},
                                      {"drop_all_pending": "resize"},
                                      {"drop_all_pending": True, "group": "g"}])
async def test_dropping_an_offline_agents_only_command_keeps_the_new_one(
    hub: Dispatcher, connect: Connect, selector: dict[str, Any]
) -> None:
    """Issue 13, defect 1: the new command is listed, delivered and answered."""
    old = hub.execute_on_agent("a1", "resize", 1)
    async with asyncio.timeout(WAIT):
        await old.submitted()
    newest = hub.execute_on_agent("a1", "resize", 2, timeout=WAIT, **selector)
    assert await outcome(old) == {"dropped": True}
    assert [c.id for c in await hub.list_pending_commands("a1")] == [newest.id]
    agent = await connect(hub, "a1")
    assert (await agent.recv_type("cmd"))["id"] == newest.id
    await agent.send({"t": "result", "id": newest.id, "data": "resized"})
    assert await outcome(newest) == "resized"


async def test_a_member_submitted_right_after_the_groups_answer_runs_itself(
    hub: Dispatcher, connect: Connect
) -> None:
    """Issue 13, defect 2: the answer completes the group's PENDING members in the
    same store step; a member submitted in the same event-loop turn as that answer
    (the same pipelined write on Redis) is not one of them: it is sent and runs."""
    agent = await connect(hub, "a1")
    leader = hub.execute_on_agent("a1", "sync", 1, group="g")
    assert (await agent.recv_type("cmd"))["id"] == leader.id
    answered = asyncio.ensure_future(hub.apply_command_response(leader.id, "first"))
    # One loop turn, not a wait: the answer's store call is made (on Redis, queued
    # for the next pipelined write), the late member's creation comes right after.
    await asyncio.sleep(0)
    late = hub.execute_on_agent("a1", "sync", 2, group="g", timeout=WAIT)
    assert await answered
    assert await outcome(leader) == "first"
    assert (await agent.recv_type("cmd"))["id"] == late.id
    await agent.send({"t": "result", "id": late.id, "data": "second"})
    assert await outcome(late) == "second"


async def test_drop_all_pending_keeps_the_same_group(hub: Dispatcher, connect: Connect) -> None:
    same = hub.execute_on_agent("a1", "sync", 1, group="y")
    loose = hub.execute_on_agent("a1", "ping", 2)
    async with asyncio.timeout(WAIT):
        await same.submitted()
        await loose.submitted()
    newest = hub.execute_on_agent("a1", "sync", 3, group="y", drop_all_pending=True)
    assert await outcome(loose) == {"dropped": True}
    assert not same.done()
    assert [c.id for c in await hub.list_pending_commands("a1")] == [same.id, newest.id]

    agent = await connect(hub, "a1")
    assert (await agent.recv_type("cmd"))["id"] == same.id  # the group's first only
    await agent.expect_silence(0.2)
    await agent.send({"t": "result", "id": same.id, "data": "ok"})
    assert await outcome(same) == "ok"
    assert await outcome(newest) == "ok"


async def test_drop_all_pending_with_a_key(hub: Dispatcher, connect: Connect) -> None:
    r1 = hub.execute_on_agent("a1", "resize", 1)
    p1 = hub.execute_on_agent("a1", "ping", 2)
    r2 = hub.execute_on_agent("a1", "resize", 3, group="g")
    async with asyncio.timeout(WAIT):
        for h in (r1, p1, r2):
            await h.submitted()
    newest = hub.execute_on_agent("a1", "ping", 4, drop_all_pending="resize")
    async with asyncio.timeout(WAIT):
        await newest.submitted()
    for h in (r1, r2):
        assert await outcome(h) == {"dropped": True}
        assert (await stored(hub, h.id)).outcome == "dropped"
    assert not p1.done()
    assert [c.id for c in await hub.list_pending_commands("a1")] == [p1.id, newest.id]

    agent = await connect(hub, "a1")
    assert [c["id"] for c in await recv_cmds(agent, 2)] == [p1.id, newest.id]
    await agent.expect_silence(0.2)  # neither a dropped command nor a cancel for one


async def test_dropping_a_group_leader_lets_the_next_member_run(
    hub: Dispatcher, connect: Connect
) -> None:
    agent = await connect(hub, "a1")
    leader = hub.execute_on_agent("a1", "resize", 1, group="g")
    assert (await agent.recv_type("cmd"))["id"] == leader.id
    member = hub.execute_on_agent("a1", "sync", 2, group="g")
    async with asyncio.timeout(WAIT):
        await member.submitted()
    await agent.expect_silence(0.1)
    newest = hub.execute_on_agent("a1", "ping", 3, drop_all_pending="resize")
    assert await outcome(leader) == {"dropped": True}
    frames = [await agent.recv() for _ in range(3)]
    assert frames[0] == {"t": "cancel", "id": leader.id}, frames
    # The member spared by the drop (another key) must not be stranded.
    assert sorted(f["id"] for f in frames[1:] if f["t"] == "cmd") == sorted(
        [member.id, newest.id]), frames
    await agent.expect_silence(0.1)
    await agent.send({"t": "result", "id": member.id, "data": "synced"})
    assert await outcome(member) == "synced"


# -- online / offline ------------------------------------------------------------------------------


async def test_require_online(hub: Dispatcher, connect: Connect) -> None:
    handle = hub.execute_on_agent("ghost", "ping", require_online=True)
    assert handle.id
    with pytest.raises(AgentOffline):
        await outcome(handle)
    assert await hub.list_pending_commands("ghost") == []
    assert await hub.get_command(handle.id) is None  # never stored

    agent = await connect(hub, "a1")
    handle = hub.execute_on_agent("a1", "ping", require_online=True)
    cmd = await agent.recv_type("cmd")
    await agent.send({"t": "result", "id": cmd["id"], "data": "pong"})
    assert await outcome(handle) == "pong"

    await go_offline(hub, agent, "a1")
    handle = hub.execute_on_agent("a1", "ping", require_online=True)
    with pytest.raises(AgentOffline):
        await outcome(handle)


async def test_offline_agent_gets_its_commands_right_after_welcome(
    hub: Dispatcher, connect: Connect
) -> None:
    handle = hub.execute_on_agent("a1", "resize", {"w": 1})
    async with asyncio.timeout(WAIT):
        await handle.submitted()
    assert not handle.done()
    pending = await hub.list_pending_commands("a1")
    assert [(c.id, c.status) for c in pending] == [(handle.id, "PENDING")]

    agent = await connect(hub, "a1")
    assert agent.welcome["t"] == "welcome"
    cmd = await agent.recv()  # the very next frame after welcome
    assert cmd["t"] == "cmd"
    assert cmd["id"] == handle.id
    assert cmd["payload"] == {"w": 1}
    await agent.send({"t": "result", "id": handle.id, "data": "ok"})
    assert await outcome(handle) == "ok"


async def test_reconnect_redelivers_every_command_not_complete(
    hub: Dispatcher, connect: Connect
) -> None:
    agent = await connect(hub, "a1")
    h1 = hub.execute_on_agent("a1", "one")
    h2 = hub.execute_on_agent("a1", "two")
    h3 = hub.execute_on_agent("a1", "three")
    assert [c["id"] for c in await recv_cmds(agent, 3)] == [h1.id, h2.id, h3.id]
    await agent.send({"t": "ack", "id": h2.id})
    await agent.send({"t": "result", "id": h3.id, "data": 3})
    assert await outcome(h3) == 3
    assert (await stored(hub, h2.id)).status == "ACTIVE"

    await go_offline(hub, agent, "a1")
    h4 = hub.execute_on_agent("a1", "four")
    async with asyncio.timeout(WAIT):
        await h4.submitted()
    statuses = [(c.id, c.status) for c in await hub.list_pending_commands("a1")]
    assert statuses == [(h1.id, "PENDING"), (h2.id, "ACTIVE"), (h4.id, "PENDING")]

    again = await connect(hub, "a1")
    cmds = [await again.recv() for _ in range(3)]
    assert [(c["t"], c["id"]) for c in cmds] == [("cmd", h1.id), ("cmd", h2.id), ("cmd", h4.id)]
    assert cmds[1]["key"] == "two"
    await again.expect_silence(0.2)  # not the COMPLETE one

    # The redelivered commands are answered on the new connection.
    await again.send({"t": "ack", "id": h2.id})
    for h in (h1, h2, h4):
        await again.send({"t": "result", "id": h.id, "data": h.key})
    assert [await outcome(h) for h in (h1, h2, h4)] == ["one", "two", "four"]
    assert await hub.list_pending_commands("a1") == []
    await again.expect_silence(0.1)  # a second ack of an ACTIVE command is fine


# -- who may answer, and how often -----------------------------------------------------------------


async def test_first_answer_wins(hub: Dispatcher, connect: Connect) -> None:
    agent = await connect(hub, "a1")
    handle = hub.execute_on_agent("a1", "echo", 1)
    cmd = await agent.recv_type("cmd")
    await agent.send({"t": "result", "id": cmd["id"], "data": "first"})
    await agent.send({"t": "result", "id": cmd["id"], "data": "second"})
    await expect_unknown_command(agent, cmd["id"])
    await agent.send({"t": "fail", "id": cmd["id"], "error": {"code": "x", "message": "y"}})
    await expect_unknown_command(agent, cmd["id"])
    await agent.send({"t": "progress", "id": cmd["id"], "data": 1})
    await expect_unknown_command(agent, cmd["id"])
    await agent.send({"t": "ack", "id": cmd["id"]})
    await expect_unknown_command(agent, cmd["id"])

    assert await outcome(handle) == "first"
    info = await stored(hub, handle.id)
    assert info.status == "COMPLETE"
    assert info.outcome == "ok"
    assert info.result == "first"
    assert info.error is None


async def test_answers_from_the_wrong_agent_are_refused(hub: Dispatcher, connect: Connect) -> None:
    owner = await connect(hub, "owner")
    intruder = await connect(hub, "intruder")
    handle = hub.execute_on_agent("owner", "secret", 1)
    updates: list[Any] = []

    async def follow() -> None:
        updates.extend([u async for u in handle.progress()])

    follower = asyncio.create_task(follow())
    cmd = await owner.recv_type("cmd")

    for frame in (
        {"t": "ack", "id": cmd["id"]},
        {"t": "progress", "id": cmd["id"], "data": "forged"},
        {"t": "result", "id": cmd["id"], "data": "forged"},
        {"t": "fail", "id": cmd["id"], "error": {"code": "forged", "message": "forged"}},
    ):
        await intruder.send(frame)
        await expect_unknown_command(intruder, cmd["id"])
    info = await stored(hub, handle.id)
    assert info.status == "PENDING"  # not even the ack was applied
    assert not handle.done()

    await owner.send({"t": "progress", "id": cmd["id"], "data": "real"})
    await owner.send({"t": "result", "id": cmd["id"], "data": "genuine"})
    assert await outcome(handle) == "genuine"
    async with asyncio.timeout(WAIT):
        await follower
    assert updates == ["real"]
    await owner.expect_silence(0.1)


async def test_frames_for_unknown_ids(hub: Dispatcher, connect: Connect) -> None:
    agent = await connect(hub, "a1")
    for frame in (
        {"t": "ack", "id": "no-such"},
        {"t": "progress", "id": "no-such", "data": 1},
        {"t": "result", "id": "no-such", "data": 1},
        {"t": "fail", "id": "no-such", "error": {"code": "x", "message": "y"}},
    ):
        await agent.send(frame)
        await expect_unknown_command(agent, "no-such")
    # The connection stays open and serves commands.
    handle = hub.execute_on_agent("a1", "echo", 1)
    cmd = await agent.recv_type("cmd")
    await agent.send({"t": "result", "id": cmd["id"], "data": 1})
    assert await outcome(handle) == 1


# -- apply_command_* -------------------------------------------------------------------------------


async def test_apply_command_response_and_progress(hub: Dispatcher) -> None:
    handle = hub.execute_on_agent("elsewhere", "job")
    async with asyncio.timeout(WAIT):
        await handle.submitted()
    updates: list[Any] = []

    async def follow() -> None:
        updates.extend([u async for u in handle.progress()])

    follower = asyncio.create_task(follow())
    assert await hub.apply_command_progress(handle.id, {"pct": 10}) is True
    assert await hub.apply_command_progress(handle.id, {"pct": 90}) is True
    assert await hub.apply_command_response(handle.id, {"done": True}) is True
    assert await outcome(handle) == {"done": True}
    async with asyncio.timeout(WAIT):
        await follower
    assert updates == [{"pct": 10}, {"pct": 90}]
    info = await stored(hub, handle.id)
    assert (info.status, info.outcome, info.result) == ("COMPLETE", "ok", {"done": True})

    # A late duplicate changes nothing.
    with pytest.raises(UnknownCommand):
        await hub.apply_command_response(handle.id, {"done": False})
    with pytest.raises(UnknownCommand):
        await hub.apply_command_error(handle.id, {"code": "x", "message": "y"})
    with pytest.raises(UnknownCommand):
        await hub.apply_command_progress(handle.id, {"pct": 100})
    assert (await stored(hub, handle.id)).result == {"done": True}


async def test_apply_command_error(hub: Dispatcher) -> None:
    handle = hub.execute_on_agent("elsewhere", "job")
    async with asyncio.timeout(WAIT):
        await handle.submitted()
    error = {"code": "quota", "message": "over quota", "data": {"limit": 5}}
    assert await hub.apply_command_error(handle.id, error) is True
    with pytest.raises(CommandFailed) as caught:
        await outcome(handle)
    assert (caught.value.code, caught.value.message, caught.value.data) == (
        "quota", "over quota", {"limit": 5})
    info = await stored(hub, handle.id)
    assert info.outcome == "error"
    assert info.error is not None
    assert (info.error["code"], info.error["message"]) == ("quota", "over quota")
    with pytest.raises(UnknownCommand):
        await hub.apply_command_response(handle.id, 1)


async def test_apply_to_unknown_ids(hub: Dispatcher) -> None:
    with pytest.raises(UnknownCommand):
        await hub.apply_command_response("no-such", 1)
    with pytest.raises(UnknownCommand):
        await hub.apply_command_error("no-such", {"code": "x", "message": "y"})
    with pytest.raises(UnknownCommand):
        await hub.apply_command_progress("no-such", 1)
    assert await hub.get_command("no-such") is None


async def test_applied_response_beats_the_agent(hub: Dispatcher, connect: Connect) -> None:
    agent = await connect(hub, "a1")
    handle = hub.execute_on_agent("a1", "job")
    cmd = await agent.recv_type("cmd")
    assert await hub.apply_command_response(cmd["id"], "from elsewhere") is True
    assert await outcome(handle) == "from elsewhere"
    await agent.send({"t": "result", "id": cmd["id"], "data": "from the agent"})
    await expect_unknown_command(agent, cmd["id"])
    assert (await stored(hub, cmd["id"])).result == "from elsewhere"


# -- queries ---------------------------------------------------------------------------------------


async def test_list_pending_commands_oldest_first(hub: Dispatcher) -> None:
    assert await hub.list_pending_commands("a1") == []
    handles = [hub.execute_on_agent("a1", f"k{i}", {"i": i}) for i in range(4)]
    async with asyncio.timeout(WAIT):
        for h in handles:
            await h.submitted()
    pending = await hub.list_pending_commands("a1")
    assert [c.id for c in pending] == [h.id for h in handles]
    assert [c.key for c in pending] == ["k0", "k1", "k2", "k3"]
    assert [c.payload for c in pending] == [{"i": i} for i in range(4)]
    assert all(isinstance(c, CommandInfo) and c.status == "PENDING" for c in pending)
    assert all(c.agent_id == "a1" for c in pending)
    assert [c.ts for c in pending] == sorted(c.ts for c in pending)

    await hub.apply_command_response(handles[1].id, None)
    assert [c.id for c in await hub.list_pending_commands("a1")] == [
        handles[0].id, handles[2].id, handles[3].id]
    assert await hub.list_pending_commands("someone-else") == []


async def test_get_command_fields(hub: Dispatcher, connect: Connect) -> None:
    assert await hub.get_command("no-such") is None
    agent = await connect(hub, "a1")
    before = int(time.time() * 1000)
    handle = hub.execute_on_agent("a1", "resize", {"w": 2, "blob": b"\x01\x02"}, group="imgs")
    async with asyncio.timeout(WAIT):
        await handle.submitted()
    after = int(time.time() * 1000)
    info = await stored(hub, handle.id)
    assert isinstance(info, CommandInfo)
    assert info.id == handle.id
    assert info.agent_id == "a1"
    assert info.key == "resize"
    assert info.status == "PENDING"
    assert info.outcome is None
    assert info.group == "imgs"
    assert before <= info.ts <= after
    assert info.ts <= info.updated <= after
    assert info.payload == {"w": 2, "blob": b"\x01\x02"}
    assert info.result is None
    assert info.error is None

    cmd = await agent.recv_type("cmd")
    await agent.send({"t": "result", "id": cmd["id"], "data": [1, b"\x03"]})
    assert await outcome(handle) == [1, b"\x03"]
    done = await stored(hub, handle.id)
    assert (done.status, done.outcome) == ("COMPLETE", "ok")
    assert done.result == [1, b"\x03"]
    assert done.error is None
    assert done.ts == info.ts
    assert done.updated >= info.updated
    assert done.payload == info.payload
    assert done.group == "imgs"

    # Returned records are copies: changing one does not change the store.
    done.result = "tampered"
    assert (await stored(hub, handle.id)).result == [1, b"\x03"]


async def test_list_connected_agents(hub: Dispatcher, connect: Connect) -> None:
    assert await hub.list_connected_agents() == []
    a1 = await connect(hub, "a1", meta={"version": "1.4", "tags": ["gpu"]})
    await connect(hub, "a2")
    agents = {a.id: a for a in await hub.list_connected_agents()}
    assert set(agents) == {"a1", "a2"}
    info = agents["a1"]
    assert info.hub_id == hub.hub_id == a1.welcome["hub"]
    assert info.session == a1.welcome["session"]
    assert info.meta == {"version": "1.4", "tags": ["gpu"]}
    assert info.connected_at <= info.last_seen
    assert agents["a2"].meta == {}

    await go_offline(hub, a1, "a1")
    assert [a.id for a in await hub.list_connected_agents()] == ["a2"]


# -- retention -------------------------------------------------------------------------------------


async def test_complete_commands_are_readable_then_expire(
    make_hub: Callable[..., Awaitable[Dispatcher]], connect: Connect
) -> None:
    hub = await make_hub(retention=0.2)
    agent = await connect(hub, "a1")
    handle = hub.execute_on_agent("a1", "echo", 1)
    cmd = await agent.recv_type("cmd")
    await agent.send({"t": "result", "id": cmd["id"], "data": "kept"})
    assert await outcome(handle) == "kept"
    info = await stored(hub, handle.id)
    assert (info.status, info.result) == ("COMPLETE", "kept")

    await eventually(lambda: hub.get_command(handle.id), lambda i: i is None, timeout=1.5,
                     what="a COMPLETE command to expire with retention=0.2 s")

    # A command that is not COMPLETE never expires by retention.
    waiting = hub.execute_on_agent("nobody", "job", timeout=5)
    async with asyncio.timeout(WAIT):
        await waiting.submitted()
    assert (await stored(hub, waiting.id)).status == "PENDING"


# -- arguments and shutdown ------------------------------------------------------------------------


@pytest.mark.parametrize("agent_id", ["", "has space", "semi;colon", "x" * 129, None, 42])
async def test_bad_agent_id_raises_at_once(hub: Dispatcher, agent_id: Any) -> None:
    with pytest.raises(ValueError if isinstance(agent_id, str) else (ValueError, TypeError)):
        hub.execute_on_agent(agent_id, "ping")


async def test_bad_arguments_raise_at_once(hub: Dispatcher, connect: Connect) -> None:
    agent = await connect(hub, "a1")
    with pytest.raises(ValueError):
        hub.execute_on_agent("a1", "")
    with pytest.raises((ValueError, TypeError)):
        hub.execute_on_agent("a1", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        hub.execute_on_agent("a1", "ping", object())
    with pytest.raises(TypeError):
        hub.execute_on_agent("a1", "ping", {"nested": [object()]})
    with pytest.raises(ValueError):
        hub.execute_on_agent("a1", "ping", timeout=-1)
    with pytest.raises(ValueError):
        hub.execute_on_agent("a1", "ping", timeout=0)
    with pytest.raises(ValueError):
        hub.execute_on_agent("a1", "ping", command_id="")
    with pytest.raises(ValueError):
        hub.execute_on_agent("a1", "ping", group="")
    # Nothing of the refused calls was stored or sent.
    assert await hub.list_pending_commands("a1") == []
    await agent.expect_silence(0.1)


async def test_close_makes_waiting_handles_raise_hub_closed(
    make_hub: Callable[..., Awaitable[Dispatcher]], connect: Connect
) -> None:
    hub = await make_hub()
    agent = await connect(hub, "a1")
    delivered = hub.execute_on_agent("a1", "job")
    await agent.recv_type("cmd")
    queued = hub.execute_on_agent("offline", "job")
    async with asyncio.timeout(WAIT):
        await queued.submitted()
    waiter = asyncio.create_task(outcome(delivered))
    async with asyncio.timeout(WAIT):
        await hub.close()
    with pytest.raises(HubClosed):
        await waiter
    with pytest.raises(HubClosed):
        await outcome(queued)


async def test_a_callers_timeout_does_not_end_the_command(make_hub: Any) -> None:
    """``asyncio.wait_for(handle, t)`` stops the caller's wait, not the command: it
    can still be awaited, and cancelled."""
    hub = await make_hub()
    agent, _ = await RawAgent.hello(ws_url(hub), "patient")
    handle = hub.execute_on_agent("patient", "work", 1, timeout=WAIT)
    cmd = await agent.recv_type("cmd")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(handle, 0.05)
    assert not handle.done()
    await agent.send({"t": "result", "id": cmd["id"], "data": 42})
    assert await asyncio.wait_for(handle, WAIT) == 42

    second = hub.execute_on_agent("patient", "work", 2, timeout=WAIT)
    await agent.recv_type("cmd")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(second, 0.05)
    assert await second.cancel() is True  # still cancellable after the caller gave up
    assert (await agent.recv_type("cancel"))["id"] == second.id
    await agent.close()


async def test_a_hub_made_id_never_overwrites_a_callers_command(make_hub: Any) -> None:
    """Hub-made ids are predictable (a prefix and a counter) and callers may choose
    any ``command_id``: a hub-made id that a caller took first is an idempotent
    submit of the caller's command, never a new record over it."""
    hub = await make_hub()
    bob, _ = await RawAgent.hello(ws_url(hub), "bob")
    alice, _ = await RawAgent.hello(ws_url(hub), "alice")
    first = hub.execute_on_agent("bob", "warm", None)
    await bob.recv_type("cmd")
    prefix, counter = first.id.rsplit("-", 1)
    taken = f"{prefix}-{int(counter, 16) + 1:0{len(counter)}x}"  # the hub's next id
    bobs = hub.execute_on_agent("bob", "bobs-job", 1, command_id=taken)
    assert (await bob.recv_type("cmd"))["id"] == taken
    await bobs.submitted()
    collided = hub.execute_on_agent("alice", "alices-job", 2)
    assert collided.id == taken
    await collided.submitted()
    stored = await hub.get_command(taken)
    assert stored is not None
    assert (stored.agent_id, stored.key, stored.payload) == ("bob", "bobs-job", 1)
    await alice.expect_silence(0.2)  # alice is not sent bob's command
    await bob.close()
    await alice.close()


async def test_waits_that_end_early_leave_nothing_behind(make_hub: Any) -> None:
    """Each ``await handle`` has a future of its own: a cancelled or timed-out wait
    drops it at once (no growth however often a caller polls with a timeout), and
    the other waiters still get the outcome."""
    hub = await make_hub()
    agent, _ = await RawAgent.hello(ws_url(hub), "polled")
    handle = hub.execute_on_agent("polled", "work", 1, timeout=WAIT)
    cmd = await agent.recv_type("cmd")
    for _ in range(50):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(handle, 0.001)
    assert not handle._waiters  # white box: the polls' futures are gone
    patient = asyncio.ensure_future(_await(handle))
    impatient = asyncio.ensure_future(_await(handle))
    await asyncio.sleep(0)
    impatient.cancel()
    await agent.send({"t": "result", "id": cmd["id"], "data": "both"})
    assert await asyncio.wait_for(patient, WAIT) == "both"
    assert impatient.cancelled()
    assert await asyncio.wait_for(handle, WAIT) == "both"
    await agent.close()


async def _await(handle: CommandHandle) -> Any:
    return await handle
