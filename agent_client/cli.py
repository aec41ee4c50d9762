"""``dispatcher-agent``: a ready agent with built-in ``echo``, ``sleep`` and ``sysinfo``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click
import structlog

from .client import Agent, CommandContext
from .errors import AgentRefused, AgentReplaced, CommandError
from .logs import FORMATS, LEVELS, configure_logging, log_settings
from .proctitle import hide_secret_flags
from .signals import on_stop_signals

__all__ = ["ENV_VARIABLES", "build_agent", "main"]


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


# Every variable this program reads (the hub's `serve` knows them: not typos).
ENV_VARIABLES = ("DISPATCHER_AGENT_URL", "DISPATCHER_AGENT_ID", "DISPATCHER_AGENT_TOKEN",
                 "DISPATCHER_AGENT_TOKEN_FILE", "DISPATCHER_AGENT_CONCURRENCY",
                 "DISPATCHER_AGENT_STOP_TIMEOUT")
DEFAULT_URL = "ws://127.0.0.1:8080/ws"
EXIT_REFUSED = 2  # the hub refused the credential or the protocol version
EXIT_REPLACED = 3  # another connection took this agent id

log = structlog.get_logger("agent_client.cli")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dispatcher", prog_name="dispatcher-agent")
@click.option("--url", "urls", multiple=True, envvar=ENV_VARIABLES[0], show_envvar=True,
              help=f"Hub URL; repeat it, or give a comma list, for fail-over between hubs "
                   f"(default: {DEFAULT_URL}).")
@click.option("--id", "agent_id", envvar=ENV_VARIABLES[1], show_envvar=True,
              default=lambda: f"agent-{socket.gethostname()}",
              help="Agent id (default: agent-HOSTNAME).")
@click.option("--token", default=None, envvar=ENV_VARIABLES[2], show_envvar=True,
              help="Credential when the hub requires one (prefer --token-file: the "
                   "command line is visible to every user).")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              envvar=ENV_VARIABLES[3], show_envvar=True, help="File holding the credential.")
@click.option("--concurrency", type=click.IntRange(min=1), default=64, show_default=True,
              envvar=ENV_VARIABLES[4], show_envvar=True, help="Commands run at once.")
@click.option("--stop-timeout", type=click.FloatRange(min=0), default=30.0,
              show_default=True, envvar=ENV_VARIABLES[5], show_envvar=True,
              help="Seconds SIGTERM lets running commands finish before they are cancelled.")
@click.option("--log-level", type=click.Choice(LEVELS), default=None,
              help="debug, info, warning or error (default: info).  "
                   "[env: DISPATCHER_LOG_LEVEL]")
@click.option("--log-format", type=click.Choice(FORMATS), default=None,
              help="json or console (default: console on a terminal, else JSON lines).  "
                   "[env: DISPATCHER_LOG_FORMAT]")
def main(*, urls: tuple[str, ...], agent_id: str, token: str | None, token_file: str | None,
         concurrency: int, stop_timeout: float, log_level: str | None,
         log_format: str | None) -> None:
    """Run an agent with the built-in commands echo, sleep and sysinfo.

    SIGTERM or Ctrl-C: take no new command, let the running ones finish (up to
    --stop-timeout), answer them, close and exit 0 (a second signal cancels
    them). Exits 2 when the hub refuses the token or the protocol version,
    3 when another connection takes this agent id.
    """
    hide_secret_flags()  # --token VALUE does not show in `ps`
    try:
        level, json_logs = log_settings(log_level, log_format)
    except ValueError as exc:
        _fail(EXIT_REFUSED, f"configuration error: {exc}")
    hubs = [u.strip() for url in urls or (DEFAULT_URL,) for u in url.split(",") if u.strip()]
    if token is not None and token_file is not None:
        _fail(EXIT_REFUSED, "configuration error: give --token or --token-file "
                            f"({ENV_VARIABLES[2]} or {ENV_VARIABLES[3]}), not both")
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            _fail(EXIT_REFUSED, f"configuration error: --token-file {token_file}: "
                                f"cannot read it: {exc}")
    configure_logging(level, json_logs)
    try:
        agent = build_agent(hubs, agent_id, token=token, max_concurrency=concurrency,
                            meta={"host": socket.gethostname(), "builtin": True})
    except ValueError as exc:
        _fail(EXIT_REFUSED, f"configuration error: {exc}")
    try:
        asyncio.run(_run(agent, stop_timeout))
    except AgentRefused as exc:
        _fail(EXIT_REFUSED, f"the hub refused this agent ({exc.code}): {exc.message}")
    except AgentReplaced as exc:
        _fail(EXIT_REPLACED, str(exc))


def _fail(code: int, message: str) -> NoReturn:
    click.echo(f"dispatcher-agent: {message}", err=True)
    sys.exit(code)


async def _run(agent: Agent, stop_timeout: float) -> None:
    """Serve until the first SIGTERM/SIGINT, then stop gracefully (a second one forces)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def graceful() -> None:
        log.info("agent_stopping", agent_id=agent.agent_id, stop_timeout=stop_timeout,
                 hint="send the signal again to cancel running commands")
        stop.set()

    def forced() -> None:
        log.warning("agent_forced_stop", agent_id=agent.agent_id)
        stopper.cancel()

    on_stop_signals(loop, graceful, forced)
    runner = loop.create_task(agent.run())
    waiter = loop.create_task(stop.wait())
    stopper: asyncio.Task[None] = loop.create_task(_after(stop, agent, stop_timeout))
    try:
        await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if runner.done():
            runner.result()  # AgentRefused, AgentReplaced
            return
        with contextlib.suppress(asyncio.CancelledError):
            await stopper
        await agent.stop()  # after a forced stop: cancel what still runs
        log.info("agent_stopped", agent_id=agent.agent_id)
    finally:
        for task in (waiter, stopper, runner):
            task.cancel()
        await asyncio.gather(waiter, stopper, runner, return_exceptions=True)


async def _after(event: asyncio.Event, agent: Agent, timeout: float) -> None:
    await event.wait()
    await agent.stop(timeout)
