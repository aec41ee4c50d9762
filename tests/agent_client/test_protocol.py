"""``agent_client.protocol``: the pure frame module against docs/protocol.md, no sockets.

Property tests check that decoding anything at all raises only
``ProtocolError`` with a code docs/protocol.md lists (section "Errors"), that every
frame type survives ``decode(encode(frame))``, and that each field check gives
the error code the protocol names.
"""

from __future__ import annotations

import math
import string
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent_client import protocol as P

# docs/protocol.md, Errors: the complete list of error codes the hub may send.
PROTOCOL_ERROR_CODES = frozenset({
    "bad_frame", "unknown_type", "unknown_command", "reserved_key", "rate_limited",
    "unauthorized", "bad_hello", "unsupported_version", "replaced", "internal",
})
# What decoding alone can find wrong with a message.
DECODE_ERROR_CODES = frozenset({"bad_frame", "unknown_type", "bad_hello"})

FRAME_CLASSES: tuple[Any, ...] = (
    P.HelloFrame, P.WelcomeFrame, P.CmdFrame, P.AckFrame, P.ProgressFrame, P.ResultFrame,
    P.FailFrame, P.CancelFrame, P.EventFrame, P.ReceivedFrame, P.EmitFrame, P.SubFrame,
    P.UnsubFrame, P.CallFrame, P.ReplyFrame, P.ErrorFrame,
)
# Every frame type docs/protocol.md defines.
PROTOCOL_TYPES = frozenset({
    "hello", "welcome", "cmd", "ack", "progress", "result", "fail", "cancel", "event",
    "received", "emit", "sub", "unsub", "call", "reply", "error",
})
# Every field name any frame uses on the wire (extra fields must avoid them).
WIRE_FIELDS = frozenset({
    "t", "v", "agent", "token", "meta", "subs", "hub", "session", "heartbeat", "id", "key",
    "payload", "ts", "deadline", "data", "error", "from", "to", "keys", "timeout", "ok",
    "code", "message", "ref",
})

ID_ALPHABET = string.ascii_letters + string.digits + "._:@-"

# Hypothesis: a moderate number of examples keeps the file well under a few seconds.
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def expect_error(data: bytes | bytearray | memoryview | str) -> P.ProtocolError:
    """Decode ``data``, which must fail with a ProtocolError the hub can send back."""
    with pytest.raises(P.ProtocolError) as info:
        P.decode(data)
    exc = info.value
    assert exc.code in PROTOCOL_ERROR_CODES, exc.code
    assert isinstance(exc.message, str)
    assert exc.message
    # The error frame made from it must itself be a valid frame on the wire.
    assert P.decode(P.encode(exc.to_frame())) == exc.to_frame()
    return exc


