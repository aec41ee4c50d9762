"""The store interface against the reference model, both engines at once (hypothesis stateful).

One ``RuleBasedStateMachine`` drives a ``MemoryStore`` and a ``RedisStore``
(the session's private redis-server, a fresh key prefix per example) with the
same random sequence of calls: ``create_command`` (new or reused ids, groups,
``drop``, ``max_pending``, deadlines), ``mark_active``, ``complete`` (with and
without ``agent_id``; an answer to a group member completes the group's
PENDING members in the same step), answers past the deadline,
``next_in_group``, ``overdue`` and the sweep a hub does with it, and clock
advances. Each answer is compared with ``lifecycle_model.Model`` and the two
engines with each other; after every step every agent's ``list_pending`` and
every command's ``get_command`` must match on both engines.

The clock is the machine's own (the store takes ``now`` from its caller):
it starts at a whole second of wall time (COMPLETE commands are retained by
wall time) and moves by whole seconds, while deadlines are whole seconds plus
500 ms, so "at the deadline" never happens and the boundary needs no opinion.

The defects the machine found (issue 13, defects 1 and 6, both fixed) are
each pinned by a plain regression test below as well.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from dispatcher.errors import DispatcherError, TooManyCommands, UnknownCommand
from dispatcher.models import CommandInfo
from dispatcher.store.base import Completion, CreateResult, Store
from dispatcher.store.memory import MemoryStore
from dispatcher.store.redis import RedisStore

from ..lifecycle_model import Completed, Created, Model, project

T = TypeVar("T")

AGENTS = ("a1", "a2")
KEYS = ("k1", "k2")
GROUPS = (None, "g1", "g2")
ORIGIN = "hub-m"
NOT_AN_ID = "nope"

values = st.one_of(
    st.none(), st.integers(-5, 5), st.text(max_size=3), st.binary(max_size=3),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), max_size=2),
)
errors = st.fixed_dictionaries(
    {"code": st.sampled_from(["boom", "disk_full"]), "message": st.text(max_size=4)},
    optional={"data": values},
)


def _now_wall_second() -> int:
    return int(time.time()) * 1000


Outcome = tuple[str, Any]  # ("raised", exception class name) or ("ok", normalized value)


async def _attempt(call: Awaitable[T], normalize: Callable[[T], Any]) -> Outcome:
    try:
        value = await call
    except DispatcherError as exc:
        return ("raised", type(exc).__name__)
    return ("ok", normalize(value))


def _model_attempt(call: Callable[[], T], normalize: Callable[[T], Any]) -> Outcome:
    try:
        value = call()
    except DispatcherError as exc:
        return ("raised", type(exc).__name__)
    return ("ok", normalize(value))


def _created(res: CreateResult | Created) -> dict[str, Any]:
    return {
        "command": res.command.to_dict(),
        "created": res.created,
        "dropped": sorted((project(d) for d in res.dropped), key=lambda d: d["id"]),
        "coalesced": res.coalesced,
    }


def _completed(res: Completion | Completed) -> dict[str, Any]:
    return {
        "command": {**project(res.command), "deadline": res.command.deadline},
        "group": _completed_list(res.group),
        # Every command is submitted by the one origin: nobody else waits on it.
        "watchers": list(res.watchers) if isinstance(res, Completion) else [],
    }


def _completed_list(infos: list[CommandInfo]) -> list[dict[str, Any]]:
    return sorted((project(i) for i in infos), key=lambda d: d["id"])


def _full(info: CommandInfo | None) -> dict[str, Any] | None:
    return None if info is None else info.to_dict()


def _full_list(infos: list[CommandInfo]) -> list[dict[str, Any]]:
    return [i.to_dict() for i in infos]


class StoreMachine(RuleBasedStateMachine):
    """Both engines and the model, one call at a time."""

    redis_url = ""  # set by the test function (session fixture)

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.model = Model()
        self.now = _now_wall_second()
        self.ids: list[str] = []
        self.counter = 0
        self.memory = MemoryStore()
        self.redis = RedisStore(self.redis_url, prefix="m" + uuid.uuid4().hex[:12])
        self.run(self.redis.start())

    def teardown(self) -> None:
        try:
            self.run(self.redis.close())
        finally:
            self.runner.close()

    def run(self, coro: Awaitable[T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(10):
                return await coro
        return self.runner.run(bounded())

    def both(self, call: Callable[[Store], Awaitable[T]], normalize: Callable[[T], Any]
             ) -> Outcome:
        """Run ``call`` on both engines; they must agree. Returns their common outcome."""
        async def go() -> tuple[Outcome, Outcome]:
            return (await _attempt(call(self.memory), normalize),
                    await _attempt(call(self.redis), normalize))

        mem, red = self.run(go())
        assert mem == red, f"the engines disagree:\n memory: {mem}\n redis:  {red}"
        return mem

    def check(self, call: Callable[[Store], Awaitable[T]], normalize: Callable[[T], Any],
              model_call: Callable[[], Any], model_normalize: Callable[[Any], Any]) -> Outcome:
        expected = _model_attempt(model_call, model_normalize)
        got = self.both(call, normalize)
        assert got == expected, f"engines and model disagree:\n engines: {got}\n model:   {expected}"
        return got

    # -- rules ---------------------------------------------------------------
    @rule(data=st.data(), agent=st.sampled_from(AGENTS), key=st.sampled_from(KEYS),
          group=st.sampled_from(GROUPS),
          drop=st.sampled_from([None, None, True, "k1", "k2"]),
          max_pending=st.sampled_from([None, None, 2, 4]),
          timeout=st.sampled_from([None, 1_500, 4_500, 20_500]),
          reuse=st.integers(0, 4), payload=values)
    def create(self, data: st.DataObject, agent: str, key: str, group: str | None,
               drop: bool | str | None, max_pending: int | None, timeout: int | None,
               reuse: int, payload: Any) -> None:
        if reuse == 0 and self.ids:  # idempotent submit: maybe with other arguments
            cmd_id = data.draw(st.sampled_from(self.ids), label="reused id")
        else:
            cmd_id = f"c{self.counter:03d}"
            self.counter += 1

        def make() -> CommandInfo:  # each engine takes ownership of its own record
            return CommandInfo(id=cmd_id, agent_id=agent, key=key, group=group, ts=self.now,
                               updated=self.now, origin=ORIGIN, payload=payload,
                               deadline=None if timeout is None else self.now + timeout)

        self.check(lambda s: s.create_command(make(), drop=drop, max_pending=max_pending),
                   _created,
                   lambda: self.model.create(make(), drop=drop, max_pending=max_pending),
                   _created)
        if cmd_id not in self.ids and self.model.get(cmd_id) is not None:
            self.ids.append(cmd_id)

    def _pick(self, data: st.DataObject) -> str:
        """Mostly a command not COMPLETE; else any id, or one that never existed."""
        live = [c.id for a in AGENTS for c in self.model.pending(a)]
        if live and data.draw(st.booleans(), label="live") is True:
            return data.draw(st.sampled_from(live), label="live command id")
        return data.draw(st.sampled_from([*self.ids, NOT_AN_ID]), label="command id")

    @rule(data=st.data(), agent=st.sampled_from(AGENTS))
    def mark_active(self, data: st.DataObject, agent: str) -> None:
        cmd_id = self._pick(data)
        now = self.now
        if self.model.unspecified("ack", cmd_id, now) and \
                (c := self.model.get(cmd_id)) is not None and c.agent_id == agent:
            got = self.both(lambda s: s.mark_active(cmd_id, agent, now), lambda v: v)
            if got[0] == "ok":
                self.model.mark_active(cmd_id, agent, now)
            return
        self.check(lambda s: s.mark_active(cmd_id, agent, now), lambda v: v,
                   lambda: self.model.mark_active(cmd_id, agent, now), lambda v: v)

    @rule(data=st.data(), outcome=st.sampled_from(["ok", "ok", "error", "timeout", "cancelled"]),
          by=st.sampled_from([None, "right", "a1", "a2"]), result=values, error=errors)
    def complete(self, data: st.DataObject, outcome: str, by: str | None, result: Any,
                 error: dict[str, Any]) -> None:
        cmd_id = self._pick(data)
        now = self.now
        cmd = self.model.get(cmd_id)
        agent_id = (cmd.agent_id if cmd is not None else "a1") if by == "right" else by
        if outcome == "ok":
            err: dict[str, Any] | None = None
        else:
            result = None
            err = error if outcome == "error" else {"code": outcome, "message": outcome}

        def call(s: Store) -> Awaitable[Completion]:
            return s.complete(cmd_id, outcome, now=now, result=result, error=err,  # type: ignore[arg-type]
                              agent_id=agent_id)

        self.check(call, _completed,
                   lambda: self.model.complete(cmd_id, outcome, now=now, result=result,
                                               error=err, agent_id=agent_id),
                   _completed)

    # No @precondition on the two rules below: hypothesis rarely picks a rule that has
    # one here (a handful of calls in a run); they return at once when there is nothing to do.
    @rule(data=st.data(), kind=st.sampled_from(["ok", "error", "ack"]), result=values,
          error=errors)
    def late_answer(self, data: st.DataObject, kind: str, result: Any,
                    error: dict[str, Any]) -> None:
        """The agent answers a command past its deadline that nobody timed out yet."""
        overdue = [c.id for c in self.model.overdue(self.now, 100)]
        if not overdue:
            return
        cmd_id = data.draw(st.sampled_from(overdue), label="overdue id")
        cmd = self.model.get(cmd_id)
        assert cmd is not None
        now = self.now
        if kind == "ack":
            got = self.both(lambda s: s.mark_active(cmd.id, cmd.agent_id, now), lambda v: v)
            if got[0] == "ok":  # unspecified: the engines agree, the model follows
                self.model.mark_active(cmd.id, cmd.agent_id, now)
            return
        err = None if kind == "ok" else error
        res = result if kind == "ok" else None

        def call(s: Store) -> Awaitable[Completion]:
            return s.complete(cmd.id, kind, now=now, result=res, error=err,  # type: ignore[arg-type]
                              agent_id=cmd.agent_id)

        # Refused (UnknownCommand): past its deadline a command only times out or is cancelled.
        self.check(call, _completed,
                   lambda: self.model.complete(cmd.id, kind, now=now, result=res, error=err,
                                               agent_id=cmd.agent_id),
                   _completed)

    def _members(self) -> list[str]:
        """Group members not COMPLETE; those with PENDING companions if there are any."""
        live = [c for a in AGENTS for c in self.model.pending(a) if c.group is not None]
        shared = [c.id for c in live
                  if any(o is not c and (o.agent_id, o.group) == (c.agent_id, c.group)
                         and o.status == "PENDING" for o in live)]
        return shared or [c.id for c in live]

    @rule(data=st.data(), outcome=st.sampled_from(["ok", "error"]), result=values,
          error=errors)
    def answer_group_member(self, data: st.DataObject, outcome: str, result: Any,
                            error: dict[str, Any]) -> None:
        """Its agent answers a group member (not COMPLETE, maybe past its deadline): the
        group's PENDING members whose deadline has not passed complete in the same step."""
        members = self._members()
        if not members:
            return
        cmd_id = data.draw(st.sampled_from(members), label="group member")
        cmd = self.model.get(cmd_id)
        assert cmd is not None
        now = self.now
        err = None if outcome == "ok" else error
        res = result if outcome == "ok" else None

        def call(s: Store) -> Awaitable[Completion]:
            return s.complete(cmd_id, outcome, now=now, result=res, error=err,  # type: ignore[arg-type]
                              agent_id=cmd.agent_id)

        self.check(call, _completed,
                   lambda: self.model.complete(cmd_id, outcome, now=now, result=res, error=err,
                                               agent_id=cmd.agent_id),
                   _completed)

    @rule(agent=st.sampled_from(AGENTS), group=st.sampled_from(["g1", "g2"]))
    def next_in_group(self, agent: str, group: str) -> None:
        self.check(lambda s: s.next_in_group(agent, group), _full,
                   lambda: self.model.next_in_group(agent, group), _full)

    @rule(limit=st.sampled_from([1, 3, 100]))
    def overdue(self, limit: int) -> None:
        now = self.now
        self.check(lambda s: s.overdue(now, limit), _full_list,
                   lambda: self.model.overdue(now, limit), _full_list)

    @rule()
    def sweep(self) -> None:
        """What a hub's sweeper does: time out every overdue command."""
        now = self.now
        err = {"code": "timeout", "message": "the command timed out"}
        for cmd in self.model.overdue(now, 100):
            self._time_out(cmd.id, now, err)

    def _time_out(self, cmd_id: str, now: int, err: dict[str, Any]) -> None:
        self.check(lambda s: s.complete(cmd_id, "timeout", now=now, error=err), _completed,
                   lambda: self.model.complete(cmd_id, "timeout", now=now, error=err),
                   _completed)

    @rule(seconds=st.sampled_from([1, 2, 5, 10]))
    def advance(self, seconds: int) -> None:
        self.now += seconds * 1000

    # -- invariants -------------------------------------------------------------
    @invariant()
    def same_state(self) -> None:
        ids = [*self.ids, NOT_AN_ID]

        async def read(s: Store) -> tuple[Any, ...]:
            pending = asyncio.gather(*(s.list_pending(a) for a in AGENTS))
            cmds = asyncio.gather(*(s.get_command(i) for i in ids))
            return (
                [_full_list(x) for x in await pending],
                {i: _full(c) for i, c in zip(ids, await cmds, strict=True)},
            )

        async def go() -> tuple[tuple[Any, ...], tuple[Any, ...]]:
            return await read(self.memory), await read(self.redis)

        mem, red = self.run(go())
        model = (
            [_full_list(self.model.pending(a)) for a in AGENTS],
            {i: _full(self.model.get(i)) for i in ids},
        )
        for name, got in (("memory", mem), ("redis", red)):
            for what, g, m in zip(("list_pending", "get_command"), got, model,
                                  strict=True):
                assert g == m, f"{name} {what} differs from the model:\n got:   {g}\n model: {m}"


