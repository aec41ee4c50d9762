"""The agent wire protocol, version 1: every frame as a typed value, pure (no I/O).

This module is the executable form of ``docs/protocol.md``. It never imports asyncio,
sockets or Redis, so any program (the hub, an agent, a test, another transport)
can parse and build frames with it. Each frame type is a frozen dataclass whose
``parse`` checks one decoded msgpack map and whose ``to_wire`` gives the map
back; :func:`decode` and :func:`encode` go between frames and bytes.

Decoding anything that is not a valid frame raises :class:`ProtocolError`, and
only that, with the error code docs/protocol.md names (section "Errors").
"""

from __future__ import annotations

import itertools
import math
import re
import threading
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Final, TypeGuard

import msgpack

__all__ = [
    "ID_RE",
    "MAX_ID_LENGTH",
    "MAX_KEY_LENGTH",
    "MAX_KEYS_PER_FRAME",
    "MAX_META_BYTES",
    "MAX_META_DEPTH",
    "MAX_TARGETS",
    "PROTOCOL_VERSION",
    "RESERVED_KEYS",
    "AckFrame",
    "AgentFrame",
    "CallFrame",
    "CancelFrame",
    "CloseCode",
    "CmdFrame",
    "EmitFrame",
    "ErrorCode",
    "ErrorFrame",
    "EventFrame",
    "FailFrame",
    "Frame",
    "HelloFrame",
    "HubFrame",
    "ProgressFrame",
    "ProtocolError",
    "ReceivedFrame",
    "ReplyFrame",
    "ResultFrame",
    "SubFrame",
    "UnsubFrame",
    "WelcomeFrame",
    "decode",
    "encode",
    "error_info",
    "frame_of",
    "is_reserved_key",
    "is_valid_agent_id",
    "key_matches",
    "loads",
    "pack",
    "parse",
    "result_fields",
    "unpack",
]

PROTOCOL_VERSION: Final = 1
# docs/protocol.md, Handshake: 1 to 128 characters of A-Z a-z 0-9 . _ : @ -
ID_RE: Final = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
MAX_ID_LENGTH: Final = 128
# docs/protocol.md, Limits: 1 to 256 characters, long enough for any sane key, short enough that a
# hostile peer cannot make the hub index megabyte-long strings.
MAX_KEY_LENGTH: Final = 256
MAX_REF_ID_LENGTH: Final = 256
# Hostile-peer bounds (docs/protocol.md, Limits). ``hello.meta`` is stored in the
# registry and rendered by the admin API for everyone: a map nested at most
# MAX_META_DEPTH levels (the meta map itself is level 1) whose msgpack encoding
# is at most MAX_META_BYTES; otherwise the hello is refused with bad_hello.
MAX_META_DEPTH: Final = 16
MAX_META_BYTES: Final = 16 * 1024
# Agent ids in one ``emit.to``: each target may get a queue of its own.
MAX_TARGETS: Final = 1000
# Keys in one ``sub``/``unsub`` frame or ``hello.subs`` (an agent holds at most
# 1000 subscriptions anyway).
MAX_KEYS_PER_FRAME: Final = 1000
RESERVED_KEYS: Final = frozenset({"agent-connected", "agent-disconnected"})
RESERVED_PREFIX: Final = "internal."


class CloseCode(IntEnum):
    """WebSocket close codes of docs/protocol.md, "Close codes"."""

    NORMAL = 1000
    GOING_AWAY = 1001  # hub shutting down or draining
    POLICY_VIOLATION = 1008  # send buffer overflow, persistent rate limiting
    MESSAGE_TOO_BIG = 1009
    BAD_HELLO = 4400
    UNAUTHORIZED = 4401
    HELLO_TIMEOUT = 4408
    REPLACED = 4409


class ErrorCode:
    """Error codes of docs/protocol.md, "Errors" (plus the routed-call codes)."""

    BAD_FRAME: Final = "bad_frame"
    UNKNOWN_TYPE: Final = "unknown_type"
    UNKNOWN_COMMAND: Final = "unknown_command"
    RESERVED_KEY: Final = "reserved_key"
    RATE_LIMITED: Final = "rate_limited"
    UNAUTHORIZED: Final = "unauthorized"
    BAD_HELLO: Final = "bad_hello"
    UNSUPPORTED_VERSION: Final = "unsupported_version"
    REPLACED: Final = "replaced"
    INTERNAL: Final = "internal"
    # Codes a routed call's reply may carry (docs/protocol.md, Routed calls).
    TIMEOUT: Final = "timeout"
    AGENT_OFFLINE: Final = "agent_offline"
    CANCELLED: Final = "cancelled"
    DROPPED: Final = "dropped"
    BAD_REQUEST: Final = "bad_request"


