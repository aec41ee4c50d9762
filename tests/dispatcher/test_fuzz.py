"""Hostile input against a live hub (docs/protocol.md, Errors).

"The hub never crashes, leaks a task, or loses other agents' work because of
what one connection sends." Hypothesis generates whole WebSocket messages
(known and unknown frame types, fields of every msgpack type, deep nesting,
frames close to ``max_frame``, raw bytes, text) and sends them from hostile
connections, before and after their handshake, while a well-behaved agent keeps
executing commands. Each example runs on a fresh in-memory hub in its own
event loop. A second test floods the hub from another process and measures a
good agent's command latency before, during and after; a third checks, without
timing anything, that one connection's burst is handled in slices.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import sys
import time
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from websockets.exceptions import ConnectionClosed

from dispatcher import Dispatcher, agent_token
from dispatcher.transport import FAIR_SLICE

from ..support import WAIT, RawAgent, hub_config, pack, wait_for

SECRET = "fuzz-secret"
MAX_FRAME = 256 * 1024
HELD = "held-cmd-1"  # the good agent's command in flight during every example
AGENT_IDS = ["good", "evil", "ghost", "probe", "evil2"]
KNOWN_TYPES = ["hello", "welcome", "cmd", "ack", "progress", "result", "fail", "cancel",
               "event", "received", "emit", "sub", "unsub", "call", "reply", "error"]
# Overall bound for the fuzz test: later examples pass untried once it is spent.
FUZZ_BUDGET = 10.0

# -- strategies -----------------------------------------------------------------------------

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(),  # NaN and infinities too
    st.text(max_size=40),
    st.binary(max_size=40),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)),
)
map_keys = st.one_of(st.text(max_size=12), st.integers(-3, 3), st.binary(max_size=4),
                     st.none(), st.booleans(), st.floats(allow_nan=False))
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=6),
                               st.dictionaries(map_keys, children, max_size=6)),
    max_leaves=25,
)
ids = st.one_of(st.sampled_from([HELD, "x1", ""]), st.text(max_size=140), values)
agents = st.one_of(st.sampled_from(AGENT_IDS), st.text(max_size=140), values)
keys = st.one_of(
    st.sampled_from(["news", "echo", "hold", "*", "", "internal.db.error", "internal.*",
                     "agent-connected", "agent-disconnected", "job.*"]),
    st.text(max_size=300), values)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "v": st.one_of(st.just(1), ints, values),
    "id": ids,
    "agent": agents,
    "token": st.one_of(st.none(), st.text(max_size=80), values),
    "key": keys,
    "keys": st.one_of(st.lists(keys, max_size=5), values),
    "subs": st.one_of(st.lists(keys, max_size=5), values),
    "to": st.one_of(st.lists(agents, max_size=5), values),
    "error": st.one_of(st.fixed_dictionaries({"code": st.text(max_size=20),
                                              "message": st.text(max_size=20)},
                                             optional={"data": values}), values),
    "timeout": st.one_of(st.floats(), ints, values),
    **{name: values for name in ("data", "payload", "meta", "ref", "ts", "deadline", "code",
                                 "message", "ok", "session", "hub", "heartbeat", "from")},
}
frame_types = st.one_of(st.sampled_from(KNOWN_TYPES), st.text(max_size=12), scalars)
frames = st.builds(
    lambda extra, fields: {**extra, **fields},
    st.dictionaries(st.text(max_size=8), values, max_size=3),
    st.fixed_dictionaries({"t": frame_types}, optional=FIELDS),
)



def _with(frame: dict[str, Any], **optional: Any) -> dict[str, Any]:
    return {**frame, **{k: v for k, v in optional.items() if v is not None}}


# Frames that parse, with hostile values: other agents' command ids, reserved keys,
# offline or own ids as targets, tiny timeouts, hub-only types.
ref_ids = st.one_of(st.sampled_from([HELD, "x1", "nope"]), st.text(min_size=1, max_size=128))
event_keys = st.one_of(
    st.sampled_from(["news", "job.*", "*", "internal.db.error", "agent-connected"]),
    st.text(min_size=1, max_size=256))
targets = st.lists(st.sampled_from(AGENT_IDS), max_size=6)
error_maps = st.fixed_dictionaries(
    {"code": st.text(min_size=1, max_size=30), "message": st.text(max_size=60)},
    optional={"data": values})
well_formed = st.one_of(
    st.builds(lambda i: {"t": "ack", "id": i}, ref_ids),
    st.builds(lambda i, d: {"t": "progress", "id": i, "data": d}, ref_ids, values),
    st.builds(lambda i, d: {"t": "result", "id": i, "data": d}, ref_ids, values),
    st.builds(lambda i, e: {"t": "fail", "id": i, "error": e}, ref_ids, error_maps),
    st.builds(lambda i: {"t": "received", "id": i}, ref_ids),
    st.builds(lambda k, d, to: _with({"t": "emit", "key": k, "data": d}, to=to),
              event_keys, values, st.none() | targets),
    st.builds(lambda t, ks: {"t": t, "keys": ks}, st.sampled_from(["sub", "unsub"]),
              st.lists(event_keys, max_size=5)),
    st.builds(lambda i, a, k, p, tmo: _with({"t": "call", "id": i, "agent": a, "key": k,
                                             "payload": p}, timeout=tmo),
              ref_ids, st.sampled_from(AGENT_IDS), event_keys, values,
              st.none() | st.floats(0.001, 10)),
    st.builds(lambda a, tok: {"t": "hello", "v": 1, "agent": a, "token": tok},
              st.sampled_from(AGENT_IDS), st.none() | st.text(max_size=64)),
    st.builds(lambda t, i, k: {"t": t, "id": i, "key": k, "data": None, "payload": None,
                               "ts": 0, "ok": True, "code": "x", "message": "m"},
              st.sampled_from(["cmd", "cancel", "event", "reply", "error", "welcome"]),
              ref_ids, event_keys),
)


def deep(t: str, depth: int, container: str) -> bytes:
    """A ``t`` frame whose ``data`` nests ``depth`` arrays or maps (for ``HELD``)."""
    head = (b"\x84" + pack("t") + pack(t) + pack("id") + pack(HELD) + pack("key") + pack("news")
            + pack("data"))
    level = b"\x91" if container == "array" else b"\x81" + pack("k")
    return head + level * depth + b"\xc0"


def big(t: str, size: int, seed: int) -> bytes:
    """A frame whose payload makes it ``size`` bytes or a little more."""
    data = random.Random(seed).randbytes(size)
    return pack({"t": t, "id": HELD, "key": "news", "data": data, "payload": None})


def with_data(t: str, data: bytes) -> bytes:
    """A ``t`` frame for ``HELD`` whose ``data`` is the raw msgpack ``data``."""
    return (b"\x84" + pack("t") + pack(t) + pack("id") + pack(HELD) + pack("key")
            + pack("news") + pack("data") + data)


CRAFTED = [
    b"\x80",  # {}
    b"\xc1",  # never used
    b"\x81\xa1t",  # truncated map
    b"\xdb\xff\xff\xff\xff" + b"x" * 10,  # str32 claiming 4 GiB
    b"\xdd\xff\xff\xff\xff",  # array32 claiming 4G items
    b"\xdf\xff\xff\xff\xff",  # map32 claiming 4G pairs
    b"\x81\x91\x01\x01",  # a map whose key is an array (unhashable)
    b"\x81\x81\x01\x01\x01",  # a map whose key is a map
    pack({"t": "result", "id": HELD, "data": 1}) + b"\x00",  # trailing byte
    with_data("result", b"\xc7\x03\xffabc"),  # a timestamp ext of an impossible length
    with_data("emit", b"\xd6\xff\x00\x00\x00\x01"),  # a valid timestamp, as data
    with_data("emit", b"\xc7\x02\x05ab"),  # an unknown ext type, as data
    pack({"t": "hello", "v": 1, "agent": "good", "token": agent_token("other", "good")}),
    pack({"t": "emit", "key": "news", "data": 1, "to": ["good"] * 2000}),
    pack({"t": "sub", "keys": [f"k{i}" for i in range(1500)]}),
    pack({"t": "call", "id": "c", "agent": "good", "key": "echo", "payload": 1,
          "timeout": 1e-9}),
    pack({"t": "call", "id": "c", "agent": "good", "key": "echo", "payload": 1, "timeout": 1e300}),
    "{\"t\": \"ack\", \"id\": \"" + HELD + "\"}",
    b"x" * (MAX_FRAME + 1),  # over max_frame: closed with 1009
]

messages: st.SearchStrategy[bytes | str] = st.one_of(
    well_formed.map(pack),
    well_formed.map(pack),
    well_formed.map(pack),
    frames.map(pack),
    frames.map(pack),
    st.dictionaries(map_keys, values, max_size=5).map(pack),  # maps without a usable t
    values.map(pack),  # any msgpack value, mostly not a map
    st.binary(max_size=120),  # raw bytes
    st.text(max_size=120),  # text messages
    st.builds(deep, st.sampled_from(["result", "emit", "progress", "zz"]),
              st.integers(1, 5000), st.sampled_from(["array", "map"])),
    st.builds(big, st.sampled_from(["result", "emit", "progress", "call", "zz"]),
              st.integers(1024, MAX_FRAME - 1024), st.integers(0, 2**32)),
    st.sampled_from(CRAFTED),
)


# -- the well-behaved agent ------------------------------------------------------------------


class GoodAgent:
    """Answers every command with its payload, except ``HELD``, which it only acks."""

    def __init__(self, raw: RawAgent) -> None:
        self.raw = raw
        self.held = asyncio.Event()
        self.commands = 0

    async def serve(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = await self.raw.recv(timeout=3600)
                if frame["t"] != "cmd":
                    if frame["t"] == "event" and "id" in frame:
                        await self.raw.send({"t": "received", "id": frame["id"]})
                    continue
                self.commands += 1
                if frame["id"] == HELD:
                    await self.raw.send({"t": "ack", "id": HELD})
                    self.held.set()
                else:
                    await self.raw.send({"t": "result", "id": frame["id"],
                                         "data": frame["payload"]})


async def hostile_hello(url: str, agent_id: str = "evil") -> RawAgent:
    raw, _ = await RawAgent.hello(url, agent_id, token=agent_token(SECRET, agent_id))
    return raw


async def settle(raw: RawAgent, url: str, mark: int) -> RawAgent:
    """Make sure the hub applied everything ``raw`` sent: a marker frame's answer
    comes back after every earlier frame's (the memory engine applies them in order)."""
    ref = f"marker-{mark}"
    for _ in range(2):
        try:
            await raw.send({"t": "ack", "id": ref})
            async with asyncio.timeout(WAIT):
                while True:
                    frame = await raw.recv(WAIT)
                    if frame["t"] == "error" and frame.get("ref") == ref:
                        assert frame["code"] == "unknown_command", frame
                        return raw
        except ConnectionClosed:
            raw = await hostile_hello(url)
    raise AssertionError("the hostile connection could not be settled")


