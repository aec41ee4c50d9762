"""The agents' WebSocket server: handshake, reader, non-blocking writer, liveness.

Thin by design (docs/design-notes.md, The shape of the hub): it turns WebSocket messages into
frames and frames into calls on the hub (sessions and the frame router), and maps
every failure to the
close code docs/protocol.md names. Sending never blocks the hub and is bounded by
``max_send_buffer`` per connection: a reader that does not read is disconnected
instead of growing memory.

Two ways to run a connection, the same behaviour on the wire: the fast path
(``dispatcher.ws_fastpath``, when ``HubConfig.ws_fast_path`` is on and the
installed websockets has the internals it needs) reads answers off the socket
and writes frames in batches; otherwise :class:`PublicLink` uses websockets'
public API only (``recv``, ``send``, ``ping``, ``close``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import json
from collections import deque
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Data

from agent_client import protocol as P

from . import ws_fastpath
from .clock import now_ms
from .config import HubConfig
from .connections import Connections
from .errors import StoreUnavailable
from .ids import new_session_id
from .metrics import Metrics
from .models import AgentInfo
from .router import FrameRouter
from .sessions import Sessions
from .ws_fastpath import AgentConnection, TurnWriter, binary_header

__all__ = ["AgentServer", "PublicLink", "WsSession", "agent_token", "close_reason", "load_tokens"]

log = structlog.get_logger(__name__)

# Frames of one connection being applied at once (store calls not answered yet): enough
# for one agent's answers to fill pipelined Redis writes, small enough that a
# connection cannot hold more than a few hundred store operations.
MAX_FRAMES_IN_FLIGHT = 256
# Frames one connection's reader handles before it lets the other tasks run:
# 64 frames is about 0.1 ms of work, so a flooding connection delays the others
# by that much at most, while the yield itself stays rare.
FAIR_SLICE = 64
# What a frame the hub refuses with an error frame costs against the frame rate,
# in frames: an error costs the hub a decode and an encode, and a peer that sends
# nothing but garbage gets a tenth of the rate (the calm agents keep theirs).
REFUSED_COST = 10
# Connections the kernel queues for accept() (see start()).
LISTEN_BACKLOG = 2048
# websockets' bound on an opening handshake, on top of the wait for a turn
# (HubConfig.hello_timeout at most).
OPEN_TIMEOUT = 10.0
# Seconds a connection keeps its handshake slot (HandshakeGate) at most: one
# slower to say hello (or whose handshake failed before the hub's handler ran)
# lets the next one in meanwhile, so connections that never say hello cannot
# hold the gate shut; their own limit stays hello_timeout.
HANDSHAKE_TURN = 1.0
# Seconds a closing connection gets to finish its closing handshake (websockets'
# close_timeout), and, on the public path, to flush what it still has queued.
CLOSE_TIMEOUT = 5.0


class Link(Protocol):
    """What a session needs from its connection, on either path."""

    def queue_frame(self, data: bytes, header: bytes | None = None) -> bool:
        """Queue one binary message without waiting; False if the connection is gone."""

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close after the frames already queued, with a close code of docs/protocol.md."""

    def buffered(self) -> int:
        """Bytes queued for this connection and not yet sent."""


def agent_token(secret: str, agent_id: str) -> str:
    """An agent's credential under ``agent_secret`` (docs/security.md)."""
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


