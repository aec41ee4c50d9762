"""Bad frames after the handshake: each costs one ``error`` frame, nothing more.

docs/protocol.md, Transport and Errors: the hub answers with the error code the
protocol names, ``ref`` echoes the offending frame's ``id``, the connection
stays open and usable, and nothing one connection sends disturbs another
agent's work or leaves a task behind.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from dispatcher import CommandCancelled, Dispatcher

from ..conftest import HubFactory, ws_url
from ..support import WAIT, P, RawAgent, wait_for

# Run again with the fast paths off in CI (pytest -m fallback).
pytestmark = pytest.mark.fallback


def deep(depth: int) -> bytes:
    """``{"t": "result", "id": "deep", "data": [[[...]]]}`` nested ``depth`` times."""
    return (b"\x83" + P.pack("t") + P.pack("result") + P.pack("id") + P.pack("deep")
            + P.pack("data") + b"\x91" * depth + b"\xc0")


@pytest.fixture
async def agent(hub: Dispatcher) -> AsyncIterator[RawAgent]:
    """Agent ``a`` after a completed handshake."""
    raw, _ = await RawAgent.hello(ws_url(hub), "a")
    yield raw
    await raw.close()


async def expect_error(agent: RawAgent, code: str, ref: Any = None) -> dict[str, Any]:
    """The next frame is ``{t:"error", code, message, ref}`` with this code and ref."""
    frame = await agent.recv()
    assert frame["t"] == "error", frame
    assert frame["code"] == code, frame
    assert isinstance(frame["message"], str), frame
    assert frame.get("ref") == ref, frame
    return frame


async def round_trip(hub: Dispatcher, agent: RawAgent, agent_id: str, payload: Any) -> None:
    """The connection is usable: the next frame is a new command, which completes.

    ``recv`` (not ``recv_type``) also proves that the bad frame before cost
    exactly one error frame.
    """
    handle = hub.execute_on_agent(agent_id, "echo", payload, timeout=WAIT)
    cmd = await agent.recv()
    assert cmd["t"] == "cmd", cmd
    assert cmd["id"] == handle.id
    await agent.send({"t": "result", "id": cmd["id"], "data": cmd["payload"]})
    assert await handle.result(WAIT) == payload


async def until_status(hub: Dispatcher, cmd_id: str, status: str) -> None:
    """Wait (bounded) until the stored command has ``status``."""
    async with asyncio.timeout(WAIT):
        while True:
            info = await hub.get_command(cmd_id)
            if info is not None and info.status == status:
                return
            await asyncio.sleep(0.005)


# --------------------------------------------------------------------------
# bad_frame and unknown_type

BAD_FRAMES: list[Any] = [
    # Not binary, not msgpack, not a map.
    pytest.param("not msgpack", "bad_frame", None, id="text-message"),
    pytest.param('{"t": "ack", "id": "j1"}', "bad_frame", None, id="text-json"),
    pytest.param(b"", "bad_frame", None, id="empty-message"),
    pytest.param(b"\xc1", "bad_frame", None, id="garbage-byte"),
    pytest.param(b"\x82\xa1t\xa3ack", "bad_frame", None, id="truncated-map"),
    pytest.param(P.pack({"t": "ack", "id": "c1"}) + b"\x00", "bad_frame", None, id="extra-data"),
    pytest.param(P.pack([{"t": "ack", "id": "c1"}]), "bad_frame", None, id="list"),
    pytest.param(P.pack(5), "bad_frame", None, id="int"),
    pytest.param(P.pack(None), "bad_frame", None, id="nil"),
    pytest.param(P.pack("ack"), "bad_frame", None, id="str"),
    pytest.param(P.pack(b"\x81\xa1t\xa3ack"), "bad_frame", None, id="bin"),
    pytest.param(b"\x81\x91\x01\x01", "bad_frame", None, id="unhashable-key"),
    pytest.param(b"\x91" * 100_000 + b"\xc0", "bad_frame", None, id="deep-list"),
    pytest.param(deep(5000), "bad_frame", None, id="deep-data"),
    # A map without a string t.
    pytest.param(P.pack({"id": "r1", "data": 1}), "bad_frame", "r1", id="no-t"),
    pytest.param(P.pack({"t": 5, "id": "r2"}), "bad_frame", "r2", id="t-int"),
    pytest.param(P.pack({"t": b"ack", "id": "r3"}), "bad_frame", "r3", id="t-bin"),
    pytest.param(P.pack({"t": None, "id": 7}), "bad_frame", 7, id="t-nil-int-id"),
    pytest.param(P.pack({"t": ["ack"], "id": "r4"}), "bad_frame", "r4", id="t-list"),
    # Unknown types.
    pytest.param(P.pack({"t": "nope", "id": "u1"}), "unknown_type", "u1", id="unknown"),
    pytest.param(P.pack({"t": "", "id": "u2"}), "unknown_type", "u2", id="unknown-empty"),
    pytest.param(P.pack({"t": "ACK", "id": "u3"}), "unknown_type", "u3", id="unknown-case"),
    pytest.param(P.pack({"t": "x" * 10_000}), "unknown_type", None, id="unknown-long"),
    # Known types with a missing field.
    pytest.param(P.pack({"t": "ack"}), "bad_frame", None, id="ack-no-id"),
    pytest.param(P.pack({"t": "progress", "id": "m1"}), "bad_frame", "m1", id="progress-no-data"),
    pytest.param(P.pack({"t": "result", "id": "m2"}), "bad_frame", "m2", id="result-no-data"),
    pytest.param(P.pack({"t": "result", "data": 1}), "bad_frame", None, id="result-no-id"),
    pytest.param(P.pack({"t": "fail", "id": "m3"}), "bad_frame", "m3", id="fail-no-error"),
    pytest.param(P.pack({"t": "received"}), "bad_frame", None, id="received-no-id"),
    pytest.param(P.pack({"t": "emit", "data": 1}), "bad_frame", None, id="emit-no-key"),
    pytest.param(P.pack({"t": "emit", "key": "k"}), "bad_frame", None, id="emit-no-data"),
    pytest.param(P.pack({"t": "sub"}), "bad_frame", None, id="sub-no-keys"),
    pytest.param(P.pack({"t": "unsub"}), "bad_frame", None, id="unsub-no-keys"),
    pytest.param(P.pack({"t": "call", "id": "m4", "agent": "b", "key": "k"}), "bad_frame", "m4",
                 id="call-no-payload"),
    # Known types with a mistyped field.
    pytest.param(P.pack({"t": "ack", "id": 5}), "bad_frame", 5, id="ack-id-int"),
    pytest.param(P.pack({"t": "ack", "id": ["c1"]}), "bad_frame", None, id="ack-id-list"),
    pytest.param(P.pack({"t": "ack", "id": "x" * 10_000}), "bad_frame", None, id="ack-id-huge"),
    pytest.param(P.pack({"t": "result", "id": None, "data": 1}), "bad_frame", None,
                 id="result-id-nil"),
    pytest.param(P.pack({"t": "progress", "id": b"c1", "data": 1}), "bad_frame", None,
                 id="progress-id-bin"),
    pytest.param(P.pack({"t": "fail", "id": "y1", "error": "boom"}), "bad_frame", "y1",
                 id="fail-error-str"),
    pytest.param(P.pack({"t": "fail", "id": "y2", "error": {"code": "E"}}), "bad_frame", "y2",
                 id="fail-error-no-message"),
    pytest.param(P.pack({"t": "fail", "id": "y3", "error": {"code": 5, "message": "m"}}),
                 "bad_frame", "y3", id="fail-error-code-int"),
    pytest.param(P.pack({"t": "emit", "key": 5, "data": 1}), "bad_frame", None, id="emit-key-int"),
    pytest.param(P.pack({"t": "emit", "key": "k", "data": 1, "to": "b"}), "bad_frame", None,
                 id="emit-to-str"),
    pytest.param(P.pack({"t": "emit", "key": "k", "data": 1, "to": ["bad id"]}), "bad_frame",
                 None, id="emit-to-bad-id"),
    pytest.param(P.pack({"t": "sub", "keys": "k"}), "bad_frame", None, id="sub-keys-str"),
    pytest.param(P.pack({"t": "sub", "keys": [1]}), "bad_frame", None, id="sub-keys-int"),
    pytest.param(P.pack({"t": "unsub", "keys": [""]}), "bad_frame", None, id="unsub-key-empty"),
    pytest.param(P.pack({"t": "received", "id": 1.5}), "bad_frame", None, id="received-id-float"),
    pytest.param(P.pack({"t": "call", "id": "y4", "agent": "bad id", "key": "k", "payload": 1}),
                 "bad_frame", "y4", id="call-agent-invalid"),
    pytest.param(P.pack({"t": "call", "id": "y5", "agent": "b", "key": "k", "payload": 1,
                         "timeout": -1}), "bad_frame", "y5", id="call-timeout-negative"),
    pytest.param(P.pack({"t": "call", "id": "y6", "agent": "b", "key": "", "payload": 1}),
                 "bad_frame", "y6", id="call-key-empty"),
]


@pytest.mark.parametrize(("message", "code", "ref"), BAD_FRAMES)
async def test_bad_frame_gets_its_error_and_the_connection_stays_usable(
    hub: Dispatcher, agent: RawAgent, message: bytes | str, code: str, ref: Any
) -> None:
    await agent.send_raw(message)
    await expect_error(agent, code, ref)
    await round_trip(hub, agent, "a", {"after": code})
    assert hub._connections.get("a") is not None


def test_deep_helper_builds_the_intended_frame() -> None:
    frame = P.decode(deep(10))
    assert isinstance(frame, P.ResultFrame)
    assert frame.id == "deep"


# Frames only the hub sends. docs/protocol.md does not name the code for one that
# comes from an agent; it is an error frame either way, and harmless.
HUB_ONLY: list[Any] = [
    pytest.param({"t": "welcome", "v": 1, "hub": "h", "session": "s", "heartbeat": 1}, None,
                 id="welcome"),
    pytest.param({"t": "cmd", "id": "h1", "key": "k", "payload": 1, "ts": 1, "deadline": None},
                 "h1", id="cmd"),
    pytest.param({"t": "cancel", "id": "h2"}, "h2", id="cancel"),
    pytest.param({"t": "event", "key": "k", "data": 1, "id": "h3"}, "h3", id="event"),
    pytest.param({"t": "reply", "id": "h4", "ok": True, "data": 1}, "h4", id="reply"),
    pytest.param({"t": "error", "code": "bad_frame", "message": "m"}, None, id="error"),
]


@pytest.mark.parametrize(("frame", "ref"), HUB_ONLY)
async def test_hub_only_frame_from_an_agent_is_refused(
    hub: Dispatcher, agent: RawAgent, frame: dict[str, Any], ref: Any
) -> None:
    await agent.send(frame)
    reply = await agent.recv()
    assert reply["t"] == "error", reply
    assert reply["code"] in ("bad_frame", "unknown_type"), reply
    assert reply.get("ref") == ref, reply
    await round_trip(hub, agent, "a", "still usable")


@pytest.mark.parametrize("hello", [
    {"t": "hello", "v": 1, "agent": "a", "token": None},
    {"t": "hello", "v": 1, "agent": "other", "token": None},
    {"t": "hello", "v": 1, "agent": "bad id", "token": None},
    {"t": "hello", "v": 2, "agent": "a", "token": None},
], ids=["same-agent", "other-agent", "invalid", "other-version"])
async def test_hello_after_the_handshake_is_refused_without_closing(
    hub: Dispatcher, agent: RawAgent, hello: dict[str, Any]
) -> None:
    session = hub._connections.get("a")
    await agent.send(hello)
    reply = await agent.recv()
    assert reply["t"] == "error", reply
    assert reply["code"] in ("bad_frame", "bad_hello"), reply
    # The connection is neither closed nor re-identified.
    assert hub._connections.get("a") is session
    assert hub._connections.get("other") is None
    await round_trip(hub, agent, "a", "same session")


# --------------------------------------------------------------------------
# unknown_command

ANSWERS: dict[str, dict[str, Any]] = {
    "ack": {"t": "ack"},
    "progress": {"t": "progress", "data": {"pct": 50}},
    "result": {"t": "result", "data": "forged"},
    "fail": {"t": "fail", "error": {"code": "forged", "message": "not mine"}},
}


@pytest.mark.parametrize("t", sorted(ANSWERS))
async def test_answer_for_an_unknown_id(hub: Dispatcher, agent: RawAgent, t: str) -> None:
    await agent.send({**ANSWERS[t], "id": "ghost-1"})
    await expect_error(agent, "unknown_command", "ghost-1")
    await round_trip(hub, agent, "a", t)


@pytest.mark.parametrize("t", sorted(ANSWERS))
async def test_answer_for_another_agents_command(
    hub: Dispatcher, agent: RawAgent, t: str
) -> None:
    owner, _ = await RawAgent.hello(ws_url(hub), "b")
    handle = hub.execute_on_agent("b", "work", {"n": 1}, timeout=WAIT)
    cmd = await owner.recv()
    assert cmd["t"] == "cmd"
    assert cmd["id"] == handle.id

    # docs/protocol.md, Commands and redelivery: for an id not addressed to this agent, never applied.
    await agent.send({**ANSWERS[t], "id": cmd["id"]})
    await expect_error(agent, "unknown_command", cmd["id"])
    stored = await hub.get_command(cmd["id"])
    assert stored is not None
    assert stored.status == "PENDING", stored
    assert not handle.done()

    await owner.send({"t": "ack", "id": cmd["id"]})
    await owner.send({"t": "progress", "id": cmd["id"], "data": "owner's"})
    await owner.send({"t": "result", "id": cmd["id"], "data": "owner's result"})
    assert await handle.result(WAIT) == "owner's result"
    assert [update async for update in handle.progress()] == ["owner's"]
    await round_trip(hub, agent, "a", t)
    await owner.close()


@pytest.mark.parametrize("t", sorted(ANSWERS))
async def test_answer_for_a_finished_command(hub: Dispatcher, agent: RawAgent, t: str) -> None:
    handle = hub.execute_on_agent("a", "work", None, timeout=WAIT)
    cmd = await agent.recv()
    await agent.send({"t": "result", "id": cmd["id"], "data": "first"})
    assert await handle.result(WAIT) == "first"

    await agent.send({**ANSWERS[t], "id": cmd["id"]})
    await expect_error(agent, "unknown_command", cmd["id"])
    stored = await hub.get_command(cmd["id"])
    assert stored is not None
    assert (stored.status, stored.outcome, stored.result) == ("COMPLETE", "ok", "first")
    await round_trip(hub, agent, "a", t)


@pytest.mark.parametrize("t", ["result", "fail"])
async def test_terminal_frame_after_cancel(hub: Dispatcher, agent: RawAgent, t: str) -> None:
    """docs/protocol.md, Commands and redelivery: a terminal frame after ``cancel`` gets unknown_command."""
    handle = hub.execute_on_agent("a", "work", None, timeout=WAIT)
    cmd = await agent.recv()
    await agent.send({"t": "ack", "id": cmd["id"]})
    await until_status(hub, cmd["id"], "ACTIVE")  # else the ack itself could come late
    assert await handle.cancel()
    cancel = await agent.recv()
    assert cancel == {"t": "cancel", "id": cmd["id"]}
    await agent.send({**ANSWERS[t], "id": cmd["id"]})
    await expect_error(agent, "unknown_command", cmd["id"])
    with pytest.raises(CommandCancelled):
        await handle.result(WAIT)
    await round_trip(hub, agent, "a", t)


# --------------------------------------------------------------------------
# a burst of bad frames


def burst_frame(i: int) -> tuple[bytes | str, str, Any]:
    """The i-th bad frame of a burst, with the error code and ref it must get."""
    kind = i % 10
    rid = f"burst-{i}"
    cases: list[tuple[bytes | str, str, Any]] = [
        ("text frame", "bad_frame", None),
        (b"\xc1\xc1", "bad_frame", None),
        (P.pack([i]), "bad_frame", None),
        (P.pack({"id": rid}), "bad_frame", rid),
        (P.pack({"t": "nope", "id": rid}), "unknown_type", rid),
        (P.pack({"t": "result", "id": rid}), "bad_frame", rid),
        (P.pack({"t": "ack", "id": rid}), "unknown_command", rid),
        (P.pack({"t": "result", "id": rid, "data": "x" * 100}), "unknown_command", rid),
        (P.pack({"t": "fail", "id": rid, "error": {"code": "E", "message": "m"}}),
         "unknown_command", rid),
        (P.pack({"t": "progress", "id": rid, "data": i}), "unknown_command", rid),
    ]
    return cases[kind]


async def test_burst_of_bad_frames_does_not_disturb_other_agents(make_hub: HubFactory) -> None:
    hub = await make_hub()
    worker, _ = await RawAgent.hello(ws_url(hub), "worker")
    noisy, _ = await RawAgent.hello(ws_url(hub), "noisy")

    # The worker has a command in flight.
    handle = hub.execute_on_agent("worker", "work", {"n": 1}, timeout=WAIT)
    await handle.submitted()
    cmd = await worker.recv()
    assert cmd["id"] == handle.id
    await worker.send({"t": "ack", "id": cmd["id"]})
    tasks_before = len(asyncio.all_tasks())

    n = 400
    with capture_logs() as logs:
        for i in range(n):
            message, _, _ = burst_frame(i)
            await noisy.send_raw(message)
        # One error frame each. With a networked store the hub applies frames
        # concurrently, so errors may come back out of order (they carry ``ref``).
        expected = Counter((code, ref) for _, code, ref in map(burst_frame, range(n)))
        got: Counter[tuple[str, Any]] = Counter()
        for _ in range(n):
            frame = await noisy.recv()
            assert frame["t"] == "error", frame
            got[frame["code"], frame.get("ref")] += 1
        assert got == expected

        # The worker's command is untouched and completes normally.
        stored = await hub.get_command(cmd["id"])
        assert stored is not None
        assert stored.status == "ACTIVE"
        await worker.send({"t": "progress", "id": cmd["id"], "data": 1})
        await worker.send({"t": "result", "id": cmd["id"], "data": "done"})
        assert await handle.result(WAIT) == "done"

        # Every connection is still usable, new ones are accepted.
        await round_trip(hub, noisy, "noisy", "still here")
        await round_trip(hub, worker, "worker", "me too")
        late, _ = await RawAgent.hello(ws_url(hub), "late")
        await round_trip(hub, late, "late", "welcome")
        await late.close()

        # docs/protocol.md, Errors: the hub never leaks a task because of what one
        # connection sends. The close above ends its handler task too.
        await wait_for(lambda: len(asyncio.all_tasks()) <= tasks_before, timeout=WAIT,
                       what=f"the task count to settle back to {tasks_before}")
    failures = [e for e in logs if e.get("log_level") in ("error", "critical")]
    assert not failures, failures
    assert hub.connected_count == 2