async def run_example(pre: list[bytes | str], post: list[bytes | str]) -> None:
    config = hub_config(port=0, admin_port=None, agent_secret=SECRET, max_frame=MAX_FRAME,
                       heartbeat=5.0, hello_timeout=2.0, command_timeout=5.0)
    with capture_logs() as logs:
        async with Dispatcher(config) as hub:
            url = f"ws://127.0.0.1:{hub.port}/ws"
            raw_good, _ = await RawAgent.hello(url, "good", token=agent_token(SECRET, "good"),
                                               subs=["*"])
            good = GoodAgent(raw_good)
            serving = asyncio.create_task(good.serve())
            held = hub.execute_on_agent("good", "hold", {"held": True}, command_id=HELD,
                                        timeout=30)
            async with asyncio.timeout(WAIT):
                await good.held.wait()

            async def active() -> bool:
                info = await hub.get_command(HELD)
                return info is not None and info.status == "ACTIVE"

            await wait_for(active, what="the held command to be ACTIVE")
            progress: list[Any] = []

            async def follow() -> None:
                async for update in held.progress():
                    progress.append(update)

            following = asyncio.create_task(follow())
            baseline = len(asyncio.all_tasks())

            # Before their handshake: every first message that is not a good hello
            # ends the connection with the close code docs/protocol.md names.
            for message in pre:
                raw = await RawAgent.connect(url)
                with contextlib.suppress(ConnectionClosed):
                    await raw.send_raw(message)
                code, _ = await raw.closed()
                assert code in (4400, 4401, 1009), (code, message[:200])

            # After it: everything else, while the good agent keeps working.
            evil = await hostile_hello(url)
            expected: list[tuple[Any, Any]] = []
            for i, message in enumerate(post):
                if i % 2 == 0:
                    payload = {"n": i, "blob": b"\x01" * i}
                    expected.append((payload, hub.execute_on_agent("good", "echo", payload,
                                                                   timeout=WAIT)))
                try:
                    await evil.send_raw(message)
                except ConnectionClosed:
                    evil = await hostile_hello(url)  # closed by the hub (1009): come back
            evil = await settle(evil, url, len(post))

            # The good agent's commands all completed, with the right results.
            for payload, handle in expected:
                assert await handle.result(WAIT) == payload
            assert good.commands >= len(expected) + 1
            # Its command in flight is untouched by anything the others sent ...
            info = await hub.get_command(HELD)
            assert info is not None and (info.status, info.agent_id) == ("ACTIVE", "good")
            assert not held.done()
            # ... and completes with its own progress and answer, nobody else's.
            await raw_good.send({"t": "progress", "id": HELD, "data": "mine"})
            await raw_good.send({"t": "result", "id": HELD, "data": "kept"})
            assert await held.result(WAIT) == "kept"
            async with asyncio.timeout(WAIT):
                await following
            assert progress == ["mine"]

            # The hub still serves newcomers.
            probe = await hostile_hello(url, "probe")
            handle = hub.execute_on_agent("probe", "echo", 1, timeout=WAIT)
            cmd = await probe.recv_type("cmd")
            await probe.send({"t": "result", "id": cmd["id"], "data": 2})
            assert await handle.result(WAIT) == 2

            # Once the hostile connections are gone, nothing of theirs is left.
            await evil.close()
            await probe.close()
            await wait_for(lambda: hub._connections.ids() == ["good"],
                           what="the hostile connections to be gone")
            await wait_for(lambda: len(asyncio.all_tasks()) <= baseline,
                           what=f"the task count to settle back to {baseline}")
            await wait_for(lambda: not hub._commands.waiting_ids(), what="no command left waiting")
            assert hub._connections.get("good") is not None
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
    failures = [e for e in logs if e.get("log_level") in ("error", "critical")]
    assert not failures, failures


