"""The agents' WebSocket server: handshake, reader, non-blocking writer, liveness.

Thin by design (ARCHITECTURE.md, Layers): it turns WebSocket messages into
frames and frames into calls on the hub (sessions and the frame router), and
maps every failure to the close code PROTOCOL.md names. Sending never blocks
the hub: frames go straight into the connection's transport buffer, which is
bounded (``max_send_buffer``); a reader that does not read is disconnected
instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import json
import struct
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from websockets.asyncio.messages import SimpleQueue
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.streams import StreamReader
from websockets.typing import Data

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

from agent_client import protocol as P

from .clock import now_ms
from .config import HubConfig
from .connections import Connections
from .errors import StoreUnavailable
from .ids import new_session_id
from .metrics import Metrics
from .models import AgentInfo
from .router import FrameRouter
from .sessions import Sessions

__all__ = ["AgentServer", "WsSession", "agent_token", "close_reason"]

log = structlog.get_logger(__name__)

# Frames of one connection being applied at once (store calls not answered yet).
MAX_FRAMES_IN_FLIGHT = 256
# Seconds a connection may stay over its frame rate before it is closed (1008).
RATE_LIMIT_GRACE = 5.0
# Frames one connection's reader handles before it lets the other tasks run.
FAIR_SLICE = 64
# Frames applied inline per read of one connection; the rest go to its task.
INLINE_SLICE = FAIR_SLICE
# Opcodes RFC 6455 defines: continuation, text, binary, close, ping, pong.
_OPCODES = frozenset((0x0, 0x1, 0x2, 0x8, 0x9, 0xA))
# websockets' parser sits here between frames (see AgentConnection._at_boundary).
_AT_EOF = StreamReader.at_eof.__code__


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


_SMALL_HEADERS = [bytes((0x82, n)) for n in range(126)]


def binary_header(size: int) -> bytes:
    """RFC 6455, 5.2: the header of an unmasked, final binary frame of ``size`` bytes."""
    if size < 126:
        return _SMALL_HEADERS[size]
    if size < 65536:
        return struct.pack("!BBH", 0x82, 126, size)
    return struct.pack("!BBQ", 0x82, 127, size)


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

    def queue_frame(self, data: bytes, header: bytes | None = None) -> bool:
        """Send one binary message: it leaves with every other frame of this
        event-loop turn, in one write at the end of the turn (one system call
        per connection and turn instead of one per frame).

        Never waits: the send-buffer bound replaces the backpressure a drain
        would give (a reader that does not read is dropped, not waited for).

        The frame is serialized here, not by websockets: a server's frames are
        not masked, so a binary frame is a 2-10 byte header (``header``, made
        once for a fan-out) and the message. It joins websockets' own output
        list, so it keeps its place among the control frames (a Close sent
        after it leaves after it).
        """
        protocol = self.protocol
        if protocol.state is not State.OPEN or protocol.expect_continuation_frame:
            return False
        writes = protocol.writes
        writes.append(binary_header(len(data)) if header is None else header)
        writes.append(data)
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

    # -- reading: whole binary frames applied inline --------------------------
    # Set once the agent is attached: applies one message now and returns True,
    # or returns False (having done nothing) to leave it to the connection's task.
    inline: Callable[[bytes], bool] | None = None
    # The connection's task is handling a message (anything after it waits behind).
    busy: bool = False
    max_message: int = 1 << 20
    _split: bool = False  # frames are split here; websockets sees only whole frames
    _passthrough: bool = False  # websockets parses everything from now on
    _partial: bytearray | None = None  # the start of a frame whose end has not arrived
    _need = 0  # bytes _partial must reach to hold that frame whole (0: header incomplete)

    def data_received(self, data: bytes) -> None:
        """Apply the agents' answers straight from the socket's bytes.

        websockets parses frames in Python and hands messages to a task through
        a queue: per message, more than the hub's whole work on an answer. Here,
        once the agent is attached, complete final binary frames are unmasked
        and applied at once (``inline``); every other frame (control frames,
        text, fragments) goes to websockets whole and in order, so it still
        handles pings, closes and protocol errors. A message ``inline`` leaves
        to the task, and every message after it until the task has caught up,
        joins websockets' queue for the task, so frames are applied in order.
        """
        self.last_rx = self.loop.time()
        if self._passthrough or (self.inline is None and not self._split):
            # Once splitting, it goes on after the task ended (``inline`` None):
            # websockets must never get the rest of a frame whose start it missed.
            super().data_received(data)
            return
        if not self._split:
            if not self._at_boundary():
                super().data_received(data)
                return
            self._split = True
        partial = self._partial
        if partial is not None:
            # Appended in place (a frame trickling in byte by byte costs linear
            # time), parsed again only once it can be whole.
            partial += data
            if len(partial) < self._need:
                return
            data = bytes(partial)
            self._partial = None
        self._split_frames(data)

    def _at_boundary(self) -> bool:
        """Whether websockets' parser waits for a new frame (has consumed none of one)."""
        protocol = self.protocol
        if not hasattr(protocol, "current_size") \
                or not isinstance(getattr(self.recv_messages, "frames", None), SimpleQueue):
            return False  # another websockets release: leave all reading to it
        if protocol.reader.buffer or protocol.current_size is not None \
                or protocol.state is not State.OPEN:
            return False
        # The innermost generator of the parser's ``yield from`` chain.
        inner = protocol.parser
        while (outer := getattr(inner, "gi_yieldfrom", None)) is not None:
            inner = outer
        return getattr(inner, "gi_code", None) is _AT_EOF

    def _split_frames(self, data: bytes) -> None:
        protocol = self.protocol
        size = len(data)
        pos = 0
        run = -1  # start of frames for websockets, not yet handed over
        inline_left = INLINE_SLICE
        self._need = 0
        while size - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            length = b1 & 0x7F
            head = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
                head = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                head = pos + 10
            if b1 & 0x80:
                head += 4
            opcode = b0 & 0x0F
            if length > self.max_message or b0 & 0x70 or opcode not in _OPCODES \
                    or (opcode >= 0x8 and length > 125):
                # Too big (websockets closes with 1009) or invalid from its
                # header (1002): websockets decides now, nothing is buffered here.
                self._passthrough = True
                super().data_received(data[pos if run < 0 else run:])
                return
            end = head + length
            if end > size:
                self._need = end - pos
                break
            if b0 == 0x82 and b1 & 0x80:
                # The frames before it first: a Close or an invalid frame
                # among them ends what may be applied after them.
                if run >= 0:
                    super().data_received(data[run:pos])
                    run = -1
                # Not inside a fragmented message (that is websockets' 1002).
                if protocol.state is State.OPEN and protocol.current_size is None:
                    message = apply_mask(data[head:end], data[head - 4:head])
                    if self.busy or self.recv_messages.frames or inline_left <= 0 \
                            or not self._apply(message):
                        with contextlib.suppress(EOFError):  # the connection is gone
                            self.recv_messages.put(Frame(Opcode.BINARY, message))
                    else:
                        inline_left -= 1
                    pos = end
                    continue
            if run < 0:
                run = pos
            pos = end
        if run >= 0:
            super().data_received(data[run:pos])
        if pos < size:
            self._partial = bytearray(data[pos:])

    def _apply(self, message: bytes) -> bool:
        inline = self.inline
        if inline is None:
            return False
        try:
            return inline(message)
        except Exception:  # a bug: the frame is lost, the connection is not
            log.exception("inline_frame_failed")
            return True

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
    """One authenticated agent connection (implements ``connections.Session``)."""

    __slots__ = ("_server", "agent_id", "info", "session_id", "ws")

    def __init__(self, server: AgentServer, ws: AgentConnection, info: AgentInfo) -> None:
        self._server = server
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
        header = binary_header(len(data))
        for session in sessions:
            if session.ws.queue_frame(data, header):
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
            body = json.dumps({"status": "ok", "hub": self.hub_id,
                               "agents": len(self.connections)}).encode()
            return Response(http.HTTPStatus.OK, "OK",
                            Headers([("Content-Type", "application/json"),
                                     ("Content-Length", str(len(body)))]), body)
        if path != "/ws":
            return conn.respond(http.HTTPStatus.NOT_FOUND, "agents connect on /ws\n")
        # Limits (API.md, Security), answered before the upgrade costs anything.
        config = self.config
        attached = len(self.connections)
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
        ws.max_message = self.config.max_frame
        ws.writer = self._writer
        ws.watch_liveness(self.config.heartbeat)
        session = await self._handshake(ws)
        if session is None:
            return
        reader = _Reader(self, session)
        # From here, answers are applied as their bytes arrive (data_received);
        # this task handles every other frame, in order with them.
        ws.inline = reader.apply_inline
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
                ws.busy = True
                if not await reader.handle(message):
                    break
                ws.busy = False
        finally:
            ws.inline = None
            await reader.drain()
            await self.sessions.detach(session, ws.lost_reason
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
        info = AgentInfo(id=frame.agent, hub_id=self.hub_id, session=new_session_id(),
                         connected_at=now, last_seen=now, meta=frame.meta or {})
        session = WsSession(self, ws, info)
        try:
            await self.sessions.attach(session, frame.subs)
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


class _Reader:
    """One attached agent's frames into the hub's frame router: answers inline from
    the connection's ``data_received`` when possible, everything else in order in
    the connection's task (:meth:`handle`)."""

    __slots__ = ("dropped_at", "frame_in", "inflight", "last", "limited_since", "loop",
                 "rate", "router", "session", "tokens", "warned", "ws")

    def __init__(self, server: AgentServer, session: WsSession) -> None:
        self.router = server.router
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
        # Frames per second (API.md, Security): a token bucket of one second's
        # worth. Over it, frames are dropped with one `rate_limited` error a
        # second; a connection still over it after RATE_LIMIT_GRACE is closed.
        self.rate = server.config.max_frame_rate
        self.tokens, self.last = self.rate, self.loop.time()
        self.limited_since: float | None = None
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
        return True

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
        # Last: a frame left to the task must not have taken a token here.
        if self.rate and not self._token(self.loop.time()):
            return False  # the task drops it (and counts, warns, closes)
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
        if self.rate:
            now = self.loop.time()
            if not self._token(now):
                if self.limited_since is None:
                    self.limited_since = now
                elif now - self.limited_since > RATE_LIMIT_GRACE:
                    log.warning("rate_limit_close", agent_id=session.agent_id)
                    # Awaited: once the handler returns websockets closes
                    # with 1000, which would overtake a close left to a task.
                    await self.ws.close(P.CloseCode.POLICY_VIOLATION,
                                        "frame rate limit exceeded")
                    return False
                self.dropped_at = now
                if now - self.warned >= 1.0:
                    self.warned = now
                    self.frame_in("rate_limited")
                    session.send(P.encode(P.ErrorFrame(
                        P.ErrorCode.RATE_LIMITED,
                        f"over {self.rate:g} frames per second; frames are being dropped")))
                return True
        try:
            frame = P.decode(message)
        except P.ProtocolError as exc:
            self.frame_in("invalid")
            session.send(P.encode(exc.to_frame()))
            return True
        self.frame_in(frame.TYPE)
        self._track(self.router.apply(session, frame))
        if len(self.inflight) >= MAX_FRAMES_IN_FLIGHT:
            await asyncio.wait(self.inflight, return_when=asyncio.FIRST_COMPLETED)
        return True

    async def drain(self) -> None:
        """Wait for the frames still being applied (the connection ended)."""
        if self.inflight:
            await asyncio.gather(*self.inflight, return_exceptions=True)


# Frames apply_inline takes (result frames are read without a frame object).
_ANSWERS = (P.FailFrame, P.AckFrame, P.ProgressFrame)


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
