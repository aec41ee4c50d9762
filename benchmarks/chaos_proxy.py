"""A loopback TCP proxy for fault injection: ``cut()`` kills connections, ``blackhole()``
keeps them open but moves no byte (a dead host, a pulled cable).

One proxy sits in front of each hub's agent port; agents only know the
proxies, so the hub behind one can be killed and restarted on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["FaultProxy"]

_CHUNK = 65536
_HOLD_MAX = 1 << 20  # bytes a black hole holds per direction of a connection


class _Held:
    """What one direction of a connection read during a black hole, not yet sent."""

    __slots__ = ("chunks", "size", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.chunks: list[bytes] = []
        self.size = 0


class FaultProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target_port``.

    While :meth:`cut` is in force, new connections are refused (aborted at
    once); while :meth:`blackhole` is, they are accepted and held like the old
    ones: nothing is forwarded and no close is passed on until it is lifted
    (at most one read chunk per direction is held, so memory stays bounded).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: set[_Held] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refusing = False
        self._closed = False
        self.connections = 0
        # Seconds from the start of the current black hole to each connection the
        # hub (or the agent) closed during it: how fast a stall is noticed.
        self.stall_drops: list[float] = []
        self._stalled_since = 0.0

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def live(self) -> int:
        return len(self._conns)

    def cut(self) -> None:
        """Abort every live connection; new ones are refused until :meth:`restore`."""
        self._refusing = True
        for pair in list(self._conns):
            for w in pair:
                w.transport.abort()

    def blackhole(self) -> None:
        """Stop forwarding (both ways, old and new connections) until :meth:`restore`."""
        self._flowing.clear()
        self.stall_drops = []
        self._stalled_since = asyncio.get_running_loop().time()

    def restore(self) -> None:
        """End a cut or a black hole: bytes flow and connections are accepted again.

        What a black hole held is written first, in order (as TCP would deliver
        it late), before any pipe moves a newer byte.
        """
        self._refusing = False
        for held in list(self._held):
            if held.chunks and not held.writer.transport.is_closing():
                held.writer.write(b"".join(held.chunks))
            held.chunks.clear()
            held.size = 0
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing or self._closed:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.target_port), 5)
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        self.connections += 1
        pair = (writer, up_w)
        self._conns.add(pair)
        a = asyncio.ensure_future(self._pipe(reader, up_w))
        b = asyncio.ensure_future(self._pipe(up_r, writer))
        self._tasks.update((a, b))
        try:
            await asyncio.wait([a, b], return_when=asyncio.FIRST_COMPLETED)
            if not self._flowing.is_set():
                self.stall_drops.append(asyncio.get_running_loop().time() - self._stalled_since)
            if not self._closed:
                # A black hole passes no close on either: the peer must find
                # out by its own heartbeat, as it would on a real network.
                await self._flowing.wait()
        finally:
            for t in (a, b):
                t.cancel()
            await asyncio.gather(a, b, return_exceptions=True)
            self._tasks.difference_update((a, b))
            for w in pair:
                w.transport.abort()
            self._conns.discard(pair)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held = _Held(writer)
        self._held.add(held)
        try:
            with contextlib.suppress(OSError, ConnectionError):
                while True:
                    if not self._flowing.is_set() and held.size >= _HOLD_MAX:
                        await self._flowing.wait()  # bounded: stop reading, TCP backs up
                    data = await reader.read(_CHUNK)
                    if not data:
                        return  # the peer closed: seen even in a black hole
                    if not self._flowing.is_set():
                        held.chunks.append(data)
                        held.size += len(data)
                        continue
                    writer.write(data)
                    await writer.drain()
        finally:
            self._held.discard(held)

    async def close(self) -> None:
        """Idempotent: abort every connection, stop listening, end every task."""
        self._closed = True
        self._flowing.set()
        self.cut()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
