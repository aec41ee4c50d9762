"""The store contract: the same test functions against the memory and the Redis engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dispatcher.errors import JobPartRefused, TooManyCommands, UnknownCommand
from dispatcher.models import AgentInfo, CommandInfo, JobInfo
from dispatcher.store.base import JobRecord, Store
from dispatcher.store.memory import MemoryStore
from dispatcher.store.redis import RedisStore

from ...support import redis_fast_path, wait_for

pytestmark = pytest.mark.fallback  # run again with the fast paths off (CI)

NOW = int(time.time() * 1000)  # the stores expire COMPLETE commands by wall clock


@pytest.fixture
async def store(request: pytest.FixtureRequest, engine: str, prefix: str) -> AsyncIterator[Store]:
    retention = getattr(request, "param", 3600.0)
    s: Store
    if engine == "redis":
        s = RedisStore(request.getfixturevalue("redis_url"), prefix=prefix, retention=retention,
                       fast_path=redis_fast_path())
    else:
        s = MemoryStore(retention=retention)
    await s.start()
    yield s
    await s.close()


def cmd(cmd_id: str, agent: str = "a1", key: str = "k", ts: int = NOW, **kw: Any) -> CommandInfo:
    kw.setdefault("deadline", ts + 60_000)
    kw.setdefault("origin", "hub-x")
    return CommandInfo(id=cmd_id, agent_id=agent, key=key, ts=ts, updated=ts, **kw)


async def test_create_then_read(store: Store) -> None:
    payload = {"bin": b"\x00\xff", "nested": [1, 2.5, None, {"x": True}]}
    res = await store.create_command(cmd("c1", payload=payload, group="g"))
    assert res.created and not res.coalesced and res.dropped == []
    got = await store.get_command("c1")
    assert got is not None
    assert (got.id, got.agent_id, got.key, got.status, got.outcome) == ("c1", "a1", "k", "PENDING", None)
    assert (got.group, got.ts, got.deadline, got.origin) == ("g", NOW, NOW + 60_000, "hub-x")
    assert got.payload == payload
    assert await store.get_command("nope") is None


async def test_pending_oldest_first(store: Store) -> None:
    for i, ts in enumerate([NOW + 3, NOW + 1, NOW + 2]):
        await store.create_command(cmd(f"c{i}", ts=ts))
    await store.create_command(cmd("other", agent="a2"))
    assert [c.id for c in await store.list_pending("a1")] == ["c1", "c2", "c0"]
    assert await store.list_pending("nobody") == []


async def test_idempotent_create_changes_nothing(store: Store) -> None:
    await store.create_command(cmd("c1", payload=1))
    again = await store.create_command(cmd("c1", payload=2, key="other"))
    assert not again.created
    assert again.command.payload == 1 and again.command.key == "k"
    assert [c.id for c in await store.list_pending("a1")] == ["c1"]


async def test_max_pending_refuses_without_change(store: Store) -> None:
    await store.create_command(cmd("c1"), max_pending=1)
    with pytest.raises(TooManyCommands):
        await store.create_command(cmd("c2"), max_pending=1)
    assert await store.get_command("c2") is None


async def test_ack_rules(store: Store) -> None:
    await store.create_command(cmd("c1"))
    with pytest.raises(UnknownCommand):
        await store.mark_active("c1", "intruder", NOW)
    with pytest.raises(UnknownCommand):
        await store.mark_active("missing", "a1", NOW)
    await store.mark_active("c1", "a1", NOW + 5)
    await store.mark_active("c1", "a1", NOW + 6)  # redelivered and acked again
    got = await store.get_command("c1")
    assert got is not None and got.status == "ACTIVE" and got.updated == NOW + 6
    await store.complete("c1", "ok", now=NOW + 7, result=1)
    with pytest.raises(UnknownCommand):
        await store.mark_active("c1", "a1", NOW + 8)


async def test_first_answer_wins(store: Store) -> None:
    await store.create_command(cmd("c1"))
    done = (await store.complete("c1", "ok", now=NOW + 10, result={"v": 1},
                                 agent_id="a1")).command
    assert (done.status, done.outcome, done.result, done.agent_id) == ("COMPLETE", "ok", {"v": 1}, "a1")
    with pytest.raises(UnknownCommand):
        await store.complete("c1", "error", now=NOW + 11, error={"code": "x", "message": ""})
    got = await store.get_command("c1")
    assert got is not None and got.outcome == "ok" and got.result == {"v": 1} and got.error is None
    assert got.updated == NOW + 10
    assert await store.list_pending("a1") == []
    assert await store.overdue(NOW + 10**9) == []


async def test_complete_checks_agent(store: Store) -> None:
    await store.create_command(cmd("c1"))
    with pytest.raises(UnknownCommand):
        await store.complete("c1", "ok", now=NOW, result=1, agent_id="a2")
    with pytest.raises(UnknownCommand):
        await store.complete("zzz", "ok", now=NOW, result=1)
    got = await store.get_command("c1")
    assert got is not None and got.status == "PENDING"


async def test_error_outcome_keeps_error_map(store: Store) -> None:
    await store.create_command(cmd("c1"))
    err = {"code": "disk_full", "message": "no space", "data": {"free": 3}}
    await store.complete("c1", "error", now=NOW, error=err)
    got = await store.get_command("c1")
    assert got is not None and got.outcome == "error" and got.error == err and got.result is None


@pytest.mark.parametrize("store", [0.2], indirect=True)
async def test_complete_commands_expire_after_retention(store: Store) -> None:
    await store.create_command(cmd("c1"))
    await store.complete("c1", "ok", now=int(time.time() * 1000), result=1)
    assert await store.get_command("c1") is not None

    async def expired() -> bool:
        return await store.get_command("c1") is None

    await wait_for(expired, what="c1 to expire")


async def test_drop_all_pending_other_groups(store: Store) -> None:
    await store.create_command(cmd("p1", ts=NOW + 1))
    await store.create_command(cmd("p2", ts=NOW + 2, group="g"))
    await store.create_command(cmd("act", ts=NOW + 3))
    await store.mark_active("act", "a1", NOW + 4)
    res = await store.create_command(cmd("new", ts=NOW + 5, group="g"), drop=True)
    assert [d.id for d in res.dropped] == ["p1"]
    assert res.dropped[0].outcome == "dropped" and res.dropped[0].result == {"dropped": True}
    assert res.coalesced  # p2 shares the group and is not COMPLETE
    p1 = await store.get_command("p1")
    assert p1 is not None and (p1.status, p1.outcome, p1.result) == ("COMPLETE", "dropped", {"dropped": True})
    assert [c.id for c in await store.list_pending("a1")] == ["p2", "act", "new"]


async def test_drop_by_command_key(store: Store) -> None:
    await store.create_command(cmd("x1", key="x", ts=NOW + 1))
    await store.create_command(cmd("y1", key="y", ts=NOW + 2))
    res = await store.create_command(cmd("x2", key="z", ts=NOW + 3), drop="x")
    assert [d.id for d in res.dropped] == ["x1"]
    assert [c.id for c in await store.list_pending("a1")] == ["y1", "x2"]


async def test_group_completion_and_next(store: Store) -> None:
    await store.create_command(cmd("g1", ts=NOW + 1, group="g"))
    res = await store.create_command(cmd("g2", ts=NOW + 2, group="g"))
    assert res.coalesced
    await store.create_command(cmd("g3", ts=NOW + 3, group="g"))
    await store.create_command(cmd("h1", ts=NOW + 4, group="h"))
    nxt = await store.next_in_group("a1", "g")
    assert nxt is not None and nxt.id == "g1"
    await store.mark_active("g1", "a1", NOW)
    completion = await store.complete("g1", "ok", now=NOW + 9, result="same")
    assert completion.command.id == "g1"
    assert sorted(d.id for d in completion.group) == ["g2", "g3"]
    assert all((d.outcome, d.result, d.status) == ("ok", "same", "COMPLETE")
               for d in completion.group)
    for cid in ("g2", "g3"):
        got = await store.get_command(cid)
        assert got is not None and got.outcome == "ok" and got.result == "same"
    assert await store.next_in_group("a1", "g") is None
    assert [c.id for c in await store.list_pending("a1")] == ["h1"]


async def test_a_member_submitted_after_the_groups_answer_is_not_part_of_it(
        store: Store) -> None:
    """Issue 13, defect 2: the group's answer and the completion of its PENDING
    members are one step, so a member created after it stays PENDING (it runs)."""
    await store.create_command(cmd("g1", ts=NOW + 1, group="g"))
    await store.mark_active("g1", "a1", NOW + 2)
    assert not (await store.complete("g1", "ok", now=NOW + 3, result=1)).group
    late = await store.create_command(cmd("g2", ts=NOW + 4, group="g"))
    assert late.created and not late.coalesced  # nothing else of the group is left
    assert [c.id for c in await store.list_pending("a1")] == ["g2"]
    got = await store.get_command("g2")
    assert got is not None and got.status == "PENDING"


async def test_no_answer_after_the_deadline(store: Store) -> None:
    """Issue 13, defect 6: past its deadline a command only ends timeout or cancelled;
    a group's answer leaves members whose deadline passed for the sweepers."""
    await store.create_command(cmd("late", deadline=NOW + 10))
    for outcome in ("ok", "error"):
        with pytest.raises(UnknownCommand, match="deadline"):
            await store.complete("late", outcome, now=NOW + 10, result=1,  # type: ignore[arg-type]
                                 error={"code": "x", "message": ""})
    got = await store.get_command("late")
    assert got is not None and got.status == "PENDING"
    done = await store.complete("late", "timeout", now=NOW + 11,
                                error={"code": "timeout", "message": ""})
    assert done.command.outcome == "timeout"
    await store.create_command(cmd("g1", ts=NOW + 1, group="g", deadline=NOW + 1000))
    await store.create_command(cmd("g2", ts=NOW + 2, group="g", deadline=NOW + 20))
    await store.create_command(cmd("g3", ts=NOW + 3, group="g", deadline=NOW + 1000))
    completion = await store.complete("g1", "ok", now=NOW + 30, result=1)
    assert [c.id for c in completion.group] == ["g3"]
    assert [c.id for c in await store.list_pending("a1")] == ["g2"]