class ProtocolError(Exception):
    """A frame that breaks docs/protocol.md; ``code`` is the error code to answer with."""

    def __init__(self, code: str, message: str, ref: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref

    def to_frame(self) -> ErrorFrame:
        return ErrorFrame(code=self.code, message=self.message, ref=self.ref)


def is_valid_agent_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def is_reserved_key(key: str) -> bool:
    """Keys an agent may not emit (docs/protocol.md, Events and receipts)."""
    return key in RESERVED_KEYS or key.startswith(RESERVED_PREFIX)


def key_matches(pattern: str, key: str) -> bool:
    """``job.*`` matches every key starting with ``job.``; anything else matches itself."""
    if pattern.endswith("*"):
        return key.startswith(pattern[:-1])
    return pattern == key


# --------------------------------------------------------------------------
# Field checks. Each raises ProtocolError(bad_frame) naming the frame and field.

_MISSING: Final = object()


def _field(d: dict[str, Any], t: str, name: str) -> Any:
    value = d.get(name, _MISSING)
    if value is _MISSING:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{t!r} frame lacks field {name!r}", _ref(d))
    return value


def _str(d: dict[str, Any], t: str, name: str, max_len: int = MAX_KEY_LENGTH) -> str:
    value = _field(d, t, name)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise ProtocolError(
            ErrorCode.BAD_FRAME,
            f"{t!r} frame field {name!r} must be a non-empty string of at most "
            f"{max_len} characters",
            _ref(d),
        )
    return value


def _opt_str(d: dict[str, Any], t: str, name: str, max_len: int = MAX_KEY_LENGTH) -> str | None:
    if d.get(name) is None:
        return None
    return _str(d, t, name, max_len)


def _int(d: dict[str, Any], t: str, name: str) -> int:
    value = _field(d, t, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(
            ErrorCode.BAD_FRAME, f"{t!r} frame field {name!r} must be an integer", _ref(d)
        )
    return value


def _opt_int(d: dict[str, Any], t: str, name: str) -> int | None:
    if d.get(name) is None:
        return None
    return _int(d, t, name)


def _number(d: dict[str, Any], t: str, name: str) -> float:
    value = _field(d, t, name)
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        raise ProtocolError(
            ErrorCode.BAD_FRAME, f"{t!r} frame field {name!r} must be a number", _ref(d)
        )
    return float(value)


def _opt_positive(d: dict[str, Any], t: str, name: str) -> float | None:
    if d.get(name) is None:
        return None
    value = _number(d, t, name)
    if not 0 < value < 1e9:
        raise ProtocolError(
            ErrorCode.BAD_FRAME, f"{t!r} frame field {name!r} must be a positive number", _ref(d)
        )
    return value


def _keys(d: dict[str, Any], t: str, name: str, *, required: bool) -> tuple[str, ...]:
    value = d.get(name) if not required else _field(d, t, name)
    if value is None and not required:
        return ()
    if not isinstance(value, list | tuple) or len(value) > MAX_KEYS_PER_FRAME or not all(
        isinstance(k, str) and 0 < len(k) <= MAX_KEY_LENGTH for k in value
    ):
        raise ProtocolError(
            ErrorCode.BAD_FRAME,
            f"{t!r} frame field {name!r} must be a list of at most {MAX_KEYS_PER_FRAME} "
            f"non-empty strings of at most {MAX_KEY_LENGTH} characters",
            _ref(d),
        )
    return tuple(value)


def _agent_ids(d: dict[str, Any], t: str, name: str) -> tuple[str, ...] | None:
    value = d.get(name)
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) > MAX_TARGETS \
            or not all(is_valid_agent_id(a) for a in value):
        raise ProtocolError(
            ErrorCode.BAD_FRAME,
            f"{t!r} frame field {name!r} must be a list of at most {MAX_TARGETS} agent ids",
            _ref(d),
        )
    return tuple(value)


def _meta(value: Any) -> dict[str, Any] | None:
    """``hello.meta``: nil, or a map within MAX_META_DEPTH and MAX_META_BYTES."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.BAD_HELLO, "'hello' field 'meta' must be a map")
    if not _depth_within(value, MAX_META_DEPTH, MAX_META_BYTES):
        raise ProtocolError(
            ErrorCode.BAD_HELLO,
            f"'hello' field 'meta' must nest at most {MAX_META_DEPTH} levels and hold at "
            f"most {MAX_META_BYTES} bytes",
        )
    try:
        size = len(pack(value))
    except TypeError:
        raise ProtocolError(ErrorCode.BAD_HELLO, "'hello' field 'meta' cannot be "
                            "encoded as msgpack") from None
    if size > MAX_META_BYTES:
        raise ProtocolError(
            ErrorCode.BAD_HELLO,
            f"'hello' field 'meta' is {size} bytes packed; at most {MAX_META_BYTES} allowed",
        )
    return value


def _depth_within(value: Any, max_depth: int, max_items: int) -> bool:
    """Whether ``value`` nests at most ``max_depth`` arrays/maps (``value`` itself is
    level 1) and holds at most ``max_items`` values in all. Iterative, and it
    stops at the first breach: its cost is bounded whatever the value."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    items = 0
    while stack:
        node, depth = stack.pop()
        items += 1
        if items > max_items:
            return False
        if isinstance(node, dict):
            children: Any = itertools.chain(node.keys(), node.values())
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth > max_depth:
            return False
        for child in children:
            if isinstance(child, dict | list | tuple):
                if depth + 1 > max_depth:
                    return False
                stack.append((child, depth + 1))
            else:
                items += 1
                if items > max_items:
                    return False
    return True


def _error_map(d: dict[str, Any], t: str) -> dict[str, Any]:
    value = _field(d, t, "error")
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("code"), str)
        or not value["code"]
        or not isinstance(value.get("message"), str)
    ):
        raise ProtocolError(
            ErrorCode.BAD_FRAME,
            f"{t!r} frame field 'error' must be a map with string 'code' and 'message'",
            _ref(d),
        )
    out: dict[str, Any] = {"code": value["code"], "message": value["message"]}
    if value.get("data") is not None:
        out["data"] = value["data"]
    return out


