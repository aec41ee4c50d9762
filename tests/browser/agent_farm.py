"""Many agents in one process, cheaply: raw WebSockets speaking the hub's protocol.

``python -m tests.browser.agent_farm URL COUNT [--delay S]``: connects ``COUNT``
agents (``farm-00000``...) with a little meta each, answers every command
after a random delay of up to ``--delay`` seconds (so a job on all of them
keeps running for a while), prints ``connected N`` once they are in, and
serves until its standard input closes. For the dashboard's speed test.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from typing import Any

import msgpack
from websockets.asyncio.client import connect

REGIONS = ("eu-west", "eu-central", "us-east", "ap-south")
ROLES = ("web", "db", "cache", "worker")


async def agent(url: str, index: int, delay: float, gate: asyncio.Semaphore,
                ready: asyncio.Queue[bool]) -> None:
    aid = f"farm-{index:05d}"
    meta = {"role": ROLES[index % len(ROLES)], "region": REGIONS[index % len(REGIONS)],
            "version": f"1.{index % 7}"}
    loop = asyncio.get_running_loop()
    async with gate:
        ws = await connect(url, compression=None, ping_interval=None, open_timeout=60)
        await ws.send(msgpack.packb({"t": "hello", "v": 1, "agent": aid, "token": None,
                                     "meta": meta}))
        while msgpack.unpackb(await ws.recv())["t"] != "welcome":
            pass
    ready.put_nowait(True)

    sending: set[asyncio.Task[None]] = set()  # held until sent

    def answer(frame: dict[str, Any]) -> None:
        reply = {"t": "result", "id": frame["id"], "data": {"ok": True, "agent": aid}}
        task = loop.create_task(ws.send(msgpack.packb(reply)))
        sending.add(task)
        task.add_done_callback(sending.discard)

    async for message in ws:
        frame = msgpack.unpackb(message)
        if frame.get("t") == "cmd":
            loop.call_later(random.uniform(0, delay), answer, frame)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("count", type=int)
    parser.add_argument("--delay", type=float, default=3.0)
    args = parser.parse_args()
    gate = asyncio.Semaphore(64)
    ready: asyncio.Queue[bool] = asyncio.Queue()
    tasks = [asyncio.ensure_future(agent(args.url, i, args.delay, gate, ready))
             for i in range(args.count)]
    for _ in range(args.count):
        await asyncio.wait_for(ready.get(), 60)
    print(f"connected {args.count}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for task in tasks:  # the process ends: its connections drop with it
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