async def test_drop_of_an_agents_only_pending_command_keeps_the_new_one(store: Store) -> None:
    """Issue 13, defect 1: the new command is indexed even when the drop emptied the
    agent's pending index."""
    await store.create_command(cmd("old", ts=NOW + 1))
    for drop in (True, "k"):
        res = await store.create_command(cmd(f"new-{drop}", ts=NOW + 2), drop=drop)
        assert res.created and [d.id for d in res.dropped] in (["old"], ["new-True"])
    assert [c.id for c in await store.list_pending("a1")] == ["new-k"]
    await store.create_command(cmd("g-new", ts=NOW + 3, group="g"), drop=True)
    assert [c.id for c in await store.list_pending("a1")] == ["g-new"]


async def test_overdue(store: Store) -> None:
    await store.create_command(cmd("soon", deadline=NOW + 10))
    await store.create_command(cmd("later", deadline=NOW + 1000))
    await store.create_command(cmd("done", deadline=NOW + 5))
    await store.complete("done", "ok", now=NOW, result=1)
    assert [c.id for c in await store.overdue(NOW + 100)] == ["soon"]
    assert [c.id for c in await store.overdue(NOW + 100)] == ["soon"]  # until completed
    await store.complete("soon", "timeout", now=NOW + 100, error={"code": "timeout", "message": ""})
    assert await store.overdue(NOW + 100) == []
    assert [c.id for c in await store.overdue(NOW + 5000)] == ["later"]