def echoable(value: Any) -> bool:
    """An ``id`` that ``ref`` must echo: a non-empty string of sane length, or an int."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and 0 < len(value) <= 128


# --------------------------------------------------------------------------
# Strategies

ints64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
ext_types = st.builds(msgpack.ExtType, st.integers(min_value=0, max_value=127),
                      st.binary(max_size=16))
scalars = (
    st.none() | st.booleans() | ints64 | st.floats(allow_nan=False)
    | st.text(max_size=16) | st.binary(max_size=16) | ext_types
)
hashable_keys = (
    st.none() | st.booleans() | ints64 | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.binary(max_size=8) | ext_types
)
# User data (``payload``, ``data``, ``meta``): any msgpack value, maps with any keys.
user_data = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hashable_keys, inner, max_size=4),
    max_leaves=16,
)
ids = st.text(min_size=1, max_size=P.MAX_REF_ID_LENGTH)
keys = st.text(min_size=1, max_size=P.MAX_KEY_LENGTH)
agent_ids = st.text(alphabet=ID_ALPHABET, min_size=1, max_size=P.MAX_ID_LENGTH)
error_maps = st.builds(P.error_info, code=st.text(min_size=1, max_size=32),
                       message=st.text(max_size=32), data=user_data)

FRAME_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "hello": st.builds(P.HelloFrame, v=ints64, agent=agent_ids,
                       token=st.none() | st.text(max_size=64),
                       meta=st.none() | st.dictionaries(hashable_keys, user_data, max_size=4),
                       subs=st.lists(keys, max_size=4).map(tuple)),
    "welcome": st.builds(P.WelcomeFrame, v=ints64, hub=keys, session=keys,
                         heartbeat=st.floats(min_value=1e-3, max_value=1e6)),
    "cmd": st.builds(P.CmdFrame, id=ids, key=keys, payload=user_data, ts=ints64,
                     deadline=st.none() | ints64),
    "ack": st.builds(P.AckFrame, id=ids),
    "progress": st.builds(P.ProgressFrame, id=ids, data=user_data),
    "result": st.builds(P.ResultFrame, id=ids, data=user_data),
    "fail": st.builds(P.FailFrame, id=ids, error=error_maps),
    "cancel": st.builds(P.CancelFrame, id=ids),
    "event": st.builds(P.EventFrame, key=keys, data=user_data, id=st.none() | ids,
                       sender=st.none() | agent_ids),
    "received": st.builds(P.ReceivedFrame, id=ids),
    "emit": st.builds(P.EmitFrame, key=keys, data=user_data,
                      to=st.none() | st.lists(agent_ids, max_size=4).map(tuple)),
    "sub": st.builds(P.SubFrame, keys=st.lists(keys, max_size=4).map(tuple)),
    "unsub": st.builds(P.UnsubFrame, keys=st.lists(keys, max_size=4).map(tuple)),
    "call": st.builds(P.CallFrame, id=ids, agent=agent_ids, key=keys, payload=user_data,
                      timeout=st.none() | st.floats(min_value=0, max_value=1e9,
                                                    exclude_min=True, exclude_max=True)),
    "reply": st.builds(P.ReplyFrame, id=ids, ok=st.just(True), data=user_data)
    | st.builds(P.ReplyFrame, id=ids, ok=st.just(False), error=error_maps),
    "error": st.builds(P.ErrorFrame, code=keys, message=st.text(max_size=64), ref=user_data),
}
frames = st.one_of(*FRAME_STRATEGIES.values())


def _array(items: list[bytes]) -> bytes:
    n = len(items)
    head = bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
    return head + b"".join(items)


def _map(pairs: list[tuple[bytes, bytes]]) -> bytes:
    n = len(pairs)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")
    return head + b"".join(k + v for k, v in pairs)


# msgpack bytes built by hand, so that maps may have any keys: lists, maps,
# duplicates, floats, bin, ext (a Python dict cannot hold most of these).
packed_scalars = scalars.map(P.pack) | st.sampled_from([
    b"\xd6\xff\x00\x00\x00\x01",  # timestamp ext (-1), 32 bit
    b"\xd7\xff" + b"\x00" * 8,  # timestamp ext, 64 bit
    b"\xc7\x0c\xff" + b"\x00" * 12,  # timestamp ext, 96 bit
    b"\xd4\xff\x00",  # timestamp ext with an impossible length
    b"\xca\x7f\xc0\x00\x00",  # float32 NaN
    b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # float64 NaN
])
packed_values = st.recursive(
    packed_scalars,
    lambda inner: st.lists(inner, max_size=5).map(_array)
    | st.lists(st.tuples(inner, inner), max_size=5).map(_map),
    max_leaves=24,
)
# Maps that look like frames: a known (or unknown) ``t`` and field names the
# frames use, with values of any type. These reach every field check.
packed_frame_like = st.builds(
    lambda t, pairs: _map([(P.pack("t"), P.pack(t)), *pairs]),
    st.sampled_from(sorted(PROTOCOL_TYPES)) | st.text(max_size=8),
    st.lists(st.tuples(st.sampled_from(sorted(WIRE_FIELDS)).map(P.pack) | packed_scalars,
                       packed_scalars | packed_values), max_size=6),
)


def deep(depth: int, leaf: bytes = b"\xc0", head: bytes = b"\x91") -> bytes:
    """``depth`` nested one-element arrays (or maps with ``head=b'\\x81\\xa1k'``)."""
    return head * depth + leaf


# --------------------------------------------------------------------------
# Decoding arbitrary input raises only ProtocolError


def check_decode(data: bytes) -> None:
    try:
        frame = P.decode(data)
    except P.ProtocolError as exc:
        assert exc.code in DECODE_ERROR_CODES, exc.code
        assert P.decode(P.encode(exc.to_frame())) == exc.to_frame()
        return
    assert isinstance(frame, FRAME_CLASSES)
    # What decode accepts, encode writes back, and the result is stable.
    wire = P.encode(frame)
    assert P.encode(P.decode(wire)) == wire


@FAST
@given(st.binary(max_size=256))
@example(b"")
@example(b"\xc1")  # the one byte msgpack never uses
@example(b"\x82\xa1t")  # truncated map
@example(b"\xdd\xff\xff\xff\xff")  # array32 claiming 4 G elements
@example(b"\xdf\xff\xff\xff\xff")  # map32 claiming 4 G pairs
@example(b"\xdb\xff\xff\xff\xff")  # str32 claiming 4 GB
@example(b"\xa3\xff\xfe\xfd")  # str with invalid UTF-8
@example(b"\x81\xa1t\xa3ack\xc0")  # a valid map followed by extra data
def test_decode_arbitrary_bytes_raises_only_protocol_error(data: bytes) -> None:
    check_decode(data)


@FAST
@given(packed_values)
def test_decode_arbitrary_msgpack_values_raises_only_protocol_error(data: bytes) -> None:
    check_decode(data)


@FAST
@given(packed_frame_like)
def test_decode_frame_like_maps_raises_only_protocol_error(data: bytes) -> None:
    check_decode(data)


@FAST
@given(user_data)
def test_decode_packed_python_values_raises_only_protocol_error(value: Any) -> None:
    check_decode(P.pack(value))


@pytest.mark.parametrize("data", [
    deep(100), deep(5000), deep(200_000),
    deep(5000, head=b"\x81\xa1k"),  # {"k": {"k": ...}}
    deep(5000, head=b"\x81\x91"),  # maps whose keys are arrays
    # A result whose data nests too deeply to be read.
    _map([(P.pack("t"), P.pack("result")), (P.pack("id"), P.pack("c1")),
          (P.pack("data"), deep(5000))]),
    b"\x81\x91\x01\x01",  # {[1]: 1}: an unhashable key
    b"\x81\x81\x01\x01\x01",  # {{1: 1}: 1}
    b"\x81\xc4\x01t\xa3ack",  # {b"t": "ack"}: the key is bin, not str
    b"\x82\xa1t\xa3ack\xa1t\xa3ack",  # duplicate keys
])
def test_decode_hostile_shapes(data: bytes) -> None:
    exc = expect_error(data)
    assert exc.code == "bad_frame"


def test_moderately_deep_user_data_is_accepted() -> None:
    data = _map([(P.pack("t"), P.pack("result")), (P.pack("id"), P.pack("c1")),
                 (P.pack("data"), deep(200))])
    frame = P.decode(data)
    assert isinstance(frame, P.ResultFrame)
    assert frame.id == "c1"


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = P.encode(P.AckFrame("c1"))
    assert P.decode(bytearray(data)) == P.AckFrame("c1")
    assert P.decode(memoryview(data)) == P.AckFrame("c1")


@FAST
@given(st.text())
@example("")
@example('{"t": "ack", "id": "c1"}')
def test_text_input_is_bad_frame(text: str) -> None:
    assert expect_error(text).code == "bad_frame"


# --------------------------------------------------------------------------
# Round trips


def test_the_module_covers_every_protocol_frame_type() -> None:
    assert {cls.TYPE for cls in FRAME_CLASSES} == PROTOCOL_TYPES


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames)
def test_every_frame_round_trips(frame: Any) -> None:
    wire = P.encode(frame)
    assert isinstance(wire, bytes)
    assert P.decode(wire) == frame
    obj = msgpack.unpackb(wire, raw=False, strict_map_key=False)
    assert isinstance(obj, dict)
    assert obj["t"] == frame.TYPE
    assert all(isinstance(k, str) for k in obj)  # docs/protocol.md: a map with string keys


def test_round_trip_covers_every_frame_type() -> None:
    assert set(FRAME_STRATEGIES) == PROTOCOL_TYPES


def test_binary_values_stay_binary() -> None:
    frame = P.ResultFrame("c1", {"blob": b"\x00\xff", "nested": [b"x"]})
    obj = msgpack.unpackb(P.encode(frame), raw=False)
    assert obj["data"] == {"blob": b"\x00\xff", "nested": [b"x"]}
    assert P.decode(P.encode(frame)) == frame


def test_welcome_heartbeat_is_written_as_a_plain_number() -> None:
    assert msgpack.unpackb(P.encode(P.WelcomeFrame(1, "h", "s", 20.0)))["heartbeat"] == 20
    assert msgpack.unpackb(P.encode(P.WelcomeFrame(1, "h", "s", 0.25)))["heartbeat"] == 0.25
    # Whatever heartbeat decode accepts, encode writes back (no int overflow).
    for beat in (2**64 - 1, 2**63, -(2**63), 1e300):
        wire = P.pack({"t": "welcome", "v": 1, "hub": "h", "session": "s", "heartbeat": beat})
        assert P.decode(P.encode(P.decode(wire))) == P.decode(wire)


def test_wire_names_are_the_protocol_names() -> None:
    event = msgpack.unpackb(P.encode(P.EventFrame("k", 1, id="e1", sender="a2")))
    assert event == {"t": "event", "key": "k", "data": 1, "id": "e1", "from": "a2"}
    cmd = msgpack.unpackb(P.encode(P.CmdFrame("c1", "k", None, 5, None)))
    assert cmd == {"t": "cmd", "id": "c1", "key": "k", "payload": None, "ts": 5,
                   "deadline": None}


# --------------------------------------------------------------------------
# Field validation

VALID: dict[str, dict[str, Any]] = {
    "hello": {"t": "hello", "v": 1, "agent": "a1", "token": None, "meta": {"x": 1},
              "subs": ["k"]},
    "welcome": {"t": "welcome", "v": 1, "hub": "h1", "session": "s1", "heartbeat": 20},
    "cmd": {"t": "cmd", "id": "c1", "key": "k", "payload": None, "ts": 1, "deadline": 2},
    "ack": {"t": "ack", "id": "c1"},
    "progress": {"t": "progress", "id": "c1", "data": 1},
    "result": {"t": "result", "id": "c1", "data": None},
    "fail": {"t": "fail", "id": "c1", "error": {"code": "E", "message": "m"}},
    "cancel": {"t": "cancel", "id": "c1"},
    "event": {"t": "event", "key": "k", "data": 1, "id": "e1", "from": "a2"},
    "received": {"t": "received", "id": "e1"},
    "emit": {"t": "emit", "key": "k", "data": 1, "to": ["a2"]},
    "sub": {"t": "sub", "keys": ["k", "job.*"]},
    "unsub": {"t": "unsub", "keys": ["k"]},
    "call": {"t": "call", "id": "q1", "agent": "a2", "key": "k", "payload": 1, "timeout": 1.5},
    "reply": {"t": "reply", "id": "q1", "ok": True, "data": 1},
    "error": {"t": "error", "code": "bad_frame", "message": "m", "ref": "c1"},
}
REPLY_FAILED = {"t": "reply", "id": "q1", "ok": False, "error": {"code": "timeout",
                                                                 "message": "m"}}

# Fields without which the frame is a bad frame. Fields written ``X|nil`` in
# docs/protocol.md (hello ``token``, cmd ``deadline``) are read as optional, and so is
# the ``message`` of an error frame (docs/protocol.md itself shows
# ``{t:"error", code:"replaced"}``): a receiver is lenient there.
REQUIRED: dict[str, tuple[str, ...]] = {
    "hello": ("v", "agent"),
    "welcome": ("v", "hub", "session", "heartbeat"),
    "cmd": ("id", "key", "payload", "ts"),
    "ack": ("id",),
    "progress": ("id", "data"),
    "result": ("id", "data"),
    "fail": ("id", "error"),
    "cancel": ("id",),
    "event": ("key", "data"),
    "received": ("id",),
    "emit": ("key", "data"),
    "sub": ("keys",),
    "unsub": ("keys",),
    "call": ("id", "agent", "key", "payload"),
    "reply": ("id", "ok"),
    "error": ("code",),
}

BAD_IDS: tuple[Any, ...] = ("", "x" * 257, None, 5, 1.5, True, b"c1", ["c1"], {"id": "c1"})
BAD_KEYS: tuple[Any, ...] = ("", "k" * 257, None, 5, b"k", ["k"])
BAD_INTS: tuple[Any, ...] = ("1", 1.5, True, None, b"1", [1])
BAD_ERRORS: tuple[Any, ...] = (
    None, "boom", 5, ["E", "m"], {"code": 1, "message": "m"}, {"code": "", "message": "m"},
    {"code": "E"}, {"message": "m"}, {"code": "E", "message": 5}, {"code": b"E", "message": "m"},
)
BAD_KEY_LISTS: tuple[Any, ...] = (None, "k", [5], [""], ["k" * 257], {"k": 1}, [None], 5)
BAD_AGENT_IDS: tuple[Any, ...] = ("", "a b", "x" * 129, "é", "a/b", "a\n", 5, None, b"a2")

MISTYPED: list[tuple[str, str, Any]] = [
    *[("welcome", "v", v) for v in BAD_INTS],
    *[("welcome", f, v) for f in ("hub", "session") for v in BAD_KEYS],
    *[("welcome", "heartbeat", v) for v in ("20", True, None, math.nan, b"1", [20])],
    *[("cmd", "id", v) for v in BAD_IDS],
    *[("cmd", "key", v) for v in BAD_KEYS],
    *[("cmd", "ts", v) for v in BAD_INTS],
    *[("cmd", "deadline", v) for v in ("2", 2.5, True, b"2")],
    *[(t, "id", v) for t in ("ack", "progress", "result", "fail", "cancel", "received")
      for v in BAD_IDS],
    *[("fail", "error", v) for v in BAD_ERRORS],
    *[("event", "key", v) for v in BAD_KEYS],
    *[("event", "id", v) for v in ("", "x" * 257, 5, b"e1", ["e1"])],
    *[("event", "from", v) for v in ("", "bad id", 5, b"a2", ["a2"])],
    *[("emit", "key", v) for v in BAD_KEYS],
    *[("emit", "to", v) for v in ("a2", ["bad id"], [5], {"a2": 1}, 5, [None])],
    *[(t, "keys", v) for t in ("sub", "unsub") for v in BAD_KEY_LISTS],
    *[("call", "id", v) for v in BAD_IDS],
    *[("call", "agent", v) for v in BAD_AGENT_IDS],
    *[("call", "key", v) for v in BAD_KEYS],
    *[("call", "timeout", v) for v in (0, -1, 1e9, math.nan, math.inf, "1", True, b"1")],
    *[("reply", "id", v) for v in BAD_IDS],
    *[("reply", "ok", v) for v in ("yes", 1, 0, None, b"\x01", [True])],
    *[("error", "code", v) for v in BAD_KEYS],
    *[("error", "message", v) for v in (5, None, b"m", ["m"])],
]

MISTYPED_HELLO: list[tuple[str, Any]] = [
    *[("v", v) for v in BAD_INTS],
    *[("agent", v) for v in BAD_AGENT_IDS],
    *[("token", v) for v in (5, b"tok", ["tok"], {"t": 1}, True, "x" * 100_000)],
    *[("meta", v) for v in ([1], "m", 5, True, b"m")],
    *[("subs", v) for v in ("k", [5], [""], ["k" * 257], {"k": 1}, 5)],
]


def check_ref(exc: P.ProtocolError, frame: dict[str, Any]) -> None:
    """docs/protocol.md, Errors: ``ref`` echoes the offending frame's ``id`` when it had one."""
    frame_id = frame.get("id")
    if echoable(frame_id):
        assert exc.ref == frame_id, f"ref {exc.ref!r} does not echo id {frame_id!r}"
    else:
        assert exc.ref is None or exc.ref == frame_id, exc.ref