class PublicLink:
    """A connection on websockets' public API (the fast path is off).

    Sending: a bounded outbox drained by one writer task per connection that
    awaits ``send``; a connection whose queued bytes exceed ``max_send_buffer``
    is dropped (``send_buffer_overflow``). Liveness: one task pings every
    ``heartbeat`` and drops the connection when the Pong is a heartbeat late
    (``heartbeat_timeout``). Both tasks end with the connection (:meth:`stop`).

    Dropping aborts the asyncio transport the connection was made with (it is
    an ``asyncio.Protocol``), as the fast path does: websockets' ``close()``
    first waits until the peer has read what is buffered, which a peer that
    does not read never does. That is the one thing used beyond websockets'
    documented API.
    """

    __slots__ = ("_close", "_gone", "_outbox", "_pinger", "_queued", "_wake", "_writer",
                 "limit", "lost_reason", "ws")

    def __init__(self, ws: ServerConnection, max_send_buffer: int, heartbeat: float) -> None:
        self.ws = ws
        self.limit = max_send_buffer
        self.lost_reason: str | None = None
        self._outbox: deque[bytes] = deque()
        self._queued = 0  # bytes in the outbox or being sent
        self._wake = asyncio.Event()
        self._close: tuple[int, str] | None = None
        self._gone = False
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write())
        self._pinger = loop.create_task(self._ping(heartbeat))

    def queue_frame(self, data: bytes, header: bytes | None = None) -> bool:
        if self._close is not None or self._gone:
            return False
        self._outbox.append(data)
        self._queued += len(data)
        if self._queued > self.limit:
            log.warning("send_buffer_overflow", buffered=self._queued)
            self.lose("send_buffer_overflow")
            return False
        if not self._wake.is_set():
            self._wake.set()
        return True

    def buffered(self) -> int:
        return self._queued

    @property
    def sent_close(self) -> tuple[int | None, str | None]:
        """The close code and reason the hub asked for (None: it did not close)."""
        return self._close if self._close is not None else (None, None)

    async def _write(self) -> None:
        ws, outbox, wake = self.ws, self._outbox, self._wake
        try:
            while True:
                while outbox:
                    data = outbox.popleft()
                    await ws.send(data)
                    self._queued -= len(data)
                if self._close is not None:
                    return
                wake.clear()
                await wake.wait()
        except ConnectionClosed:
            pass
        finally:
            self._gone = True

    async def _ping(self, heartbeat: float) -> None:
        """docs/protocol.md, Transport: a Ping every heartbeat; a Pong a heartbeat
        late drops the connection (at most two heartbeats after the peer froze)."""
        ws = self.ws
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(heartbeat)
                try:
                    async with asyncio.timeout(heartbeat):
                        await (await ws.ping())
                except TimeoutError:
                    self.lose("heartbeat_timeout")
                    return

    def lose(self, reason: str) -> None:
        """Drop the connection now, without a closing handshake (the agent is
        disconnected as soon as websockets sees the connection lost)."""
        if self.lost_reason is None:
            self.lost_reason = reason
        self._gone = True
        self._outbox.clear()
        self._queued = 0
        self._writer.cancel()
        transport = getattr(self.ws, "transport", None)
        if transport is not None:
            transport.abort()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close after the frames already queued (a Close never overtakes them),
        within ``CLOSE_TIMEOUT`` for the flush and again for the handshake."""
        if self._close is None:
            self._close = (code, reason)
            self._wake.set()
        await asyncio.wait((self._writer,), timeout=CLOSE_TIMEOUT)
        self._writer.cancel()  # not flushed in time: a peer that does not read
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(code, reason)
        except TimeoutError:
            self.lose("close_timeout")

    async def stop(self) -> None:
        """End both tasks: the connection is over."""
        self._gone = True
        tasks = (self._writer, self._pinger)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class WsSession:
    """One authenticated agent connection (implements ``connections.Session``)."""

    __slots__ = ("_server", "agent_id", "info", "reader", "session_id", "ws")

    def __init__(self, server: AgentServer, ws: Link, info: AgentInfo) -> None:
        self._server = server
        self.reader: _Reader | None = None  # once attached
        self.ws = ws
        self.info = info
        self.agent_id = info.id
        self.session_id = info.session

    def send(self, data: bytes, frame_type: str | None = None) -> bool:
        if not self.ws.queue_frame(data):
            return False
        metrics = self._server.metrics
        if frame_type is None:
            metrics.frame_out(data)
        else:
            metrics.frames_out[frame_type] += 1
        return True

    @staticmethod
    def send_many(sessions: list[WsSession], data: bytes) -> int:
        """One frame to many connections (fan-out), queued on each without waiting."""
        if not sessions:
            return 0
        sent = 0
        server = sessions[0]._server
        header = binary_header(len(data)) if server.fast_path else None
        for session in sessions:
            if session.ws.queue_frame(data, header):
                sent += 1
        server.metrics.frame_out_many(data, sent)
        return sent

    def close(self, code: int, reason: str) -> None:
        self._server.close_soon(self.ws, code, reason)

    def refused(self) -> None:
        """One of this connection's frames was refused with an error frame."""
        if self.reader is not None:
            self.reader.refused()

    def buffered(self) -> int:
        """Bytes written to this connection and not yet sent (for ``/metrics``)."""
        return self.ws.buffered()


