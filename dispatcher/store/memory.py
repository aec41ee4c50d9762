"""The in-memory engine: one hub, nothing to install, everything lost on restart."""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from agent_client.protocol import pack, unpack

from ..errors import DispatcherError, TooManyCommands, UnknownCommand
from ..futures import failed
from ..lifecycle import next_status
from ..models import AgentInfo, CommandInfo, Outcome
from .base import DROPPED_RESULT, Completion, CreateResult, DropSpec, Store

__all__ = ["MemoryStore"]

T = TypeVar("T")


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
        self._agents: dict[str, AgentInfo] = {}
        # agent id -> its queued (ts, frame), the queues in order of last push
        # (oldest first): past max_queues queues or max_queued_bytes bytes in
        # all, the oldest queues' oldest frames are evicted first.
        self._frames: OrderedDict[str, deque[tuple[int, bytes]]] = OrderedDict()
        self._max_queues = max_queues
        self._max_queued_bytes = max_queued_bytes
        self._queued_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    # Every answer is a finished future (the store's calling convention, base.py).
    def _ok(self, value: T) -> asyncio.Future[T]:
        loop = self._loop
        if loop is None:
            # Cached: on Python 3.11 get_running_loop() costs a getpid() system call.
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()  # futures.resolved, inlined (hot)
        fut.set_result(value)
        return fut

    def _failed(self, exc: DispatcherError) -> asyncio.Future[Any]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return failed(loop, exc)

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
            self._done.pop(cmd_id, None)

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
        expiry = self._expiry
        expiry.append((now + self._retention_ms, cmd.id))
        if len(expiry) > self._max_retained:
            _, oldest = expiry.popleft()
            done.pop(oldest, None)

    def create_command(
        self, cmd: CommandInfo, *, drop: DropSpec = None, max_pending: int | None = None,
        locate: bool = True,
    ) -> asyncio.Future[CreateResult]:
        # Spelled out rather than through _run (hot path: no closure per command).
        try:
            res = self._create(cmd, drop, max_pending)
        except DispatcherError as exc:
            return self._failed(exc)
        return self._ok(res)

    def _create(self, cmd: CommandInfo, drop: DropSpec, max_pending: int | None,
                ) -> CreateResult:
        self._expire(cmd.ts)
        if cmd.id in self._commands or cmd.id in self._done:
            existing = self._get(cmd.id)
            assert existing is not None
            return CreateResult(existing, created=False)
        index = self._pending.setdefault(cmd.agent_id, {})
        if max_pending is not None and len(index) >= max_pending:
            raise TooManyCommands(
                f"agent {cmd.agent_id!r} already has {len(index)} commands not COMPLETE"
            )
        dropped: list[CommandInfo] = []
        coalesced = False
        for other_id in list(index) if (drop or cmd.group is not None) else ():
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
        heap = self._deadlines
        if heap is not None and cmd.deadline is not None:
            heapq.heappush(heap, (cmd.deadline, cmd.id))
            if len(heap) > 1024 and len(heap) > 4 * len(self._commands):
                self._compact_deadlines()
        return CreateResult(cmd, created=True, dropped=dropped, coalesced=coalesced)

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
            return self._ok(Completion(cmd))
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


def _drops(drop: DropSpec, new: CommandInfo, other: CommandInfo) -> bool:
    """Whether ``drop_all_pending`` of ``new`` selects the PENDING command ``other``."""
    if isinstance(drop, str):
        return other.key == drop
    return new.group is None or other.group != new.group


_FIELDS = ("id", "agent_id", "key", "outcome", "group", "ts", "updated", "deadline", "origin",
           "payload", "result", "error")


def _freeze(cmd: CommandInfo) -> bytes | CommandInfo:
    """A COMPLETE command as one msgpack bytes object (kept as is if it cannot be packed:
    ``apply_command_response`` may be given any Python value). Order of ``_FIELDS``."""
    try:
        return pack((cmd.id, cmd.agent_id, cmd.key, cmd.outcome, cmd.group, cmd.ts,
                     cmd.updated, cmd.deadline, cmd.origin, cmd.payload, cmd.result, cmd.error))
    except TypeError:
        return cmd


def _thaw(data: bytes) -> CommandInfo:
    values = dict(zip(_FIELDS, unpack(data), strict=True))
    return CommandInfo(status="COMPLETE", **values)
