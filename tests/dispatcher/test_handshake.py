"""The hub's agent transport: handshake, replacement, /healthz, frame limit, liveness.

Real hubs on port 0 and raw msgpack clients (docs/protocol.md, Transport and
Handshake); every wait is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

from dispatcher import Dispatcher
from dispatcher.models import AgentInfo
from dispatcher.transport import agent_token

from ..conftest import HubFactory, ws_url
from ..support import WAIT, WEBSOCKETS_MAJOR, P, RawAgent, TcpProxy

# Run again with the fast paths off in CI (pytest -m fallback).
pytestmark = pytest.mark.fallback

PROTOCOL_ERROR_CODES = frozenset({
    "bad_frame", "unknown_type", "unknown_command", "reserved_key", "rate_limited",
    "unauthorized", "bad_hello", "unsupported_version", "replaced", "internal",
})


class HubEvents:
    """The hub's ``agent-connected`` / ``agent-disconnected`` events, in order."""

    def __init__(self, hub: Dispatcher) -> None:
        self.queue: asyncio.Queue[tuple[str, AgentInfo, str | None]] = asyncio.Queue()
        hub.on("agent-connected", self._connected)
        hub.on("agent-disconnected", self._disconnected)

    def _connected(self, info: AgentInfo) -> None:
        self.queue.put_nowait(("agent-connected", info, None))

    def _disconnected(self, info: AgentInfo, reason: str) -> None:
        self.queue.put_nowait(("agent-disconnected", info, reason))

    async def next(self, timeout: float = WAIT) -> tuple[str, AgentInfo, str | None]:
        async with asyncio.timeout(timeout):
            return await self.queue.get()

    async def expect(self, key: str, agent_id: str,
                     timeout: float = WAIT) -> tuple[AgentInfo, str | None]:
        """The next event, which must be ``key`` for ``agent_id``."""
        got, info, reason = await self.next(timeout)
        assert (got, info.id) == (key, agent_id), (got, info, reason)
        return info, reason

    def assert_none(self) -> None:
        assert self.queue.empty(), f"unexpected hub event {self.queue.get_nowait()}"


def now_ms() -> int:
    return int(time.time() * 1000)


def check_info(info: AgentInfo, hub: Dispatcher, agent_id: str, session: str,
               meta: dict[str, Any], since_ms: int) -> None:
    """An event's AgentInfo describes the connection that hello opened."""
    assert isinstance(info, AgentInfo)
    assert info.id == agent_id
    assert info.hub_id == hub.hub_id
    assert info.session == session
    assert since_ms <= info.connected_at <= now_ms()
    assert info.connected_at <= info.last_seen <= now_ms()
    assert info.meta == meta


async def round_trip(hub: Dispatcher, agent: RawAgent, agent_id: str, payload: Any) -> None:
    """Run one command on ``agent``, which answers it with its payload."""
    handle = hub.execute_on_agent(agent_id, "echo", payload, timeout=WAIT)
    cmd = await agent.recv_type("cmd")
    assert cmd["id"] == handle.id
    assert cmd["key"] == "echo"
    await agent.send({"t": "result", "id": cmd["id"], "data": cmd["payload"]})
    assert await handle.result(WAIT) == payload


async def refused(agent: RawAgent) -> tuple[dict[str, Any], int | None]:
    """The error frame the hub answers a bad handshake with, and the close code."""
    frame = await agent.recv()
    assert frame["t"] == "error", frame
    assert frame["code"] in PROTOCOL_ERROR_CODES, frame
    assert isinstance(frame.get("message"), str), frame
    code, _ = await agent.closed()
    return frame, code


# --------------------------------------------------------------------------
# welcome


async def test_welcome_fields(hub: Dispatcher) -> None:
    events = HubEvents(hub)
    since = now_ms()
    agent, welcome = await RawAgent.hello(ws_url(hub), "a1", meta={"version": "1.2", "n": 3})
    assert welcome["t"] == "welcome"
    assert welcome["v"] == 1
    assert welcome["hub"] == hub.hub_id
    assert isinstance(welcome["session"], str)
    assert welcome["session"]
    assert welcome["heartbeat"] == hub.config.heartbeat
    assert isinstance(P.decode(P.pack(welcome)), P.WelcomeFrame)
    info, _ = await events.expect("agent-connected", "a1")
    check_info(info, hub, "a1", welcome["session"], {"version": "1.2", "n": 3}, since)

    other, welcome2 = await RawAgent.hello(ws_url(hub), "a2")
    assert welcome2["session"] != welcome["session"]
    info2, _ = await events.expect("agent-connected", "a2")
    check_info(info2, hub, "a2", welcome2["session"], {}, since)

    await round_trip(hub, agent, "a1", {"x": [1, b"\x00"]})
    await agent.close()
    info, reason = await events.expect("agent-disconnected", "a1")
    check_info(info, hub, "a1", welcome["session"], {"version": "1.2", "n": 3}, since)
    assert isinstance(reason, str)
    assert reason
    await other.close()