class HandshakeGate:
    """At most ``size`` connections in their handshake at once; the others wait.

    A reconnect storm (a hub died, thousands of its agents arrive here within
    a second) would otherwise have every handshake step of every arrival run
    in the same event-loop turns as the frames of the agents already here, and
    their round trips wait for all of it (the storm row of docs/benchmarks.md).
    A connection takes a slot before its upgrade is answered and gives it back
    once its hello is handled (attached or refused), or after ``hold_max``
    seconds at the latest (a timer: a peer slow to say hello, or one whose
    handshake failed before the hub's handler ran). So the handshake work in
    flight stays bounded, arrivals are served in order, and waiting costs them
    nothing but memory (bounded by ``max_handshakes``).
    """

    def __init__(self, size: int, hold_max: float) -> None:
        self.free = size
        self.hold_max = hold_max
        self.waiters: deque[asyncio.Future[None]] = deque()
        self._holders: dict[object, asyncio.TimerHandle] = {}

    def take_now(self, conn: object) -> bool:
        """Take a slot for ``conn`` if one is free and nobody waits ahead."""
        if self.free > 0 and not self.waiters:
            self.free -= 1
            self._hold(conn)
            return True
        return False

    async def take(self, conn: object, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) for a slot, in order of arrival."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            self._abandon(fut)
            return False
        except asyncio.CancelledError:
            self._abandon(fut)
            raise
        self._hold(conn)
        return True

    def _abandon(self, fut: asyncio.Future[None]) -> None:
        if fut.done() and not fut.cancelled():
            self._pass_on()  # handed over just as the wait ended: the next one's
        else:
            with contextlib.suppress(ValueError):
                self.waiters.remove(fut)

    def give_back(self, conn: object) -> None:
        """``conn``'s handshake is over: its slot goes to the next waiting one."""
        timer = self._holders.pop(conn, None)
        if timer is not None:
            timer.cancel()
            self._pass_on()

    def _hold(self, conn: object) -> None:
        self._holders[conn] = asyncio.get_running_loop().call_later(
            self.hold_max, self.give_back, conn)

    def _pass_on(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


class AgentServer:
    """Serves ``/ws`` (agents) and ``GET /healthz`` (load balancers) on one port."""

    def __init__(self, *, config: HubConfig, hub_id: str, sessions: Sessions,
                 router: FrameRouter, connections: Connections, metrics: Metrics) -> None:
        self.config = config
        self.hub_id = hub_id
        self.sessions = sessions
        self.router = router
        self.connections = connections
        self.max_send_buffer = config.max_send_buffer
        self.metrics = metrics
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tokens: dict[str, str] | None = load_tokens(config.agent_tokens)
        self.port: int | None = None
        self._open = 0  # connections past the upgrade, handshaking or attached
        self._gate = HandshakeGate(config.handshake_concurrency, hold_max=HANDSHAKE_TURN)
        self._writer = TurnWriter()
        # Decided at start(): the fast path, or websockets' public API only.
        self.fast_path = False
        self.fast_path_reason = "not started"
        self.accepting = True  # False while the hub drains: new agents get HTTP 503

    @property
    def _open_timeout(self) -> float:
        # websockets' bound on the opening handshake, which includes the wait
        # for a turn at the gate (HandshakeGate).
        return self.config.hello_timeout + OPEN_TIMEOUT

    @property
    def auth_required(self) -> bool:
        return bool(self.config.agent_secret) or self._tokens is not None

    async def start(self) -> int:
        config = self.config
        if config.ws_fast_path:
            self.fast_path, self.fast_path_reason = ws_fastpath.check()
        else:
            self.fast_path, self.fast_path_reason = False, "turned off (HubConfig.ws_fast_path)"
        (log.info if self.fast_path or not config.ws_fast_path else log.warning)(
            "transport_fast_path", hub_id=self.hub_id, enabled=self.fast_path,
            reason=self.fast_path_reason)
        fast: dict[str, Any] = {
            # Liveness (docs/protocol.md, Transport): websockets pings every
            # heartbeat; AgentConnection drops a peer whose Pong is late.
            "ping_interval": config.heartbeat,
            "create_connection": AgentConnection,
        } if self.fast_path else {
            # PublicLink pings and times the Pongs itself (websockets' own
            # Pong timeout would wait close_timeout before the agent is gone).
            "ping_interval": None,
        }
        self._server = await serve(
            self._handler,
            config.host,
            config.port,
            process_request=self._process_request,
            open_timeout=self._open_timeout,
            max_size=config.max_frame,
            ping_timeout=None,
            close_timeout=CLOSE_TIMEOUT,
            **fast,
            # Compression triples the memory of an idle connection (docs/benchmarks.md).
            compression=None,
            max_queue=64,
            ssl=config.ssl_context(),
            server_header=None,
            # A reconnect storm (a hub died, its agents come here) arrives faster
            # than asyncio's default backlog of 100 takes it: the kernel dropped
            # SYNs and clients retried 1, 3, 7 s later, in waves (the storm row of
            # docs/benchmarks.md). The kernel caps it at net.core.somaxconn.
            backlog=LISTEN_BACKLOG,
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        return self.port

    def close_soon(self, ws: Link, code: int, reason: str) -> None:
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
    def _process_request(self, conn: ServerConnection, request: Request,
                         ) -> Response | Awaitable[Response | None] | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            # A draining hub says so here too: a balancer probing the agent port
            # stops sending it new agents (which it would refuse with 503).
            status = http.HTTPStatus.OK if self.accepting else \
                http.HTTPStatus.SERVICE_UNAVAILABLE
            body = json.dumps({"status": "ok" if self.accepting else "draining",
                               "hub": self.hub_id,
                               "agents": len(self.connections)}).encode()
            return Response(status, status.phrase,
                            Headers([("Content-Type", "application/json"),
                                     ("Content-Length", str(len(body)))]), body)
        if path != "/ws":
            return conn.respond(http.HTTPStatus.NOT_FOUND, "agents connect on /ws\n")
        if not self.accepting:
            self.metrics.connection_refused("draining")
            return conn.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                "hub draining: connect to another hub\n")
        # Limits (docs/security.md), answered before the upgrade costs anything.
        config = self.config
        attached = len(self.connections)
        # Upgraded connections that have not said hello yet count too, or
        # concurrent handshakes could overshoot max_agents.
        opened = self._open  # a counter: websockets' Server.connections is O(n) per call
        if max(attached, opened) >= config.max_agents:
            log.warning("agent_refused_hub_full", max_agents=config.max_agents)
            self.metrics.connection_refused("hub_full")
            return conn.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                f"hub full: {config.max_agents} agents (max_agents)\n")
        if opened - attached + len(self._gate.waiters) >= config.max_handshakes:
            log.warning("agent_refused_handshakes", max_handshakes=config.max_handshakes)
            self.metrics.connection_refused("too_many_handshakes")
            return conn.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                "too many connections in their handshake; retry\n")
        if self._gate.take_now(conn):
            return None  # the common case: no coroutine, websockets goes on at once
        return self._wait_turn(conn)

    async def _wait_turn(self, conn: ServerConnection) -> Response | None:
        """Wait for a handshake slot (HandshakeGate), at most ``hello_timeout``."""
        if await self._gate.take(conn, self.config.hello_timeout):
            if conn.transport.is_closing():  # it left while waiting: the next one's turn
                self._gate.give_back(conn)
            return None
        log.warning("agent_refused_handshakes", max_handshakes=self.config.max_handshakes,
                    waited=self.config.hello_timeout)
        self.metrics.connection_refused("too_many_handshakes")
        return conn.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                            "too many connections in their handshake; retry\n")

    # -- one connection ----------------------------------------------------------
    async def _handler(self, ws: ServerConnection) -> None:
        self._open += 1
        try:
            if self.fast_path:
                await self._serve(ws)
            else:
                await self._serve_public(ws)
        finally:
            self._open -= 1
            self._gate.give_back(ws)  # if the handshake did not (it raised)

    async def _serve(self, ws: ServerConnection) -> None:
        assert isinstance(ws, AgentConnection)
        ws.max_send_buffer = self.max_send_buffer
        ws.max_message = self.config.max_frame
        ws.control_rate = self.config.max_control_rate
        ws.writer = self._writer
        ws.watch_liveness(self.config.heartbeat)
        session = await self._handshake(ws, ws)
        if session is None:
            return
        reader = session.reader = _Reader(self, session)
        # From here, answers are applied as their bytes arrive (data_received);
        # this task handles every other frame, in order with them.
        ws.inline = reader.apply_inline
        ws.admit = reader.admit
        try:
            await reader.read_all(ws, ws)
        finally:
            ws.inline = ws.admit = None
            await reader.drain()
            await self.sessions.detach(session, ws.lost_reason or close_reason(*ws.close_info()))

    async def _serve_public(self, ws: ServerConnection) -> None:
        """One connection on websockets' public API: every message through recv()."""
        link = PublicLink(ws, self.max_send_buffer, self.config.heartbeat)
        try:
            session = await self._handshake(ws, link)
            if session is None:
                return
            reader = session.reader = _Reader(self, session)
            closed: ConnectionClosed | None = None
            try:
                closed = await reader.read_all(ws, None)
            finally:
                await reader.drain()
                if link.lost_reason is not None:
                    reason = link.lost_reason
                elif closed is not None:
                    reason = close_reason(*_close_info(closed))
                else:  # the hub closed it (frame rate)
                    reason = close_reason(*link.sent_close)
                await self.sessions.detach(session, reason)
        finally:
            await link.stop()

    async def _handshake(self, ws: ServerConnection, link: Link) -> WsSession | None:
        """docs/protocol.md, Handshake. Returns None when the connection was refused."""
        try:
            return await self._hello(ws, link)
        finally:
            self._gate.give_back(ws)  # the next connection's turn

    async def _hello(self, ws: ServerConnection, link: Link) -> WsSession | None:
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
        info = AgentInfo(id=frame.agent, hub_id=self.hub_id, session=new_session_id(),
                         connected_at=now, last_seen=now, meta=frame.meta or {})
        session = WsSession(self, link, info)
        try:
            await self.sessions.attach(session, frame.subs)
        except StoreUnavailable:
            await self._refuse(ws, P.ErrorCode.INTERNAL,
                               "the hub's store is unavailable; try again later", 1013)
            return None
        return session

    def _authorized(self, agent_id: str, token: str | None) -> bool:
        """Constant-time check of the agent's credential (docs/security.md)."""
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