def agent(agent_id: str, session: str, hub: str = "hub-1") -> AgentInfo:
    return AgentInfo(id=agent_id, hub_id=hub, session=session, connected_at=NOW, last_seen=NOW,
                     meta={"v": "1.0", "tags": ["a"]})


async def test_agent_registry(store: Store) -> None:
    assert await store.register_agent(agent("a1", "s1")) is None
    previous = await store.register_agent(agent("a1", "s2", hub="hub-2"))
    assert previous is not None and previous.session == "s1" and previous.hub_id == "hub-1"
    await store.register_agent(agent("a2", "s3"))
    assert not await store.unregister_agent("a1", "s1")  # stale session: no-op
    got = await store.get_agent("a1")
    assert got is not None and (got.session, got.hub_id) == ("s2", "hub-2")
    assert got.meta == {"v": "1.0", "tags": ["a"]}
    assert sorted(a.id for a in await store.list_agents()) == ["a1", "a2"]
    assert await store.unregister_agent("a1", "s2")
    assert await store.get_agent("a1") is None
    assert [a.id for a in await store.list_agents()] == ["a2"]


async def test_returned_records_are_copies(store: Store) -> None:
    await store.create_command(cmd("c1", payload={"x": 1}))
    got = await store.get_command("c1")
    assert got is not None
    got.status = "COMPLETE"
    again = await store.get_command("c1")
    assert again is not None and again.status == "PENDING"


async def test_redis_queue_is_bounded(redis_url: str, prefix: str) -> None:
    """Operations waiting for the next pipelined write are bounded: past the bound
    a call fails at once with StoreUnavailable instead of growing memory."""
    from dispatcher.errors import StoreUnavailable

    store = RedisStore(redis_url, prefix=prefix, max_queued=2, fast_path=redis_fast_path())
    await store.start()
    try:
        # Three calls queued in the same loop turn, before the writer runs.
        first, second, third = (asyncio.ensure_future(store.get_command(k)) for k in "abc")
        assert await first is None and await second is None
        with pytest.raises(StoreUnavailable, match="overloaded"):
            await third
        assert await store.get_command("d") is None  # the queue drained: calls flow again
    finally:
        await store.close()