async def test_welcome_reports_the_configured_heartbeat(make_hub: HubFactory) -> None:
    hub = await make_hub(heartbeat=0.75)
    agent, welcome = await RawAgent.hello(ws_url(hub), "a1")
    assert welcome["heartbeat"] == 0.75
    await agent.close()


# --------------------------------------------------------------------------
# refused handshakes

BAD_HELLOS: list[Any] = [
    pytest.param(P.pack({"t": "ack", "id": "c1"}), id="first-frame-ack"),
    pytest.param(P.pack({"t": "result", "id": "c1", "data": 1}), id="first-frame-result"),
    pytest.param(P.pack({"t": "nope"}), id="first-frame-unknown-type"),
    pytest.param(P.pack({"t": "hello", "v": 1, "agent": "bad id", "token": None}),
                 id="agent-id-with-space"),
    pytest.param(P.pack({"t": "hello", "v": 1, "agent": "x" * 129, "token": None}),
                 id="agent-id-too-long"),
    pytest.param(P.pack({"t": "hello", "v": 1, "agent": "", "token": None}), id="agent-id-empty"),
    pytest.param(P.pack({"t": "hello", "v": 1, "agent": 5, "token": None}), id="agent-id-int"),
    pytest.param(P.pack({"t": "hello", "v": 1, "token": None}), id="agent-missing"),
    pytest.param(P.pack({"t": "hello", "agent": "a1", "token": None}), id="v-missing"),
    pytest.param(P.pack({"t": "hello", "v": "1", "agent": "a1", "token": None}), id="v-string"),
    pytest.param(P.pack({"t": "hello", "v": 1, "agent": "a1", "meta": [1]}), id="meta-list"),
    pytest.param(P.pack({"t": "hello", "v": 1, "agent": "a1", "subs": "k"}), id="subs-string"),
    pytest.param(P.pack({"t": "hello", "v": 1, "agent": "a1", "token": 5}), id="token-int"),
    pytest.param(b"\xc1\xc1\xc1", id="garbage-bytes"),
    pytest.param(b"", id="empty-message"),
    pytest.param(P.pack([1, 2]), id="not-a-map"),
    pytest.param('{"t": "hello", "v": 1, "agent": "a1"}', id="text-message"),
]


@pytest.mark.parametrize("message", BAD_HELLOS)
async def test_bad_hello_is_refused_with_4400(hub: Dispatcher, message: bytes | str) -> None:
    events = HubEvents(hub)
    agent = await RawAgent.connect(ws_url(hub))
    await agent.send_raw(message)
    frame, code = await refused(agent)
    assert frame["code"] == "bad_hello", frame
    assert code == 4400
    assert hub.connected_count == 0
    # A connection the hub refused was never an agent: no events.
    events.assert_none()


@pytest.mark.parametrize("version", [0, 2, 99, -1])
async def test_unsupported_version_is_refused_with_4400(hub: Dispatcher, version: int) -> None:
    agent = await RawAgent.connect(ws_url(hub))
    await agent.send({"t": "hello", "v": version, "agent": "a1", "token": None})
    frame, code = await refused(agent)
    assert frame["code"] == "unsupported_version", frame
    assert code == 4400
    assert hub.connected_count == 0


async def test_no_hello_in_time_is_closed_with_4408(make_hub: HubFactory) -> None:
    hub = await make_hub(hello_timeout=0.3)
    events = HubEvents(hub)
    loop = asyncio.get_running_loop()
    started = loop.time()
    agent = await RawAgent.connect(ws_url(hub))
    _, code = await refused(agent)
    elapsed = loop.time() - started
    assert code == 4408
    assert 0.25 <= elapsed < 1.5, elapsed
    events.assert_none()


async def test_hello_timeout_does_not_disturb_connected_agents(make_hub: HubFactory) -> None:
    hub = await make_hub(hello_timeout=0.3)
    worker, _ = await RawAgent.hello(ws_url(hub), "worker")
    mute = await RawAgent.connect(ws_url(hub))
    _, code = await refused(mute)
    assert code == 4408
    await round_trip(hub, worker, "worker", "still here")