class _Reader:
    """One attached agent's frames into the hub's frame router: answers inline from
    the connection's ``data_received`` when possible (fast path), everything else
    in order in the connection's task (:meth:`handle`)."""

    __slots__ = ("close_soon", "closing", "dropped", "dropped_at", "frame_in", "grace",
                 "inflight", "last", "limited_since", "loop", "rate", "router",
                 "session", "tokens", "warned", "ws")

    def __init__(self, server: AgentServer, session: WsSession) -> None:
        self.router = server.router
        self.close_soon = server.close_soon
        self.closing = False
        self.session = session
        self.ws = session.ws
        self.loop = asyncio.get_running_loop()
        self.frame_in = server.metrics.frame_in
        # Frames whose store calls are not answered yet: applied concurrently so
        # that one agent's answers share pipelined writes instead of waiting one
        # round trip each (the store applies their writes in arrival order;
        # error replies may come back out of order: they carry ``ref``).
        # Bounded per connection (MAX_FRAMES_IN_FLIGHT).
        self.inflight: set[asyncio.Future[Any]] = set()
        # Frames per second (docs/security.md): a token bucket of one second's
        # worth. Over it, frames are dropped with one `rate_limited` error a
        # second; a connection still over it after ``rate_limit_grace`` is closed.
        self.rate = server.config.max_frame_rate
        self.grace = server.config.rate_limit_grace
        self.tokens, self.last = self.rate, self.loop.time()
        self.limited_since: float | None = None
        self.dropped = 0  # frames dropped since the connection went over the rate
        self.warned = self.dropped_at = 0.0

    def _token(self, now: float) -> bool:
        """Take one frame's token; False when over the rate (nothing taken)."""
        rate = self.rate
        tokens = min(rate, self.tokens + (now - self.last) * rate)
        self.last = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        # A flood still gets a frame through at the refill rate; it is back
        # under the rate only after a whole second without a drop.
        if self.limited_since is not None and now - self.dropped_at >= 1.0:
            self.limited_since = None
            self.dropped = 0
        return True

    def _over(self, now: float) -> bool:
        """A frame over the rate is dropped: warn the agent once a second; True once
        it has been over the rate for longer than the grace, or has sent more than
        two seconds' worth of frames beyond it (a flood): close it, 1008."""
        self.dropped += 1
        if self.limited_since is None:
            self.limited_since = now
        elif now - self.limited_since > self.grace or self.dropped > 2 * self.rate:
            return True
        self.dropped_at = now
        if now - self.warned >= 1.0:
            self.warned = now
            self.frame_in("rate_limited")
            self.session.send(P.encode(P.ErrorFrame(
                P.ErrorCode.RATE_LIMITED,
                f"over {self.rate:g} frames per second; frames are being dropped")))
        return False

    def admit(self) -> bool:
        """Fast path: every data frame read off the socket takes its token here, as
        it is split off (so the task does not take one again, see handle). Over
        the rate, a frame the hub reads itself is dropped there and then, before
        it is decoded; a flood (more than two seconds' worth beyond the rate) is
        closed at once (1008), without waiting for the grace."""
        if not self.rate:
            return True
        now = self.loop.time()
        if self._token(now):
            return True
        if self._over(now) and not self.closing:
            # Closed at once with 1008; while the closing handshake runs, the
            # flood's data frames are discarded unread (ws_fastpath).
            self.closing = True
            log.warning("rate_limit_close", agent_id=self.session.agent_id)
            self.close_soon(self.ws, P.CloseCode.POLICY_VIOLATION, "frame rate limit exceeded")
        return False

    def refused(self) -> None:
        """A refused frame (answered with an error frame) costs REFUSED_COST frames'
        worth of the rate: an agent that sends garbage gets a tenth of the rate."""
        if self.rate:
            self.tokens -= REFUSED_COST - 1

    def _track(self, pending: asyncio.Future[Any] | None) -> None:
        if pending is not None:
            self.inflight.add(pending)
            pending.add_done_callback(self.inflight.discard)

    def apply_inline(self, message: bytes) -> bool:
        """Apply an answer (result, fail, ack, progress) now; False, having done
        nothing, for anything else."""
        try:
            obj = P.loads(message)
            fields = P.result_fields(obj)
            frame = P.frame_of(obj) if fields is None else None
        except P.ProtocolError:
            return False  # the task answers it with the error frame
        if frame is not None and not isinstance(frame, _ANSWERS):
            return False
        if len(self.inflight) >= MAX_FRAMES_IN_FLIGHT:
            return False  # the task waits for room first
        if frame is None:
            assert fields is not None
            self.frame_in("result")
            self._track(self.router.apply_result(self.session, fields[0], fields[1]))
        else:
            self.frame_in(frame.TYPE)
            self._track(self.router.apply(self.session, frame))
        return True

    async def handle(self, message: Data) -> bool:
        """Apply one message in the connection's task; False to end the connection."""
        session = self.session
        # Frames the fast path split off took their token there (admit); before
        # the split took over, websockets read them alone: they pay here.
        if self.rate and not getattr(self.ws, "splitting", False):
            now = self.loop.time()
            if not self._token(now):
                if self._over(now):
                    log.warning("rate_limit_close", agent_id=session.agent_id)
                    # Awaited: once the handler returns websockets closes
                    # with 1000, which would overtake a close left to a task.
                    await self.ws.close(P.CloseCode.POLICY_VIOLATION,
                                        "frame rate limit exceeded")
                    return False
                return True
        try:
            frame = P.decode(message)
        except P.ProtocolError as exc:
            self.frame_in("invalid")
            self.refused()
            session.send(P.encode(exc.to_frame()))
            return True
        self.frame_in(frame.TYPE)
        self._track(self.router.apply(session, frame))
        if len(self.inflight) >= MAX_FRAMES_IN_FLIGHT:
            await asyncio.wait(self.inflight, return_when=asyncio.FIRST_COMPLETED)
        return True

    async def read_all(self, ws: ServerConnection,
                       fast: AgentConnection | None) -> ConnectionClosed | None:
        """Handle every message ``recv()`` gives until the connection ends (the
        ``ConnectionClosed`` that ended it) or :meth:`handle` ends it (None).
        ``fast``: the fast path's connection, told while a message is handled so
        that the answers read inline wait behind it."""
        streak = 0
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
            except ConnectionClosed as exc:
                return exc
            if fast is not None:
                fast.busy = True
            if not await self.handle(message):
                return None
            if fast is not None:
                fast.busy = False

    async def drain(self) -> None:
        """Wait for the frames still being applied (the connection ended)."""
        if self.inflight:
            await asyncio.gather(*self.inflight, return_exceptions=True)


# Frames apply_inline takes (result frames are read without a frame object).
_ANSWERS = (P.FailFrame, P.AckFrame, P.ProgressFrame)


def _close_info(exc: ConnectionClosed) -> tuple[int | None, str | None]:
    """As ``AgentConnection.close_info``, from the exception ``recv`` raised."""
    rcvd, sent = exc.rcvd, exc.sent
    code = sent.code if sent is not None else None
    if rcvd is not None and code != P.CloseCode.REPLACED:
        code = rcvd.code
    text = sent.reason if sent is not None else rcvd.reason if rcvd is not None else None
    return code, text


def _remote(ws: ServerConnection) -> str:
    addr = ws.remote_address
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else str(addr)


def load_tokens(tokens: Mapping[str, str] | str | None) -> dict[str, str] | None:
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