def _ref(d: dict[str, Any]) -> Any:
    """The offending frame's ``id``, echoed in the error (docs/protocol.md, Errors)."""
    ref = d.get("id")
    if isinstance(ref, str | int) and not isinstance(ref, bool):
        if isinstance(ref, str) and len(ref) > MAX_REF_ID_LENGTH:
            return None
        return ref
    return None


def error_info(code: str, message: str, data: Any = None) -> dict[str, Any]:
    """The ``error`` map of ``fail`` and ``reply`` frames."""
    out: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        out["data"] = data
    return out


# --------------------------------------------------------------------------
# Frames. ``parse`` takes the decoded map (``t`` already checked), ``to_wire``
# gives the map to encode. Optional fields that are None are left out.


@dataclass(frozen=True, slots=True)
class HelloFrame:
    """Agent → hub, first frame (docs/protocol.md, Handshake)."""

    TYPE: ClassVar[str] = "hello"
    v: int
    agent: str
    token: str | None = None
    meta: dict[str, Any] | None = None
    subs: tuple[str, ...] = ()

    @classmethod
    def parse(cls, d: dict[str, Any]) -> HelloFrame:
        # Every fault of a hello is bad_hello (docs/protocol.md, Handshake, step 2).
        try:
            v = _int(d, "hello", "v")
        except ProtocolError as exc:
            raise ProtocolError(ErrorCode.BAD_HELLO, exc.message) from None
        agent = d.get("agent")
        if not is_valid_agent_id(agent):
            raise ProtocolError(
                ErrorCode.BAD_HELLO,
                "'hello' field 'agent' must be 1 to 128 characters of A-Z a-z 0-9 . _ : @ -",
            )
        token = d.get("token")
        if token is not None and (not isinstance(token, str) or len(token) > 1024):
            raise ProtocolError(ErrorCode.BAD_HELLO, "'hello' field 'token' must be a string")
        meta = _meta(d.get("meta"))
        try:
            subs = _keys(d, "hello", "subs", required=False)
        except ProtocolError as exc:
            raise ProtocolError(ErrorCode.BAD_HELLO, exc.message) from None
        return cls(v=v, agent=agent, token=token, meta=meta, subs=subs)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": "hello", "v": self.v, "agent": self.agent, "token": self.token}
        if self.meta is not None:
            out["meta"] = self.meta
        if self.subs:
            out["subs"] = list(self.subs)
        return out


