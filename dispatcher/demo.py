"""``dispatcher demo``: a hub and a few agents in one process, showing what the hub does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from agent_client import Agent, CommandContext, CommandError, EventContext
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


def _upgrade(agent_id: str) -> Callable[[Any, CommandContext], Awaitable[Any]]:
    """The rollout's command: fails on the agent the payload names as broken."""

    async def upgrade(payload: Any, ctx: CommandContext) -> Any:
        await asyncio.sleep(0.05)
        if agent_id == payload.get("broken"):
            raise CommandError("unhealthy", f"{agent_id} did not come back after the upgrade")
        return {"version": payload.get("version")}

    return upgrade


class _Seen:
    """Events the demo waits for: each handler prints its line and sets its Event."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.events: dict[str, asyncio.Event] = {}

    def __getitem__(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())

    def handler(self, name: str, agent_id: str) -> Callable[[Any, EventContext], Awaitable[None]]:
        async def on_event(data: Any, ctx: EventContext) -> None:
            sender = f" from {ctx.sender}" if ctx.sender else " from the hub"
            self.echo(f"  {agent_id} got event {ctx.key!r}{sender}: {data}")
            self[name].set()

        return on_event


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
        watch = _Seen(echo)
        agents: list[Agent] = []
        for i in range(1, n_agents + 1):
            agent = build_agent([url], f"demo-{i}", meta={"demo": True})
            agent.add_command("resize", _resize)
            agent.add_command("deploy", _deploy)
            agent.add_command("upgrade", _upgrade(f"demo-{i}"))
            # Every agent takes config events; the last one also follows jobs.
            agent.on("config.*")(watch.handler(f"config:{agent.agent_id}", agent.agent_id))
            if i == n_agents and n_agents > 1:
                agent.on("job.*")(watch.handler("job", agent.agent_id))
            agents.append(agent)
            await agent.start()
        try:
            await asyncio.wait_for(connected.wait(), 10)
            await _show(hub, echo, [a.agent_id for a in agents])
            await _show_events(hub, echo, agents, watch)
            await _show_admin(hub, echo, agents[0].agent_id)
            if len(agents) > 1:
                await _show_rollout(hub, echo, [a.agent_id for a in agents])
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


async def _show_events(hub: Dispatcher, echo: Callable[[str], None], agents: list[Agent],
                       seen: _Seen) -> None:
    first = agents[0]
    target = agents[1] if len(agents) > 1 else first
    echo(f"\n6. an event from the hub, with a receipt (config.reload to {target.agent_id}):")
    await hub.emit_to(target.agent_id, "config.reload", {"version": 2}, timeout=5)
    await asyncio.wait_for(seen[f"config:{target.agent_id}"].wait(), 5)
    echo(f"  receipt: {target.agent_id} answered 'received', so emit_to returned")
    if len(agents) < 2:
        return
    last = agents[-1]
    echo(f"\n7. an agent emits an event ({first.agent_id} emits job.done; "
         f"{last.agent_id} subscribed to job.*):")
    hub_saw = asyncio.Event()

    def on_job(data: Any, sender: str) -> None:
        echo(f"  the hub saw {sender} emit job.done: {data}")
        hub_saw.set()

    hub.on("job.done", on_job)
    await first.emit("job.done", {"job": 42, "ok": True})
    await asyncio.wait_for(asyncio.gather(hub_saw.wait(), seen["job"].wait()), 5)
    hub.off("job.done", on_job)

    echo(f"\n8. an agent calls a command on another agent through the hub "
         f"({first.agent_id} calls sysinfo on {last.agent_id}):")
    info = await first.call(last.agent_id, "sysinfo", timeout=5)
    echo(f"  {first.agent_id} got {last.agent_id}'s answer: pid {info['pid']}, "
         f"python {info['python']}")


async def _show_admin(hub: Dispatcher, echo: Callable[[str], None], agent_id: str) -> None:
    base = f"http://127.0.0.1:{hub.admin_port}"
    echo(f"\n9. the same hub through its admin API ({base}, what `dispatcher agents` and "
         "`dispatcher exec` use):")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/agents") as resp:
            found = await resp.json()
            echo(f"  GET /agents -> {resp.status}: {sorted(a['id'] for a in found)}")
        body = {"key": "echo", "payload": {"via": "http"}}
        async with http.post(f"{base}/agents/{agent_id}/commands", json=body) as resp:
            info = await resp.json()
            echo(f"  POST /agents/{agent_id}/commands {json.dumps(body)} -> {resp.status}: "
                 f"outcome {info['outcome']}, result {info['result']}")


async def _show_rollout(hub: Dispatcher, echo: Callable[[str], None], ids: list[str]) -> None:
    broken = ids[1]
    echo(f"\n10. a rollout: upgrade on 'demo-*', one agent at a time (batch=1), stopping "
         f"after the first failure (max_failures=0); {broken} is broken:")
    handle = hub.execute_on_agents("demo-*", "upgrade", {"version": "2.0", "broken": broken},
                                   batch=1, max_failures=0, timeout=5)
    echo(f"  job {handle.id} on {await handle.resolved()}")
    async for info in handle.results():
        detail = info.result if info.outcome == "ok" else (info.error or {}).get("message")
        echo(f"  {info.agent_id}: {info.outcome}" + (f" {detail}" if detail else ""))
    job = await handle
    counts = {k: v for k, v in job.counts.items() if v}
    echo(f"  job {job.status}: {counts}")
    echo("  the history afterwards, from the store's index (list_commands, newest first;")
    echo("  `dispatcher commands --outcome error` and GET /commands?outcome=error ask the same):")
    for cmd in (await hub.list_commands(limit=5)).commands:
        echo(f"    {cmd.id:<36} {cmd.agent_id:<12} {cmd.key:<8} {cmd.outcome or '-':<9} "
             f"job {cmd.job or '-'}")
    failed = (await hub.list_commands(outcome="error")).commands
    echo(f"  failed commands so far: {[(c.agent_id, c.key) for c in failed]}")
