"""Hostile peers: the bounds an authenticated agent meets (issue 13, defects 8, 9, 11).

A ``hello`` whose ``meta`` is nested too deep or too big is refused with
``bad_hello`` (4400) and the admin API keeps answering everyone; whatever an
older hub stored, the admin API renders it without a 500. ``emit.to`` is
bounded; frames queued for agents that are away are bounded in number of
queues (both engines) and bytes (in-memory engine), the oldest dropped first
and counted in ``/metrics``. A fragmented message is one frame for the hub;
more than websockets' fragment cap closes with 1009. Real hubs on port 0,
real WebSocket clients, the session's redis-server.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.messages import MAX_FRAGMENTS

from agent_client import Agent
from agent_client import protocol as P
from dispatcher import Dispatcher, HubConfig
from dispatcher.admin import MAX_JSON_DEPTH, TOO_DEEP
from dispatcher.models import AgentInfo
from dispatcher.store.base import Store
from dispatcher.store.memory import MemoryStore
from dispatcher.store.redis import RedisStore

from ..conftest import HubFactory, ws_url
from ..support import WAIT, RawAgent, pack, redis_fast_path, wait_for


@pytest.fixture
async def memory_hub() -> AsyncIterator[HubFactory]:
    """Hubs on the in-memory engine, for what only it or the transport decides."""
    hubs: list[Dispatcher] = []

    async def factory(**overrides: Any) -> Dispatcher:
        hub = Dispatcher(HubConfig(**{"port": 0, "admin_port": 0, "heartbeat": 5.0,
                                      "hello_timeout": 5.0, **overrides}))
        await hub.listen()
        hubs.append(hub)
        return hub

    yield factory
    for hub in hubs:
        await hub.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


async def get_json(http: aiohttp.ClientSession, hub: Dispatcher, path: str) -> tuple[int, Any]:
    async with http.get(f"http://127.0.0.1:{hub.admin_port}{path}") as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


async def dropped(http: aiohttp.ClientSession, hub: Dispatcher, reason: str) -> int:
    status, text = await get_json(http, hub, "/metrics")
    assert status == 200
    match = re.search(rf'^dispatcher_events_dropped_total{{reason="{reason}"}} (\S+)$', text,
                      re.MULTILINE)
    assert match, f"no dispatcher_events_dropped_total{{reason={reason!r}}} in /metrics"
    return int(float(match.group(1)))


def nested_map(depth: int, leaf: bytes = b"\xc0") -> bytes:
    """msgpack bytes of ``{"k": {"k": ... leaf}}``: ``depth`` single-key maps, by hand
    (msgpack's own packer refuses to nest this deep)."""
    return b"\x81\xa1k" * depth + leaf


def hello_with_meta(agent_id: str, meta: bytes) -> bytes:
    head = {"t": "hello", "v": 1, "agent": agent_id, "token": None}
    return b"\x85" + b"".join(pack(k) + pack(v) for k, v in head.items()) + pack("meta") + meta


async def refused_hello(hub: Dispatcher, message: bytes) -> dict[str, Any]:
    raw = await RawAgent.connect(ws_url(hub))
    await raw.send_raw(message)
    error = await raw.recv()
    code, _ = await raw.closed()
    assert code == P.CloseCode.BAD_HELLO, code
    return error


# -- defect 8: hello meta ------------------------------------------------------------------

@pytest.mark.parametrize("depth", [600, P.MAX_META_DEPTH + 1])
async def test_a_deeply_nested_meta_is_refused_at_hello_and_the_admin_api_still_answers(
        make_hub: HubFactory, http: aiohttp.ClientSession, depth: int) -> None:
    hub = await make_hub()
    good, _ = await RawAgent.hello(ws_url(hub), "good", meta={"v": "1.4"})
    error = await refused_hello(hub, hello_with_meta("evil", nested_map(depth)))
    assert error["t"] == "error" and error["code"] == "bad_hello", error
    assert str(P.MAX_META_DEPTH) in error["message"]
    for path in ("/agents", "/agents/good"):
        status, body = await get_json(http, hub, path)
        assert status == 200, (path, body)
    status, body = await get_json(http, hub, "/agents")
    assert [a["id"] for a in body] == ["good"]
    assert (await get_json(http, hub, "/agents/evil"))[0] == 404
    await good.close()


async def test_a_meta_at_the_depth_bound_is_accepted(make_hub: HubFactory) -> None:
    hub = await make_hub()
    raw = await RawAgent.connect(ws_url(hub))
    await raw.send_raw(hello_with_meta("deep-ok", nested_map(P.MAX_META_DEPTH, b"\x01")))
    assert (await raw.recv())["t"] == "welcome"
    info = await hub.get_agent("deep-ok")
    assert info is not None and isinstance(info.meta, dict)
    await raw.close()


async def test_an_oversized_meta_is_refused_at_hello(make_hub: HubFactory,
                                                   http: aiohttp.ClientSession) -> None:
    hub = await make_hub()
    meta = {"junk": "x" * P.MAX_META_BYTES}  # far under max_frame (1 MiB)
    error = await refused_hello(hub, pack({"t": "hello", "v": 1, "agent": "big", "token": None,
                                           "meta": meta}))
    assert error["code"] == "bad_hello" and str(P.MAX_META_BYTES) in error["message"], error
    # Wide rather than long: as many tiny values as bytes allowed.
    wide = {"w": [0] * P.MAX_META_BYTES}
    error = await refused_hello(hub, pack({"t": "hello", "v": 1, "agent": "wide", "token": None,
                                           "meta": wide}))
    assert error["code"] == "bad_hello", error
    status, body = await get_json(http, hub, "/agents")
    assert status == 200 and body == []


async def test_admin_api_renders_any_stored_value_without_a_500(
        make_hub: HubFactory, http: aiohttp.ClientSession) -> None:
    """Defence in depth: a meta an older hub stored (no bound at hello), and a command
    result nested as deep as msgpack allows, are rendered cut at MAX_JSON_DEPTH."""
    hub = await make_hub()
    deep: Any = 1
    for _ in range(500):  # msgpack's packer (the Redis engine stores packed) nests 511 at most
        deep = {"k": deep}
    await hub._store.register_agent(AgentInfo(id="old", hub_id=hub.hub_id, session="s",
                                              connected_at=1, last_seen=1, meta=deep))
    for path in ("/agents", "/agents/old"):
        status, body = await get_json(http, hub, path)
        assert status == 200, (path, body)
    status, body = await get_json(http, hub, "/agents/old")
    node = body["meta"]
    for _ in range(MAX_JSON_DEPTH - 1):
        node = node["k"]
    assert node == TOO_DEEP

    worker, _ = await RawAgent.hello(ws_url(hub), "worker")
    handle = hub.execute_on_agent("worker", "deep", None, timeout=WAIT)
    cmd = await worker.recv_type("cmd")
    data = b"\x91" * 500 + b"\x01"  # a result 500 arrays deep, as an agent may send it
    await worker.send_raw(b"\x83" + pack("t") + pack("result") + pack("id")
                          + pack(cmd["id"]) + pack("data") + data)
    await handle
    status, body = await get_json(http, hub, f"/commands/{cmd['id']}")
    assert status == 200, body
    await worker.close()


# -- defect 9: emit.to and the queues of agents that are away ------------------------------------

async def queued_keys(hub: Dispatcher, redis_url: str | None, prefix: str) -> int:
    """How many agents have frames queued (memory: the store's count; Redis: the keys)."""
    store = hub._store
    if isinstance(store, MemoryStore):
        return store.queue_count
    assert redis_url is not None
    client = aioredis.from_url(redis_url)
    try:
        return len([k async for k in client.scan_iter(match=f"{prefix}:agent:*:events")])
    finally:
        await client.aclose()


async def test_an_emit_to_over_the_bound_is_refused_and_changes_nothing(
        make_hub: HubFactory, request: pytest.FixtureRequest, engine: str, prefix: str) -> None:
    hub = await make_hub()
    redis_url = request.getfixturevalue("redis_url") if engine == "redis" else None
    sender, _ = await RawAgent.hello(ws_url(hub), "sender")
    targets = [f"ghost-{i}" for i in range(P.MAX_TARGETS + 1)]
    await sender.send({"t": "emit", "key": "k", "data": 1, "to": targets})
    error = await sender.recv_type("error")
    assert error["code"] == "bad_frame" and str(P.MAX_TARGETS) in error["message"], error
    assert await queued_keys(hub, redis_url, prefix) == 0
    # At the bound it is accepted (and the connection stayed usable).
    await sender.send({"t": "emit", "key": "k", "data": 1, "to": targets[:P.MAX_TARGETS]})

    async def all_queued() -> bool:
        return await queued_keys(hub, redis_url, prefix) == P.MAX_TARGETS

    await wait_for(all_queued, what="an emit to MAX_TARGETS ids to be queued for each")
    await sender.close()


async def test_queues_of_never_seen_agents_are_bounded_in_number(
        make_hub: HubFactory, http: aiohttp.ClientSession, request: pytest.FixtureRequest,
        engine: str, prefix: str) -> None:
    limit, rounds, width = 50, 4, 100
    hub = await make_hub(max_offline_queues=limit)
    redis_url = request.getfixturevalue("redis_url") if engine == "redis" else None
    sender, _ = await RawAgent.hello(ws_url(hub), "sender")
    for r in range(rounds):
        await sender.send({"t": "emit", "key": "k", "data": r,
                           "to": [f"ghost-{r}-{i}" for i in range(width)]})
    total = rounds * width

    async def all_counted() -> bool:
        return await dropped(http, hub, "evicted") == total - limit

    await wait_for(all_counted, what="the evicted frames to be counted in /metrics")
    assert await queued_keys(hub, redis_url, prefix) == limit
    if redis_url is not None:
        client = aioredis.from_url(redis_url)
        try:
            assert await client.zcard(f"{prefix}:queues") == limit
        finally:
            await client.aclose()
    # The newest queues were kept: the last round's last targets get their event.
    last = f"ghost-{rounds - 1}-{width - 1}"
    ghost, _ = await RawAgent.hello(ws_url(hub), last)
    event = await ghost.recv_type("event")
    assert (event["data"], event["from"]) == (rounds - 1, "sender")
    await ghost.close()
    await sender.close()


async def test_queues_are_bounded_in_bytes_in_memory(memory_hub: HubFactory,
                                                     http: aiohttp.ClientSession) -> None:
    budget = 64 * 1024
    hub = await memory_hub(max_offline_bytes=budget)
    store = hub._store
    assert isinstance(store, MemoryStore)
    sender, _ = await RawAgent.hello(ws_url(hub), "sender")
    blob = b"x" * 4096
    for r in range(10):
        await sender.send({"t": "emit", "key": "k", "data": [r, blob],
                           "to": [f"ghost-{r}-{i}" for i in range(4)]})

    async def all_counted() -> bool:  # one frame per queue here
        return await dropped(http, hub, "evicted") + store.queue_count == 40

    await wait_for(all_counted, what="40 frames queued or evicted")
    assert store.queued_bytes <= budget
    # Each frame is a bit over 4 KiB: 15 fit in 64 KiB, the 25 oldest were evicted.
    assert store.queue_count == 15 and await dropped(http, hub, "evicted") == 25
    ghost, _ = await RawAgent.hello(ws_url(hub), "ghost-9-3")
    assert (await ghost.recv_type("event"))["data"][0] == 9
    await ghost.close()
    await sender.close()


async def test_metrics_report_every_drop_reason(make_hub: HubFactory,
                                                http: aiohttp.ClientSession) -> None:
    hub = await make_hub()
    for reason in ("queue_full", "expired", "evicted", "store_unavailable"):
        assert await dropped(http, hub, reason) == 0


# -- defect 11: fragmented messages ----------------------------------------------------------

async def test_a_fragmented_message_is_one_frame(memory_hub: HubFactory) -> None:
    hub = await memory_hub()
    raw = await RawAgent.connect(ws_url(hub))
    hello = pack({"t": "hello", "v": 1, "agent": "frag", "token": None})
    await raw.ws.send([hello[i:i + 3] for i in range(0, len(hello), 3)])  # fragments
    assert (await raw.recv())["t"] == "welcome"
    emit = pack({"t": "emit", "key": "internal.x", "data": None})
    await raw.ws.send([emit[i:i + 1] for i in range(len(emit))])
    assert (await raw.recv())["code"] == "reserved_key"  # applied as one frame
    await raw.close()


async def test_more_fragments_than_websockets_allows_closes_1009(
        memory_hub: HubFactory) -> None:
    hub = await memory_hub()
    raw, _ = await RawAgent.hello(ws_url(hub), "frag")
    other, _ = await RawAgent.hello(ws_url(hub), "other")
    emit = pack({"t": "emit", "key": "k", "data": b"\x00" * MAX_FRAGMENTS})
    await raw.ws.send([emit[i:i + 1] for i in range(len(emit))])
    assert await raw.closed() == (P.CloseCode.MESSAGE_TOO_BIG, "too many fragments")
    # Only that connection: the other agent is served.
    await other.send({"t": "sub", "keys": ["internal.x"]})
    assert (await other.recv())["code"] == "reserved_key"
    await other.close()


# -- the store's bounds, on both engines -------------------------------------------------------

TTL = 3_600_000


@pytest.fixture
async def bounded_store(request: pytest.FixtureRequest, engine: str,
                        prefix: str) -> AsyncIterator[Store]:
    s: Store
    if engine == "redis":
        s = RedisStore(request.getfixturevalue("redis_url"), prefix=prefix, max_queues=3,
                       fast_path=redis_fast_path())
    else:
        s = MemoryStore(max_queues=3)
    await s.start()
    yield s
    await s.close()


async def test_store_evicts_the_oldest_queue_past_its_bound(bounded_store: Store) -> None:
    store, now = bounded_store, int(time.time() * 1000)

    async def push(agent: str, frame: bytes, at: int) -> None:
        assert await store.queue_frame(agent, frame, now=at, max_len=10, ttl_ms=TTL)

    await push("a", b"a1", now)
    await push("b", b"b1", now + 1)
    await push("a", b"a2", now + 2)  # a pushed last: b is now the oldest queue
    await push("c", b"c1", now + 3)
    assert store.frames_evicted == 0
    await push("d", b"d1", now + 4)
    assert store.frames_evicted == 1
    assert await store.take_frames("b", now=now + 5, ttl_ms=TTL) == ([], 0)
    assert await store.take_frames("a", now=now + 5, ttl_ms=TTL) == ([b"a1", b"a2"], 0)
    # A taken queue no longer counts: c, d and e fit.
    await push("e", b"e1", now + 6)
    assert store.frames_evicted == 1
    # Frames put back for a new agent obey the bound too: c (oldest) goes.
    await store.requeue_frames("f", [b"f1", b"f2"], now=now + 7, ttl_ms=TTL)
    assert store.frames_evicted == 2
    assert await store.take_frames("c", now=now + 8, ttl_ms=TTL) == ([], 0)
    for agent, frames in (("d", [b"d1"]), ("e", [b"e1"]), ("f", [b"f1", b"f2"])):
        assert await store.take_frames(agent, now=now + 8, ttl_ms=TTL) == (frames, 0)


async def test_memory_store_evicts_the_oldest_frames_past_its_bytes() -> None:
    store = MemoryStore(max_queued_bytes=10)
    for i, agent in enumerate("aab"):
        assert await store.queue_frame(agent, b"xxxx", now=i, max_len=10, ttl_ms=TTL)
    assert (store.queued_bytes, store.frames_evicted) == (8, 1)  # a's first frame went
    assert not await store.queue_frame("c", b"x" * 11, now=3, max_len=10, ttl_ms=TTL)
    await store.requeue_frames("b", [b"yyyy"], now=4, ttl_ms=TTL)  # a's last frame goes
    assert (store.queued_bytes, store.queue_count, store.frames_evicted) == (8, 1, 2)
    assert await store.take_frames("b", now=5, ttl_ms=TTL) == ([b"yyyy", b"xxxx"], 0)
    assert (store.queued_bytes, store.queue_count) == (0, 0)


def test_the_agent_library_refuses_a_meta_the_hub_would_refuse() -> None:
    deep: Any = 1
    for _ in range(P.MAX_META_DEPTH + 1):
        deep = {"k": deep}
    with pytest.raises(ValueError, match="nest at most"):
        Agent("ws://127.0.0.1:1/ws", "a1", meta=deep)
    with pytest.raises(ValueError, match="bytes"):
        Agent("ws://127.0.0.1:1/ws", "a1", meta={"x": "y" * P.MAX_META_BYTES})
    Agent("ws://127.0.0.1:1/ws", "a1", meta=deep["k"])  # at the bound
