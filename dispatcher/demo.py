"""``dispatcher demo``: a hub and a few agents in one process, showing what the hub does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from agent_client import Agent, CommandContext, CommandError
from agent_client.cli import build_agent

from .config import HubConfig
from .errors import CommandFailed, CommandTimeout
from .hub import Dispatcher
from .models import AgentInfo

__all__ = ["run_demo"]


async def _resize(payload: Any, ctx: CommandContext) -> Any:
    """A command with progress: pretends to resize an image in four steps."""
    for step in range(1, 5):
        await asyncio.sleep(0.15)
        await ctx.progress({"step": step, "of": 4})
    return {"resized": payload.get("image"), "width": payload.get("width")}


async def _deploy(payload: Any, ctx: CommandContext) -> Any:
    raise CommandError("disk_full", "no space left on /var", {"free_mb": 3})


async def run_demo(n_agents: int = 3, port: int = 0,
                   echo: Callable[[str], None] = print) -> None:
    """Run the demo; ``echo`` prints one line (the CLI passes ``click.echo``)."""
    config = HubConfig(port=port, admin_port=0, heartbeat=5, command_timeout=10)
    async with Dispatcher(config) as hub:
        url = f"ws://127.0.0.1:{hub.port}/ws"
        echo(f"hub {hub.hub_id} listening on {url} (engine: {hub.engine}), "
             f"admin API on http://127.0.0.1:{hub.admin_port}")
        connected = asyncio.Event()
        seen: set[str] = set()

        def on_connected(agent: AgentInfo) -> None:
            echo(f"  + agent {agent.id} connected (session {agent.session[:8]})")
            seen.add(agent.id)
            if len(seen) >= n_agents:
                connected.set()

        hub.on("agent-connected", on_connected)
        hub.on("agent-disconnected",
               lambda agent, reason: echo(f"  - agent {agent.id} disconnected ({reason})"))
        agents: list[Agent] = []
        for i in range(1, n_agents + 1):
            agent = build_agent([url], f"demo-{i}", meta={"demo": True})
            agent.add_command("resize", _resize)
            agent.add_command("deploy", _deploy)
            agents.append(agent)
            await agent.start()
        try:
            await asyncio.wait_for(connected.wait(), 10)
            await _show(hub, echo, [a.agent_id for a in agents])
        finally:
            for agent in agents:
                await agent.stop()
    echo("done: the hub closed cleanly.")


async def _show(hub: Dispatcher, echo: Callable[[str], None], ids: list[str]) -> None:
    first = ids[0]
    echo("\n1. sysinfo on every agent, in parallel:")
    handles = [hub.execute_on_agent(a, "sysinfo") for a in ids]
    for handle in handles:
        info = await handle
        echo(f"  {handle.agent_id}: pid {info['pid']} on {info['hostname']}, "
             f"python {info['python']}")

    echo(f"\n2. a command with progress (resize on {first}):")
    handle = hub.execute_on_agent(first, "resize", {"image": "cat.png", "width": 640})
    async for update in handle.progress():
        echo(f"  progress {update}")
    echo(f"  result   {await handle}")

    echo(f"\n3. a command the agent fails (deploy on {first}):")
    try:
        await hub.execute_on_agent(first, "deploy", {"version": "1.2"})
    except CommandFailed as exc:
        echo(f"  CommandFailed code={exc.code!r} message={exc.message!r} data={exc.data}")

    echo(f"\n4. a command that times out (sleep 5 s with timeout=0.5 on {first}):")
    handle = hub.execute_on_agent(first, "sleep", {"seconds": 5}, timeout=0.5)
    try:
        await handle
    except CommandTimeout:
        info = await hub.get_command(handle.id)
        assert info is not None
        echo(f"  CommandTimeout; stored as status={info.status} outcome={info.outcome}; "
             "the agent was sent 'cancel'")

    offline = "demo-offline"
    echo(f"\n5. a command for an agent that is not connected yet ({offline}):")
    handle = hub.execute_on_agent(offline, "echo", {"hello": "later"}, timeout=5)
    await handle.submitted()
    pending = await hub.list_pending_commands(offline)
    echo(f"  stored and PENDING: {[c.id for c in pending]}")
    late = build_agent([f"ws://127.0.0.1:{hub.port}/ws"], offline)
    await late.start()
    echo(f"  {offline} connects; the hub delivers it: result {await handle}")
    await late.stop()
