"""The hub's websockets fast path: it reads agents' answers straight off the
socket and writes each connection's frames once per event-loop turn, relying on
websockets internals (the sans-I/O protocol's ``parser`` generator, ``reader.buffer``,
``current_size``, ``writes``, ``data_to_send`` and ``expect_continuation_frame``;
the asyncio connection's ``data_received``/``send_data`` hooks and its
``recv_messages.frames``/``put``; ``Frame``/``Opcode`` and ``apply_mask``).

Every use of websockets internals in the hub is in this module. :func:`check`
says, once at start-up, whether the installed websockets has what it needs; when
it does not (or ``HubConfig.ws_fast_path`` is off), ``dispatcher.transport``
uses websockets' public API only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import importlib.metadata
import struct
from collections.abc import Callable

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request

from agent_client import protocol as P

try:
    from websockets.asyncio.messages import Assembler, SimpleQueue
    from websockets.frames import Frame, Opcode
    from websockets.protocol import State
    from websockets.server import ServerProtocol
    from websockets.streams import StreamReader

    # websockets' parser sits here between frames (see AgentConnection._at_boundary).
    _AT_EOF = StreamReader.at_eof.__code__
    _CONTROL = frozenset((Opcode.PING, Opcode.PONG))
    _IMPORT_ERROR: str | None = None
except (ImportError, AttributeError) as exc:  # pragma: no cover - another websockets release
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

__all__ = ["AgentConnection", "TurnWriter", "binary_header", "check"]

log = structlog.get_logger(__name__)

# Frames applied inline per read of one connection; the rest go to its task.
# The same slice as the task's fairness yield (transport.FAIR_SLICE): one read
# never holds the loop for more than 64 answers, about 0.1 ms of work.
INLINE_SLICE = 64
# Frames split off one read before the rest waits for the next event-loop turn:
# a read can hold thousands of small frames (a flood), and splitting them all at
# once held the loop for milliseconds; 256 frames are ~0.2-0.5 ms of work.
SPLIT_SLICE = 256
# Bytes waiting for their turn beyond which reading pauses until they are split.
STASH_LIMIT = 1 << 20
# Opcodes RFC 6455 defines: continuation, text, binary, close, ping, pong.
_OPCODES = frozenset((0x0, 0x1, 0x2, 0x8, 0x9, 0xA))


@functools.cache
def check() -> tuple[bool, str]:
    """Whether the installed websockets has every internal the fast path uses:
    ``(True, release)`` or ``(False, what is missing)``. Runs once per process,
    in the event loop (websockets' message queue needs one).

    It drives a real ``ServerProtocol`` through a handshake and one frame
    offline and looks at exactly what :class:`AgentConnection` reads and writes.
    """
    asyncio.get_running_loop()  # raises outside the loop (and nothing is cached)
    release = f"websockets {importlib.metadata.version('websockets')}"
    if _IMPORT_ERROR is not None:
        return False, f"{release}: {_IMPORT_ERROR}"
    try:
        for name in ("data_received", "send_data", "connection_lost"):
            if not callable(getattr(ServerConnection, name, None)):
                return False, f"{release}: ServerConnection has no {name}()"
        queue = Assembler()
        if not isinstance(getattr(queue, "frames", None), SimpleQueue) \
                or not callable(getattr(queue, "put", None)):
            return False, f"{release}: Assembler.frames is not a SimpleQueue with put()"
        protocol = ServerProtocol()
        protocol.receive_data(
            b"GET /ws HTTP/1.1\r\nHost: check\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n")
        [request] = protocol.events_received()
        assert isinstance(request, Request)
        protocol.send_response(protocol.accept(request))
        protocol.data_to_send()
        for name, kind in (("writes", list), ("current_size", type(None)),
                           ("expect_continuation_frame", bool)):
            if not hasattr(protocol, name):
                return False, f"{release}: ServerProtocol has no {name}"
            if not isinstance(getattr(protocol, name), kind):
                return False, f"{release}: ServerProtocol.{name} is not a {kind.__name__}"
        if not isinstance(getattr(protocol.reader, "buffer", None), bytearray):
            return False, f"{release}: StreamReader.buffer is not a bytearray"
        if protocol.state is not State.OPEN or not _parser_at_eof(protocol):
            return False, f"{release}: the parser does not wait in StreamReader.at_eof"
        # One whole masked frame: the parser must be back at the same place.
        protocol.receive_data(bytes((0x82, 0x81, 1, 2, 3, 4, 0x78 ^ 1)))
        [frame] = protocol.events_received()
        if not isinstance(frame, Frame) or frame.data != b"x" or not _parser_at_eof(protocol) \
                or protocol.current_size is not None:
            return False, f"{release}: the parser does not return to StreamReader.at_eof"
    except Exception as exc:  # any surprise means: not this release
        return False, f"{release}: {type(exc).__name__}: {exc}"
    return True, release


def _parser_at_eof(protocol: ServerProtocol) -> bool:
    # The innermost generator of the parser's ``yield from`` chain.
    inner = protocol.parser
    while (outer := getattr(inner, "gi_yieldfrom", None)) is not None:
        inner = outer
    return getattr(inner, "gi_code", None) is _AT_EOF


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

    docs/protocol.md, Transport: a connection whose Pong is ``heartbeat`` seconds
    late counts as gone *at that moment*, without waiting for a closing
    handshake a dead peer will never answer. websockets sends the Pings
    (``ping_interval``); this class notes when bytes last arrived and one
    timer per connection aborts it when nothing came for two heartbeats
    (a Ping went out, and its Pong is a heartbeat late).
    """

    last_rx: float = 0.0
    lost_reason: str | None = None
    # Control frames (Ping, Pong) per second, before and after the hello: an
    # agent needs about one per heartbeat; a flood of them costs the hub a
    # parse and a Pong each, so past this rate (a bucket of one second's worth)
    # the connection is dropped (HubConfig.max_control_rate; 0: no limit).
    control_rate: float = 100.0
    _control_tokens: float = -1.0  # -1: full bucket, not started yet
    _control_last: float = 0.0
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

    writer: TurnWriter | None = None

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
    # Set once the agent is attached: False when the connection is over its frame
    # rate, and the frame at hand is dropped before anything is decoded.
    admit: Callable[[], bool] | None = None
    # The connection's task is handling a message (anything after it waits behind).
    busy: bool = False
    max_message: int = 1 << 20
    _split: bool = False  # frames are split here; websockets sees only whole frames
    _passthrough: bool = False  # websockets parses everything from now on
    _partial: bytearray | None = None  # the start of a frame whose end has not arrived
    _need = 0  # bytes _partial must reach to hold that frame whole (0: header incomplete)
    # Reads not split yet, (bytes, offset) in order: they wait for later event-loop
    # turns. Kept without copying: a flood must cost linear time.
    _stash: collections.deque[tuple[bytes, int]] | None = None
    _stash_size = 0
    _stash_scheduled = False
    _stash_paused = False  # reading paused by this class while the stash is large

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
        if self._passthrough:
            super().data_received(data)
            return
        if not self._split:
            # From the first frame on, before the hello too (a flood of control
            # frames needs no credential); once splitting, it goes on to the end:
            # websockets must never get the rest of a frame whose start it missed.
            if not self._at_boundary():
                super().data_received(data)
                return
            self._split = True
        if self._stash is not None:
            # Frames of an earlier read are still waiting for their turn: these
            # come after them.
            self._stash.append((data, 0))
            self._stash_size += len(data)
            if self._stash_size > STASH_LIMIT and not self._stash_paused:
                self._stash_paused = True
                self.transport.pause_reading()
            return
        self._feed(data, 0)

    @property
    def splitting(self) -> bool:
        """Whether frames are read here (and took their rate token in ``admit``)."""
        return self._split and not self._passthrough

    def _feed(self, data: bytes, pos: int) -> None:
        """Split ``data[pos:]``, after the start of a frame kept from an earlier read."""
        partial = self._partial
        if partial is not None:
            # Appended in place (a frame trickling in byte by byte costs linear
            # time), parsed again only once it can be whole.
            partial += data if pos == 0 else data[pos:]
            if len(partial) < self._need:
                return
            data, pos = bytes(partial), 0
            self._partial = None
        self._split_frames(data, pos)

    def _at_boundary(self) -> bool:
        """Whether websockets' parser waits for a new frame (has consumed none of one)."""
        protocol = self.protocol
        if protocol.reader.buffer or protocol.current_size is not None \
                or protocol.state is not State.OPEN:
            return False
        return _parser_at_eof(protocol)

    def _split_frames(self, data: bytes, pos: int = 0) -> None:
        protocol = self.protocol
        size = len(data)
        run = -1  # start of frames for websockets, not yet handed over
        inline_left = INLINE_SLICE
        split_left = SPLIT_SLICE
        self._need = 0
        # Read once, and again after websockets got frames (a Close changes it).
        is_open = protocol.state is State.OPEN
        while size - pos >= 2:
            split_left -= 1
            if split_left < 0:
                # The rest in a later turn: the other connections' frames, and the
                # tasks of the hub, come first.
                if run >= 0:
                    super().data_received(data[run:pos])
                if self._stash is None:
                    self._stash = collections.deque()
                self._stash.appendleft((data, pos))
                self._stash_size += size - pos
                if not self._stash_scheduled:
                    self._stash_scheduled = True
                    self.loop.call_soon(self._split_stash)
                return
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
                stash, self._stash = self._stash, None
                while stash:  # reads that waited for their turn go after it
                    more, start = stash.popleft()
                    super().data_received(more[start:])
                return
            end = head + length
            if end > size:
                self._need = end - pos
                break
            if opcode >= 0x9 and self.control_rate and not self._control_token():
                # A flood of Pings or Pongs: each would cost a parse and a Pong.
                if self.lost_reason is None:
                    log.warning("control_frame_flood", rate=self.control_rate,
                                remote=str(self.remote_address))
                self.abort("control_frame_flood")
                return
            if opcode <= 0x2 and not is_open:
                # Closing: data frames are discarded unread (RFC 6455, 5.5.1: so
                # would websockets, after parsing each); control frames go on.
                if run >= 0:
                    super().data_received(data[run:pos])
                    run = -1
                    is_open = protocol.state is State.OPEN
                pos = end
                continue
            if opcode <= 0x2 and b0 != 0x82 and self.admit is not None:
                self.admit()  # a data frame websockets reads: its token, all the same
            if b0 == 0x82 and b1 & 0x80:
                # The frames before it first: a Close or an invalid frame
                # among them ends what may be applied after them.
                if run >= 0:
                    super().data_received(data[run:pos])
                    run = -1
                    is_open = protocol.state is State.OPEN
                # Not inside a fragmented message (that is websockets' 1002).
                if is_open and protocol.current_size is None:
                    admit = self.admit
                    if admit is not None and not admit():
                        pos = end  # over the frame rate: dropped unread
                        continue
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

    def _split_stash(self) -> None:
        """One waiting read (or what is left of it) per event-loop turn."""
        self._stash_scheduled = False
        stash = self._stash
        if stash is None:
            return
        if self._stash_paused:
            self._stash_paused = False
            self.transport.resume_reading()
        if self.transport.is_closing():
            self._stash = None
            return
        data, pos = stash.popleft()
        self._stash_size -= len(data) - pos
        if not stash:
            self._stash = None  # nothing else waits: the next reads go straight on
        self._feed(data, pos)
        if self._stash is not None and not self._stash_scheduled:
            self._stash_scheduled = True
            self.loop.call_soon(self._split_stash)

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

    def close_info(self) -> tuple[int | None, str | None]:
        """The close code and reason that ended the connection, for the
        ``agent-disconnected`` reason: the one the hub sent when it replaced the
        agent, else the one received, else the one sent (None: no Close at all)."""
        rcvd, sent = self.protocol.close_rcvd, self.protocol.close_sent
        code = sent.code if sent is not None else None
        if rcvd is not None and code != P.CloseCode.REPLACED:
            code = rcvd.code
        text = sent.reason if sent is not None else rcvd.reason if rcvd is not None else None
        return code, text

    def buffered(self) -> int:
        """Bytes written to this connection and not yet sent."""
        return self.transport.get_write_buffer_size()

    def _control_token(self) -> bool:
        """Take one control frame's token; False when over ``control_rate``."""
        rate = self.control_rate
        now = self.loop.time()
        tokens = self._control_tokens
        tokens = rate if tokens < 0 else min(rate, tokens + (now - self._control_last) * rate)
        self._control_last = now
        if tokens < 1.0:
            return False
        self._control_tokens = tokens - 1.0
        return True

    def abort(self, reason: str) -> None:
        """Drop the connection now, without a closing handshake."""
        if self.lost_reason is None:
            self.lost_reason = reason
        self.transport.abort()


class TurnWriter:
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


