"""Storm driver: the calm agents and the application that sends them commands.

``python -m benchmarks.storm_driver --redis-url URL --prefix P --url B --first I --count N``

One process holds an embedded ``dispatcher.Dispatcher`` (hub id ``storm-c``)
joined to the same Redis as the hubs under test but with no agents of its own,
as an application process would run it, and ``--count`` calm
``agent_client.Agent`` instances connected to hub B only, answering ``echo``.
On ``{"op": "traffic", "rate": R}`` it submits commands to the calm agents in
turn on a fixed schedule (open loop: a slow answer does not delay the next
submit, so a stall shows as latency rather than as fewer samples) through the
embedded hub, which routes them to hub B over Redis. Each sample is
``[scheduled wall time, latency ms or None, error or None]``, latency from the
scheduled time to the result. ``{"op": "report"}`` stops the schedule, waits
(bounded) for the commands in flight and prints them all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from typing import Any

from agent_client import Agent
from agent_client.logs import configure_logging

from .common import COMMAND_KEY, PAYLOAD, agent_id, install_uvloop, now, print_json, stdin_lines

COMMAND_TIMEOUT = 30.0


def _echo(payload: Any, _ctx: Any) -> Any:
    return payload


class Traffic:
    """Commands on a fixed schedule, one per ``1 / rate`` seconds, to the agents in turn."""

    def __init__(self, hub: Any, agent_ids: list[str], rate: float) -> None:
        self.hub = hub
        self.ids = agent_ids
        self.rate = rate
        self.samples: list[list[Any]] = []
        self.inflight = 0
        self.lag_max_ms = 0.0  # how late the schedule itself ran (this process's own delay)
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="traffic")

    async def _run(self) -> None:
        # time.monotonic(), not loop.time(): uvloop's clock ticks in whole milliseconds.
        period = 1.0 / self.rate
        t0, t0_wall = time.monotonic(), now()
        k = 0
        while True:
            due = t0 + k * period
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.lag_max_ms = max(self.lag_max_ms, 1000 * (time.monotonic() - due))
            self._submit(self.ids[k % len(self.ids)], t0_wall + k * period, due)
            k += 1

    def _submit(self, aid: str, sched_wall: float, due: float) -> None:
        sample: list[Any] = [sched_wall, None, None]
        self.samples.append(sample)
        try:
            handle = self.hub.execute_on_agent(aid, COMMAND_KEY, PAYLOAD,
                                               timeout=COMMAND_TIMEOUT)
        except Exception as exc:
            sample[2] = f"{type(exc).__name__}: {exc}"[:200]
            return
        self.inflight += 1
        self._idle.clear()

        def done(fut: asyncio.Future[Any]) -> None:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()
            exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
            if exc is None:
                sample[1] = 1000 * (time.monotonic() - due)
            else:
                sample[2] = f"{type(exc).__name__}: {exc}"[:200]

        handle.add_done_callback(done)

    async def stop(self, timeout: float) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)


async def amain(args: argparse.Namespace, loop_name: str) -> None:
    from dispatcher import Dispatcher, HubConfig  # noqa: PLC0415

    hub = Dispatcher(HubConfig(host="127.0.0.1", port=0, admin_port=None,
                               redis_url=args.redis_url, prefix=args.prefix,
                               hub_id=args.hub_id, hub_ttl=args.hub_ttl))
    ids = [agent_id(i) for i in range(args.first, args.first + args.count)]
    agents = [Agent([args.url], aid) for aid in ids]
    for agent in agents:
        agent.add_command(COMMAND_KEY, _echo)
    traffic: Traffic | None = None
    cpu0 = time.process_time()
    try:
        await hub.listen()
        for agent in agents:
            await agent.start()
        async with asyncio.timeout(60):
            await asyncio.gather(*(a.wait_connected() for a in agents))
        print_json({"event": "ready", "loop": loop_name, "hubs": sorted(
            {str(a.hub_id) for a in agents})})
        async for cmd in stdin_lines():
            op = cmd.get("op")
            if op == "traffic" and traffic is None:
                traffic = Traffic(hub, ids, float(cmd["rate"]))
                traffic.start()
                print_json({"event": "traffic", "t": now()})
            elif op == "report":
                if traffic is not None:
                    await traffic.stop(COMMAND_TIMEOUT + 5)
                print_json({"event": "result",
                            "samples": traffic.samples if traffic else [],
                            "unfinished": traffic.inflight if traffic else 0,
                            "schedule_lag_max_ms": traffic.lag_max_ms if traffic else 0.0,
                            "cpu_s": time.process_time() - cpu0})
                traffic = None
            elif op == "quit":
                break
    finally:
        if traffic is not None:
            await traffic.stop(1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(15):
                await hub.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--hub-id", default="storm-c")
    parser.add_argument("--hub-ttl", type=float, default=5.0)
    parser.add_argument("--url", required=True, help="hub B's agent URL (the calm agents')")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    configure_logging("warning", json=True)
    loop_name = "asyncio" if args.no_uvloop else install_uvloop()
    asyncio.run(amain(args, loop_name))


if __name__ == "__main__":
    main()
