"""The agents' WebSocket server: handshake, reader, non-blocking writer, liveness.

Thin by design (ARCHITECTURE.md, Layers): it turns WebSocket messages into
frames and frames into calls on the hub core, and maps every failure to the
close code PROTOCOL.md names. Sending never blocks the hub: frames go straight
into the connection's transport buffer, which is bounded (``max_send_buffer``);
a reader that does not read is disconnected instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import json
from collections.abc import Mapping
from typing import Any

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from agent_client import protocol as P

from .core import HubCore, now_ms
from .errors import StoreUnavailable
from .ids import new_session_id
from .models import AgentInfo

__all__ = ["AgentServer", "WsSession", "agent_token", "close_reason"]

log = structlog.get_logger(__name__)

# Frames of one connection being applied at once (networked store only).
MAX_FRAMES_IN_FLIGHT = 256
# Seconds a connection may stay over its frame rate before it is closed (1008).
RATE_LIMIT_GRACE = 5.0
# Frames one connection's reader handles before it lets the other tasks run.
FAIR_SLICE = 64


def agent_token(secret: str, agent_id: str) -> str:
    """An agent's credential under ``agent_secret`` (API.md, Security)."""
    return hmac.new(secret.encode(), agent_id.encode(), "sha256").hexdigest()


def close_reason(code: int | None, reason: str | None) -> str:
    """A short word for the ``agent-disconnected`` event and the logs."""
    if code is None:
        return "connection_lost"
    if code == 1011 and reason and "keepalive" in reason:
        return "heartbeat_timeout"
    return {
        1000: "closed",
        1001: "going_away",
        1006: "connection_lost",
        1008: "policy_violation",
        1009: "frame_too_large",
        int(P.CloseCode.REPLACED): "replaced",
    }.get(code, f"close_{code}")


class AgentConnection(ServerConnection):
    """websockets' server connection plus the hub's liveness watch.

    PROTOCOL.md, Transport: a connection whose Pong is ``heartbeat`` seconds
    late counts as gone *at that moment*, without waiting for a closing
    handshake a dead peer will never answer. websockets sends the Pings
    (``ping_interval``); this class notes when bytes last arrived and one
    timer per connection aborts it when nothing came for two heartbeats
    (a Ping went out, and its Pong is a heartbeat late).
    """

    last_rx: float = 0.0
    lost_reason: str | None = None
    _liveness: asyncio.TimerHandle | None = None
    _heartbeat: float = 0.0
    _corked: bool = False
    max_send_buffer: int = 4 * 1024 * 1024

    def queue_frame(self, data: bytes) -> bool:
        """Send one binary message: it leaves with every other frame of this
        event-loop turn, in one write at the end of the turn (one system call
        per connection and turn instead of one per frame).

        Never waits: the send-buffer bound replaces the backpressure a drain
        would give (a reader that does not read is dropped, not waited for).
        """
        if self.protocol.state is not State.OPEN:
            return False
        self.protocol.send_binary(data)
        if not self._corked:
            self._corked = True
            writer = self.writer
            if writer is None:
                self.send_data()
                self._corked = False
            else:
                writer.dirty(self)
        return True

    writer: _TurnWriter | None = None

    def uncork(self) -> None:
        self._corked = False
        if not self.transport.is_closing():
            self.send_data()

    def send_data(self) -> None:
        """Write what the protocol has to send in one call, not one per frame.

        websockets also calls this when data arrives (to answer pings), which
        flushes the frames queued by :meth:`queue_frame` early: joined, they
        still cost one system call.
        """
        chunks = self.protocol.data_to_send()
        if not chunks:
            return
        transport = self.transport
        if all(chunks):
            transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        else:
            # An empty chunk means end of stream (after a close): keep
            # websockets' own handling for that rare case.
            for chunk in chunks:
                if chunk:
                    transport.write(chunk)
                elif transport.can_write_eof():
                    with contextlib.suppress(Exception):  # as websockets does
                        transport.write_eof()
                else:
                    transport.close()
        if transport.get_write_buffer_size() > self.max_send_buffer:
            log.warning("send_buffer_overflow", buffered=transport.get_write_buffer_size())
            self.abort("send_buffer_overflow")

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._liveness is not None:
            self._liveness.cancel()
            self._liveness = None
        super().connection_lost(exc)

    def watch_liveness(self, heartbeat: float) -> None:
        self._heartbeat = heartbeat
        self.last_rx = self.loop.time()
        self._liveness = self.loop.call_at(self.last_rx + 2 * heartbeat, self._check_liveness)

    def _check_liveness(self) -> None:
        deadline = self.last_rx + 2 * self._heartbeat
        if self.loop.time() >= deadline:
            self._liveness = None
            self.abort("heartbeat_timeout")
        else:
            self._liveness = self.loop.call_at(deadline, self._check_liveness)

    def abort(self, reason: str) -> None:
        """Drop the connection now, without a closing handshake."""
        if self.lost_reason is None:
            self.lost_reason = reason
        self.transport.abort()