async def test_memory_engine_keeps_at_most_max_retained_complete_commands() -> None:
    """In-memory only (Redis bounds itself with maxmemory): past ``max_retained``
    COMPLETE commands, the oldest are forgotten first; commands not COMPLETE never are."""
    store = MemoryStore(max_retained=3)
    await store.start()
    for i in range(6):
        await store.create_command(cmd(f"c{i}"))
    for i in range(5):
        await store.complete(f"c{i}", "ok", now=NOW + i, result=i)
    assert [await store.get_command(f"c{i}") for i in range(2)] == [None, None]
    kept = [await store.get_command(f"c{i}") for i in range(2, 6)]
    assert [(c.status, c.result) for c in kept if c is not None] == [
        ("COMPLETE", 2), ("COMPLETE", 3), ("COMPLETE", 4), ("PENDING", None)]
    await store.close()


# -- jobs: a part is claimed with its command, atomically (docs/fleets.md) ----------------

def job_record(job_id: str = "j1", agents: tuple[str, ...] = ("a1", "a2", "a3"),
               origin: str = "hub-a") -> JobRecord:
    return JobRecord(JobInfo(id=job_id, key="k", agents=list(agents), ts=NOW, updated=NOW,
                             batch=1, max_failures=0, origin=origin, target="a*"),
                     timeout_ms=5000)


async def test_job_create_is_idempotent_and_listed(store: Store) -> None:
    rec, created = await store.create_job(job_record())
    assert created and rec.info.status == "RUNNING" and rec.timeout_ms == 5000
    assert rec.info.counts == {"pending": 3, "active": 0, "skipped": 0, "ok": 0, "error": 0,
                               "timeout": 0, "cancelled": 0, "dropped": 0}
    again, created = await store.create_job(job_record(agents=("zz",), origin="hub-b"))
    assert not created and again.info.agents == ["a1", "a2", "a3"]
    assert again.info.origin == "hub-a" and again.info.batch == 1
    await store.create_job(job_record("j2"))
    assert [j.id for j in await store.list_jobs(10)] == ["j2", "j1"] or \
        [j.id for j in await store.list_jobs(10)] == ["j1", "j2"]  # same ts: either order
    assert len(await store.list_jobs(1)) == 1


async def test_a_part_starts_once(store: Store) -> None:
    await store.create_job(job_record())
    first = await store.create_command(cmd("j1.0", "a1", origin="hub-a"), job="j1")
    assert first.created and first.command.job == "j1"
    assert (await store.get_command("j1.0")).job == "j1"  # type: ignore[union-attr]
    # The same id again: the same command (idempotent); another id: refused.
    again = await store.create_command(cmd("j1.0", "a1", origin="hub-a"), job="j1")
    assert not again.created
    with pytest.raises(JobPartRefused) as refused:
        await store.create_command(cmd("other", "a1", origin="hub-a"), job="j1")
    assert refused.value.command_id == "j1.0"
    assert await store.get_command("other") is None
    # Only the hub running the job starts parts; never a non-target.
    with pytest.raises(JobPartRefused, match="run by hub"):
        await store.create_command(cmd("j1.1", "a2", origin="hub-b"), job="j1")
    with pytest.raises(JobPartRefused, match="not a target"):
        await store.create_command(cmd("j1.9", "zz", origin="hub-a"), job="j1")
    with pytest.raises(JobPartRefused, match="no job"):
        await store.create_command(cmd("x.0", "a1", origin="hub-a"), job="nope")
    rec = await store.get_job("j1")
    assert rec is not None and rec.parts == {"a1": "j1.0"} and rec.info.counts["active"] == 1


async def test_skipped_parts_never_start_and_the_job_completes(store: Store) -> None:
    await store.create_job(job_record())
    await store.create_command(cmd("j1.0", "a1", origin="hub-a"), job="j1")
    assert await store.skip_job_parts("j1", ["a2"], NOW, origin="hub-b") is None  # not its job
    rec = await store.skip_job_parts("j1", ["a1", "a2"], NOW, origin="hub-a")
    assert rec is not None and rec.skipped == {"a2"}  # a1 started: not skipped
    with pytest.raises(JobPartRefused, match="skipped"):
        await store.create_command(cmd("j1.1", "a2", origin="hub-a"), job="j1")
    info = await store.end_job_parts("j1", [("a1", "error"), ("a1", "ok")], NOW)
    assert info is not None and info.counts["error"] == 1 and info.counts["ok"] == 0
    assert info.status == "RUNNING"  # a3 neither ended nor skipped
    rec = await store.skip_job_parts("j1", None, NOW, cancel=True)  # any hub may cancel
    assert rec is not None and rec.cancelled and rec.skipped == {"a2", "a3"}
    assert rec.info.status == "COMPLETE" and rec.ended == {"a1": "error"}
    assert rec.info.counts == {"pending": 0, "active": 0, "skipped": 2, "ok": 0, "error": 1,
                               "timeout": 0, "cancelled": 0, "dropped": 0}
    assert await store.end_job_parts("nope", [("a1", "ok")], NOW) is None