@pytest.mark.parametrize("t", sorted(VALID))
def test_valid_examples_decode(t: str) -> None:
    frame = P.decode(P.pack(VALID[t]))
    assert t == frame.TYPE
    assert P.decode(P.encode(frame)) == frame


def test_failed_reply_decodes() -> None:
    frame = P.decode(P.pack(REPLY_FAILED))
    assert frame == P.ReplyFrame("q1", ok=False, error={"code": "timeout", "message": "m"})


@pytest.mark.parametrize(("t", "name"), [(t, f) for t, fs in REQUIRED.items() for f in fs])
def test_missing_required_field(t: str, name: str) -> None:
    frame = dict(VALID[t])
    del frame[name]
    exc = expect_error(P.pack(frame))
    expected = "bad_hello" if t == "hello" else "bad_frame"
    assert exc.code == expected, f"{t} without {name!r}: {exc.code} ({exc.message})"
    check_ref(exc, frame)


def test_failed_reply_without_error_is_bad_frame() -> None:
    frame = dict(REPLY_FAILED)
    del frame["error"]
    exc = expect_error(P.pack(frame))
    assert exc.code == "bad_frame"
    assert exc.ref == "q1"


@pytest.mark.parametrize(("t", "name", "value"), MISTYPED,
                         ids=[f"{t}.{f}={v!r:.20}" for t, f, v in MISTYPED])
