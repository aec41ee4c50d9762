"""Storm load generator: real ``agent_client.Agent`` instances, one process holding many.

``python -m benchmarks.storm_agents --urls A,B --first I --count N --home HUB_ID``

Each agent is an ``agent_client.Agent`` with the URL list ``[A, B]`` and the
library's default reconnection (``agent_client.backoff``: exponential backoff
with jitter, the next URL at each attempt), answering ``echo`` with its payload.
These are the agents the product ships, not a lean client: what the storm
measures is what real agents do when their hub dies.

Prints ``{"event": "ready"}``, waits for ``{"op": "go"}``, connects its agents
(at most ``--concurrency`` handshakes at once, so that the initial connection
is not itself a storm and every agent lands on its first URL), prints
``{"event": "connected", ...}``; then serves until ``{"op": "report"}``
(answered with ``{"event": "report", ...}``: which hub each agent is on and
when it connected there) and ``{"op": "quit"}`` / EOF.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from typing import Any

from agent_client import Agent
from agent_client.logs import configure_logging

from .common import COMMAND_KEY, agent_id, install_uvloop, now, print_json, stdin_lines


def _echo(payload: Any, _ctx: Any) -> Any:
    return payload


class Fleet:
    """The agents of this process and when each connected to which hub."""

    def __init__(self, urls: list[str], first: int, count: int, backoff_initial: float,
                 backoff_max: float) -> None:
        self.agents: list[Agent] = []
        # agent index -> (wall time, hub id) of its latest welcome
        self.last: dict[int, tuple[float, str | None]] = {}
        self.connects = 0
        self.disconnects: list[float] = []  # wall times the agents saw their connection end
        for i in range(first, first + count):
            agent = Agent(urls, agent_id(i), backoff_initial=backoff_initial,
                          backoff_max=backoff_max)
            agent.add_command(COMMAND_KEY, _echo)
            agent.on_connect = self._hook(i, agent)
            agent.on_disconnect = self._dropped
            self.agents.append(agent)

    def _hook(self, index: int, agent: Agent) -> Any:
        def on_connect() -> None:
            # A task spawned by the agent right after its welcome: the time is the
            # agent's view, later than the hub's by this process's own delay.
            self.connects += 1
            self.last[index] = (now(), agent.hub_id)

        return on_connect

    def _dropped(self) -> None:
        self.disconnects.append(now())

    async def connect_all(self, concurrency: int, timeout: float) -> list[str]:
        sem = asyncio.Semaphore(concurrency)
        errors: list[str] = []

        async def one(agent: Agent) -> None:
            async with sem:
                await agent.start()
                try:
                    await agent.wait_connected(timeout)
                except TimeoutError:
                    errors.append(f"{agent.agent_id}: not connected within {timeout:g} s")

        await asyncio.gather(*(one(a) for a in self.agents))
        return errors

    def report(self) -> dict[str, Any]:
        hubs: dict[str, int] = {}
        for agent in self.agents:
            key = str(agent.hub_id) if agent.connected else "not connected"
            hubs[key] = hubs.get(key, 0) + 1
        return {"hubs": hubs, "connects": self.connects, "disconnects": self.disconnects,
                "last_connect": {str(i): t for i, (t, _) in self.last.items()},
                "last_hub": {str(i): h for i, (_, h) in self.last.items()}}

    async def stop(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(a.stop() for a in self.agents), return_exceptions=True)


async def amain(args: argparse.Namespace, loop_name: str) -> None:
    urls = [u for u in args.urls.split(",") if u]
    fleet = Fleet(urls, args.first, args.count, args.backoff_initial, args.backoff_max)
    print_json({"event": "ready", "loop": loop_name})
    commands = stdin_lines()
    async for cmd in commands:
        if cmd.get("op") == "go":
            break
        if cmd.get("op") == "quit":
            return
    else:
        return
    t_start, cpu0 = now(), time.process_time()
    try:
        errors = await fleet.connect_all(args.concurrency, args.connect_timeout)
        rep = fleet.report()
        print_json({"event": "connected", "n": sum(a.connected for a in fleet.agents),
                    "hubs": rep["hubs"], "t_start": t_start, "t_end": now(),
                    "cpu_s": time.process_time() - cpu0, "errors": errors[:5],
                    "error_count": len(errors)})
        async for cmd in commands:
            op = cmd.get("op")
            if op == "report":
                print_json({"event": "report", **fleet.report(),
                            "cpu_s": time.process_time() - cpu0})
            elif op == "quit":
                break
    finally:
        await fleet.stop(10)
        print_json({"event": "done", "cpu_s": time.process_time() - cpu0})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--urls", required=True, help="comma-separated hub URLs, in order")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=32,
                        help="initial handshakes in progress at once")
    parser.add_argument("--connect-timeout", type=float, default=60)
    parser.add_argument("--backoff-initial", type=float, default=0.5,
                        help="Agent(backoff_initial=...): the library's default")
    parser.add_argument("--backoff-max", type=float, default=30.0,
                        help="Agent(backoff_max=...): the library's default")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    # Warning level on stderr: the agents' per-connection info lines would cost this
    # process more than the handshakes (and structlog's default prints to stdout).
    configure_logging("warning", json=True)
    loop_name = "asyncio" if args.no_uvloop else install_uvloop()
    asyncio.run(amain(args, loop_name))


if __name__ == "__main__":
    main()
