"""A first end-to-end check: one hub, one agent_client agent, one command."""

from __future__ import annotations

from dispatcher import Dispatcher

from .conftest import ws_url


async def test_echo_round_trip(hub: Dispatcher, make_agent) -> None:
    agent = make_agent(ws_url(hub), "a1")

    @agent.command("echo")
    async def echo(payload, ctx):
        return payload

    await agent.start()
    await agent.wait_connected(5)
    assert await hub.execute_on_agent("a1", "echo", {"x": 1}) == {"x": 1}
