"""The hub's own WebSocket framing on the hot path (``dispatcher.ws_fastpath``).

Once an agent is attached, the hub splits the byte stream into frames itself and
applies answers straight from ``data_received``; websockets still gets every
other frame whole. These tests send hand-made byte streams (mixed frame kinds,
fragments, pings, a close, frames cut at every byte) over a real socket and
check that everything is applied once, in order, with websockets' behaviour for
what is not an answer. Both store engines.
"""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any

import pytest
from websockets.frames import Frame, Opcode

from agent_client.protocol import pack
from dispatcher import Dispatcher
from dispatcher.ws_fastpath import AgentConnection, binary_header

from ..conftest import ws_url
from ..support import FAST_PATH, FAST_PATH_RELEASE, WAIT, RawAgent, wait_for

HubFactory = Any

# Everything here is about the fast path: nothing to test with it off, or on a
# websockets release it does not support (before 16; docs/deployment.md). A
# newer release that breaks it fails test_answers_are_read_by_the_hub_itself.
pytestmark = [
    pytest.mark.fallback,
    pytest.mark.skipif(not FAST_PATH, reason="websockets fast path off "
                       "(DISPATCHER_TEST_WS_FAST_PATH=0)"),
    pytest.mark.skipif(not FAST_PATH_RELEASE, reason="websockets < 16 has no fast path"),
]


def masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One client frame (masked, as RFC 6455 requires from clients)."""
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += struct.pack("!BH", 0x80 | 126, n)
    else:
        head += struct.pack("!BQ", 0x80 | 127, n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def binary(frame: dict[str, Any]) -> bytes:
    return masked(0x2, pack(frame))


async def write(agent: RawAgent, data: bytes) -> None:
    agent.ws.transport.write(data)
    await asyncio.sleep(0)


def hub_connection(hub: Dispatcher, agent_id: str) -> AgentConnection:
    session: Any = hub._connections.get(agent_id)
    assert session is not None
    ws = session.ws
    assert isinstance(ws, AgentConnection)
    return ws


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_server_frame_header_is_what_websockets_writes(size: int) -> None:
    data = b"x" * size
    expected = Frame(Opcode.BINARY, data).serialize(mask=False, extensions=[])
    assert binary_header(size) + data == expected


async def test_answers_are_read_by_the_hub_itself(make_hub: HubFactory) -> None:
    """The fast path is on once attached (a websockets release that changes the
    internals it relies on turns it off: this test says so)."""
    hub = await make_hub()
    assert hub._agents_server.fast_path, hub._agents_server.fast_path_reason
    agent, _ = await RawAgent.hello(ws_url(hub), "quick")
    handle = hub.execute_on_agent("quick", "work", 1)
    cmd = await agent.recv_type("cmd")
    await agent.send({"t": "result", "id": cmd["id"], "data": "done"})
    assert await asyncio.wait_for(handle, WAIT) == "done"
    assert hub_connection(hub, "quick")._split
    await agent.close()


async def test_a_mixed_stream_in_one_write(make_hub: HubFactory) -> None:
    """Results, a ping, a text frame, a fragmented message and a close in one
    write: each is handled as websockets would, in order."""
    hub = await make_hub()
    agent, _ = await RawAgent.hello(ws_url(hub), "mixed")
    handles = [hub.execute_on_agent("mixed", "work", i) for i in range(3)]
    cmds = [await agent.recv_type("cmd") for _ in handles]
    first_half, second_half = pack({"t": "result", "id": cmds[1]["id"], "data": 1})[:3], \
        pack({"t": "result", "id": cmds[1]["id"], "data": 1})[3:]
    stream = b"".join([
        binary({"t": "result", "id": cmds[0]["id"], "data": 0}),
        masked(0x9, b"are you there"),  # ping
        masked(0x1, b"text is not allowed"),  # text: error frame, connection stays
        masked(0x2, first_half, fin=False),  # a fragmented binary message
        masked(0x0, second_half, fin=True),
        binary({"t": "result", "id": cmds[2]["id"], "data": 2}),
    ])
    pongs = asyncio.get_running_loop().create_future()
    agent.ws.acknowledge_pings = lambda data: pongs.done() or pongs.set_result(bytes(data))
    await write(agent, stream)
    assert [await asyncio.wait_for(h, WAIT) for h in handles] == [0, 1, 2]
    assert hub_connection(hub, "mixed")._split
    error = await agent.recv_type("error")
    assert error["code"] == "bad_frame"
    assert await asyncio.wait_for(pongs, WAIT) == b"are you there"
    # A close after the answers: websockets answers it and the agent leaves.
    await write(agent, masked(0x8, struct.pack("!H", 1000) + b"bye"))
    code, _ = await agent.closed()
    assert code == 1000
    await wait_for(lambda: hub._connections.get("mixed") is None, what="the agent to leave")


async def test_frames_cut_at_every_byte(make_hub: HubFactory) -> None:
    """A stream that arrives one byte at a time is reassembled (both for the
    frames read here and for websockets' ones)."""
    hub = await make_hub()
    agent, _ = await RawAgent.hello(ws_url(hub), "slow")
    handles = [hub.execute_on_agent("slow", "work", i) for i in range(3)]
    cmds = [await agent.recv_type("cmd") for _ in handles]
    big = "y" * 70_000  # a 64-bit length
    stream = b"".join([
        binary({"t": "result", "id": cmds[0]["id"], "data": big}),
        masked(0x9, b"ping"),
        binary({"t": "result", "id": cmds[1]["id"], "data": 1}),
        binary({"t": "result", "id": cmds[2]["id"], "data": "z" * 300}),  # 16-bit length
    ])
    # The first and last 2,000 bytes a byte at a time (every header and the
    # small frames cut everywhere), the long middle in odd-sized chunks.
    head, middle, tail = stream[:2000], stream[2000:-2000], stream[-2000:]
    pieces = [head[i:i + 1] for i in range(len(head))]
    pieces += [middle[i:i + 997] for i in range(0, len(middle), 997)]
    pieces += [tail[i:i + 1] for i in range(len(tail))]
    for piece in pieces:
        await write(agent, piece)
    results = [await asyncio.wait_for(h, WAIT) for h in handles]
    assert results == [big, 1, "z" * 300]
    assert hub_connection(hub, "slow")._split
    await agent.close()


async def test_progress_before_its_result_stays_before_it(make_hub: HubFactory) -> None:
    """A frame left to the connection's task holds back the answers behind it:
    progress then result in one write reach the caller in that order."""
    hub = await make_hub()
    agent, _ = await RawAgent.hello(ws_url(hub), "ordered")
    handle = hub.execute_on_agent("ordered", "work", None)
    updates: list[Any] = []

    async def follow() -> None:
        async for update in handle.progress():
            updates.append(update)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0)  # the iterator is waiting
    cmd = await agent.recv_type("cmd")
    await write(agent, b"".join([
        binary({"t": "progress", "id": cmd["id"], "data": {"pct": 50}}),
        binary({"t": "result", "id": cmd["id"], "data": "ok"}),
    ]))
    assert await asyncio.wait_for(handle, WAIT) == "ok"
    await asyncio.wait_for(follower, WAIT)
    assert updates == [{"pct": 50}]
    await agent.close()


async def test_a_frame_over_max_frame_still_closes_with_1009(make_hub: HubFactory) -> None:
    hub = await make_hub(max_frame=4096)
    agent, _ = await RawAgent.hello(ws_url(hub), "greedy")
    handle = hub.execute_on_agent("greedy", "work", 1)
    cmd = await agent.recv_type("cmd")
    await agent.send({"t": "result", "id": cmd["id"], "data": 1})  # fast path on
    assert await asyncio.wait_for(handle, WAIT) == 1
    await write(agent, binary({"t": "result", "id": "x", "data": "a" * 5000})[:100])
    code, _ = await agent.closed()
    assert code == 1009