def test_mistyped_field_is_bad_frame(t: str, name: str, value: Any) -> None:
    frame = {**VALID[t], name: value}
    exc = expect_error(P.pack(frame))
    assert exc.code == "bad_frame", f"{t}.{name}={value!r}: {exc.code} ({exc.message})"
    check_ref(exc, frame)


# Frame types whose definition in docs/protocol.md has an ``id``.
TYPES_WITH_ID = frozenset({"cmd", "ack", "progress", "result", "fail", "cancel", "event",
                           "received", "call", "reply", "reply-failed"})
# Values near the edges of the field checks.
EDGE_VALUES = st.sampled_from([
    "", "a1", "x" * 128, "x" * 129, "x" * 256, "x" * 257, "bad id", "job.*", 0, -1, 1, 2**64 - 1,
    -(2**63), 0.5, 1e9, math.nan, math.inf, -math.inf, True, False, None, b"", b"a1", [], {},
    ["k"], [""], ["a2"], {"code": "E", "message": "m"}, {"code": "E"},
])


@FAST
@given(st.sampled_from([*sorted(VALID), "reply-failed"]),
       st.dictionaries(st.sampled_from(sorted(WIRE_FIELDS - {"t"})), EDGE_VALUES | user_data,
                       max_size=3),
       st.sets(st.sampled_from(sorted(WIRE_FIELDS - {"t"})), max_size=2))