_budget: dict[str, Any] = {"started": 0.0, "failed": False}


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.large_base_example])
@given(pre=st.lists(messages, max_size=3), post=st.lists(messages, min_size=1, max_size=25))
@example(pre=CRAFTED[:3], post=CRAFTED)
@example(pre=[], post=[pack({"t": "ack", "id": HELD}),
                       pack({"t": "progress", "id": HELD, "data": "forged"}),
                       pack({"t": "result", "id": HELD, "data": "forged"}),
                       pack({"t": "fail", "id": HELD, "error": {"code": "x", "message": "m"}})])
@example(pre=[], post=[deep("result", 1023, "array"), deep("emit", 1023, "map"),
                       deep("emit", 1024, "array"), big("emit", MAX_FRAME - 1024, 1)])
@pytest.mark.timeout(120)
def test_fuzzed_frames_never_hurt_the_hub_or_a_good_agent(
    pre: list[bytes | str], post: list[bytes | str]
) -> None:
    if not _budget["started"]:
        _budget["started"] = time.monotonic()
    if time.monotonic() - _budget["started"] > FUZZ_BUDGET and not _budget["failed"]:
        return  # the time budget: the remaining examples pass untried
    try:
        asyncio.run(asyncio.wait_for(run_example(pre, post), 30))
    except BaseException:
        _budget["failed"] = True  # shrinking replays examples: no budget from now on
        raise


