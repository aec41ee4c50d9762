"""The Redis engine end to end: restart recovery, store deadlines, outages, round trips."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from dispatcher import Dispatcher, StoreUnavailable
from dispatcher.store.redis import RedisStore, _resp, _resp_python

from ..support import (
    WAIT,
    RawAgent,
    RedisProcess,
    external_redis_url,
    hub_config,
    redis_fast_path,
    wait_for,
)

pytestmark = pytest.mark.fallback  # run again with the fast paths off (CI)


def url(hub: Dispatcher) -> str:
    return f"ws://127.0.0.1:{hub.port}/ws"


@pytest.fixture
async def hubs(redis_url: str, prefix: str) -> AsyncIterator[list[Dispatcher]]:
    """Hubs started by ``start_hub``; closed at the end."""
    started: list[Dispatcher] = []
    yield started
    for hub in started:
        await hub.close()


async def start_hub(hubs: list[Dispatcher], redis_url: str, prefix: str, **kw: object) -> Dispatcher:
    options: dict[str, object] = {"port": 0, "admin_port": 0, "redis_url": redis_url,
                                  "prefix": prefix, "heartbeat": 5.0,
                                  "redis_fast_path": redis_fast_path()}
    options.update(kw)
    hub = Dispatcher(hub_config(**options))  # type: ignore[arg-type]
    await hub.listen()
    hubs.append(hub)
    return hub


async def test_restarted_hub_delivers_and_records(hubs: list[Dispatcher], redis_url: str,
                                                  prefix: str) -> None:
    first = await start_hub(hubs, redis_url, prefix)
    handle = first.execute_on_agent("late", "echo", {"n": 1}, timeout=30)
    await handle.submitted()  # stored before anything is sent
    await first.close()
    with pytest.raises(Exception) as info:
        await handle
    assert type(info.value).__name__ == "HubClosed"

    second = await start_hub(hubs, redis_url, prefix)
    pending = await second.list_pending_commands("late")
    assert [c.id for c in pending] == [handle.id] and pending[0].payload == {"n": 1}
    agent, _ = await RawAgent.hello(url(second), "late")
    frame = await agent.recv_type("cmd")
    assert frame["id"] == handle.id and frame["payload"] == {"n": 1}
    await agent.send({"t": "result", "id": handle.id, "data": {"echo": 1}})

    async def stored() -> bool:
        info = await second.get_command(handle.id)
        return info is not None and info.status == "COMPLETE"

    await wait_for(stored, what="the result to be stored")
    await agent.close()
    # Readable by anyone on the same Redis, the submitting hub long gone.
    reader = RedisStore(redis_url, prefix=prefix, fast_path=redis_fast_path())
    await reader.start()
    try:
        info = await reader.get_command(handle.id)
        assert info is not None and info.outcome == "ok" and info.result == {"echo": 1}
        assert info.origin == first.hub_id
    finally:
        await reader.close()


async def test_sweeper_times_out_commands_of_a_dead_hub(hubs: list[Dispatcher], redis_url: str,
                                                        prefix: str) -> None:
    dead = await start_hub(hubs, redis_url, prefix)
    handle = dead.execute_on_agent("w1", "sleep", {"seconds": 60}, timeout=0.3)
    await handle.submitted()
    await dead.close()  # its local timer is gone with it

    survivor = await start_hub(hubs, redis_url, prefix, sweep_interval=0.1)
    agent, _ = await RawAgent.hello(url(survivor), "w1")
    assert (await agent.recv_type("cmd"))["id"] == handle.id
    cancel = await agent.recv_type("cancel", timeout=5)  # the sweeper timed it out
    assert cancel["id"] == handle.id
    info = await survivor.get_command(handle.id)
    assert info is not None and info.outcome == "timeout"
    await agent.close()


async def test_round_trips_per_command_are_few_and_batched(hubs: list[Dispatcher],
                                                           redis_url: str, prefix: str) -> None:
    hub = await start_hub(hubs, redis_url, prefix, sweep_interval=3600)  # no sweeps mid-count
    ready = asyncio.Event()
    hub.on("agent-connected", lambda info: ready.set())
    agent, _ = await RawAgent.hello(url(hub), "rt")
    await asyncio.wait_for(ready.wait(), 5)  # the catch-up after welcome is done
    n = 50

    async def answer() -> None:
        for _ in range(n):
            frame = await agent.recv_type("cmd")
            await agent.send({"t": "result", "id": frame["id"], "data": frame["payload"]})

    responder = asyncio.ensure_future(answer())
    store = hub.store
    assert isinstance(store, RedisStore)
    client = aioredis.from_url(redis_url)
    try:
        before_ops, before_trips = store.operations, store.round_trips
        before_stats = await client.info("commandstats")
        handles = [hub.execute_on_agent("rt", "echo", i) for i in range(n)]
        assert [await h for h in handles] == list(range(n))
        await responder
        ops = store.operations - before_ops
        trips = store.round_trips - before_trips
        after_stats = await client.info("commandstats")
    finally:
        await client.aclose()
        await agent.close()
    # create + complete per command, as the scripts count them; nothing else.
    assert ops == 2 * n, ops
    # Concurrent commands share pipelined writes: far fewer round trips than ops.
    assert trips <= n, trips
    evalsha = after_stats["cmdstat_evalsha"]["calls"] - before_stats.get(
        "cmdstat_evalsha", {"calls": 0})["calls"]
    assert evalsha >= 2 * n  # Redis saw them (other tests' hubs may add a few)


@pytest.fixture
def private_redis() -> Iterator[RedisProcess]:
    if external_redis_url():
        pytest.skip("outage tests stop and start their own redis-server")
    proc = RedisProcess()
    proc.start()
    try:
        yield proc
    finally:
        proc.cleanup()


async def test_outage_fails_fast_reports_once_and_recovers(hubs: list[Dispatcher],
                                                          private_redis: RedisProcess,
                                                          prefix: str) -> None:
    hub = await start_hub(hubs, private_redis.url, prefix)
    outages: list[BaseException] = []
    hub.on("internal.db.error", outages.append)
    ready = asyncio.Event()
    hub.on("agent-connected", lambda info: ready.set())
    agent, _ = await RawAgent.hello(url(hub), "steady")
    await asyncio.wait_for(ready.wait(), 5)  # attached, catch-up done
    health = f"http://127.0.0.1:{hub.admin_port}/healthz"

    private_redis.stop()
    for _ in range(5):
        handle = hub.execute_on_agent("steady", "echo", 1)
        async with asyncio.timeout(2):  # at once, no hang
            with pytest.raises(StoreUnavailable):
                await handle
    assert len(outages) == 1  # once per outage, not once per call
    assert hub._connections.get("steady") is not None  # agents stay connected
    async with aiohttp.ClientSession() as http, http.get(health) as resp:
        assert resp.status == 503
        assert (await resp.json())["status"] == "store_unavailable"

    private_redis.start()
    await wait_for(lambda: hub.store.healthy, timeout=10, what="store reconnect")
    async with aiohttp.ClientSession() as http, http.get(health) as resp:
        assert resp.status == 200
    handle = hub.execute_on_agent("steady", "echo", 2)
    frame = await agent.recv_type("cmd")
    await agent.send({"t": "result", "id": frame["id"], "data": 2})
    assert await handle == 2
    # Redis came back empty: the hub put its agent back in the registry.

    async def registered() -> bool:
        return "steady" in [a.id for a in await hub.list_connected_agents()]

    await wait_for(registered, what="the agent to be registered again")

    private_redis.stop()  # a second outage is reported again
    with pytest.raises(StoreUnavailable):
        await hub.execute_on_agent("steady", "echo", 3)
    assert len(outages) == 2
    await agent.close()


async def test_sentinel_url_finds_the_primary(hubs: list[Dispatcher], private_redis: RedisProcess,
                                              prefix: str, tmp_path: object) -> None:
    """``redis+sentinel://`` asks a real Sentinel for the primary (docs/redis.md)."""
    import subprocess
    from pathlib import Path

    from ..support import free_port, redis_server_binary

    port = free_port()
    conf = Path(str(tmp_path)) / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor main 127.0.0.1 "
                    f"{private_redis.port} 1\n")
    proc = subprocess.Popen([redis_server_binary(), str(conf), "--sentinel"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async def sentinel_up() -> bool:
            try:
                client = aioredis.Redis(port=port)
                try:
                    return bool(await client.ping())
                finally:
                    await client.aclose()
            except Exception:  # not listening yet
                return False

        await wait_for(sentinel_up, timeout=10, what="sentinel to answer")
        hub = await start_hub(hubs, f"redis+sentinel://127.0.0.1:{port}/main/0", prefix)
        agent, _ = await RawAgent.hello(url(hub), "via-sentinel")
        handle = hub.execute_on_agent("via-sentinel", "echo", "hi")
        frame = await agent.recv_type("cmd")
        await agent.send({"t": "result", "id": frame["id"], "data": "hi"})
        assert await handle == "hi"
        # The command really is in the primary behind the Sentinel.
        direct = RedisStore(private_redis.url, prefix=prefix, fast_path=redis_fast_path())
        await direct.start()
        try:
            info = await direct.get_command(handle.id)
            assert info is not None and info.result == "hi"
        finally:
            await direct.close()
        await agent.close()
    finally:
        proc.kill()
        proc.wait(10)


async def test_script_cache_flush_is_survived(hubs: list[Dispatcher], redis_url: str,
                                              prefix: str) -> None:
    """An operator's SCRIPT FLUSH is a short outage: the call that meets it fails at
    once with StoreUnavailable (it did not run), the probe loads the scripts again,
    and traffic resumes by itself."""
    hub = await start_hub(hubs, redis_url, prefix)
    outages: list[BaseException] = []
    hub.on("internal.db.error", outages.append)
    agent, _ = await RawAgent.hello(url(hub), "flushed")

    async def round_trip(n: int) -> None:
        handle = hub.execute_on_agent("flushed", "echo", n)
        frame = await agent.recv_type("cmd")
        while frame["id"] != handle.id:
            # At-least-once: the recovery after the outage may send an earlier
            # command again (docs/protocol.md, Commands and redelivery); an agent dedupes by id.
            frame = await agent.recv_type("cmd")
        await agent.send({"t": "result", "id": frame["id"], "data": n})
        assert await asyncio.wait_for(handle.result(), 5) == n

    await round_trip(1)
    client = aioredis.from_url(redis_url)
    try:
        await client.script_flush()
    finally:
        await client.aclose()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(hub.execute_on_agent("flushed", "echo", 2).result(), 5)
    assert len(outages) == 1
    await wait_for(lambda: hub.store.healthy, timeout=5, what="the scripts to be reloaded")
    await round_trip(3)
    await round_trip(4)
    await agent.close()


async def test_a_command_lost_by_the_store_times_out_its_handle(
        hubs: list[Dispatcher], redis_url: str, prefix: str) -> None:
    """A command that vanished from Redis (restart without persistence, FLUSHALL)
    does not leave its caller waiting forever: at its deadline it times out."""
    from dispatcher import CommandTimeout

    hub = await start_hub(hubs, redis_url, prefix, sweep_interval=3600)
    handle = hub.execute_on_agent("nobody", "work", None, timeout=0.3)
    await handle.submitted()
    client = aioredis.from_url(redis_url)
    try:
        await client.delete(f"{prefix}:cmd:{handle.id}", f"{prefix}:agent:nobody:pending")
        await client.zrem(f"{prefix}:deadlines", handle.id)
    finally:
        await client.aclose()
    with pytest.raises(CommandTimeout):
        await asyncio.wait_for(handle.result(), 5)


def test_both_resp_encoders_write_the_same_bytes() -> None:
    """The engine packs its pipelined commands with hiredis' C encoder when it can;
    the pure-Python one (older hiredis) must write exactly the same RESP."""
    commands = [
        (b"EVALSHA", b"a" * 40, 3, "p:cmd:é-1", "k2", "k3", 1764000000000, -5, 2.5, b"",
         b"\x00\xff binary", ""),
        ("PING",),
    ]
    expected = _resp_python(commands)
    assert expected.startswith(b"*12\r\n$7\r\nEVALSHA\r\n$40\r\n")
    assert b"$10\r\np:cmd:\xc3\xa9-1\r\n" in expected and b"$3\r\n2.5\r\n" in expected
    assert _resp(commands) == expected
    # A type hiredis refuses falls back to the Python encoder instead of failing the batch.
    odd = [("SET", "k", True)]
    assert _resp(odd) == _resp_python(odd)


async def test_a_failing_continuation_is_logged_and_the_reader_goes_on(
        redis_url: str, prefix: str) -> None:
    """The store runs then()'s continuation as it reads the reply (futures.StoreFuture):
    one that raises must cost only a log line, never the connection's reader."""
    from structlog.testing import capture_logs

    from dispatcher.futures import StoreFuture, then

    store = RedisStore(redis_url, prefix=prefix, fast_path=redis_fast_path())
    await store.start()
    try:
        seen: list[object] = []

        def broken(fut: asyncio.Future[object]) -> None:
            seen.append(fut.result())
            raise RuntimeError("a bug in a continuation")

        with capture_logs() as logs:
            fut = store.get_command("nope")
            assert isinstance(fut, StoreFuture) and not fut.done()
            then(fut, broken)
            await asyncio.wait_for(asyncio.shield(fut), WAIT)
            # The reader went on: the next operations are answered.
            assert await asyncio.wait_for(store.get_command("nope-2"), WAIT) is None
        assert seen == [None]
        assert [e["event"] for e in logs].count("store_continuation_failed") == 1
    finally:
        await store.close()