def test_mutated_frames_decode_or_fail_cleanly(
    t: str, replace: dict[str, Any], remove: set[str]
) -> None:
    frame = {**(REPLY_FAILED if t == "reply-failed" else VALID[t]), **replace}
    for name in remove:
        frame.pop(name, None)
    check_decode(P.pack(frame))
    try:
        P.decode(P.pack(frame))
    except P.ProtocolError as exc:
        if t in TYPES_WITH_ID:
            check_ref(exc, frame)


@pytest.mark.parametrize("value", BAD_ERRORS[1:])
def test_failed_reply_with_mistyped_error_is_bad_frame(value: Any) -> None:
    exc = expect_error(P.pack({**REPLY_FAILED, "error": value}))
    assert exc.code == "bad_frame"
    assert exc.ref == "q1"


@pytest.mark.parametrize(("name", "value"), MISTYPED_HELLO,
                         ids=[f"{f}={v!r:.20}" for f, v in MISTYPED_HELLO])
def test_mistyped_hello_field_is_bad_hello(name: str, value: Any) -> None:
    exc = expect_error(P.pack({**VALID["hello"], name: value}))
    assert exc.code == "bad_hello", f"hello.{name}={value!r}: {exc.code} ({exc.message})"


@pytest.mark.parametrize("agent_id", ["a", "x" * 128, "A-Z.a_z:0@9", "node-1.example.com"])
def test_hello_accepts_valid_agent_ids(agent_id: str) -> None:
    frame = P.decode(P.pack({**VALID["hello"], "agent": agent_id}))
    assert isinstance(frame, P.HelloFrame)
    assert frame.agent == agent_id


