"""An agent process of the fault-injection run: it runs ``work`` commands and logs each one.

``python -m benchmarks.chaos_agent --id A --url U [--url U ...] --log FILE``.
Every execution of a ``work`` command appends one JSON line to ``FILE``
(command id, agent, start and end unix ms, the cmd frame's deadline, how it
ended) and flushes and fsyncs it before the answer is sent, so the harness
can count executions exactly even if this process is killed right after.

Its stdin takes JSON lines ``{"op": "state"}`` (answered on stdout with
``{"event": "state", "connected": ..., "hub": ..., "session": ...}``) and
``{"op": "quit"}``; it prints ``{"event": "ready"}`` once started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from typing import IO, Any

from agent_client import Agent, CommandContext
from agent_client.logs import configure_logging

__all__ = ["main"]


def _now_ms() -> int:
    return int(time.time() * 1000)


class ExecutionLog:
    """Append-only, one JSON line per execution, durable before the answer leaves."""

    def __init__(self, path: str, agent_id: str) -> None:
        self.agent_id = agent_id
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def record(self, ctx: CommandContext, start: int, status: str) -> None:
        line = {"id": ctx.id, "agent": self.agent_id, "start": start, "end": _now_ms(),
                "deadline": ctx.deadline, "status": status}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def build(urls: list[str], agent_id: str, log: ExecutionLog, heartbeat: float) -> Agent:
    agent = Agent(urls, agent_id, heartbeat=heartbeat, backoff_initial=0.05, backoff_max=0.5,
                  open_timeout=5.0, meta={"chaos": True})

    async def work(payload: Any, ctx: CommandContext) -> Any:
        start = _now_ms()
        status = "cancelled"
        try:
            ms = payload.get("ms", 0) if isinstance(payload, dict) else 0
            await asyncio.sleep(max(0, min(float(ms), 60_000)) / 1000)
            status = "ok"
        finally:
            # Written before the answer is sent (the answer goes out after
            # this returns), and also when the hub cancelled it mid-run.
            log.record(ctx, start, status)
        return {"agent": agent_id, "start": start}

    agent.add_command("work", work)
    return agent


async def _serve(agent: Agent) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 16)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    await agent.start()
    say({"event": "ready", "pid": os.getpid()})
    while line := await reader.readline():
        try:
            op = json.loads(line).get("op")
        except (ValueError, AttributeError):
            continue
        if op == "state":
            say({"event": "state", "connected": agent.connected,
                 "hub": agent.hub_id if agent.connected else None,
                 "session": agent.session if agent.connected else None})
        elif op == "quit":
            break


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos_agent")
    parser.add_argument("--id", required=True)
    parser.add_argument("--url", action="append", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--heartbeat", type=float, default=6.0)
    args = parser.parse_args(argv)
    configure_logging("warning", json=True)  # stderr: stdout carries the JSON replies
    log = ExecutionLog(args.log, args.id)
    agent = build(args.url, args.id, log, args.heartbeat)

    async def run() -> None:
        try:
            await _serve(agent)
        finally:
            await asyncio.wait_for(agent.stop(), 10)

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run())
    finally:
        log.close()


if __name__ == "__main__":
    main()