@pytest.mark.parametrize("auth", ["secret", "tokens"])
async def test_unauthorized_is_refused_with_4401(make_hub: HubFactory, auth: str) -> None:
    if auth == "secret":
        hub = await make_hub(agent_secret="s3cret")
        good = agent_token("s3cret", "a1")
    else:
        hub = await make_hub(agent_tokens={"a1": "tok-a1"})
        good = "tok-a1"
    for token in (None, "wrong", agent_token("other", "a1"), good + "x"):
        agent = await RawAgent.connect(ws_url(hub))
        await agent.send({"t": "hello", "v": 1, "agent": "a1", "token": token})
        frame, code = await refused(agent)
        assert frame["code"] == "unauthorized", (token, frame)
        assert code == 4401
    agent, welcome = await RawAgent.hello(ws_url(hub), "a1", token=good)
    assert welcome["hub"] == hub.hub_id
    await round_trip(hub, agent, "a1", 1)


# --------------------------------------------------------------------------
# one live connection per agent id


async def test_second_connection_replaces_the_first(hub: Dispatcher) -> None:
    events = HubEvents(hub)
    since = now_ms()
    old, w_old = await RawAgent.hello(ws_url(hub), "a1", meta={"n": 1})
    info, _ = await events.expect("agent-connected", "a1")
    check_info(info, hub, "a1", w_old["session"], {"n": 1}, since)

    new, w_new = await RawAgent.hello(ws_url(hub), "a1", meta={"n": 2})
    assert w_new["session"] != w_old["session"]

    frame = await old.recv()
    assert frame["t"] == "error"
    assert frame["code"] == "replaced"
    code, _ = await old.closed()
    assert code == 4409

    # The old connection is reported gone first, then the new one connected.
    info, reason = await events.expect("agent-disconnected", "a1")
    assert reason == "replaced"
    check_info(info, hub, "a1", w_old["session"], {"n": 1}, since)
    info, _ = await events.expect("agent-connected", "a1")
    check_info(info, hub, "a1", w_new["session"], {"n": 2}, since)

    # Commands now go to the new connection, and the old one's end is not
    # reported a second time.
    session = hub._connections.get("a1")
    assert session is not None
    assert session.session_id == w_new["session"]
    await round_trip(hub, new, "a1", "to the new one")
    events.assert_none()
    await new.close()
    info, _ = await events.expect("agent-disconnected", "a1")
    assert info.session == w_new["session"]


async def test_replacement_chain(hub: Dispatcher) -> None:
    """Three quick connections of one agent: each replaced one gets 4409, the last stays."""
    agents = []
    for _ in range(3):
        agent, _ = await RawAgent.hello(ws_url(hub), "a1")
        agents.append(agent)
    for agent in agents[:-1]:
        frame = await agent.recv()
        assert frame["code"] == "replaced"
        code, _ = await agent.closed()
        assert code == 4409
    await round_trip(hub, agents[-1], "a1", 3)
    assert hub.connected_count == 1


# --------------------------------------------------------------------------
# HTTP on the agent port


async def test_healthz_on_the_agent_port(hub: Dispatcher) -> None:
    base = f"http://127.0.0.1:{hub.port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
            body = await resp.json()
        assert isinstance(body, dict)
        assert body.get("status") == "ok"
        async with http.get(f"{base}/nope") as resp:
            assert resp.status == 404
        async with http.get(f"{base}/healthz/extra") as resp:
            assert resp.status == 404


@pytest.mark.parametrize("request_bytes", [
    b"GET /healthz HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n",
    pytest.param(b"GET /healthz HTTP/1.0\r\n\r\n", marks=pytest.mark.skipif(
        WEBSOCKETS_MAJOR < 17, reason="websockets < 17 refuses HTTP/1.0 requests "
        "(docs/deployment.md, Load balancer)")),
], ids=["http-1.1", "http-1.0"])
async def test_healthz_with_a_raw_request(hub: Dispatcher, request_bytes: bytes) -> None:
    """Load balancers' probes are plain HTTP requests, without a WebSocket upgrade."""
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
        writer.write(request_bytes)
        await writer.drain()
        response = await reader.read()
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")), head
    assert isinstance(json.loads(body), dict)


# --------------------------------------------------------------------------
# frame size limit


async def test_oversized_message_closes_only_that_connection(make_hub: HubFactory) -> None:
    hub = await make_hub(max_frame=4096)
    events = HubEvents(hub)
    worker, _ = await RawAgent.hello(ws_url(hub), "worker")
    big, _ = await RawAgent.hello(ws_url(hub), "big")
    await events.expect("agent-connected", "worker")
    await events.expect("agent-connected", "big")

    # A command in flight on the worker while the other agent misbehaves.
    handle = hub.execute_on_agent("worker", "work", {"n": 1}, timeout=WAIT)
    cmd = await worker.recv_type("cmd")
    await worker.send({"t": "ack", "id": cmd["id"]})

    # Just under the limit is fine (answered, not closed)...
    await big.send({"t": "result", "id": "nope", "data": b"x" * 3900})
    frame = await big.recv()
    assert (frame["t"], frame["code"], frame.get("ref")) == ("error", "unknown_command", "nope")
    # ...over it closes the connection with 1009.
    await big.send({"t": "result", "id": cmd["id"], "data": b"x" * 8192})
    code, _ = await big.closed()
    assert code == 1009
    info, _ = await events.expect("agent-disconnected", "big")
    assert info.id == "big"

    # Nothing else on the hub is affected.
    await worker.send({"t": "result", "id": cmd["id"], "data": "done"})
    assert await handle.result(WAIT) == "done"
    await round_trip(hub, worker, "worker", "again")
    again, _ = await RawAgent.hello(ws_url(hub), "big")
    await round_trip(hub, again, "big", "back")