def test_optional_fields_may_be_nil_or_absent() -> None:
    hello = P.decode(P.pack({"t": "hello", "v": 1, "agent": "a1"}))
    assert hello == P.HelloFrame(v=1, agent="a1")
    assert P.decode(P.pack({**VALID["hello"], "meta": None, "subs": None})) == P.HelloFrame(
        v=1, agent="a1")
    cmd = P.decode(P.pack({**VALID["cmd"], "deadline": None}))
    assert isinstance(cmd, P.CmdFrame)
    assert cmd.deadline is None
    event = P.decode(P.pack({"t": "event", "key": "k", "data": None}))
    assert event == P.EventFrame("k", None)
    emit = P.decode(P.pack({"t": "emit", "key": "k", "data": None, "to": None}))
    assert emit == P.EmitFrame("k", None)
    call = P.decode(P.pack({**VALID["call"], "timeout": None}))
    assert isinstance(call, P.CallFrame)
    assert call.timeout is None


@FAST
@given(st.text(max_size=40).filter(lambda t: t not in PROTOCOL_TYPES),
       st.none() | ids | ints64)
@example("", "c1")
@example("HELLO", None)
@example("ack ", "c1")
def test_unknown_type_is_unknown_type(t: str, frame_id: Any) -> None:
    frame: dict[str, Any] = {"t": t, "data": 1}
    if frame_id is not None:
        frame["id"] = frame_id
    exc = expect_error(P.pack(frame))
    assert exc.code == "unknown_type"
    check_ref(exc, frame)


