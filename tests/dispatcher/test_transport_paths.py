"""The two ways the transport runs (``HubConfig.ws_fast_path``): the websockets
fast path (``dispatcher.ws_fastpath``) and websockets' public API only.

The rest of the suite runs on whichever ``DISPATCHER_TEST_WS_FAST_PATH`` picks
(CI runs it both ways); these tests pick the path themselves.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog
from websockets.asyncio.server import ServerConnection

from dispatcher import Dispatcher, HubConfig, ws_fastpath
from dispatcher.transport import PublicLink, WsSession

from ..conftest import ws_url
from ..support import FAST_PATH_RELEASE, WAIT, RawAgent, TcpProxy, wait_for

# Run again with the fast paths off in CI (pytest -m fallback).
pytestmark = pytest.mark.fallback

HubFactory = Any


def session_of(hub: Dispatcher, agent_id: str) -> WsSession:
    session = hub._connections.get(agent_id)
    assert isinstance(session, WsSession)
    return session


async def round_trip(hub: Dispatcher, agent: RawAgent, agent_id: str) -> None:
    """A command out and its answers back: ack, progress, then result."""
    handle = hub.execute_on_agent(agent_id, "work", {"n": 1})
    cmd = await agent.recv_type("cmd")
    await agent.send({"t": "ack", "id": cmd["id"]})
    await agent.send({"t": "progress", "id": cmd["id"], "data": 50})
    await agent.send({"t": "result", "id": cmd["id"], "data": "done"})
    assert await asyncio.wait_for(handle, WAIT) == "done"


async def test_switched_off_the_hub_reads_through_websockets_public_api_only(
    make_hub: HubFactory,
) -> None:
    with structlog.testing.capture_logs() as logs:
        hub = await make_hub(ws_fast_path=False)
    [line] = [e for e in logs if e["event"] == "transport_fast_path"]
    assert line["enabled"] is False
    assert "ws_fast_path" in line["reason"]
    agent, _ = await RawAgent.hello(ws_url(hub), "plain")
    await round_trip(hub, agent, "plain")
    link = session_of(hub, "plain").ws
    assert isinstance(link, PublicLink)
    # websockets' own connection class, nothing overridden: every byte is read,
    # and every message received, by websockets (recv), and sent by its send().
    assert type(link.ws) is ServerConnection
    assert not isinstance(link.ws, ws_fastpath.AgentConnection)
    await agent.close()


@pytest.mark.skipif(not FAST_PATH_RELEASE, reason="websockets < 16 has no fast path")
async def test_switched_on_the_fast_path_runs_and_says_so(make_hub: HubFactory) -> None:
    with structlog.testing.capture_logs() as logs:
        hub = await make_hub(ws_fast_path=True)
    [line] = [e for e in logs if e["event"] == "transport_fast_path"]
    assert line["enabled"] is True, line
    assert line["reason"].startswith("websockets 1")
    agent, _ = await RawAgent.hello(ws_url(hub), "quick")
    await round_trip(hub, agent, "quick")
    conn = session_of(hub, "quick").ws
    assert isinstance(conn, ws_fastpath.AgentConnection)
    assert conn._split  # answers were read off the socket by the hub
    await agent.close()


async def test_start_up_check_names_the_release() -> None:
    ok, reason = ws_fastpath.check()
    assert ok is FAST_PATH_RELEASE, reason
    assert reason.startswith("websockets ")


@pytest.mark.parametrize("fast", [True, False])
async def test_close_after_queued_frames_keeps_their_order(fast: bool) -> None:
    """A Close never overtakes frames queued before it (the replaced agent
    gets its ``replaced`` error, then 4409), on both paths. In-memory engine:
    its broadcast queues the frames at once."""
    if fast and not FAST_PATH_RELEASE:
        pytest.skip("websockets < 16 has no fast path")
    config = HubConfig(port=0, admin_port=None, ws_fast_path=fast, max_send_buffer=64 << 20)
    async with Dispatcher(config) as hub:
        first, _ = await RawAgent.hello(ws_url(hub), "twin")
        # The first agent stops reading: the frames stay queued on the hub's side.
        first.ws.transport.pause_reading()
        blob = b"x" * 1_000_000
        for _ in range(16):  # more than the kernel's socket buffers hold
            await hub.broadcast("blob", blob)
        # Still queued on the hub's side (written at the end of the loop turn on
        # the fast path, held in the outbox on the public one).
        await wait_for(lambda: session_of(hub, "twin").buffered() > 8_000_000,
                       what="frames queued for the reader that paused")
        second, _ = await RawAgent.hello(ws_url(hub), "twin")  # the Close is asked for now
        first.ws.transport.resume_reading()
        for _ in range(16):
            assert (await first.recv_type("event"))["data"] == blob
        error = await first.recv()
        assert (error["t"], error["code"]) == ("error", "replaced")
        code, _ = await first.closed()
        assert code == 4409
        await round_trip(hub, second, "twin")
        await second.close()


@pytest.mark.parametrize(("raw", "value"), [
    ("0", False), ("false", False), ("No", False), ("off", False),
    ("1", True), ("true", True), ("YES", True), ("on", True),
])
def test_switch_from_the_environment(raw: str, value: bool) -> None:
    config = HubConfig.from_env({"DISPATCHER_WS_FAST_PATH": raw})
    assert config.ws_fast_path is value


def test_bad_switch_in_the_environment_names_the_variable() -> None:
    with pytest.raises(ValueError, match="DISPATCHER_WS_FAST_PATH"):
        HubConfig.from_env({"DISPATCHER_WS_FAST_PATH": "maybe"})


def test_rate_limit_grace_is_a_checked_setting() -> None:
    assert HubConfig.from_env({"DISPATCHER_RATE_LIMIT_GRACE": "0.5"}).rate_limit_grace == 0.5
    with pytest.raises(ValueError, match="rate_limit_grace"):
        HubConfig(rate_limit_grace=0)


@pytest.mark.parametrize("fast", [True, False])
async def test_a_frozen_peer_is_dropped_not_just_forgotten(fast: bool) -> None:
    """After a late Pong the connection itself ends too (its handler returns),
    even though a peer that does not read would never finish a closing handshake."""
    if fast and not FAST_PATH_RELEASE:
        pytest.skip("websockets < 16 has no fast path")
    config = HubConfig(port=0, admin_port=None, ws_fast_path=fast, heartbeat=0.3)
    async with Dispatcher(config) as hub:
        gone: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        hub.on("agent-disconnected",
               lambda _info, reason: gone.done() or gone.set_result(reason))
        proxy = await TcpProxy(hub.port).start()
        try:
            frozen, _ = await RawAgent.hello(proxy.url, "frozen")
            for _ in range(4):  # something queued for it, so a Close would wait
                await hub.broadcast("blob", b"x" * 500_000)
            proxy.pause()
            assert await asyncio.wait_for(gone, WAIT) == "heartbeat_timeout"
            await wait_for(lambda: hub._agents_server._open == 0, what="the handler ended")
        finally:
            await proxy.close()
        await frozen.close()
