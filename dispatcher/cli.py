"""``dispatcher``: the operator's command line (argument parsing and output only)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from typing import Any

import click

from agent_client.logs import configure_logging

from .config import HubConfig
from .demo import run_demo
from .hub import Dispatcher
from .transport import agent_token

__all__ = ["main"]

_LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dispatcher")
def main() -> None:
    """dispatcher: a realtime agent hub.

    Run a hub with `dispatcher serve`, try it with `dispatcher demo`.
    """


@main.command()
@click.option("--host", help="Interface for agents and admin API.  [env: DISPATCHER_HOST]")
@click.option("--port", type=int, help="Agents' WebSocket port (8080).")
@click.option("--admin-host", help="Interface of the admin API (default: --host).")
@click.option("--admin-port", type=int, help="Admin HTTP API port (8081; 0 = any).")
@click.option("--redis", "redis_url", help="Redis URL; without it the in-memory engine runs.")
@click.option("--prefix", help="Redis key prefix (dispatcher).")
@click.option("--hub-id", help="This hub's id (random when unset).")
@click.option("--heartbeat", type=float, help="Seconds between pings (20).")
@click.option("--hello-timeout", type=float, help="Seconds an agent has to say hello (10).")
@click.option("--command-timeout", type=float, help="Default command timeout, seconds (60).")
@click.option("--retention", type=float, help="Seconds COMPLETE commands stay readable (3600).")
@click.option("--max-frame", type=int, help="Largest frame in bytes (1 MiB).")
@click.option("--agent-secret", help="Secret that derives agent tokens (HMAC-SHA256).")
@click.option("--agent-tokens", help="File of 'AGENT_ID TOKEN' lines.")
@click.option("--admin-token", help="Bearer token required by the admin API.")
@click.option("--certfile", type=click.Path(exists=True, dir_okay=False), help="TLS certificate.")
@click.option("--keyfile", type=click.Path(exists=True, dir_okay=False), help="TLS private key.")
@click.option("--log-level", type=_LOG_LEVELS, default="info", show_default=True)
@click.option("--log-json/--log-console", default=None,
              help="JSON lines or console output (default: console on a terminal).")
def serve(log_level: str, log_json: bool | None, **options: Any) -> None:
    """Run a hub until SIGTERM or Ctrl-C (the first drains, a second forces).

    Every flag can also be set as DISPATCHER_<FLAG> (e.g. DISPATCHER_REDIS_URL).
    """
    configure_logging(log_level, log_json)
    try:
        config = HubConfig.from_env(**options)
    except (ValueError, TypeError) as exc:
        raise click.UsageError(str(exc)) from None
    try:
        _run(_serve(config))
    except OSError as exc:
        click.echo(f"dispatcher: cannot serve: {exc}", err=True)
        sys.exit(1)


async def _serve(config: HubConfig) -> None:
    import structlog  # noqa: PLC0415

    log = structlog.get_logger("dispatcher.serve")
    hub = Dispatcher(config)
    # The first log line says which engine runs and whether agents need tokens.
    log.info(
        "hub_starting", engine=hub.engine, hub_id=hub.hub_id,
        note=("in-memory engine: commands are lost when this process stops; "
              "use --redis URL in production") if hub.engine == "memory" else None,
    )
    if not hub.auth_required:
        log.warning("agents_unauthenticated",
                    note="no --agent-secret or --agent-tokens: any client may connect as any agent")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("hub_draining", hint="send the signal again to force")
            stop.set()
        else:
            log.warning("hub_forced_exit")
            sys.exit(1)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    await hub.listen()
    try:
        await stop.wait()
    finally:
        try:
            async with asyncio.timeout(config.drain_timeout):
                await hub.close()
        except TimeoutError:
            log.warning("hub_drain_timeout", seconds=config.drain_timeout)


@main.command()
@click.option("--agents", default=3, show_default=True, help="How many demo agents to start.")
@click.option("--port", default=0, show_default=True, help="Agents' port (0 = any free port).")
@click.option("--log-level", type=_LOG_LEVELS, default="warning", show_default=True)
def demo(agents: int, port: int, log_level: str) -> None:
    """Start a hub and demo agents, run a few commands, and show what happens."""
    configure_logging(log_level, json=False)
    _run(run_demo(n_agents=agents, port=port, echo=click.echo))


@main.command()
@click.argument("agent_id")
@click.option("--secret", envvar="DISPATCHER_AGENT_SECRET", required=True,
              help="The hub's agent secret.  [env: DISPATCHER_AGENT_SECRET]")
def token(agent_id: str, secret: str) -> None:
    """Print the token of AGENT_ID under the hub's agent secret."""
    click.echo(agent_token(secret, agent_id))


@main.command(name="agent", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def agent_cmd(args: tuple[str, ...]) -> None:
    """Run the built-in agent (same as `dispatcher-agent`)."""
    from agent_client.cli import main as agent_main  # noqa: PLC0415

    agent_main.main(args=list(args), prog_name="dispatcher agent")


def _run(coro: Any) -> None:
    """Run on uvloop when it is installed (PERFORMANCE.md), else asyncio's loop."""
    try:
        import uvloop  # noqa: PLC0415

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(coro)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)
