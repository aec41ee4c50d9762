"""The reference for our transport: a bare ``websockets`` server doing nothing but round trips.

It answers ``hello`` with ``welcome`` (the same two frames our agents exchange),
sends msgpack ``cmd`` frames shaped like the hub's, and resolves one future per
call when the ``result`` frame comes back; fan-out is ``websockets.broadcast``
of one encoded frame. Compression off, every other setting at its default.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import time
from collections.abc import Awaitable
from typing import Any

import msgpack
from websockets.asyncio.server import Server, ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

from ..common import COMMAND_KEY, EVENT_KEY, agent_id
from .base import Peer, main

_packb = msgpack.Packer(use_bin_type=True).pack


def _unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


class RawWsPeer(Peer):
    name = "raw-websockets"

    def __init__(self) -> None:
        super().__init__()
        self._server: Server | None = None
        self._conns: dict[str, ServerConnection] = {}
        self._by_index: list[ServerConnection | None] = []
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    async def start(self) -> int:
        self._server = await serve(self._handler, "127.0.0.1", 0, compression=None)
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handler(self, ws: ServerConnection) -> None:
        try:
            hello = _unpackb(await ws.recv())
            aid = hello["agent"]
            await ws.send(_packb({"t": "welcome", "v": 1, "hub": "raw", "session": "s",
                                  "heartbeat": 20}))
        except ConnectionClosed:
            return
        self._conns[aid] = ws
        self.agent_connected()
        pending = self._pending
        try:
            async for message in ws:
                frame = _unpackb(message)
                fut = pending.pop(frame["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(frame.get("data"))
        except ConnectionClosed:
            pass
        finally:
            if self._conns.get(aid) is ws:
                del self._conns[aid]
            self._by_index.clear()
            self.agent_disconnected()

    def _ws(self, index: int) -> ServerConnection:
        by_index = self._by_index
        if index < len(by_index):
            ws = by_index[index]
            if ws is not None:
                return ws
        while len(by_index) <= index:
            by_index.append(None)
        ws = by_index[index] = self._conns[agent_id(index)]
        return ws

    def call(self, index: int, payload: Any) -> Awaitable[Any]:
        return self._call(self._ws(index), payload)

    async def _call(self, ws: ServerConnection, payload: Any) -> Any:
        cid = f"{self._prefix}-{next(self._counter):010x}"
        fut = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        ts = int(time.time() * 1000)
        await ws.send(_packb({"t": "cmd", "id": cid, "key": COMMAND_KEY, "payload": payload,
                              "ts": ts, "deadline": ts + 60_000}))
        return await fut

    async def fanout(self, data: Any) -> None:
        broadcast(self._conns.values(), _packb({"t": "event", "key": EVENT_KEY, "data": data}))


if __name__ == "__main__":
    def _make(_args: argparse.Namespace) -> Peer:
        return RawWsPeer()

    main(_make)
