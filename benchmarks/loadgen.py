"""Load generator: one process holding many agents that answer commands and count events.

``python -m benchmarks.loadgen --proto ws|sio --url URL --first I --count N``

- ``ws``: the hub's wire protocol (docs/protocol.md) spoken directly with ``websockets``
  (``hello`` → ``welcome``, every ``cmd`` answered at once with a ``result``
  carrying the payload, no ack); used against this hub and the bare websockets
  reference alike.
- ``sio``: one ``socketio.AsyncClient`` per agent (msgpack, WebSocket transport),
  answering the ``cmd`` event by returning its data (the ``call()`` ack).

Prints ``{"event": "ready"}``, waits for ``{"op": "go"}`` on stdin, connects its
agents with bounded concurrency, prints ``{"event": "connected", ...}``, then
serves until the server closes the connections or ``{"op": "quit"}`` / EOF;
prints ``{"event": "done", ...}`` last. With ``--control-port`` it reports every
fan-out round all of its agents have received (see ``servers/base.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

from .common import EVENT_KEY, agent_id, install_uvloop, now, print_json, stdin_lines

_packb = msgpack.Packer(use_bin_type=True).pack


class Counters:
    def __init__(self, count: int, control: asyncio.StreamWriter | None) -> None:
        self.count = count
        self.commands = 0
        self.events = 0
        self.connected = 0
        self.error_frames = 0
        self.errors: list[str] = []
        self.all_connected = asyncio.Event()
        self._rounds: dict[int, int] = {}
        self._control = control

    def on_event(self, seq: int) -> None:
        self.events += 1
        rounds = self._rounds
        n = rounds.get(seq, 0) + 1
        if n >= self.count:
            rounds.pop(seq, None)
            if self._control is not None:
                self._control.write(b"%d\n" % seq)
        else:
            rounds[seq] = n

    def on_error_frame(self, frame: dict[str, Any]) -> None:
        """An ``error`` frame from the hub (e.g. ``rate_limited``): logged, never expected."""
        self.error_frames += 1
        if self.error_frames <= 5:
            print(f"error frame from the hub: {frame!r}", file=sys.stderr, flush=True)

    def on_connected(self) -> None:
        self.connected += 1
        if self.connected >= self.count:
            self.all_connected.set()

    def on_error(self, exc: BaseException) -> None:
        self.errors.append(f"{type(exc).__name__}: {exc}")
        self.count -= 1  # one agent fewer to wait for
        if self.connected >= self.count:
            self.all_connected.set()


def _lean_connection_class() -> type:
    """websockets' client connection, with messages handled as they are parsed.

    The load generators must not be what limits a run: websockets' ``recv()``
    hands each message to a task through a queue, and one process holding 1,000
    agents spent most of its CPU there (the fan-out ran into it). Here each
    binary message goes to a plain callback from ``process_event``, and the
    answers written in one event-loop turn leave in one write per connection.
    Handshake, pings, closes and framing stay websockets'. Used identically
    against every target that speaks the hub's protocol.
    """
    from websockets.asyncio.client import ClientConnection  # noqa: PLC0415
    from websockets.frames import Opcode  # noqa: PLC0415

    class LeanConnection(ClientConnection):
        on_message: Callable[[bytes], None] | None = None
        _flushing = False

        def process_event(self, event: Any) -> None:
            handler = self.on_message
            if handler is not None and event.opcode is Opcode.BINARY and event.fin:
                handler(event.data)
            else:
                super().process_event(event)

        def queue_binary(self, data: bytes) -> None:
            self.protocol.send_binary(data)
            if not self._flushing:
                self._flushing = True
                self.loop.call_soon(self._flush)

        def _flush(self) -> None:
            self._flushing = False
            if not self.transport.is_closing():
                self.send_data()

    return LeanConnection


async def ws_agent(url: str, aid: str, sem: asyncio.Semaphore, c: Counters) -> None:
    from websockets.asyncio.client import connect  # noqa: PLC0415

    unpackb = msgpack.unpackb
    welcomed = asyncio.get_running_loop().create_future()

    try:
        async with sem:
            ws: Any = await connect(url, compression=None, ping_interval=None, open_timeout=60,
                                    max_size=None, create_connection=_lean_connection_class())
            reply = ws.queue_binary

            def on_message(message: bytes) -> None:
                frame = unpackb(message)
                t = frame["t"]
                if t == "cmd":
                    c.commands += 1
                    reply(_packb({"t": "result", "id": frame["id"], "data": frame["payload"]}))
                elif t == "event":
                    c.on_event(frame["data"]["seq"])
                elif t == "welcome":
                    if not welcomed.done():
                        welcomed.set_result(frame)
                elif t == "error":
                    c.on_error_frame(frame)

            ws.on_message = on_message
            await ws.send(_packb({"t": "hello", "v": 1, "agent": aid, "token": None}))
            await asyncio.wait_for(welcomed, 60)
    except Exception as exc:
        c.on_error(exc)
        return
    c.on_connected()
    await ws.wait_closed()


async def sio_agent(url: str, aid: str, sem: asyncio.Semaphore, c: Counters) -> None:
    import socketio  # noqa: PLC0415

    client = socketio.AsyncClient(reconnection=False, serializer="msgpack")

    async def on_cmd(data: Any) -> Any:
        c.commands += 1
        return data

    def on_tick(data: Any) -> None:
        c.on_event(data["seq"])

    client.on("cmd", on_cmd)
    client.on(EVENT_KEY, on_tick)
    try:
        async with sem:
            await client.connect(url, transports=["websocket"], auth={"agent": aid},
                                 wait_timeout=60)
    except Exception as exc:
        c.on_error(exc)
        return
    c.on_connected()
    await client.wait()


async def amain(args: argparse.Namespace, loop_name: str) -> None:
    control: asyncio.StreamWriter | None = None
    if args.control_port:
        _, control = await asyncio.open_connection("127.0.0.1", args.control_port)
    c = Counters(args.count, control)
    agent: Callable[[str, str, asyncio.Semaphore, Counters], Awaitable[None]]
    agent = sio_agent if args.proto == "sio" else ws_agent
    print_json({"event": "ready", "loop": loop_name})
    commands = stdin_lines()
    async for cmd in commands:
        if cmd.get("op") == "go":
            break
        if cmd.get("op") == "quit":
            return
    else:
        return
    sem = asyncio.Semaphore(args.concurrency)
    t_start = now()
    cpu0 = time.process_time()
    tasks = [asyncio.ensure_future(agent(args.url, agent_id(i), sem, c))
             for i in range(args.first, args.first + args.count)]
    waiter = asyncio.ensure_future(c.all_connected.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    if not c.all_connected.is_set():
        await asyncio.wait([waiter], timeout=args.connect_timeout)
    print_json({"event": "connected", "n": c.connected, "t_start": t_start, "t_end": now(),
                "cpu_s": time.process_time() - cpu0, "errors": c.errors[:5],
                "error_count": len(c.errors)})
    waiter.cancel()

    async def until_quit() -> None:
        async for cmd in commands:
            if cmd.get("op") == "quit":
                return

    quitter = asyncio.ensure_future(until_quit())
    serving = asyncio.ensure_future(asyncio.gather(*tasks, return_exceptions=True))
    await asyncio.wait([quitter, serving], return_when=asyncio.FIRST_COMPLETED)
    for t in (quitter, serving, *tasks):
        t.cancel()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    print_json({"event": "done", "commands": c.commands, "events": c.events,
                "error_frames": c.error_frames,
                "cpu_s": time.process_time() - cpu0})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--proto", choices=("ws", "sio"), required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=32,
                        help="handshakes in progress at once (the servers' listen backlog is 100)")
    parser.add_argument("--connect-timeout", type=float, default=120)
    parser.add_argument("--control-port", type=int, default=0)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    loop_name = "asyncio" if args.no_uvloop else install_uvloop()
    asyncio.run(amain(args, loop_name))


if __name__ == "__main__":
    main()