async def _fast_path_on(hub: Dispatcher, agent: RawAgent, agent_id: str) -> None:
    handle = hub.execute_on_agent(agent_id, "warm", None)
    cmd = await agent.recv_type("cmd")
    await agent.send({"t": "result", "id": cmd["id"], "data": "warm"})
    assert await asyncio.wait_for(handle, WAIT) == "warm"
    assert hub_connection(hub, agent_id)._split


async def test_nothing_after_a_close_frame_is_applied(make_hub: HubFactory) -> None:
    """RFC 6455, 1.4: data after the peer's Close is discarded, even in the same read."""
    hub = await make_hub()
    agent, _ = await RawAgent.hello(ws_url(hub), "closer")
    await _fast_path_on(hub, agent, "closer")
    handle = hub.execute_on_agent("closer", "work", 1)
    cmd = await agent.recv_type("cmd")
    await write(agent, masked(0x8, struct.pack("!H", 1000) + b"bye")
                + binary({"t": "result", "id": cmd["id"], "data": "after close"}))
    assert (await agent.closed())[0] == 1000
    await wait_for(lambda: hub._connections.get("closer") is None, what="the agent to leave")
    stored = await hub.get_command(handle.id)
    assert stored is not None and stored.status != "COMPLETE"


@pytest.mark.parametrize("bad", ["reserved_bit", "inside_a_fragmented_message"])
async def test_nothing_after_a_protocol_error_is_applied(make_hub: HubFactory,
                                                         bad: str) -> None:
    """A frame websockets rejects (1002) ends what is applied, in the same read too;
    a final binary frame inside a fragmented message is such a frame."""
    hub = await make_hub()
    agent, _ = await RawAgent.hello(ws_url(hub), "broken")
    await _fast_path_on(hub, agent, "broken")
    handle = hub.execute_on_agent("broken", "work", 1)
    cmd = await agent.recv_type("cmd")
    result = binary({"t": "result", "id": cmd["id"], "data": "too late"})
    if bad == "reserved_bit":
        stream = bytes([0xC2]) + masked(0x2, b"\x80")[1:] + result  # RSV1 without extension
    else:
        first = pack({"t": "ack", "id": cmd["id"]})
        stream = masked(0x2, first[:2], fin=False) + result + masked(0x0, first[2:])
    await write(agent, stream)
    assert (await agent.closed())[0] == 1002
    await wait_for(lambda: hub._connections.get("broken") is None, what="the agent to leave")
    stored = await hub.get_command(handle.id)
    assert stored is not None and stored.status != "COMPLETE"


async def test_frames_left_to_the_task_count_once_against_the_rate(make_hub: HubFactory) -> None:
    """``max_frame_rate`` counts each frame once, whichever path applies it."""
    hub = await make_hub(max_frame_rate=20)
    agent, _ = await RawAgent.hello(ws_url(hub), "steady")
    handle = hub.execute_on_agent("steady", "work", None)
    updates: list[Any] = []

    async def follow() -> None:
        async for update in handle.progress():
            updates.append(update)

    follower = asyncio.create_task(follow())
    cmd = await agent.recv_type("cmd")
    await agent.send({"t": "ack", "id": cmd["id"]})  # splitting from here on
    await wait_for(lambda: hub_connection(hub, "steady")._split, what="the fast path")
    # 1 + 12 + 1 frames: within a bucket of 20 if each counts once. One at a
    # time, so that each is offered to the inline path before the task gets it.
    for i in range(12):
        await write(agent, binary({"t": "progress", "id": cmd["id"], "data": i}))
        await wait_for(lambda i=i: len(updates) > i, what=f"progress {i}")
    await write(agent, binary({"t": "result", "id": cmd["id"], "data": "done"}))
    assert await asyncio.wait_for(handle, WAIT) == "done"
    await asyncio.wait_for(follower, WAIT)
    assert updates == list(range(12))
    await agent.close()