async def test_oversized_hello_is_closed_with_1009(make_hub: HubFactory) -> None:
    hub = await make_hub(max_frame=4096)
    events = HubEvents(hub)
    agent = await RawAgent.connect(ws_url(hub))
    await agent.send({"t": "hello", "v": 1, "agent": "a1", "token": None,
                      "meta": {"junk": "x" * 8192}})
    code, _ = await agent.closed()
    assert code == 1009
    assert hub._connections.get("a1") is None
    events.assert_none()


# --------------------------------------------------------------------------
# liveness


async def test_silent_agent_is_dropped_within_two_heartbeats(make_hub: HubFactory) -> None:
    heartbeat = 0.3
    hub = await make_hub(heartbeat=heartbeat)
    events = HubEvents(hub)
    loop = asyncio.get_running_loop()
    healthy, _ = await RawAgent.hello(ws_url(hub), "healthy")
    healthy_since = loop.time()
    proxy = await TcpProxy(hub.port).start()
    try:
        since = now_ms()
        silent, welcome = await RawAgent.hello(proxy.url, "silent", meta={"via": "proxy"})
        await events.expect("agent-connected", "healthy")
        await events.expect("agent-connected", "silent")

        # The network path freezes: the hub's pings get no pong, and no close
        # handshake can complete either.
        proxy.pause()
        paused_at = loop.time()
        info, reason = await events.expect("agent-disconnected", "silent", timeout=1.5)
        elapsed = loop.time() - paused_at
        # About two heartbeats (docs/protocol.md, Transport); the exact bound is
        # checked by the next test.
        assert elapsed < 1.5, elapsed
        check_info(info, hub, "silent", welcome["session"], {"via": "proxy"}, since)
        assert isinstance(reason, str)
        assert reason not in ("", "replaced", "closed")
        assert hub._connections.get("silent") is None

        # An agent that answers pings is kept, however long it says nothing.
        await healthy.expect_silence(max(0.0, healthy_since + 3 * heartbeat - loop.time()))
        assert hub._connections.get("healthy") is not None
        await round_trip(hub, healthy, "healthy", "alive")
        events.assert_none()
    finally:
        await proxy.close()
    # The cut ends the frozen connection at once (no close handshake to wait for).
    await silent.close()


async def test_hub_answers_agent_pings(hub: Dispatcher) -> None:
    """docs/protocol.md, Transport: agents SHOULD ping the hub to notice a dead hub."""
    agent, _ = await RawAgent.hello(ws_url(hub), "a1")
    for _ in range(3):
        pong = await agent.ws.ping()
        async with asyncio.timeout(WAIT):
            latency = await pong
        assert latency >= 0
    await round_trip(hub, agent, "a1", "pinged")


async def test_silent_agent_counts_as_disconnected_when_its_pong_is_late(
    make_hub: HubFactory,
) -> None:
    """docs/protocol.md, Transport: a Ping every ``heartbeat``, the connection closed when
    its Pong is ``heartbeat`` late, and the agent disconnected *from that moment*,
    "without waiting for a closing handshake that a dead peer will never answer".
    So a frozen path is reported at most two heartbeats after it froze."""
    heartbeat = 0.3
    hub = await make_hub(heartbeat=heartbeat)
    events = HubEvents(hub)
    loop = asyncio.get_running_loop()
    proxy = await TcpProxy(hub.port).start()
    try:
        silent, _ = await RawAgent.hello(proxy.url, "silent")
        await events.expect("agent-connected", "silent")
        proxy.pause()
        paused_at = loop.time()
        await events.expect("agent-disconnected", "silent", timeout=1.5)
        elapsed = loop.time() - paused_at
    finally:
        await proxy.close()
    await silent.close()
    slack = 0.12  # scheduling on a busy test machine (less than the old hb/2 close wait)
    assert elapsed <= 2 * heartbeat + slack, (
        f"the frozen agent was reported disconnected {elapsed:.2f} s after its path froze, "
        f"more than two heartbeats ({2 * heartbeat:.2f} s): after the late Pong the hub "
        f"still waited for the closing handshake (websockets' close_timeout) before "
        f"counting the agent as gone"
    )