# -- flood from another process ----------------------------------------------------------

FLOODER = r"""
import asyncio, sys, time
import msgpack
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

url, token, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
stats = {"frames": 0, "handshakes": 0}
pack = lambda o: msgpack.packb(o, use_bin_type=True)
BAD = [b"\xc1", b"not msgpack", pack([1, 2]), pack({"t": "nope", "id": "x"}),
       pack({"t": "result", "id": "nobody"}), pack({"t": "ack", "id": "nobody"}),
       pack({"t": "emit", "key": "spam", "data": "x" * 200}),
       pack({"t": "emit", "key": "internal.x", "data": 1}),
       pack({"t": "sub", "keys": ["spam"]}), "text frame"]

async def drain(ws):
    try:
        async for _ in ws:
            pass
    except ConnectionClosed:
        pass

async def frames(end):
    while time.monotonic() < end:
        try:
            async with connect(url, compression=None, ping_interval=None,
                               max_queue=None) as ws:
                await ws.send(pack({"t": "hello", "v": 1, "agent": "flooder", "token": token}))
                reader = asyncio.ensure_future(drain(ws))
                while time.monotonic() < end:
                    for message in BAD:
                        await ws.send(message)
                    stats["frames"] += len(BAD)
                    await asyncio.sleep(0)
                reader.cancel()
        except (ConnectionClosed, OSError, InvalidHandshake):
            pass

async def handshakes(end):
    while time.monotonic() < end:
        try:
            async with connect(url, compression=None, ping_interval=None,
                               open_timeout=2) as ws:
                await ws.send(pack({"t": "hello", "v": 1, "agent": "good", "token": "forged"}))
                await drain(ws)
        except (ConnectionClosed, OSError, InvalidHandshake, TimeoutError):
            pass
        stats["handshakes"] += 1

async def main():
    end = time.monotonic() + seconds
    print("flooding", flush=True)
    await asyncio.gather(frames(end), *(handshakes(end) for _ in range(4)))
    print(stats["frames"], stats["handshakes"], flush=True)

asyncio.run(main())
"""