@pytest.mark.parametrize("t", [None, 5, 1.5, True, b"ack", ["ack"], {"t": "ack"}])
def test_non_string_type_is_bad_frame(t: Any) -> None:
    exc = expect_error(P.pack({"t": t, "id": "c1"}))
    assert exc.code == "bad_frame"
    assert exc.ref == "c1"


def test_map_without_type_is_bad_frame() -> None:
    exc = expect_error(P.pack({"id": "c1", "data": 1}))
    assert exc.code == "bad_frame"
    assert exc.ref == "c1"


@pytest.mark.parametrize("value", [None, 1, "ack", b"\x81\xa1t", [{"t": "ack", "id": "c1"}],
                                   1.5, True, msgpack.ExtType(1, b"x")])
def test_non_map_is_bad_frame(value: Any) -> None:
    assert expect_error(P.pack(value)).code == "bad_frame"


@FAST
@given(st.sampled_from([*sorted(VALID), "reply-failed"]),
       st.dictionaries(st.text(max_size=12).filter(lambda k: k not in WIRE_FIELDS), user_data,
                       max_size=5))
def test_unknown_extra_fields_are_ignored(t: str, extra: dict[str, Any]) -> None:
    base = REPLY_FAILED if t == "reply-failed" else VALID[t]
    assert P.decode(P.pack({**base, **extra})) == P.decode(P.pack(base))