@dataclass(frozen=True, slots=True)
class WelcomeFrame:
    """Hub → agent, answer to a valid ``hello``."""

    TYPE: ClassVar[str] = "welcome"
    v: int
    hub: str
    session: str
    heartbeat: float

    @classmethod
    def parse(cls, d: dict[str, Any]) -> WelcomeFrame:
        return cls(
            v=_int(d, "welcome", "v"),
            hub=_str(d, "welcome", "hub"),
            session=_str(d, "welcome", "session"),
            heartbeat=_number(d, "welcome", "heartbeat"),
        )

    def to_wire(self) -> dict[str, Any]:
        beat = float(self.heartbeat)
        # Whole seconds as an int, but only where an int is exact and fits msgpack.
        hb: float | int = int(beat) if beat.is_integer() and abs(beat) < 2**53 else beat
        return {"t": "welcome", "v": self.v, "hub": self.hub, "session": self.session,
                "heartbeat": hb}


@dataclass(frozen=True, slots=True)
class CmdFrame:
    """Hub → agent: run a command (docs/protocol.md, Commands and redelivery)."""

    TYPE: ClassVar[str] = "cmd"
    id: str
    key: str
    payload: Any
    ts: int
    deadline: int | None = None

    @classmethod
    def parse(cls, d: dict[str, Any]) -> CmdFrame:
        return cls(
            id=_str(d, "cmd", "id", MAX_REF_ID_LENGTH),
            key=_str(d, "cmd", "key"),
            payload=_field(d, "cmd", "payload"),
            ts=_int(d, "cmd", "ts"),
            deadline=_opt_int(d, "cmd", "deadline"),
        )

    def to_wire(self) -> dict[str, Any]:
        return {"t": "cmd", "id": self.id, "key": self.key, "payload": self.payload,
                "ts": self.ts, "deadline": self.deadline}


@dataclass(frozen=True, slots=True)
class AckFrame:
    TYPE: ClassVar[str] = "ack"
    id: str

    @classmethod
    def parse(cls, d: dict[str, Any]) -> AckFrame:
        return cls(id=_str(d, "ack", "id", MAX_REF_ID_LENGTH))

    def to_wire(self) -> dict[str, Any]:
        return {"t": "ack", "id": self.id}


@dataclass(frozen=True, slots=True)
class ProgressFrame:
    TYPE: ClassVar[str] = "progress"
    id: str
    data: Any

    @classmethod
    def parse(cls, d: dict[str, Any]) -> ProgressFrame:
        return cls(id=_str(d, "progress", "id", MAX_REF_ID_LENGTH),
                   data=_field(d, "progress", "data"))

    def to_wire(self) -> dict[str, Any]:
        return {"t": "progress", "id": self.id, "data": self.data}


@dataclass(frozen=True, slots=True)
class ResultFrame:
    TYPE: ClassVar[str] = "result"
    id: str
    data: Any

    @classmethod
    def parse(cls, d: dict[str, Any]) -> ResultFrame:
        return cls(id=_str(d, "result", "id", MAX_REF_ID_LENGTH),
                   data=_field(d, "result", "data"))

    def to_wire(self) -> dict[str, Any]:
        return {"t": "result", "id": self.id, "data": self.data}


@dataclass(frozen=True, slots=True)
class FailFrame:
    TYPE: ClassVar[str] = "fail"
    id: str
    error: dict[str, Any]

    @classmethod
    def parse(cls, d: dict[str, Any]) -> FailFrame:
        return cls(id=_str(d, "fail", "id", MAX_REF_ID_LENGTH), error=_error_map(d, "fail"))

    def to_wire(self) -> dict[str, Any]:
        return {"t": "fail", "id": self.id, "error": self.error}


@dataclass(frozen=True, slots=True)
class CancelFrame:
    TYPE: ClassVar[str] = "cancel"
    id: str

    @classmethod
    def parse(cls, d: dict[str, Any]) -> CancelFrame:
        return cls(id=_str(d, "cancel", "id", MAX_REF_ID_LENGTH))

    def to_wire(self) -> dict[str, Any]:
        return {"t": "cancel", "id": self.id}