def _refused_unauthorized(hub: Dispatcher) -> int:
    """Handshakes the hub refused as ``unauthorized`` (from its metrics)."""
    for line in hub.metrics.render().decode().splitlines():
        if line.startswith('dispatcher_connections_refused_total{code="unauthorized"}'):
            return int(float(line.split()[-1]))
    return 0


async def latencies(hub: Dispatcher, n: int | None = None, until: asyncio.Future[Any] | None = None
                    ) -> list[float]:
    """Run echo commands on ``good`` one after another; their round-trip times."""
    out: list[float] = []
    while (n is not None and len(out) < n) or (until is not None and not until.done()):
        start = time.perf_counter()
        payload = len(out)
        assert await hub.execute_on_agent("good", "echo", payload,
                                          timeout=WAIT).result(WAIT) == payload
        out.append(time.perf_counter() - start)
    return out


@pytest.mark.serial
async def test_a_flood_from_one_source_leaves_another_agents_latency_close_to_normal() -> None:
    config = hub_config(port=0, admin_port=None, agent_secret=SECRET, heartbeat=5.0)
    async with Dispatcher(config) as hub:
        url = f"ws://127.0.0.1:{hub.port}/ws"
        raw_good, _ = await RawAgent.hello(url, "good", token=agent_token(SECRET, "good"))
        good = GoodAgent(raw_good)
        serving = asyncio.create_task(good.serve())
        try:
            await latencies(hub, 20)  # warm up
            before = await latencies(hub, 200)

            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", FLOODER, url, agent_token(SECRET, "flooder"), "1.5",
                stdout=asyncio.subprocess.PIPE)
            assert proc.stdout is not None
            try:
                async with asyncio.timeout(15):
                    assert (await proc.stdout.readline()).strip() == b"flooding"
                    done = asyncio.ensure_future(proc.wait())
                    during = await latencies(hub, until=done)
                    stats = (await proc.stdout.read()).split()
            finally:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            after = await latencies(hub, 200)
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)

        frames_sent, handshakes = int(stats[0]), int(stats[1])
        refused = _refused_unauthorized(hub)
        p50 = {name: statistics.median(xs) for name, xs in
               (("before", before), ("during", during), ("after", after))}
        summary = (f"p50 ms {({k: round(v * 1000, 3) for k, v in p50.items()})}, "
                   f"max during {max(during) * 1000:.1f} ms, {len(during)} commands during; "
                   f"flood: {frames_sent} frames, {handshakes} handshakes "
                   f"({refused} refused unauthorized)")
        # The flood was real ...
        assert frames_sent > 5_000 and refused >= 5, summary
        # ... every command completed (latencies() checks each result) ...
        assert len(during) >= 10, summary
        # ... and the good agent's latency stayed close to normal. The baseline is
        # about 0.1 ms (hub and agent in one process), so the floors stand for "a few
        # loop turns on a machine busy with the flood and everything else"; the
        # test below checks the fairness that keeps it so without timing anything.
        assert p50["during"] < max(20 * p50["before"], 0.050), summary
        assert max(during) < 1.0, summary
        assert p50["after"] < max(5 * p50["before"], 0.010), summary
        assert hub._connections.get("good") is not None


