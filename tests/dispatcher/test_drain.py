"""``hub.drain()``: stop accepting agents and submissions, wait for the ACTIVE commands
of this hub's agents (what `dispatcher serve` does on SIGTERM; tests/test_production.py
runs it as a real process)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from agent_client import Agent
from dispatcher import HubClosed

from ..conftest import HubFactory, ws_url
from ..support import WAIT, wait_for


async def test_drain_refuses_new_work_and_waits_for_active_commands(
        make_hub: HubFactory, make_agent: Any) -> None:
    hub = await make_hub(drain_timeout=30)
    agent: Agent = make_agent(ws_url(hub), "drain-1")
    started, release = asyncio.Event(), asyncio.Event()

    @agent.command("hold")
    async def hold(payload: Any, ctx: Any) -> Any:
        started.set()
        await release.wait()
        return "done"

    await agent.start()
    await agent.wait_connected(WAIT)
    handle = hub.execute_on_agent("drain-1", "hold")
    await asyncio.wait_for(started.wait(), WAIT)
    await wait_for(lambda: _active(hub, handle.id), what="ACTIVE")
    assert hub.accepting
    with capture_logs() as logs:
        draining = asyncio.ensure_future(hub.drain())
        await wait_for(lambda: any(e["event"] == "hub_drain_waiting" for e in logs),
                       what="the drain to wait")
        assert not hub.accepting
        with pytest.raises(HubClosed, match="draining"):
            hub.execute_on_agent("drain-1", "hold")
        async with aiohttp.ClientSession() as http:
            base = f"127.0.0.1:{hub.port}"
            async with http.get(f"http://{base}/ws", headers={
                    "Upgrade": "websocket", "Connection": "Upgrade",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                    "Sec-WebSocket-Version": "13"}) as resp:
                assert resp.status == 503  # no new agent while draining
            async with http.get(f"http://127.0.0.1:{hub.admin_port}/readyz") as resp:
                assert resp.status == 503
            # The agent port's health check tells a balancer the same.
            async with http.get(f"http://{base}/healthz") as resp:
                assert resp.status == 503 and (await resp.json())["status"] == "draining"
        assert agent.connected  # agents stay until close(), to answer
        release.set()
        assert await asyncio.wait_for(draining, WAIT) == 0
        assert await handle == "done"
    waiting = next(e for e in logs if e["event"] == "hub_drain_waiting")
    assert waiting["active"] == 1
    assert next(e for e in logs if e["event"] == "hub_drained")["still_active"] == 0


async def test_drain_gives_up_after_its_timeout(make_hub: HubFactory, make_agent: Any) -> None:
    hub = await make_hub()
    agent: Agent = make_agent(ws_url(hub), "drain-2")
    started = asyncio.Event()

    @agent.command("forever")
    async def forever(payload: Any, ctx: Any) -> Any:
        started.set()
        await asyncio.Event().wait()

    await agent.start()
    await agent.wait_connected(WAIT)
    handle = hub.execute_on_agent("drain-2", "forever")
    await asyncio.wait_for(started.wait(), WAIT)
    await wait_for(lambda: _active(hub, handle.id), what="ACTIVE")
    assert await asyncio.wait_for(hub.drain(timeout=0.2), WAIT) == 1
    with capture_logs() as logs:
        await hub.close()
    lost = [e for e in logs if e["event"] == "commands_lost"]
    assert (lost[0]["count"] == 1) if hub.engine == "memory" else not lost


async def _active(hub: Any, cmd_id: str) -> bool:
    info = await hub.get_command(cmd_id)
    return info is not None and info.status == "ACTIVE"