@dataclass(frozen=True, slots=True)
class EventFrame:
    """Hub → agent (docs/protocol.md, Events and receipts). With ``id`` the agent
    answers ``received``."""

    TYPE: ClassVar[str] = "event"
    key: str
    data: Any
    id: str | None = None
    sender: str | None = None  # wire name: "from"

    @classmethod
    def parse(cls, d: dict[str, Any]) -> EventFrame:
        sender = d.get("from")
        if sender is not None and not is_valid_agent_id(sender):
            raise ProtocolError(ErrorCode.BAD_FRAME, "'event' field 'from' must be an agent id",
                                _ref(d))
        return cls(
            key=_str(d, "event", "key"),
            data=_field(d, "event", "data"),
            id=_opt_str(d, "event", "id", MAX_REF_ID_LENGTH),
            sender=sender,
        )

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": "event", "key": self.key, "data": self.data}
        if self.id is not None:
            out["id"] = self.id
        if self.sender is not None:
            out["from"] = self.sender
        return out


@dataclass(frozen=True, slots=True)
class ReceivedFrame:
    TYPE: ClassVar[str] = "received"
    id: str

    @classmethod
    def parse(cls, d: dict[str, Any]) -> ReceivedFrame:
        return cls(id=_str(d, "received", "id", MAX_REF_ID_LENGTH))

    def to_wire(self) -> dict[str, Any]:
        return {"t": "received", "id": self.id}


@dataclass(frozen=True, slots=True)
class EmitFrame:
    TYPE: ClassVar[str] = "emit"
    key: str
    data: Any
    to: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, d: dict[str, Any]) -> EmitFrame:
        return cls(key=_str(d, "emit", "key"), data=_field(d, "emit", "data"),
                   to=_agent_ids(d, "emit", "to"))

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": "emit", "key": self.key, "data": self.data}
        if self.to is not None:
            out["to"] = list(self.to)
        return out


@dataclass(frozen=True, slots=True)
class SubFrame:
    TYPE: ClassVar[str] = "sub"
    keys: tuple[str, ...]

    @classmethod
    def parse(cls, d: dict[str, Any]) -> SubFrame:
        return cls(keys=_keys(d, "sub", "keys", required=True))

    def to_wire(self) -> dict[str, Any]:
        return {"t": "sub", "keys": list(self.keys)}


@dataclass(frozen=True, slots=True)
class UnsubFrame:
    TYPE: ClassVar[str] = "unsub"
    keys: tuple[str, ...]

    @classmethod
    def parse(cls, d: dict[str, Any]) -> UnsubFrame:
        return cls(keys=_keys(d, "unsub", "keys", required=True))

    def to_wire(self) -> dict[str, Any]:
        return {"t": "unsub", "keys": list(self.keys)}


@dataclass(frozen=True, slots=True)
class CallFrame:
    """Agent → hub: run a command on another agent (docs/protocol.md, Routed calls)."""

    TYPE: ClassVar[str] = "call"
    id: str
    agent: str
    key: str
    payload: Any
    timeout: float | None = None

    @classmethod
    def parse(cls, d: dict[str, Any]) -> CallFrame:
        call_id = _str(d, "call", "id", MAX_REF_ID_LENGTH)
        agent = _field(d, "call", "agent")
        if not is_valid_agent_id(agent):
            raise ProtocolError(
                ErrorCode.BAD_FRAME, "'call' field 'agent' must be a valid agent id", call_id
            )
        return cls(
            id=call_id,
            agent=agent,
            key=_str(d, "call", "key"),
            payload=_field(d, "call", "payload"),
            timeout=_opt_positive(d, "call", "timeout"),
        )

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": "call", "id": self.id, "agent": self.agent, "key": self.key,
                               "payload": self.payload}
        if self.timeout is not None:
            out["timeout"] = self.timeout
        return out


@dataclass(frozen=True, slots=True)
class ReplyFrame:
    """Hub → agent: the outcome of a routed ``call``."""

    TYPE: ClassVar[str] = "reply"
    id: str
    ok: bool
    data: Any = None
    error: dict[str, Any] | None = None

    @classmethod
    def parse(cls, d: dict[str, Any]) -> ReplyFrame:
        reply_id = _str(d, "reply", "id", MAX_REF_ID_LENGTH)
        ok = _field(d, "reply", "ok")
        if not isinstance(ok, bool):
            raise ProtocolError(ErrorCode.BAD_FRAME, "'reply' field 'ok' must be a boolean",
                                reply_id)
        if ok:
            return cls(id=reply_id, ok=True, data=d.get("data"))
        return cls(id=reply_id, ok=False, error=_error_map(d, "reply"))

    def to_wire(self) -> dict[str, Any]:
        if self.ok:
            return {"t": "reply", "id": self.id, "ok": True, "data": self.data}
        return {"t": "reply", "id": self.id, "ok": False, "error": self.error}


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    ref: Any = None

    @classmethod
    def parse(cls, d: dict[str, Any]) -> ErrorFrame:
        message = d.get("message", "")
        if not isinstance(message, str):
            raise ProtocolError(ErrorCode.BAD_FRAME, "'error' field 'message' must be a string")
        return cls(code=_str(d, "error", "code"), message=message, ref=d.get("ref"))

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": "error", "code": self.code, "message": self.message}
        if self.ref is not None:
            out["ref"] = self.ref
        return out