class _TurnWriter:
    """Writes every connection that got frames during an event-loop turn, once,
    at the end of the turn: one callback per turn for the whole hub, one
    write per connection."""

    __slots__ = ("_conns", "_loop", "_scheduled")

    def __init__(self) -> None:
        self._conns: list[AgentConnection] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def dirty(self, conn: AgentConnection) -> None:
        self._conns.append(conn)
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        conns, self._conns = self._conns, []
        for conn in conns:
            conn.uncork()


class WsSession:
    """One authenticated agent connection (implements ``core.Session``)."""

    __slots__ = ("_server", "agent_id", "info", "session_id", "ws")

    def __init__(self, server: AgentServer, ws: AgentConnection, info: AgentInfo) -> None:
        self._server = server
        self.ws = ws
        self.info = info
        self.agent_id = info.id
        self.session_id = info.session

    def send(self, data: bytes) -> bool:
        if not self.ws.queue_frame(data):
            return False
        self._server.metrics.frame_out(data)
        return True

    @staticmethod
    def send_many(sessions: list[WsSession], data: bytes) -> int:
        """One frame to many connections (fan-out), queued on each without waiting."""
        if not sessions:
            return 0
        sent = 0
        for session in sessions:
            if session.ws.queue_frame(data):
                sent += 1
        sessions[0]._server.metrics.frame_out_many(data, sent)
        return sent

    def close(self, code: int, reason: str) -> None:
        self._server.close_soon(self.ws, code, reason)

    def buffered(self) -> int:
        """Bytes written to this connection and not yet sent (for ``/metrics``)."""
        return self.ws.transport.get_write_buffer_size()


