"""The Redis engine's two reply readers: the fast one (dispatcher/store/redis_fastpath.py,
redis-py internals) and redis-py's public ``read_response()``; both against a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from dispatcher import HubConfig
from dispatcher.errors import StoreUnavailable
from dispatcher.hub import make_store
from dispatcher.models import CommandInfo
from dispatcher.store import redis_fastpath
from dispatcher.store.redis import RedisStore

from ...support import TcpProxy, external_redis_url, wait_for

pytestmark = pytest.mark.fallback  # run again with the fast paths off (CI)

StoreFactory = Callable[..., RedisStore]


@pytest.fixture
async def make_redis_store(redis_url: str, prefix: str) -> AsyncIterator[StoreFactory]:
    """Build RedisStores on the test Redis (started by the test); all closed at the end."""
    stores: list[RedisStore] = []

    def factory(url: str | None = None, **kwargs: object) -> RedisStore:
        store = RedisStore(url or redis_url, prefix=prefix, **kwargs)  # type: ignore[arg-type]
        stores.append(store)
        return store

    yield factory
    for store in stores:
        await store.close()


def test_the_check_selects_the_fast_path_on_this_machine() -> None:
    """The suite's redis-py and hiredis have what the fast reader needs; were it
    not so, every Redis hub would silently run the slower reader."""
    support = redis_fastpath.check()
    assert support.enabled, support.reason
    assert "redis-py" in support.reason and "hiredis" in support.reason
    assert redis_fastpath.check() is support  # once per process


async def test_a_store_logs_which_reader_it_uses(make_redis_store: StoreFactory) -> None:
    fast, public = make_redis_store(), make_redis_store(fast_path=False)
    with capture_logs() as logs:
        await fast.start()
        await public.start()
    chosen = [(e["enabled"], e["reason"]) for e in logs if e["event"] == "redis_fast_path"]
    assert chosen == [(True, redis_fastpath.check().reason),
                      (False, "turned off (redis_fast_path=False)")]
    assert fast.fast_path and not public.fast_path
    await fast.ping()
    await public.ping()


def test_the_hub_config_switch_reaches_the_store() -> None:
    on = make_store(HubConfig(redis_url="redis://127.0.0.1:1/0", redis_max_queued=7))
    off = make_store(HubConfig.from_env({"DISPATCHER_REDIS_URL": "redis://127.0.0.1:1/0",
                                         "DISPATCHER_REDIS_FAST_PATH": "off"}))
    assert isinstance(on, RedisStore) and isinstance(off, RedisStore)
    assert (on._fast_path_allowed, on._max_queued) == (True, 7)
    assert (off._fast_path_allowed, off._max_queued) == (False, 100_000)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "public"])
async def test_replies_and_one_failed_command_in_a_batch(
        make_redis_store: StoreFactory, redis_url: str, prefix: str, fast_path: bool) -> None:
    """Each reader answers every operation of a pipelined batch in order; a command
    whose reply is an error fails alone (StoreUnavailable), its neighbours are answered
    and the store stays healthy (the connection is still in sync)."""
    store = make_redis_store(fast_path=fast_path)
    await store.start()
    assert store.fast_path is fast_path
    info = CommandInfo(id="c1", agent_id="a1", key="k", ts=1, updated=1, origin="hub-x",
                       payload={"n": [1, b"\x00"]})
    assert (await store.create_command(info)).created
    client = aioredis.from_url(redis_url)
    try:
        await client.set(f"{prefix}:agent:bad:pending", "not a zset")  # ZRANGE: WRONGTYPE
    finally:
        await client.aclose()
    before = store.round_trips
    got, bad, pending, missing = await asyncio.gather(
        store.get_command("c1"), store.list_pending("bad"), store.list_pending("a1"),
        store.get_command("nope"), return_exceptions=True)
    assert store.round_trips == before + 1  # one pipelined write
    assert isinstance(bad, StoreUnavailable) and "WRONGTYPE" in str(bad)
    assert isinstance(got, CommandInfo) and got.payload == {"n": [1, b"\x00"]}
    assert isinstance(pending, list) and [c.id for c in pending] == ["c1"]
    assert missing is None
    assert store.healthy and store.errors == 1
    assert [c.id for c in await store.list_pending("a1")] == ["c1"]  # still in sync


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "public"])
async def test_connection_lost_with_a_batch_in_flight(
        make_redis_store: StoreFactory, redis_url: str, fast_path: bool) -> None:
    """The connection dies while a batch waits for its replies: the batch fails at
    once with StoreUnavailable, and the store reconnects by itself."""
    if external_redis_url():
        pytest.skip("the proxy forwards to the suite's own loopback redis-server")
    target = urlsplit(redis_url).port
    assert target is not None
    proxy = await TcpProxy(target).start()
    try:
        store = make_redis_store(f"redis://127.0.0.1:{proxy.port}/0", fast_path=fast_path,
                                 reconnect_interval=0.05)
        await store.start()
        await store.ping()
        proxy.pause()  # the next batch is written, its replies never come
        before = store.round_trips
        lost = asyncio.ensure_future(store.get_command("x"))
        # Written (or, on a very slow machine, failed by the health check's timeout).
        await wait_for(lambda: store.round_trips > before or not store.healthy, timeout=10,
                       what="the batch to be written")
        proxy.cut()
        async with asyncio.timeout(2):
            with pytest.raises(StoreUnavailable, match="unreachable"):
                await lost
        assert store.outages == 1
        await wait_for(lambda: store.healthy, timeout=10, what="the store to reconnect")
        assert await store.get_command("x") is None
        assert store.fast_path is fast_path
    finally:
        await proxy.close()
