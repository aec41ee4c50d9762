"""python-socketio, the peer users pick today: ``AsyncServer.call()`` for round trips, ``emit``
for fan-out. aiohttp server, msgpack serializer, WebSocket transport only; the agents are
``socketio.AsyncClient``s, which do not offer permessage-deflate (compression off).
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable
from typing import Any

from ..common import EVENT_KEY, agent_id
from .base import Peer, main


class SioPeer(Peer):
    name = "socketio"

    def __init__(self) -> None:
        super().__init__()
        self.sio: Any = None
        self._runner: Any = None
        self._sids: dict[str, str] = {}
        self._agents: dict[str, str] = {}
        self._by_index: list[str] = []

    async def start(self) -> int:
        import socketio  # noqa: PLC0415
        from aiohttp import web  # noqa: PLC0415

        self.sio = sio = socketio.AsyncServer(
            async_mode="aiohttp", serializer="msgpack", transports=["websocket"],
            logger=False, engineio_logger=False,
        )
        app = web.Application()
        sio.attach(app)

        async def connect(sid: str, _environ: Any, auth: Any) -> None:
            aid = auth["agent"]
            self._sids[aid] = sid
            self._agents[sid] = aid
            self.agent_connected()

        async def disconnect(sid: str, *_args: Any) -> None:
            aid = self._agents.pop(sid, None)
            if aid is not None and self._sids.get(aid) == sid:
                del self._sids[aid]
            self._by_index.clear()
            self.agent_disconnected()

        sio.on("connect", connect)
        sio.on("disconnect", disconnect)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def close(self) -> None:
        if self.sio is not None:
            await self.sio.shutdown()  # disconnects every client; cleanup would wait on them
        if self._runner is not None:
            await self._runner.cleanup()

    def call(self, index: int, payload: Any) -> Awaitable[Any]:
        by_index = self._by_index
        while len(by_index) <= index:
            by_index.append(self._sids[agent_id(len(by_index))])
        result: Awaitable[Any] = self.sio.call("cmd", payload, to=by_index[index], timeout=60)
        return result

    async def fanout(self, data: Any) -> None:
        await self.sio.emit(EVENT_KEY, data)


if __name__ == "__main__":
    def _make(_args: argparse.Namespace) -> Peer:
        return SioPeer()

    main(_make)