@FAST
@given(st.sampled_from(sorted(t for t, fs in REQUIRED.items() if "id" in fs and len(fs) > 1)),
       ids | st.integers(min_value=-(2**63), max_value=2**63))
def test_ref_echoes_the_id_of_a_bad_frame(t: str, frame_id: Any) -> None:
    # Break the frame in a field other than ``id``: ``ref`` must name it.
    other = next(f for f in REQUIRED[t] if f != "id")
    frame = {**VALID[t], "id": frame_id}
    del frame[other]
    exc = expect_error(P.pack(frame))
    if isinstance(frame_id, int) or echoable(frame_id):
        assert exc.ref == frame_id


# --------------------------------------------------------------------------
# Keys and agent ids


@pytest.mark.parametrize(("pattern", "key", "expected"), [
    ("job.done", "job.done", True),
    ("job.done", "job.done.x", False),
    ("job.done", "job", False),
    ("job.*", "job.done", True),
    ("job.*", "job.done.later", True),
    ("job.*", "job.", True),
    ("job.*", "job", False),
    ("job.*", "jobs.done", False),
    ("job.*", "other.job.done", False),
    ("*", "anything", True),
    ("*", "", True),
    ("job", "job.*", False),
    ("Job.*", "job.done", False),
])
def test_key_matches(pattern: str, key: str, expected: bool) -> None:
    assert P.key_matches(pattern, key) is expected


@FAST
@given(st.text(max_size=20).filter(lambda s: not s.endswith("*")), st.text(max_size=20))
def test_key_matches_properties(prefix: str, rest: str) -> None:
    # A pattern without a trailing ``*`` matches only itself.
    assert P.key_matches(prefix, prefix)
    assert P.key_matches(prefix, prefix + rest) is (rest == "")
    # ``prefix*`` matches every key starting with ``prefix``.
    assert P.key_matches(prefix + "*", prefix + rest)


@pytest.mark.parametrize(("key", "expected"), [
    ("agent-connected", True),
    ("agent-disconnected", True),
    ("internal.", True),
    ("internal.db.error", True),
    ("internal", False),
    ("internalx", False),
    ("Internal.x", False),
    ("agent-connected.x", False),
    ("my.agent-connected", False),
    ("job.done", False),
    ("", False),
])
def test_is_reserved_key(key: str, expected: bool) -> None:
    assert P.is_reserved_key(key) is expected


@FAST
@given(st.text(max_size=30))
def test_internal_prefix_is_always_reserved(rest: str) -> None:
    assert P.is_reserved_key("internal." + rest)


@FAST
@given(st.text(alphabet=ID_ALPHABET, min_size=1, max_size=128))
def test_valid_agent_ids(agent_id: str) -> None:
    assert P.is_valid_agent_id(agent_id)


@FAST
@given(st.text(alphabet=ID_ALPHABET, max_size=128), st.characters().filter(
    lambda c: c not in ID_ALPHABET), st.text(alphabet=ID_ALPHABET, max_size=10))
def test_agent_ids_with_another_character_are_invalid(head: str, bad: str, tail: str) -> None:
    assert not P.is_valid_agent_id(head + bad + tail)


@pytest.mark.parametrize("value", [
    "", "x" * 129, "a b", "a\n", "\na", "é", "\u0661", "\uff41", "a/b", "a*", "a#b",
    None, 5, b"a1", ["a1"],
])
def test_invalid_agent_ids(value: Any) -> None:
    assert not P.is_valid_agent_id(value)


def test_agent_id_length_bounds() -> None:
    assert P.is_valid_agent_id("a")
    assert P.is_valid_agent_id("a" * 128)
    assert not P.is_valid_agent_id("a" * 129)
