"""``dispatcher-agent``: a ready agent with built-in ``echo``, ``sleep`` and ``sysinfo``."""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import sys
import time
from typing import Any

import click

from .client import Agent, CommandContext
from .errors import AgentReplaced, CommandError
from .logs import configure_logging

__all__ = ["build_agent", "main"]


async def _echo(payload: Any, ctx: CommandContext) -> Any:
    return payload


async def _sleep(payload: Any, ctx: CommandContext) -> Any:
    """Sleep ``payload["seconds"]`` (or a bare number), reporting progress each second."""
    seconds = payload.get("seconds", 1) if isinstance(payload, dict) else payload
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not seconds >= 0:
        raise CommandError("bad_payload", "sleep takes {'seconds': N} or a number >= 0")
    start = time.monotonic()
    step = min(1.0, seconds / 4) if seconds else 0
    while (elapsed := time.monotonic() - start) < seconds:
        await ctx.progress({"elapsed": round(elapsed, 2), "total": seconds})
        await asyncio.sleep(min(step, seconds - elapsed))
    return {"slept": seconds}


async def _sysinfo(payload: Any, ctx: CommandContext) -> Any:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pid": os.getpid(),
        "cpus": os.cpu_count(),
        "loadavg": list(load) if load else None,
        "time": time.time(),
    }


def build_agent(urls: list[str], agent_id: str, **kwargs: Any) -> Agent:
    agent = Agent(urls, agent_id, **kwargs)
    agent.add_command("echo", _echo)
    agent.add_command("sleep", _sleep)
    agent.add_command("sysinfo", _sysinfo)
    return agent


@click.command(context_settings={"auto_envvar_prefix": "DISPATCHER_AGENT"})
@click.option("--url", "urls", multiple=True, default=["ws://127.0.0.1:8080/ws"],
              show_default=True, help="Hub URL; repeat for fail-over between hubs.")
@click.option("--id", "agent_id", default=lambda: f"agent-{socket.gethostname()}",
              help="Agent id (default: agent-HOSTNAME).")
@click.option("--token", default=None, help="Credential when the hub requires one.")
@click.option("--concurrency", default=64, show_default=True, help="Commands run at once.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def main(urls: tuple[str, ...], agent_id: str, token: str | None, concurrency: int,
         log_level: str) -> None:
    """Run an agent with the built-in commands echo, sleep and sysinfo."""
    configure_logging(log_level)
    agent = build_agent(list(urls), agent_id, token=token, max_concurrency=concurrency,
                        meta={"host": socket.gethostname(), "builtin": True})
    try:
        asyncio.run(agent.run())
    except KeyboardInterrupt:
        pass
    except AgentReplaced as exc:
        click.echo(f"dispatcher-agent: {exc}", err=True)
        sys.exit(3)
