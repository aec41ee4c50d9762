"""The in-memory engine: one hub, nothing to install, everything lost on restart."""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import heapq
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

from agent_client.protocol import pack, unpack

from ..errors import DispatcherError, JobPartRefused, TooManyCommands, UnknownCommand
from ..futures import failed
from ..lifecycle import next_status
from ..models import AgentInfo, CommandInfo, JobInfo, Outcome
from .base import (
    DROPPED_RESULT,
    HISTORY_SCAN,
    Completion,
    CreateResult,
    DropSpec,
    HistoryFilter,
    HistoryPage,
    JobRecord,
    Store,
    job_counts,
)

__all__ = ["MemoryStore"]

T = TypeVar("T")

# COMPLETE jobs kept at most (the oldest go first), whatever the retention.
MAX_RETAINED_JOBS = 10_000


class MemoryStore(Store):
    """Dicts and indexes in this process. Same semantics as the Redis engine.

    Records returned by queries are copies: callers cannot change the store
    by mutating what they get back. ``create_command`` takes ownership of the
    record it is given, and what ``create_command``/``complete`` return is the
    store's own record: read it, do not change it (the hub core does not).
    """

    engine: ClassVar[str] = "memory"

    def __init__(self, *, retention: float = 3600.0, max_retained: int = 1_000_000,
                 max_queues: int = 10_000, max_queued_bytes: int = 64 * 1024 * 1024) -> None:
        if max_queues < 1 or max_queued_bytes < 1:
            raise ValueError("max_queues and max_queued_bytes must be at least 1")
        self._retention_ms = int(retention * 1000)
        # At thousands of commands a second, an hour of retention would hold
        # millions of records in this process: past this many, the oldest
        # COMPLETE commands are forgotten early (Redis has its own maxmemory).
        self._max_retained = max_retained
        self._commands: dict[str, CommandInfo] = {}  # not COMPLETE
        # COMPLETE commands kept for the retention period, packed into one bytes
        # object each: at thousands of commands a second a retained hour is
        # millions of records, and as objects they made every full garbage
        # collection walk all of them (measured: ~15% of the hub's CPU).
        self._done: dict[str, bytes | CommandInfo] = {}
        # agent id -> ids not COMPLETE, in insertion (= ts) order
        self._pending: dict[str, dict[str, None]] = {}
        # (deadline, id) of commands not COMPLETE; stale entries are skipped.
        # Built on the first overdue() call only: a hub on this engine times
        # its commands out with local timers and never asks.
        self._deadlines: list[tuple[int, str]] | None = None
        # (expires, id) of COMPLETE commands; retention is constant, so FIFO
        self._expiry: deque[tuple[int, str]] = deque()
        # History (list_commands): per index name ("all", "agent:ID", "key:KEY",
        # "job:JOB", "outcome:OUTCOME") the (ts, id) of its commands, sorted; and
        # per retained command its card [agent, key, job, outcome, ts]. A command
        # that expires loses its card at once; its index entries are skipped
        # from then on and dropped when they are half of an index (rebuilt).
        self._hist: dict[str, list[tuple[int, str]]] = {}
        self._hist_dead: dict[str, int] = {}
        self._cards: dict[str, list[Any]] = {}
        self._agents: dict[str, AgentInfo] = {}
        # agent id -> its queued (ts, frame), the queues in order of last push
        # (oldest first): past max_queues queues or max_queued_bytes bytes in
        # all, the oldest queues' oldest frames are evicted first.
        self._frames: OrderedDict[str, deque[tuple[int, bytes]]] = OrderedDict()
        self._max_queues = max_queues
        self._max_queued_bytes = max_queued_bytes
        self._queued_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        # Jobs, oldest first; COMPLETE ones go after the retention period, and
        # past MAX_RETAINED_JOBS of them the oldest go first.
        self._jobs: dict[str, JobRecord] = {}
        self._job_outcomes: dict[str, dict[str, int]] = {}  # job id -> ended parts by outcome
        self._job_targets: dict[str, frozenset[str]] = {}  # job id -> its agents
        self._jobs_expiry: deque[tuple[int, str]] = deque()

    # Every answer is a finished future (the store's calling convention, base.py).
    def _get_loop(self) -> asyncio.AbstractEventLoop:
        # Cached: on Python 3.11 get_running_loop() costs a getpid() system call.
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _ok(self, value: T) -> asyncio.Future[T]:
        fut: asyncio.Future[T] = (self._loop or self._get_loop()).create_future()
        fut.set_result(value)
        return fut

    def _failed(self, exc: DispatcherError) -> asyncio.Future[Any]:
        return failed(self._loop or self._get_loop(), exc)

    def _run(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """``fn()``'s value, or the store error it raised, as a finished future."""
        try:
            value = fn()
        except DispatcherError as exc:
            return self._failed(exc)
        return self._ok(value)

    @property
    def unfinished(self) -> int:
        return len(self._commands)

    def ping(self) -> asyncio.Future[None]:
        return self._ok(None)

    # -- commands ----------------------------------------------------------
    def _expire(self, now: int) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, cmd_id = expiry.popleft()
            if self._done.pop(cmd_id, None) is not None:
                self._forget(cmd_id)

    # -- history indexes -------------------------------------------------------
    def _index(self, name: str, ts: int, cmd_id: str) -> None:
        entries = self._hist.get(name)
        if entries is None:
            self._hist[name] = [(ts, cmd_id)]
        elif not entries or entries[-1] < (ts, cmd_id):
            entries.append((ts, cmd_id))  # the usual case: newest last
        else:
            bisect.insort(entries, (ts, cmd_id))

    def _forget(self, cmd_id: str) -> None:
        """A COMPLETE command expired: its card goes, its index entries are dead."""
        if cmd_id in self._commands:
            return  # created again under the same id meanwhile
        card = self._cards.pop(cmd_id, None)
        if card is None:
            return
        for name in _index_names(card):
            entries = self._hist.get(name)
            if entries is None:
                continue
            dead = self._hist_dead.get(name, 0) + 1
            if dead * 2 < len(entries):
                self._hist_dead[name] = dead
                continue
            live = [e for e in entries if self._entry_live(name, e)]
            self._hist_dead.pop(name, None)
            if live:
                self._hist[name] = live
            else:
                del self._hist[name]

    def _entry_live(self, name: str, entry: tuple[int, str]) -> bool:
        card = self._cards.get(entry[1])
        return card is not None and card[4] == entry[0] and (
            not name.startswith("outcome:") or name == f"outcome:{card[3]}")

    def _finish(
        self, cmd: CommandInfo, outcome: Outcome, now: int, result: Any,
        error: dict[str, Any] | None,
    ) -> None:
        cmd.status = next_status(cmd.status, "complete")
        cmd.outcome = outcome
        cmd.updated = now
        cmd.result = result
        cmd.error = error
        index = self._pending.get(cmd.agent_id)
        if index is not None:
            index.pop(cmd.id, None)
            if not index:
                del self._pending[cmd.agent_id]
        del self._commands[cmd.id]
        done = self._done
        done[cmd.id] = _freeze(cmd)
        card = self._cards.get(cmd.id)
        if card is not None:
            card[3] = outcome
            name = "outcome:" + outcome
            entry = (cmd.ts, cmd.id)
            entries = self._hist.get(name)
            if entries is not None and entries[-1] < entry:
                entries.append(entry)  # _index, inlined for the usual case
            else:
                self._index(name, cmd.ts, cmd.id)
        expiry = self._expiry
        expiry.append((now + self._retention_ms, cmd.id))
        if len(expiry) > self._max_retained:
            _, oldest = expiry.popleft()
            if done.pop(oldest, None) is not None:
                self._forget(oldest)

    def create_command(
        self, cmd: CommandInfo, *, drop: DropSpec = None, max_pending: int | None = None,
        locate: bool = True, job: str | None = None,
    ) -> asyncio.Future[CreateResult]:
        if job is not None:
            return self._create_part(cmd, drop, max_pending, job)
        cmd.job = None  # only a job's claimed part belongs to a job
        return self._insert(cmd, drop, max_pending)

    def _insert(self, cmd: CommandInfo, drop: DropSpec, max_pending: int | None,
                ) -> asyncio.Future[CreateResult]:
        # Hot path (benchmark rows "roundtrip" of the in-memory engine): the
        # expiry test and _ok inlined.
        expiry = self._expiry
        if expiry and expiry[0][0] <= cmd.ts:
            self._expire(cmd.ts)
        if cmd.id in self._commands or cmd.id in self._done:
            existing = self._get(cmd.id)
            assert existing is not None
            return self._ok(CreateResult(existing, False))
        index = self._pending.get(cmd.agent_id)
        if index is None:
            index = self._pending[cmd.agent_id] = {}
        elif max_pending is not None and len(index) >= max_pending:
            return self._failed(TooManyCommands(
                f"agent {cmd.agent_id!r} already has {len(index)} commands not COMPLETE"
            ))
        dropped: list[CommandInfo] = []
        coalesced = False
        if drop or cmd.group is not None:
            for other_id in list(index):
                other = self._commands[other_id]
                if drop and other.status == "PENDING" and _drops(drop, cmd, other):
                    self._finish(other, "dropped", cmd.ts, DROPPED_RESULT, None)
                    dropped.append(other.copy())
                elif cmd.group is not None and other.group == cmd.group:
                    coalesced = True
            if dropped:
                # _finish forgets an agent's index once empty: take it anew.
                index = self._pending.setdefault(cmd.agent_id, {})
        # The store takes the caller's record as its own (no copy on the hot path).
        cmd.status = "PENDING"
        cmd.outcome = None
        cmd.updated = cmd.ts
        self._commands[cmd.id] = cmd
        index[cmd.id] = None
        ts, cmd_id = cmd.ts, cmd.id
        self._cards[cmd_id] = [cmd.agent_id, cmd.key, cmd.job, None, ts]
        # The history indexes (_index, inlined for the usual case: newest last).
        entry = (ts, cmd_id)
        hist = self._hist
        names = ("all", "agent:" + cmd.agent_id, "key:" + cmd.key) if cmd.job is None else (
            "all", "agent:" + cmd.agent_id, "key:" + cmd.key, "job:" + cmd.job)
        for name in names:
            entries = hist.get(name)
            if entries is not None and entries[-1] < entry:
                entries.append(entry)
            else:
                self._index(name, ts, cmd_id)
        heap = self._deadlines
        if heap is not None and cmd.deadline is not None:
            heapq.heappush(heap, (cmd.deadline, cmd.id))
            if len(heap) > 1024 and len(heap) > 4 * len(self._commands):
                self._compact_deadlines()
        fut: asyncio.Future[CreateResult] = (self._loop or self._get_loop()).create_future()
        fut.set_result(CreateResult(cmd, True, dropped, coalesced))
        return fut

    def _create_part(self, cmd: CommandInfo, drop: DropSpec, max_pending: int | None,
                     job: str) -> asyncio.Future[CreateResult]:
        """A job's part: claim the agent's part for ``cmd.id``, and create it, in one step."""
        rec = self._jobs.get(job)
        agent = cmd.agent_id
        claimed = None if rec is None else rec.parts.get(agent)
        refusal: str | None = None
        if rec is None:
            refusal = f"no job {job!r}"
        elif claimed is not None:
            existing = self._get(claimed) if claimed == cmd.id else None
            if existing is not None:
                return self._ok(CreateResult(existing, created=False))
            refusal = f"the part of {agent!r} started already"
        elif agent in rec.skipped:
            refusal = f"the part of {agent!r} was skipped"
        elif rec.info.status != "RUNNING" or rec.cancelled:
            refusal = f"job {job!r} is not running"
        elif rec.info.origin != cmd.origin:
            refusal = f"job {job!r} is run by hub {rec.info.origin!r}"
        elif agent not in self._job_targets[job]:
            refusal = f"agent {agent!r} is not a target of job {job!r}"
        elif cmd.id in self._commands or cmd.id in self._done:
            refusal = f"command id {cmd.id!r} exists already"
        if refusal is not None:
            return self._failed(JobPartRefused(refusal, claimed))
        assert rec is not None
        cmd.job = job
        fut = self._insert(cmd, drop, max_pending)
        if fut.exception() is None and fut.result().created:
            rec.parts[agent] = cmd.id
            self._job_changed(rec, cmd.ts)
        return fut

    def _compact_deadlines(self) -> None:
        """Drop the entries of commands that completed: the heap stays bounded by
        the live commands (amortised O(1) per command)."""
        self._deadlines = [(c.deadline, c.id) for c in self._commands.values()
                           if c.deadline is not None]
        heapq.heapify(self._deadlines)

    def _get(self, cmd_id: str) -> CommandInfo | None:
        """A copy of the command, COMPLETE or not."""
        cmd = self._commands.get(cmd_id)
        if cmd is not None:
            return cmd.copy()
        done = self._done.get(cmd_id)
        if done is None:
            return None
        return _thaw(done) if isinstance(done, bytes) else done.copy()

    def _addressed(self, cmd_id: str, agent_id: str | None) -> CommandInfo:
        cmd = self._commands.get(cmd_id)
        if cmd is None:
            done = self._get(cmd_id)
            if done is None:
                raise UnknownCommand(f"no command {cmd_id!r}")
            cmd = done
        if agent_id is not None and cmd.agent_id != agent_id:
            raise UnknownCommand(f"command {cmd_id!r} is not addressed to agent {agent_id!r}")
        if cmd.status == "COMPLETE":
            raise UnknownCommand(f"command {cmd_id!r} is already COMPLETE")
        return cmd

    def mark_active(self, cmd_id: str, agent_id: str, now: int) -> asyncio.Future[None]:
        return self._run(lambda: self._mark_active(cmd_id, agent_id, now))

    def _mark_active(self, cmd_id: str, agent_id: str, now: int) -> None:
        cmd = self._addressed(cmd_id, agent_id)
        cmd.status = next_status(cmd.status, "ack")
        cmd.updated = now

    def complete(
        self,
        cmd_id: str,
        outcome: Outcome,
        *,
        now: int,
        result: Any = None,
        error: dict[str, Any] | None = None,
        agent_id: str | None = None,
    ) -> asyncio.Future[Completion]:
        # Spelled out rather than through _run (hot path: no closure per answer).
        expiry = self._expiry
        if expiry and expiry[0][0] <= now:
            self._expire(now)
        try:
            cmd = self._addressed(cmd_id, agent_id)
        except UnknownCommand as exc:
            return self._failed(exc)
        answer = outcome in ("ok", "error")
        if answer and cmd.deadline is not None and cmd.deadline <= now:
            return self._failed(UnknownCommand(f"command {cmd_id!r} is past its deadline"))
        self._finish(cmd, outcome, now, result, error)
        if not answer or cmd.group is None:
            fut: asyncio.Future[Completion] = (self._loop or self._get_loop()).create_future()
            fut.set_result(Completion(cmd))  # _ok, inlined (hot path)
            return fut
        members: list[CommandInfo] = []
        for other_id in list(self._pending.get(cmd.agent_id, ())):
            other = self._commands[other_id]
            if other.group == cmd.group and other.status == "PENDING" \
                    and (other.deadline is None or other.deadline > now):
                self._finish(other, outcome, now, result, error)
                members.append(other.copy())
        return self._ok(Completion(cmd, tuple(members)))

    def _oldest_first(self, agent_id: str) -> list[CommandInfo]:
        # The index keeps insertion order; the contract is ts order (as
        # Redis's sorted set), which differs only for explicit timestamps.
        cmds = [self._commands[i] for i in self._pending.get(agent_id, ())]
        cmds.sort(key=lambda c: (c.ts, c.id))
        return cmds

    def next_in_group(self, agent_id: str, group: str) -> asyncio.Future[CommandInfo | None]:
        for cmd in self._oldest_first(agent_id):
            if cmd.group == group:
                return self._ok(cmd.copy())
        return self._ok(None)

    def get_command(self, cmd_id: str) -> asyncio.Future[CommandInfo | None]:
        # Retention holds for readers too, as Redis's TTL does: without this
        # a COMPLETE command stayed readable until the next write swept it.
        self._expire(int(time.time() * 1000))
        return self._ok(self._get(cmd_id))

    def list_pending(self, agent_id: str) -> asyncio.Future[list[CommandInfo]]:
        return self._ok([cmd.copy() for cmd in self._oldest_first(agent_id)])

    def progress_origin(self, cmd_id: str, agent_id: str | None) -> asyncio.Future[str]:
        return self._run(lambda: self._addressed(cmd_id, agent_id).origin)

    def list_commands(self, where: HistoryFilter, *, limit: int,
                      before: tuple[int, str] | None, now: int) -> asyncio.Future[HistoryPage]:
        self._expire(now)
        names = [f"{kind}:{value}" for kind, value in (
            ("agent", where.agent_id), ("key", where.key), ("job", where.job),
            ("outcome", where.outcome)) if value is not None] or ["all"]
        entries = min((self._hist.get(name, []) for name in names), key=len)
        pos = len(entries) if before is None else bisect.bisect_left(entries, before)
        out: list[CommandInfo] = []
        last: tuple[int, str] | None = None
        scanned = 0
        while pos > 0 and len(out) < limit and scanned < HISTORY_SCAN:
            pos -= 1
            scanned += 1
            last = entries[pos]
            ts, cmd_id = last
            card = self._cards.get(cmd_id)
            if card is None or card[4] != ts:
                continue
            live = self._commands.get(cmd_id)
            status = live.status if live is not None else "COMPLETE"
            if where.matches(card[0], card[1], card[2], status, card[3]):
                info = self._get(cmd_id)
                if info is not None:
                    out.append(info)
        return self._ok(HistoryPage(out, last if pos > 0 else None))

    def trim_history(self, now: int, limit: int = 1000) -> asyncio.Future[int]:
        # Expired commands leave the indexes as they expire (_forget): only the
        # expiry itself is due.
        self._expire(now)
        return self._ok(0)

    def overdue(self, now: int, limit: int = 100) -> asyncio.Future[list[CommandInfo]]:
        if self._deadlines is None:
            self._compact_deadlines()
        heap = self._deadlines
        assert heap is not None
        out: list[CommandInfo] = []
        # Drop entries of commands that completed or expired; keep live ones.
        while heap and len(out) < limit and heap[0][0] <= now:
            _, cmd_id = heapq.heappop(heap)
            cmd = self._commands.get(cmd_id)
            if cmd is not None and cmd.status != "COMPLETE":
                out.append(cmd.copy())
        for cmd in out:  # still overdue until someone completes them
            assert cmd.deadline is not None
            heapq.heappush(heap, (cmd.deadline, cmd.id))
        return self._ok(out)

    # -- jobs --------------------------------------------------------------------
    def _expire_jobs(self, now: int) -> None:
        expiry = self._jobs_expiry
        while expiry and (expiry[0][0] <= now or len(expiry) > MAX_RETAINED_JOBS):
            job_id = expiry.popleft()[1]
            self._jobs.pop(job_id, None)
            self._job_outcomes.pop(job_id, None)
            self._job_targets.pop(job_id, None)

    def _job_changed(self, rec: JobRecord, now: int) -> None:
        """Counts anew; COMPLETE once every part ended or was skipped."""
        info = rec.info
        info.updated = now
        info.counts = job_counts(len(info.agents), len(rec.parts), len(rec.skipped),
                                 self._job_outcomes.setdefault(info.id, {}))
        if info.status == "RUNNING" and len(rec.ended) + len(rec.skipped) == len(info.agents):
            info.status = "COMPLETE"
            self._jobs_expiry.append((now + self._retention_ms, info.id))
            self._expire_jobs(now)

    def create_job(self, job: JobRecord) -> asyncio.Future[tuple[JobRecord, bool]]:
        self._expire_jobs(job.info.ts)
        existing = self._jobs.get(job.info.id)
        if existing is not None:
            return self._ok((_copy_job(existing), False))
        rec = _copy_job(job)
        self._jobs[rec.info.id] = rec
        self._job_targets[rec.info.id] = frozenset(rec.info.agents)
        self._job_changed(rec, rec.info.ts)
        return self._ok((_copy_job(rec), True))

    def get_job(self, job_id: str) -> asyncio.Future[JobRecord | None]:
        self._expire_jobs(int(time.time() * 1000))
        rec = self._jobs.get(job_id)
        return self._ok(None if rec is None else _copy_job(rec))

    def list_jobs(self, limit: int) -> asyncio.Future[list[JobInfo]]:
        self._expire_jobs(int(time.time() * 1000))
        newest = sorted(self._jobs.values(), key=lambda r: (r.info.ts, r.info.id), reverse=True)
        return self._ok([_copy_job(r).info for r in newest[:limit]])

    def end_job_parts(self, job_id: str, ended: Sequence[tuple[str, str]],
                      now: int) -> asyncio.Future[JobInfo | None]:
        rec = self._jobs.get(job_id)
        if rec is None:
            return self._ok(None)
        outcomes = self._job_outcomes.setdefault(job_id, {})
        for agent, outcome in ended:
            if agent in rec.parts and agent not in rec.ended:
                rec.ended[agent] = outcome
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
        self._job_changed(rec, now)
        info = rec.info
        return self._ok(dataclasses.replace(info, agents=[], payload=None, target=None,
                                            counts=dict(info.counts)))

    def skip_job_parts(self, job_id: str, agents: Sequence[str] | None, now: int, *,
                       origin: str | None = None,
                       cancel: bool = False) -> asyncio.Future[JobRecord | None]:
        rec = self._jobs.get(job_id)
        if rec is None or (origin is not None and rec.info.origin != origin):
            return self._ok(None)
        if rec.info.status == "RUNNING":
            if cancel:
                rec.cancelled = True
            targets = self._job_targets[job_id]
            for agent in rec.info.agents if agents is None else agents:
                if agent in targets and agent not in rec.parts:
                    rec.skipped.add(agent)
            self._job_changed(rec, now)
        return self._ok(_copy_job(rec))

    # -- agents ------------------------------------------------------------
    def register_agent(self, info: AgentInfo) -> asyncio.Future[AgentInfo | None]:
        previous = self._agents.get(info.id)
        self._agents[info.id] = info.copy()
        return self._ok(previous)

    def unregister_agent(self, agent_id: str, session: str) -> asyncio.Future[bool]:
        current = self._agents.get(agent_id)
        if current is None or current.session != session:
            return self._ok(False)
        del self._agents[agent_id]
        return self._ok(True)

    def touch_agents(self, agents: Sequence[tuple[str, str]], now: int) -> asyncio.Future[int]:
        touched = 0
        for agent_id, session in agents:
            info = self._agents.get(agent_id)
            if info is not None and info.session == session:
                info.last_seen = now
                touched += 1
        return self._ok(touched)

    def get_agent(self, agent_id: str) -> asyncio.Future[AgentInfo | None]:
        info = self._agents.get(agent_id)
        return self._ok(None if info is None else info.copy())

    def list_agents(self) -> asyncio.Future[list[AgentInfo]]:
        return self._ok([a.copy() for a in self._agents.values()])

    # -- queued frames ---------------------------------------------------------
    @property
    def queue_count(self) -> int:
        """Agents with frames queued (bounded by ``max_queues``)."""
        return len(self._frames)

    @property
    def queued_bytes(self) -> int:
        """Bytes of all queued frames (bounded by ``max_queued_bytes``)."""
        return self._queued_bytes

    def queue_frame(self, agent_id: str, frame: bytes, *, now: int, max_len: int,
                    ttl_ms: int) -> asyncio.Future[bool]:
        frames = self._frames
        queue = frames.get(agent_id)
        if queue is not None:
            expired = 0
            while queue and queue[0][0] + ttl_ms <= now:
                self._queued_bytes -= len(queue.popleft()[1])  # make room before refusing
                expired += 1
            self.frames_expired += expired
            if not queue:
                del frames[agent_id]
                queue = None
            elif len(queue) >= max_len:
                return self._ok(False)
        if max_len < 1 or len(frame) > self._max_queued_bytes:
            return self._ok(False)
        if queue is None:
            while len(frames) >= self._max_queues:
                _, oldest = frames.popitem(last=False)
                self._evicted(oldest)
            queue = frames[agent_id] = deque()
        else:
            frames.move_to_end(agent_id)
        self._make_room(len(frame), agent_id)
        queue.append((now, frame))
        self._queued_bytes += len(frame)
        return self._ok(True)

    def _evicted(self, queue: deque[tuple[int, bytes]]) -> None:
        self.frames_evicted += len(queue)
        self._queued_bytes -= sum(len(f) for _, f in queue)

    def _make_room(self, size: int, agent_id: str) -> None:
        """Evict the oldest queues' oldest frames until ``size`` more bytes fit;
        ``agent_id``'s queue (the newest) stays, even when emptied."""
        frames = self._frames
        while self._queued_bytes + size > self._max_queued_bytes:
            oldest_id, oldest = next(iter(frames.items()))
            if not oldest:  # only agent_id's empty queue is left (its frame fits alone)
                break
            self._queued_bytes -= len(oldest.popleft()[1])
            self.frames_evicted += 1
            if not oldest and oldest_id != agent_id:
                del frames[oldest_id]

    def take_frames(self, agent_id: str, *, now: int,
                    ttl_ms: int) -> asyncio.Future[tuple[list[bytes], int]]:
        queue = self._frames.pop(agent_id, None)
        if not queue:
            return self._ok(([], 0))
        self._queued_bytes -= sum(len(f) for _, f in queue)
        fresh = [f for ts, f in queue if ts + ttl_ms > now]
        return self._ok((fresh, len(queue) - len(fresh)))

    def requeue_frames(self, agent_id: str, frames: list[bytes], *, now: int,
                       ttl_ms: int = 3_600_000) -> asyncio.Future[None]:
        room = self._max_queued_bytes
        kept: list[bytes] = []
        for f in reversed(frames):  # the newest fit first, as queue_frame would keep them
            if len(f) > room:
                self.frames_evicted += 1
                continue
            room -= len(f)
            kept.append(f)
        if not kept:
            return self._ok(None)
        size = room_needed = self._max_queued_bytes - room
        queues = self._frames
        queue = queues.get(agent_id)
        if queue is None:
            while len(queues) >= self._max_queues:
                _, oldest = queues.popitem(last=False)
                self._evicted(oldest)
            queue = queues[agent_id] = deque()
        else:
            queues.move_to_end(agent_id)
        # Room first, from the other queues' oldest frames and then this one's.
        self._make_room(room_needed, agent_id)
        queue.extendleft((now, f) for f in kept)  # kept is newest first
        self._queued_bytes += size
        return self._ok(None)


def _copy_job(rec: JobRecord) -> JobRecord:
    info = dataclasses.replace(rec.info, agents=list(rec.info.agents), counts=dict(rec.info.counts))
    return JobRecord(info, rec.timeout_ms, dict(rec.parts), set(rec.skipped), dict(rec.ended),
                     rec.cancelled)


def _drops(drop: DropSpec, new: CommandInfo, other: CommandInfo) -> bool:
    """Whether ``drop_all_pending`` of ``new`` selects the PENDING command ``other``."""
    if isinstance(drop, str):
        return other.key == drop
    return new.group is None or other.group != new.group


def _index_names(card: list[Any]) -> list[str]:
    agent, key, job, outcome, _ = card
    names = ["all", f"agent:{agent}", f"key:{key}"]
    if job is not None:
        names.append(f"job:{job}")
    if outcome is not None:
        names.append(f"outcome:{outcome}")
    return names


_FIELDS = ("id", "agent_id", "key", "outcome", "group", "ts", "updated", "deadline", "origin",
           "payload", "result", "error", "job")


def _freeze(cmd: CommandInfo) -> bytes | CommandInfo:
    """A COMPLETE command as one msgpack bytes object (kept as is if it cannot be packed:
    ``apply_command_response`` may be given any Python value). Order of ``_FIELDS``."""
    try:
        return pack((cmd.id, cmd.agent_id, cmd.key, cmd.outcome, cmd.group, cmd.ts,
                     cmd.updated, cmd.deadline, cmd.origin, cmd.payload, cmd.result, cmd.error,
                     cmd.job))
    except TypeError:
        return cmd


def _thaw(data: bytes) -> CommandInfo:
    values = dict(zip(_FIELDS, unpack(data), strict=True))
    return CommandInfo(status="COMPLETE", **values)
