"""The hub's command lifecycle against the reference model (hypothesis stateful), both engines.

A ``RuleBasedStateMachine`` runs a real ``Dispatcher`` (port 0; in-memory or
on the session's redis-server with a fresh prefix) and raw WebSocket agents
(``RawAgent``), and applies random sequences of: submits (new or reused
``command_id``, groups, ``drop_all_pending`` True or a key, a long timeout or
a short one that the step then waits out), agent connect/disconnect/replace,
the agent's ack/progress/result/fail for a command it was sent, answers for
unknown, COMPLETE or another agent's ids, and cancels through the handle.
``lifecycle_model.Model`` says what must follow; after every step:

- every handle the model says is COMPLETE resolves (bounded wait) with the
  model's outcome, and no other handle has resolved;
- each connected agent has been sent exactly what the model makes
  deliverable (its commands not COMPLETE, one per group: ``redeliverable``),
  each at most once on the connection, none COMPLETE or past its deadline
  when sent, and a ``cancel`` for each command it was sent that timed out,
  was cancelled or dropped (for one it was never sent, a cancel is allowed,
  not required); after a (re)connection, the
  redelivered commands are exactly the model's, oldest first;
- answers the hub must refuse get ``unknown_command`` (and change nothing);
- ``get_command`` and ``list_pending_commands`` match the model.

Frames are drained up to a barrier: an ``ack`` for an id that never exists,
which the hub answers with an error after everything the agent sent before
it (answers are applied in order). Commands the hub sends from a task of
its own (the next member of a group) are waited for, bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from dispatcher import Dispatcher, HubConfig
from dispatcher.errors import CommandCancelled, CommandFailed, CommandTimeout
from dispatcher.handle import CommandHandle
from dispatcher.models import CommandInfo

from ..support import WAIT, RawAgent, wait_for
from .lifecycle_model import Model

T = TypeVar("T")

AGENTS = ("a1", "a2")
KEYS = ("k1", "k2")
GROUPS = (None, "g1", "g2")
SHORT = 0.2  # seconds: a timeout the step waits out
LONG = 60.0  # never reached during a test
NOT_AN_ID = "nope"
DROP_OUTCOMES = ("timeout", "cancelled", "dropped")  # the agent gets a cancel for these

values = st.one_of(
    st.none(), st.integers(-5, 5), st.text(max_size=3), st.binary(max_size=3),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), max_size=2),
)


def _view(info: CommandInfo | None) -> dict[str, Any] | None:
    """What the hub and the model must agree on (times are the hub's own)."""
    if info is None:
        return None
    return {name: getattr(info, name) for name in
            ("id", "agent_id", "key", "status", "outcome", "group", "payload", "result",
             "error")}


def _error(value: Any, *, stored: bool = False) -> dict[str, Any]:
    """A ``fail`` frame's error; as stored, ``data`` None is left out (agent_client.protocol)."""
    error = {"code": "boom", "message": "failed", "data": value}
    if stored and value is None:
        del error["data"]
    return error


class Conn:
    """One live connection of an agent and what it was sent."""

    def __init__(self, ws: RawAgent) -> None:
        self.ws = ws
        self.sent: set[str] = set()  # cmd ids received on this connection
        self.since = time.time() * 1000  # frames read now were sent after this (unix ms)


class HubMachine(RuleBasedStateMachine):
    engine = "memory"
    redis_url = ""

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.model = Model()
        self.seq = itertools.count()  # the model's ts: creation order (the hub's ts ties break by id)
        self.ids: list[str] = []
        self.handles: dict[str, CommandHandle] = {}
        self.progress: dict[str, list[Any]] = {}
        self.conns: dict[str, Conn] = {}
        self.barriers = itertools.count()
        # During a step: commands that were deliverable at some point (per agent), the
        # cancels the agent must get, the unknown_command refusals it must get.
        self.allowed: dict[str, set[str]] = {a: set() for a in AGENTS}
        self.cancels: dict[str, set[str]] = {a: set() for a in AGENTS}
        self.must_cancel: dict[str, set[str]] = {a: set() for a in AGENTS}
        self.refusals: dict[str, list[str]] = {a: [] for a in AGENTS}
        options: dict[str, Any] = {"port": 0, "admin_port": None, "heartbeat": 5.0,
                                   "hello_timeout": 5.0, "command_timeout": LONG,
                                   "prefix": "h" + uuid.uuid4().hex[:12]}
        if self.engine == "redis":
            options["redis_url"] = self.redis_url
        self.hub = Dispatcher(HubConfig(**options))
        self.run(self.hub.listen())
        self.url = f"ws://127.0.0.1:{self.hub.port}/ws"

    def teardown(self) -> None:
        async def close() -> None:
            for conn in self.conns.values():
                with contextlib.suppress(Exception):
                    await conn.ws.close()
            await self.hub.close()
        try:
            self.run(close())
        finally:
            self.runner.close()

    def run(self, coro: Awaitable[T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(3 * WAIT):
                return await coro
        return self.runner.run(bounded())

    # -- model bookkeeping --------------------------------------------------------
    def note(self) -> None:
        """After each change of the model: what is deliverable now is allowed in this step."""
        for agent in AGENTS:
            self.allowed[agent].update(c.id for c in self.model.redeliverable(agent))

    def completed(self, before: dict[str, str], agent: str) -> None:
        """Cancels the agent must get for what completed since ``before`` (id -> status)."""
        if agent not in self.conns:
            return
        for cmd_id, status in before.items():
            cmd = self.model.get(cmd_id)
            assert cmd is not None
            if status != "COMPLETE" and cmd.status == "COMPLETE" and cmd.outcome in DROP_OUTCOMES:
                self.cancels[agent].add(cmd_id)
                if cmd_id in self.conns[agent].sent:
                    self.must_cancel[agent].add(cmd_id)

    def statuses(self) -> dict[str, str]:
        return {i: c.status for i, c in self.model.cmds.items()}

    # -- rules -----------------------------------------------------------------------
    @rule(data=st.data(), agent=st.sampled_from(AGENTS), key=st.sampled_from(KEYS),
          group=st.sampled_from(GROUPS), drop=st.sampled_from([False, False, True, "k1", "k2"]),
          reuse=st.integers(0, 5), short=st.integers(0, 7), payload=values)
    def submit(self, data: st.DataObject, agent: str, key: str, group: str | None,
               drop: bool | str, reuse: int, short: int, payload: Any) -> None:
        if reuse == 0 and self.ids:
            cmd_id = data.draw(st.sampled_from(self.ids), label="reused id")
        else:
            cmd_id = f"c{len(self.ids):03d}"
        is_short = short == 0 and cmd_id not in self.model.cmds
        cmd = CommandInfo(id=cmd_id, agent_id=agent, key=key, group=group, ts=next(self.seq),
                          payload=payload, deadline=None)
        before = self.statuses()
        handle = self.run(self._submit(agent, key, payload, group=group,
                                       drop_all_pending=drop, command_id=cmd_id,
                                       timeout=SHORT if is_short else LONG))
        existing = self.model.get(cmd_id)
        if existing is not None and existing.status != "COMPLETE":
            assert handle is self.handles[cmd_id], "an idempotent submit of a waiting command " \
                                                   "returns its handle"
        res = self.model.create(cmd, drop=drop or None)
        self.note()
        if res.created:
            self.ids.append(cmd_id)
            self.handles[cmd_id] = handle
        elif res.command.status == "COMPLETE":
            self.run(self.expect_outcome(handle, res.command))
        self.run(handle.submitted())
        self.completed(before, agent)
        if is_short:
            # The step waits the timeout out: nothing else happens meanwhile (no
            # check either: one that outlasted the timeout would see it fire early).
            before = self.statuses()
            with pytest.raises(CommandTimeout):
                self.run(asyncio.wait_for(asyncio.shield(self._wait(handle)), WAIT))
            self.model.complete(cmd_id, "timeout", now=0,
                                error={"code": "timeout", "message": "the command timed out"})
            self.note()
            self.completed(before, agent)
        self.settle()

    async def _submit(self, agent: str, key: str, payload: Any, **kw: Any) -> CommandHandle:
        return self.hub.execute_on_agent(agent, key, payload, **kw)

    async def _wait(self, handle: CommandHandle) -> Any:
        return await handle

    @initialize(both=st.booleans())
    def start_connected(self, both: bool) -> None:
        """Most sequences are worth more with agents online from the start."""
        for agent in AGENTS[:2 if both else 1]:
            self.attach(agent)

    @precondition(lambda self: len(self.conns) < len(AGENTS))
    @rule(data=st.data())
    def connect(self, data: st.DataObject) -> None:
        agent = data.draw(st.sampled_from([a for a in AGENTS if a not in self.conns]))
        self.attach(agent)

    @precondition(lambda self: bool(self.conns))
    @rule(data=st.data())
    def replace(self, data: st.DataObject) -> None:
        """A new connection of a connected agent: the old one is closed (4409)."""
        agent = data.draw(st.sampled_from(sorted(self.conns)))
        old = self.conns.pop(agent)
        self.attach(agent)
        code, _ = self.run(old.ws.closed())
        assert code == 4409

    def attach(self, agent: str) -> None:
        ws, welcome = self.run(RawAgent.hello(self.url, agent))
        assert welcome["t"] == "welcome"
        conn = self.conns[agent] = Conn(ws)
        expected = [c.id for c in self.model.redeliverable(agent)]
        got: list[str] = []
        for _ in expected:
            frame = self.run(ws.recv())
            assert frame["t"] == "cmd", f"{agent} expected a redelivered command, got {frame}"
            got.append(frame["id"])
            self.check_cmd(agent, conn, frame)
        assert got == expected, f"redelivery to {agent}: got {got}, the model says {expected}"
        self.settle()

    @precondition(lambda self: bool(self.conns))
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        agent = data.draw(st.sampled_from(sorted(self.conns)))
        conn = self.conns.pop(agent)
        self.run(conn.ws.close())
        self.run(wait_for(lambda: self.hub._connections.get(agent) is None,
                          what=f"{agent} detached"))
        self.settle()

    def _delivered(self) -> list[tuple[str, str]]:
        """(agent, id) of the commands not COMPLETE that were sent on the live connections."""
        return sorted((a, i) for a, conn in self.conns.items() for i in conn.sent
                      if (c := self.model.get(i)) is not None and c.status != "COMPLETE")

    def _leaders(self) -> list[tuple[str, str]]:
        """Delivered commands that lead a group."""
        return [(a, i) for a, i in self._delivered()
                if (c := self.model.get(i)) is not None and c.group is not None]

    @precondition(lambda self: bool(self._delivered()))
    @rule(data=st.data(), kind=st.sampled_from(["ack", "progress", "result", "result", "fail"]),
          value=values)
    def answer(self, data: st.DataObject, kind: str, value: Any) -> None:
        """The agent answers a command it was sent."""
        agent, cmd_id = data.draw(st.sampled_from(self._delivered()), label="delivered")
        self.answer_with(agent, cmd_id, kind, value)
        self.settle()

    @precondition(lambda self: bool(self._delivered()))
    @rule(data=st.data(), value=values)
    def answer_result(self, data: st.DataObject, value: Any) -> None:
        """The commonest answer, twice as likely: a result."""
        agent, cmd_id = data.draw(st.sampled_from(self._delivered()), label="delivered")
        self.answer_with(agent, cmd_id, "result", value)
        self.settle()

    def answer_with(self, agent: str, cmd_id: str, kind: str, value: Any) -> None:
        ws = self.conns[agent].ws
        before = self.statuses()
        if kind == "ack":
            self.run(ws.send({"t": "ack", "id": cmd_id}))
            self.model.mark_active(cmd_id, agent, 0)
        elif kind == "progress":
            self.run(ws.send({"t": "progress", "id": cmd_id, "data": value}))
            self.progress.setdefault(cmd_id, []).append(value)
        elif kind == "result":
            self.run(ws.send({"t": "result", "id": cmd_id, "data": value}))
        else:
            self.run(ws.send({"t": "fail", "id": cmd_id, "error": _error(value)}))
        self.model_answer(agent, cmd_id, kind, value)
        self.completed(before, agent)

    def model_answer(self, agent: str, cmd_id: str, kind: str, value: Any) -> None:
        # An answer to a group member completes the group's PENDING members in the
        # same step (docs/guide.md; none is past its deadline here: short timeouts are waited out).
        if kind == "result":
            self.model.complete(cmd_id, "ok", now=0, result=value, agent_id=agent)
        elif kind == "fail":
            self.model.complete(cmd_id, "error", now=0, error=_error(value, stored=True),
                                agent_id=agent)
        self.note()

    @precondition(lambda self: bool(self.conns))
    @rule(data=st.data(), kind=st.sampled_from(["ack", "progress", "result", "fail"]))
    def refused_answer(self, data: st.DataObject, kind: str) -> None:
        """An answer for an id never created, COMPLETE, or another agent's: unknown_command."""
        agent = data.draw(st.sampled_from(sorted(self.conns)), label="agent")
        refused = [NOT_AN_ID, *(i for i in self.ids
                                if (c := self.model.get(i)) is not None
                                and (c.status == "COMPLETE" or c.agent_id != agent))]
        cmd_id = data.draw(st.sampled_from(refused), label="refused id")
        frame: dict[str, Any] = {"t": kind, "id": cmd_id}
        if kind in ("progress", "result"):
            frame["data"] = 1
        elif kind == "fail":
            frame["error"] = {"code": "late", "message": "late"}
        self.run(self.conns[agent].ws.send(frame))
        self.refusals[agent].append(cmd_id)
        self.settle()

    @precondition(lambda self: bool(self.ids))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        cmd_id = data.draw(st.sampled_from(self.ids), label="cancelled id")
        cmd = self.model.get(cmd_id)
        assert cmd is not None
        before = self.statuses()
        cancelled = self.run(self.handles[cmd_id].cancel())
        assert cancelled == (cmd.status != "COMPLETE")
        if cancelled:
            self.model.complete(cmd_id, "cancelled", now=0, error={
                "code": "cancelled", "message": "the command was cancelled"})
            self.note()
            self.completed(before, cmd.agent_id)
        self.settle()

    @precondition(lambda self: bool(self.conns))
    @rule(data=st.data(), value=values, waiting=st.integers(0, 2))
    def answer_then_submit(self, data: st.DataObject, value: Any, waiting: int) -> None:
        """The agent answers a group's leader (one it was sent, else a new one) while
        ``waiting`` more members wait behind it (the answer completes them with it, in the
        same step); the moment its handle resolves, another member of the group is
        submitted: it is a new run (issue 13, defect 2)."""
        if not self._leaders():
            agent = data.draw(st.sampled_from(sorted(self.conns)), label="agent")
            free = [g for g in ("g1", "g2")
                    if all(c.group != g for c in self.model.pending(agent))]
            if not free:
                return
            first = f"c{len(self.ids):03d}"
            handle = self.run(self._submit(agent, "k1", None, group=free[0], command_id=first,
                                           timeout=LONG))
            self.model.create(CommandInfo(id=first, agent_id=agent, key="k1", group=free[0],
                                          ts=next(self.seq)))
            self.note()
            self.ids.append(first)
            self.handles[first] = handle
            self.settle()
        agent, cmd_id = data.draw(st.sampled_from(self._leaders()), label="leader")
        leader = self.model.get(cmd_id)
        assert leader is not None and leader.group is not None
        for _ in range(waiting):
            member = f"c{len(self.ids):03d}"
            handle = self.run(self._submit(agent, leader.key, None, group=leader.group,
                                           command_id=member, timeout=LONG))
            self.model.create(CommandInfo(id=member, agent_id=agent, key=leader.key,
                                          group=leader.group, ts=next(self.seq)))
            self.note()
            self.ids.append(member)
            self.handles[member] = handle
        if waiting:
            self.settle()
        new_id = f"c{len(self.ids):03d}"

        async def go() -> CommandHandle:
            # One run of the loop from the answer on: the hub must not act on it
            # before the handle is awaited.
            await self.conns[agent].ws.send({"t": "result", "id": cmd_id, "data": value})
            # Awaited directly (no wait_for task): the submit runs in the very turn
            # the handle resolves, before the hub's own follow-up of the answer.
            async with asyncio.timeout(WAIT):
                await self.handles[cmd_id]
            return self.hub.execute_on_agent(agent, leader.key, None, group=leader.group,
                                             command_id=new_id, timeout=LONG)

        before = self.statuses()
        handle = self.run(go())
        self.model_answer(agent, cmd_id, "result", value)
        self.completed(before, agent)
        self.model.create(CommandInfo(id=new_id, agent_id=agent, key=leader.key,
                                      group=leader.group, ts=next(self.seq)))
        self.note()
        self.ids.append(new_id)
        self.handles[new_id] = handle
        self.settle()

    # -- the checks after every step ------------------------------------------------------
    def check_cmd(self, agent: str, conn: Conn, frame: dict[str, Any]) -> None:
        cmd_id = frame["id"]
        assert cmd_id not in conn.sent, f"{cmd_id} sent twice on one connection of {agent}"
        conn.sent.add(cmd_id)
        assert cmd_id in self.allowed[agent], \
            f"{agent} was sent {cmd_id}, which the model never made deliverable in this step"
        deadline = frame.get("deadline")
        assert deadline is None or deadline > conn.since, \
            f"{cmd_id} sent to {agent} past its deadline"

    def settle(self) -> None:
        self.run(self._settle())
        for agent in AGENTS:
            self.allowed[agent] = {c.id for c in self.model.redeliverable(agent)}
            self.cancels[agent].clear()
            self.must_cancel[agent].clear()
            self.refusals[agent].clear()

    async def _settle(self) -> None:
        for cmd_id, handle in self.handles.items():
            cmd = self.model.get(cmd_id)
            assert cmd is not None
            if cmd.status == "COMPLETE":
                await self.expect_outcome(handle, cmd)
        for cmd_id, updates in self.progress.items():
            if updates:
                await self.expect_progress(self.handles[cmd_id], updates)
        for agent, conn in self.conns.items():
            await self.drain(agent, conn)
        for cmd_id, handle in self.handles.items():
            cmd = self.model.get(cmd_id)
            assert cmd is not None
            assert cmd.status == "COMPLETE" or not handle.done(), \
                f"handle of {cmd_id} resolved, the model says {cmd.status}"
        ids = [*self.ids, NOT_AN_ID]
        got = await asyncio.gather(*(self.hub.get_command(i) for i in ids))
        for cmd_id, info in zip(ids, got, strict=True):
            assert _view(info) == _view(self.model.get(cmd_id)), f"get_command({cmd_id!r})"
        for agent in AGENTS:
            pending = await self.hub.list_pending_commands(agent)
            assert [_view(c) for c in pending] == [_view(c) for c in self.model.pending(agent)], \
                f"list_pending_commands({agent!r})"

    async def expect_outcome(self, handle: CommandHandle, cmd: CommandInfo) -> None:
        try:
            value = await asyncio.wait_for(self._wait(handle), WAIT)
        except CommandFailed as exc:
            assert cmd.outcome == "error" and cmd.error is not None, (cmd.id, exc)
            assert (exc.code, exc.message, exc.data) == (
                cmd.error["code"], cmd.error["message"], cmd.error.get("data")), cmd.id
        except CommandTimeout:
            assert cmd.outcome == "timeout", cmd.id
        except CommandCancelled:
            assert cmd.outcome == "cancelled", cmd.id
        except TimeoutError:
            raise AssertionError(f"handle of {cmd.id} did not resolve ({cmd.outcome})") from None
        else:
            assert cmd.outcome in ("ok", "dropped"), (cmd.id, value)
            assert value == cmd.result, f"handle of {cmd.id}: {value!r}, model {cmd.result!r}"

    async def expect_progress(self, handle: CommandHandle, updates: list[Any]) -> None:
        got: list[Any] = []
        async with asyncio.timeout(WAIT):
            async for update in handle.progress():
                got.append(update)
                if len(got) == len(updates):
                    break
        assert got == updates, f"progress of {handle.id}"

    async def drain(self, agent: str, conn: Conn) -> None:
        """Read the agent's frames up to a barrier and until the model's deliveries came."""
        barrier = f"barrier-{next(self.barriers)}"
        sent_at = time.time() * 1000
        await conn.ws.send({"t": "ack", "id": barrier})
        seen_barrier = False
        cancels: set[str] = set()
        refusals: list[str] = []
        must = {c.id for c in self.model.redeliverable(agent)}
        async with asyncio.timeout(WAIT):
            while not seen_barrier or not must <= conn.sent:
                frame = await conn.ws.recv()
                t = frame["t"]
                if t == "cmd":
                    self.check_cmd(agent, conn, frame)
                elif t == "cancel":
                    assert frame["id"] not in cancels, f"cancel {frame['id']} twice"
                    cancels.add(frame["id"])
                elif t == "error" and frame.get("ref") == barrier:
                    assert frame["code"] == "unknown_command"
                    seen_barrier = True
                elif t == "error" and frame["code"] == "unknown_command":
                    refusals.append(frame["ref"])
                else:
                    raise AssertionError(f"{agent} got an unexpected frame {frame}")
        conn.since = sent_at
        # A cancel for each command the agent was sent that timed out, was cancelled
        # or dropped; one for a command it was never sent is allowed, not required.
        assert self.must_cancel[agent] <= cancels <= self.cancels[agent], \
            f"cancels sent to {agent}: {sorted(cancels)}, model: {sorted(self.must_cancel[agent])}" \
            f" required, {sorted(self.cancels[agent])} allowed"
        assert refusals == self.refusals[agent], \
            f"unknown_command for {agent}: {refusals}, model {self.refusals[agent]}"


def test_hub_matches_model(engine: str, request: pytest.FixtureRequest) -> None:
    class Machine(HubMachine):
        pass

    Machine.engine = engine
    if engine == "redis":
        Machine.redis_url = request.getfixturevalue("redis_url")
    run_state_machine_as_test(Machine, settings=settings(
        max_examples=40, stateful_step_count=25, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    ))


# -- regression tests, one per finding ------------------------------------------------------

@pytest.fixture
async def hub(make_hub: Any) -> Dispatcher:
    hub: Dispatcher = await make_hub(command_timeout=LONG)
    return hub


@pytest.mark.parametrize(("drop", "group"), [(True, None), (True, "g"), ("k1", "g")])
async def test_defect_1_drop_of_only_pending_command(
        hub: Dispatcher, drop: bool | str, group: str | None) -> None:
    """Agent offline: submit c1; submit c2 with drop_all_pending (drops c1, the agent's
    only command). c2 must be listed pending and sent when the agent connects."""
    first = hub.execute_on_agent("a1", "k1", command_id="c1")
    second = hub.execute_on_agent("a1", "k1", command_id="c2", drop_all_pending=drop,
                                  group=group)
    assert await first == {"dropped": True}
    await second.submitted()
    assert [c.id for c in await hub.list_pending_commands("a1")] == ["c2"]
    agent, _ = await RawAgent.hello(f"ws://127.0.0.1:{hub.port}/ws", "a1")
    frame = await agent.recv()
    assert (frame["t"], frame["id"]) == ("cmd", "c2")
    await agent.send({"t": "result", "id": "c2", "data": 2})
    assert await asyncio.wait_for(second.result(), WAIT) == 2
    await agent.close()


async def test_defect_2_group_member_submitted_after_the_answer(hub: Dispatcher) -> None:
    """Agent online: submit L (group g); the agent answers L; the moment L's handle resolves,
    submit N (group g). N is a new run: it is sent, and the agent's answer is its result."""
    agent, _ = await RawAgent.hello(f"ws://127.0.0.1:{hub.port}/ws", "a1")
    leader = hub.execute_on_agent("a1", "k1", group="g", command_id="L")
    assert (await agent.recv())["id"] == "L"
    await agent.send({"t": "result", "id": "L", "data": "leader"})
    async with asyncio.timeout(WAIT):
        assert await leader == "leader"
    member = hub.execute_on_agent("a1", "k1", group="g", command_id="N")
    frame = await agent.recv()
    assert (frame["t"], frame["id"]) == ("cmd", "N")
    await agent.send({"t": "result", "id": "N", "data": "member"})
    await agent.send({"t": "ack", "id": "barrier"})
    frame = await agent.recv()
    assert frame.get("ref") == "barrier", f"the answer for N was refused: {frame}"
    assert await asyncio.wait_for(member.result(), WAIT) == "member"
    await agent.close()