AgentFrame = (
    HelloFrame | AckFrame | ProgressFrame | ResultFrame | FailFrame | EmitFrame | ReceivedFrame
    | SubFrame | UnsubFrame | CallFrame
)
HubFrame = WelcomeFrame | CmdFrame | CancelFrame | EventFrame | ReplyFrame | ErrorFrame
Frame = AgentFrame | HubFrame

_FRAME_TYPES: Final[dict[str, Any]] = {
    cls.TYPE: cls
    for cls in (
        HelloFrame, WelcomeFrame, CmdFrame, AckFrame, ProgressFrame, ResultFrame, FailFrame,
        CancelFrame, EventFrame, ReceivedFrame, EmitFrame, SubFrame, UnsubFrame, CallFrame,
        ReplyFrame, ErrorFrame,
    )
}


# --------------------------------------------------------------------------
# Bytes.

class _Packers(threading.local):
    """One reusable Packer per thread: ``msgpack.packb`` builds a new one (and its
    buffer) per call, which is half the cost of packing a small frame. A Packer
    is not thread-safe, hence one per thread; it resets itself after an error."""

    def __init__(self) -> None:
        self.pack = msgpack.Packer(use_bin_type=True).pack


_packers: Final = _Packers()


def pack(value: Any) -> bytes:
    """msgpack with ``bin`` for bytes; raises TypeError for values msgpack cannot carry."""
    try:
        return _packers.pack(value)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"value cannot be encoded as msgpack: {exc}") from None


def unpack(data: bytes) -> Any:
    """Inverse of :func:`pack` for data the program stored itself."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def encode(frame: Frame) -> bytes:
    """One frame as the bytes of one binary WebSocket message."""
    return pack(frame.to_wire())


def parse(obj: Any) -> Frame:
    """Check a decoded msgpack value and turn it into a frame."""
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "a frame must be a msgpack map")
    t = obj.get("t")
    if not isinstance(t, str):
        raise ProtocolError(ErrorCode.BAD_FRAME, "a frame needs a string field 't'", _ref(obj))
    cls = _FRAME_TYPES.get(t)
    if cls is None:
        shown = t if len(t) <= 32 else t[:32] + "..."
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {shown!r}", _ref(obj))
    frame: Frame = cls.parse(obj)
    return frame


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Bytes of one WebSocket message to its msgpack value; raises only :class:`ProtocolError`."""
    if isinstance(data, str):
        raise ProtocolError(ErrorCode.BAD_FRAME, "text messages are not allowed; send binary")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises many types for garbage; all mean bad_frame
        raise ProtocolError(
            ErrorCode.BAD_FRAME, f"message is not valid msgpack: {type(exc).__name__}"
        ) from None


def frame_of(obj: Any) -> Frame:
    """:func:`parse` for a value that came off the wire: raises only :class:`ProtocolError`."""
    try:
        return parse(obj)
    except ProtocolError:
        raise
    except Exception as exc:  # e.g. unhashable values in user maps, deep recursion
        raise ProtocolError(
            ErrorCode.BAD_FRAME, f"malformed frame: {type(exc).__name__}"
        ) from None


def decode(data: bytes | bytearray | memoryview | str) -> Frame:
    """Bytes of one WebSocket message to a frame; raises only :class:`ProtocolError`."""
    return frame_of(loads(data))


def result_fields(obj: Any) -> tuple[str, Any] | None:
    """``(id, data)`` when ``obj`` (from :func:`loads`) is a valid ``result`` frame, else
    None (then :func:`frame_of` says what it is, or what is wrong with it).

    The hub's hot path: the agents' answers, read without building a
    :class:`ResultFrame`. Accepts exactly what ``ResultFrame.parse`` accepts.
    """
    if type(obj) is dict and obj.get("t") == "result":
        cmd_id = obj.get("id")
        if type(cmd_id) is str and 0 < len(cmd_id) <= MAX_REF_ID_LENGTH and "data" in obj:
            return cmd_id, obj["data"]
    return None