def test_store_matches_model(redis_url: str) -> None:
    class Machine(StoreMachine):
        pass

    Machine.redis_url = redis_url
    run_state_machine_as_test(Machine, settings=settings(
        max_examples=50, stateful_step_count=30, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    ))


# -- regression tests, one per finding ------------------------------------------------------

@pytest.fixture
async def store(engine: str, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    s: Store
    if engine == "redis":
        s = RedisStore(request.getfixturevalue("redis_url"), prefix="r" + uuid.uuid4().hex[:12])
    else:
        s = MemoryStore()
    await s.start()
    yield s
    await s.close()


def _cmd(cmd_id: str, now: int, **kw: Any) -> CommandInfo:
    kw.setdefault("deadline", now + 60_000)
    return CommandInfo(id=cmd_id, agent_id="a1", key=kw.pop("key", "k1"), ts=now, updated=now,
                       origin=ORIGIN, **kw)


@pytest.mark.parametrize("drop", [True, "k1"])
async def test_defect_1_drop_of_every_pending_command_keeps_new_one(
        store: Store, drop: bool | str) -> None:
    """create(old); create(new, drop=...) dropping old, the agent's only command: the new
    one must be listed as pending (it is what the agent is sent when it connects)."""
    now = _now_wall_second()
    await store.create_command(_cmd("old", now))
    res = await store.create_command(_cmd("new", now + 1, group="g"), drop=drop)
    assert [d.id for d in res.dropped] == ["old"]
    got = await store.get_command("new")
    assert got is not None and got.status == "PENDING"
    assert [c.id for c in await store.list_pending("a1")] == ["new"]
    assert [c.id for c in await store.overdue(now + 10**6)] == ["new"]


async def test_defect_6_store_refuses_ok_after_deadline(store: Store) -> None:
    """create(c, deadline=now+1500); complete(c, "ok", now=now+2000) must raise
    UnknownCommand, leaving c for the sweeper to time out."""
    now = _now_wall_second()
    await store.create_command(_cmd("c", now, deadline=now + 1_500))
    with pytest.raises(UnknownCommand):
        await store.complete("c", "ok", now=now + 2_000, result=1, agent_id="a1")
    got = await store.get_command("c")
    assert got is not None and got.status == "PENDING"
    done = await store.complete("c", "timeout", now=now + 2_000,
                                error={"code": "timeout", "message": "the command timed out"})
    assert done.command.outcome == "timeout"


async def test_max_pending_counts_before_drop(store: Store) -> None:
    """Pinned by the model (both engines agree today): ``max_pending`` is checked against
    the commands not COMPLETE before ``drop`` frees any."""
    now = _now_wall_second()
    await store.create_command(_cmd("old", now))
    with pytest.raises(TooManyCommands):
        await store.create_command(_cmd("new", now + 1), drop=True, max_pending=1)
    assert [c.id for c in await store.list_pending("a1")] == ["old"]
