"""The history indexes of the store (``list_commands``, ``trim_history``, ``touch_agents``),
the same tests against both engines."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from dispatcher.models import AgentInfo, CommandInfo
from dispatcher.store.base import HistoryFilter, HistoryPage, Store
from dispatcher.store.memory import MemoryStore
from dispatcher.store.redis import RedisStore

from ...support import redis_fast_path, wait_for
from .test_contract import NOW, cmd, job_record


@pytest.fixture
async def store(request: pytest.FixtureRequest, engine: str, prefix: str) -> AsyncIterator[Store]:
    s: Store
    if engine == "redis":
        s = RedisStore(request.getfixturevalue("redis_url"), prefix=prefix, retention=0.2,
                       fast_path=redis_fast_path())
    else:
        s = MemoryStore(retention=0.2)
    await s.start()
    yield s
    await s.close()


async def page(store: Store, limit: int = 100, before: tuple[int, str] | None = None,
               **where: str) -> HistoryPage:
    return await store.list_commands(HistoryFilter(**where), limit=limit, before=before,
                                     now=NOW)


def ids(p: HistoryPage) -> list[str]:
    return [c.id for c in p.commands]


async def fill(store: Store) -> None:
    # Same ms for c2/c3 (ties are ordered by id), one job, two agents, two keys.
    specs = [("c1", "a1", "k1", NOW, None), ("c2", "a1", "k2", NOW + 1, "j1"),
             ("c3", "a2", "k1", NOW + 1, "j1"), ("c4", "a2", "k2", NOW + 2, None),
             ("c5", "a1", "k1", NOW + 3, None)]
    # A command of a job is always its claimed part: the job comes first.
    await store.create_job(job_record("j1", agents=("a1", "a2"), origin="hub-x"))
    for cmd_id, agent, key, ts, job in specs:
        await store.create_command(cmd(cmd_id, agent, key, ts), job=job)
    await store.complete("c1", "ok", now=NOW + 5, result=1)
    await store.complete("c3", "error", now=NOW + 5, error={"code": "x", "message": "m"})
    await store.mark_active("c4", "a2", NOW + 5)


async def test_filters_and_order(store: Store) -> None:
    await fill(store)
    assert ids(await page(store)) == ["c5", "c4", "c3", "c2", "c1"]
    assert ids(await page(store, agent_id="a1")) == ["c5", "c2", "c1"]
    assert ids(await page(store, key="k1")) == ["c5", "c3", "c1"]
    assert ids(await page(store, job="j1")) == ["c3", "c2"]
    assert ids(await page(store, outcome="error")) == ["c3"]
    assert ids(await page(store, key="k1", outcome="ok")) == ["c1"]
    assert ids(await page(store, status="COMPLETE")) == ["c3", "c1"]
    assert ids(await page(store, status="ACTIVE")) == ["c4"]
    assert ids(await page(store, status="PENDING", agent_id="a1")) == ["c5", "c2"]
    assert ids(await page(store, agent_id="nobody")) == []
    got = (await page(store, job="j1")).commands
    assert [c.job for c in got] == ["j1", "j1"]
    assert got[0].status == "COMPLETE" and got[0].error == {"code": "x", "message": "m"}
    assert (await store.get_command("c2")) is not None
    assert (await store.get_command("c2")).job == "j1"  # type: ignore[union-attr]
    assert (await store.get_command("c4")).job is None  # type: ignore[union-attr]


async def test_paging_is_stable_while_commands_arrive(store: Store) -> None:
    await fill(store)
    first = await page(store, limit=2)
    assert ids(first) == ["c5", "c4"] and first.after is not None
    await store.create_command(cmd("c9", "a1", "k1", NOW + 10))
    second = await page(store, limit=2, before=first.after)
    assert ids(second) == ["c3", "c2"] and second.after is not None
    third = await page(store, limit=2, before=second.after)
    assert ids(third) == ["c1"] and third.after is None
    # A page that ends inside a millisecond's ties goes on with the rest of them.
    tie = await page(store, limit=1, before=(NOW + 2, "c4"))
    assert ids(tie) == ["c3"]
    assert ids(await page(store, limit=1, before=tie.after)) == ["c2"]


async def test_dropped_and_group_members_are_indexed_by_outcome(store: Store) -> None:
    await store.create_command(cmd("d1", ts=NOW, group="g"))
    await store.create_command(cmd("d2", ts=NOW + 1, group="g"))
    await store.create_command(cmd("d3", ts=NOW + 2, key="other"), drop="k")
    assert ids(await page(store, outcome="dropped")) == ["d2", "d1"]
    await store.create_command(cmd("g1", ts=NOW + 3, group="h"))
    await store.create_command(cmd("g2", ts=NOW + 4, group="h"))
    await store.complete("g1", "ok", now=NOW + 5, result=7)
    assert ids(await page(store, outcome="ok")) == ["g2", "g1"]


async def test_expired_commands_leave_the_indexes(store: Store) -> None:
    import time

    now = int(time.time() * 1000)
    await store.create_job(job_record("j", agents=("a1",), origin="hub-x"))
    await store.create_command(cmd("e1", ts=now), job="j")
    await store.complete("e1", "ok", now=now, result=None)
    await store.create_command(cmd("e2", ts=now))  # not COMPLETE: stays

    async def expired() -> bool:  # retention is 0.2 s: e1's record expires (a real TTL)
        return await store.get_command("e1") is None

    await wait_for(expired, what="e1 to expire")
    later = int(time.time() * 1000)
    assert await store.trim_history(later + 1000) >= 0
    for where in ({}, {"job": "j"}, {"outcome": "ok"}, {"agent_id": "a1"}):
        got = await store.list_commands(HistoryFilter(**where), limit=10, before=None,
                                        now=later)
        assert "e1" not in ids(got), where
    assert ids(await page(store, agent_id="a1")) == ["e2"]
    if isinstance(store, RedisStore):
        # Nothing of e1 is left in any index once trimmed.
        client = store._pool  # the store's own pool: read the keys it wrote
        conn = await client.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_command("KEYS", f"{store.prefix}:history*")
            keys = {k.decode() for k in await conn.read_response()}
        finally:
            await client.release(conn)
        assert f"{store.prefix}:history:job:j" not in keys
        assert f"{store.prefix}:history:outcome:ok" not in keys


async def test_scan_budget_returns_a_cursor(store: Store, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    for i in range(30):
        await store.create_command(cmd(f"s{i:02}", ts=NOW + i, agent="a9"))
    monkeypatch.setattr("dispatcher.store.memory.HISTORY_SCAN", 10)
    monkeypatch.setattr("dispatcher.store.redis.HISTORY_SCAN", 10)
    got = await page(store, status="COMPLETE")  # nothing matches: the walk stops at 10
    assert ids(got) == [] and got.after == (NOW + 20, "s20")
    got = await page(store, agent_id="a9", limit=3, before=got.after)
    assert ids(got) == ["s19", "s18", "s17"]


async def test_touch_agents_moves_last_seen(store: Store) -> None:
    await store.register_agent(AgentInfo("a1", "h1", "s1", NOW, NOW))
    await store.register_agent(AgentInfo("a2", "h1", "s2", NOW, NOW))
    touched = await store.touch_agents([("a1", "s1"), ("a2", "old"), ("gone", "s")], NOW + 50)
    assert touched == 1
    a1, a2 = await store.get_agent("a1"), await store.get_agent("a2")
    assert a1 is not None and a1.last_seen == NOW + 50
    assert a2 is not None and a2.last_seen == NOW
    assert await store.touch_agents([], NOW) == 0


def test_command_info_job_is_last_and_optional() -> None:
    c = CommandInfo("x", "a", "k")
    assert c.job is None and c.copy().job is None
    assert list(c.to_dict())[-1] == "job"