class AgentServer:
    """Serves ``/ws`` (agents) and ``GET /healthz`` (load balancers) on one port."""

    def __init__(self, core: HubCore) -> None:
        self.core = core
        config = core.config
        self.config = config
        self.max_send_buffer = config.max_send_buffer
        self.metrics = core.metrics
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tokens: dict[str, str] | None = _load_tokens(config.agent_tokens)
        self.port: int | None = None
        self._open = 0  # connections past the upgrade, handshaking or attached
        self._writer = _TurnWriter()

    @property
    def auth_required(self) -> bool:
        return bool(self.config.agent_secret) or self._tokens is not None

    async def start(self) -> int:
        config = self.config
        self._server = await serve(
            self._handler,
            config.host,
            config.port,
            process_request=self._process_request,
            max_size=config.max_frame,
            # Liveness (PROTOCOL.md, Transport): websockets pings every
            # heartbeat; AgentConnection drops a peer whose Pong is late.
            ping_interval=config.heartbeat,
            ping_timeout=None,
            close_timeout=5.0,
            create_connection=AgentConnection,
            # Compression triples the memory of an idle connection (PERFORMANCE.md).
            compression=None,
            max_queue=64,
            ssl=config.ssl_context(),
            server_header=None,
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        return self.port

    def close_soon(self, ws: ServerConnection, code: int, reason: str) -> None:
        """Close a connection without blocking the caller; the task is owned."""
        task = asyncio.get_running_loop().create_task(ws.close(code, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop accepting; close every agent with 1001 (they reconnect elsewhere)."""
        if self._server is not None:
            # Closes every connection with 1001 and waits for their handlers.
            self._server.close(close_connections=True)
            await self._server.wait_closed()
            self._server = None
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- HTTP on the agent port -------------------------------------------------
    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            body = json.dumps({"status": "ok", "hub": self.core.hub_id,
                               "agents": self.core.connected_count}).encode()
            return Response(http.HTTPStatus.OK, "OK",
                            Headers([("Content-Type", "application/json"),
                                     ("Content-Length", str(len(body)))]), body)
        if path != "/ws":
            return conn.respond(http.HTTPStatus.NOT_FOUND, "agents connect on /ws\n")
        # Limits (API.md, Security), answered before the upgrade costs anything.
        config = self.config
        attached = self.core.connected_count
        # Upgraded connections that have not said hello yet count too, or
        # concurrent handshakes could overshoot max_agents.
        opened = self._open  # a counter: websockets' Server.connections is O(n) per call
        if max(attached, opened) >= config.max_agents:
            log.warning("agent_refused_hub_full", max_agents=config.max_agents)
            return conn.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                f"hub full: {config.max_agents} agents (max_agents)\n")
        if opened - attached >= config.max_handshakes:
            log.warning("agent_refused_handshakes", max_handshakes=config.max_handshakes)
            return conn.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                "too many connections in their handshake; retry\n")
        return None

    # -- one connection ----------------------------------------------------------
    async def _handler(self, ws: ServerConnection) -> None:
        self._open += 1
        try:
            await self._serve(ws)
        finally:
            self._open -= 1

    async def _serve(self, ws: ServerConnection) -> None:
        assert isinstance(ws, AgentConnection)
        ws.max_send_buffer = self.max_send_buffer
        ws.writer = self._writer
        ws.watch_liveness(self.config.heartbeat)
        session = await self._handshake(ws)
        if session is None:
            return
        core = self.core
        # With a networked store, frames are applied concurrently so that one
        # agent's answers share pipelined writes instead of waiting one Redis
        # round trip each. The batcher applies their store writes in arrival
        # order; error replies may come back out of order (they carry ``ref``).
        # Bounded per connection.
        inline = not core.store.shared
        inflight: set[asyncio.Future[Any]] = set()
        loop = asyncio.get_running_loop()
        frame_in = self.metrics.frame_in
        # Frames per second (API.md, Security): a token bucket of one second's
        # worth. Over it, frames are dropped with one `rate_limited` error a
        # second; a connection still over it after RATE_LIMIT_GRACE is closed.
        rate = self.config.max_frame_rate
        tokens, last = rate, loop.time()
        limited_since: float | None = None
        warned = dropped_at = 0.0
        streak = 0
        try:
            while True:
                # recv() does not suspend while messages are queued, and one read
                # can queue thousands: yield now and then so that a flooding
                # connection cannot hold the loop away from the other agents.
                streak += 1
                if streak >= FAIR_SLICE:
                    streak = 0
                    await asyncio.sleep(0)
                try:
                    message = await ws.recv()
                except ConnectionClosed:
                    break
                if rate:
                    now = loop.time()
                    tokens = min(rate, tokens + (now - last) * rate)
                    last = now
                    if tokens < 1.0:
                        if limited_since is None:
                            limited_since = now
                        elif now - limited_since > RATE_LIMIT_GRACE:
                            log.warning("rate_limit_close", agent_id=session.agent_id)
                            # Awaited: once this handler returns websockets closes
                            # with 1000, which would overtake a close left to a task.
                            await ws.close(P.CloseCode.POLICY_VIOLATION,
                                           "frame rate limit exceeded")
                            break
                        dropped_at = now
                        if now - warned >= 1.0:
                            warned = now
                            frame_in("rate_limited")
                            session.send(P.encode(P.ErrorFrame(
                                P.ErrorCode.RATE_LIMITED,
                                f"over {rate:g} frames per second; frames are being dropped")))
                        continue
                    tokens -= 1.0
                    # A flood still gets a frame through at the refill rate; it is
                    # back under the rate only after a whole second without a drop.
                    if limited_since is not None and now - dropped_at >= 1.0:
                        limited_since = None
                try:
                    frame = P.decode(message)
                except P.ProtocolError as exc:
                    frame_in("invalid")
                    session.send(P.encode(exc.to_frame()))
                    continue
                frame_in(frame.TYPE)
                if inline:
                    # In-process store: answers complete right here, without
                    # a coroutine; anything else goes through on_frame.
                    if not core.answer_now(session, frame):
                        await core.on_frame(session, frame)
                    continue
                # Answers (the hot path) chain a callback on the store's
                # future; anything else runs as a task. Both count as in flight.
                pending = core.on_answer_nowait(session, frame)
                if pending is None:
                    pending = loop.create_task(core.on_frame(session, frame))
                inflight.add(pending)
                pending.add_done_callback(inflight.discard)
                if len(inflight) >= MAX_FRAMES_IN_FLIGHT:
                    await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)
            await core.detach(session, ws.lost_reason
                              or close_reason(_close_code(ws), _close_text(ws)))

    async def _handshake(self, ws: AgentConnection) -> WsSession | None:
        """PROTOCOL.md, Handshake. Returns None when the connection was refused."""
        config = self.config
        try:
            async with asyncio.timeout(config.hello_timeout):
                message = await ws.recv()
        except TimeoutError:
            await self._refuse(ws, P.ErrorCode.BAD_HELLO,
                               f"no hello within {config.hello_timeout:g} s",
                               P.CloseCode.HELLO_TIMEOUT)
            return None
        except ConnectionClosed:
            return None
        try:
            frame = P.decode(message)
        except P.ProtocolError as exc:
            await self._refuse(ws, P.ErrorCode.BAD_HELLO, f"bad hello: {exc.message}",
                               P.CloseCode.BAD_HELLO)
            return None
        self.metrics.frame_in(frame.TYPE)
        if not isinstance(frame, P.HelloFrame):
            await self._refuse(ws, P.ErrorCode.BAD_HELLO,
                               f"the first frame must be 'hello', not {frame.TYPE!r}",
                               P.CloseCode.BAD_HELLO)
            return None
        if frame.v != P.PROTOCOL_VERSION:
            await self._refuse(ws, P.ErrorCode.UNSUPPORTED_VERSION,
                               f"protocol version {frame.v} is not supported; this hub speaks "
                               f"{P.PROTOCOL_VERSION}", P.CloseCode.BAD_HELLO)
            return None
        if not self._authorized(frame.agent, frame.token):
            log.warning("agent_unauthorized", agent_id=frame.agent,
                        remote=_remote(ws))
            await self._refuse(ws, P.ErrorCode.UNAUTHORIZED,
                               f"bad or missing token for agent {frame.agent!r}",
                               P.CloseCode.UNAUTHORIZED)
            return None
        now = now_ms()
        info = AgentInfo(id=frame.agent, hub_id=self.core.hub_id, session=new_session_id(),
                         connected_at=now, last_seen=now, meta=frame.meta or {})
        session = WsSession(self, ws, info)
        try:
            await self.core.attach(session, frame.subs)
        except StoreUnavailable:
            await self._refuse(ws, P.ErrorCode.INTERNAL,
                               "the hub's store is unavailable; try again later", 1013)
            return None
        return session

    def _authorized(self, agent_id: str, token: str | None) -> bool:
        """Constant-time check of the agent's credential (API.md, Security)."""
        if not self.auth_required:
            return True
        if token is None:
            return False
        ok = False
        if self.config.agent_secret:
            expected = agent_token(self.config.agent_secret, agent_id)
            ok = hmac.compare_digest(expected.encode(), token.encode())
        if self._tokens is not None:
            expected = self._tokens.get(agent_id, "")
            # compare_digest runs even for unknown ids so timing tells nothing.
            ok = (hmac.compare_digest(expected.encode(), token.encode()) and bool(expected)) or ok
        return ok

    async def _refuse(self, ws: ServerConnection, code: str, message: str, close: int) -> None:
        self.metrics.connection_refused(code)
        try:
            await ws.send(P.encode(P.ErrorFrame(code, message)))
            await ws.close(close, message[:120])
        except ConnectionClosed:
            pass


def _close_code(ws: ServerConnection) -> int | None:
    rcvd, sent = ws.protocol.close_rcvd, ws.protocol.close_sent
    if sent is not None and sent.code == P.CloseCode.REPLACED:
        return sent.code
    if rcvd is not None:
        return rcvd.code
    return sent.code if sent is not None else None


def _close_text(ws: ServerConnection) -> str | None:
    frame = ws.protocol.close_sent or ws.protocol.close_rcvd
    return frame.reason if frame is not None else None


def _remote(ws: ServerConnection) -> str:
    addr = ws.remote_address
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else str(addr)


def _load_tokens(tokens: Mapping[str, str] | str | None) -> dict[str, str] | None:
    """``agent_tokens`` as a mapping, or a file of ``id token`` lines (``#`` comments)."""
    if tokens is None:
        return None
    if isinstance(tokens, str):
        table: dict[str, str] = {}
        with open(tokens, encoding="utf-8") as fh:
            for lineno, raw in enumerate(fh, 1):
                parts = raw.split("#", 1)[0].split()
                if not parts:
                    continue
                if len(parts) != 2 or not P.is_valid_agent_id(parts[0]):
                    raise ValueError(f"{tokens}:{lineno}: expected 'AGENT_ID TOKEN'")
                table[parts[0]] = parts[1]
        return table
    return dict(tokens)