async def test_a_burst_from_one_connection_is_handled_in_slices() -> None:
    """Thousands of frames queued at once are handled a slice at a time, with the
    other tasks running in between (without it, one connection held the loop for
    300-800 ms at a time under a flood and every other agent waited)."""
    async with Dispatcher(hub_config(port=0, admin_port=None)) as hub:
        noisy, _ = await RawAgent.hello(f"ws://127.0.0.1:{hub.port}/ws", "noisy")

        def handled() -> float:
            value = hub.metrics.registry.get_sample_value("dispatcher_frames_in_total",
                                                          {"type": "ack"})
            return value or 0.0

        # One write of n frames: they arrive together and are queued together. Each
        # is refused (unknown_command), which costs REFUSED_COST frames of the rate:
        # n stays within one second's worth.
        n = 1500
        frame = pack({"t": "ack", "id": "nobody"})  # answered by unknown_command
        for _ in range(n):
            noisy.ws.protocol.send_binary(frame)
        noisy.ws.transport.write(b"".join(noisy.ws.protocol.data_to_send()))
        steps: list[float] = []
        last = handled()
        async with asyncio.timeout(WAIT):
            while last < n:
                await asyncio.sleep(0)  # one turn of the loop
                now = handled()
                steps.append(now - last)
                last = now
        # The reader runs once per turn; this task may see two of its slices at once.
        assert max(steps) <= 2 * FAIR_SLICE, max(steps)
        assert len([s for s in steps if s]) >= n // (2 * FAIR_SLICE)
        noisy.ws.transport.abort()  # it never read its thousands of error frames
