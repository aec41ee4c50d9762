"""The Redis engine: durable command state shared by every hub on one Redis.

Layout and atomic steps are in ``scripts.py`` (docs/redis.md, The key layout).
All operations go through one batcher: whatever the event loop's coroutines
ask for during one turn leaves as a single pipelined write on one connection,
so the Redis cost per command falls as concurrency rises (docs/benchmarks.md).

Failures are converted here, at the layer edge: a Redis that cannot be reached
raises ``StoreUnavailable``, once per call and at once. The first failure
marks the store unhealthy and calls the health listener (the hub emits
``internal.db.error`` once per outage); while unhealthy every call fails fast
without touching the network, and a probe task reconnects in the background.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import structlog
from redis.asyncio.connection import AbstractConnection
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    NoScriptError,
    ResponseError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)
from redis.retry import Retry

from agent_client.proctitle import without_password
from agent_client.protocol import pack, unpack

from ..errors import JobPartRefused, StoreUnavailable, TooManyCommands, UnknownCommand
from ..futures import StoreFuture, resolved, run_continuation
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
from .redis_bus import RedisBus
from .redis_fastpath import ReplyReader, read_replies, read_replies_public
from .redis_fastpath import check as fast_path_check
from .redis_url import make_pool
from .scripts import JOB_COUNT_FIELDS, JOB_INFO_FIELDS, SCRIPTS

__all__ = ["RedisStore"]

log = structlog.get_logger(__name__)

HealthListener = Callable[[bool, BaseException | None], None]

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError)
# Operations per pipelined write. Past a few hundred the per-write cost is
# already negligible per operation, while a larger write only delays the
# first replies in it and grows one buffer; not a tuning knob.
_MAX_BATCH = 1024
# Batches written whose replies are not read yet: bounds the memory held for
# them and the latency a new batch queues behind (32 x 1024 operations is far
# beyond what one hub's event loop produces in a round trip).
_MAX_BATCHES_IN_FLIGHT = 32
# The default bound of operations waiting for a write (``max_queued``).
DEFAULT_MAX_QUEUED = 100_000
# Bound of each wait in close(): cancelled tasks end within a loop turn or two,
# and closing sockets is local work. Generous for a loaded machine, and well
# inside a hub's drain_timeout (10 s by default).
_CLOSE_WAIT = 2.0
_PACKED_DROPPED = pack(DROPPED_RESULT)
_REJECTIONS = {
    0: "no command {id!r}",
    -1: "command {id!r} is not addressed to agent {agent!r}",
    -2: "command {id!r} is already COMPLETE",
    -3: "command {id!r} is past its deadline",
}


class _Op:
    __slots__ = ("args", "future", "parse", "script")

    def __init__(self, script: str | None, args: tuple[Any, ...],
                 future: StoreFuture[Any], parse: Callable[[Any], Any] | None) -> None:
        self.script = script
        self.args = args
        self.future = future
        # Turns the reply into the future's value as the reply is read (its
        # exceptions are the caller's: UnknownCommand, TooManyCommands): no
        # second future and loop turn per operation on the hot paths.
        self.parse = parse


class RedisStore(Store):
    """The store on Redis (one URL: ``redis://``, ``rediss://``, ``unix://``)."""

    engine: ClassVar[str] = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "dispatcher",
        retention: float = 3600.0,
        socket_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        reconnect_interval: float = 0.5,
        probe_interval: float = 2.0,
        probe_timeout: float = 5.0,
        fast_path: bool = True,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_queues: int = 10_000,
    ) -> None:
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        if max_queues < 1:
            raise ValueError("max_queues must be at least 1")
        # Agents with frames queued (P:queues); past it the oldest queue goes.
        self._max_queues = max_queues
        self.url = url
        self.prefix = prefix
        self._retention_ms = str(int(retention * 1000))
        self._probe_interval = reconnect_interval
        self._bus_probe = (probe_interval, probe_timeout)
        # A failure must reach the caller at once (docs/guide.md, Guarantees: store
        # unreachable); the probe task reconnects. The one retry is redis-py's
        # health check: a connection idle for a second is PINGed first, and a
        # stale one (Redis restarted meanwhile) is replaced before our batch is
        # written, so a restart costs no failed call once Redis is back.
        # The read timeout is ours, one per pipelined write (``_send``): a
        # per-reply socket_timeout costs an asyncio.timeout for every reply.
        self._op_timeout = socket_timeout
        self._pool = make_pool(
            url, socket_timeout=None, socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 1), health_check_interval=1, max_connections=8,
            protocol=2,  # the scripts' replies are parsed as RESP2 arrays
        )
        self._sha = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in SCRIPTS.items()}
        self._sha_bytes = {name: sha.encode() for name, sha in self._sha.items()}
        self._queue: list[_Op] = []
        # Operations waiting for a write; beyond this, calls fail at once.
        self._max_queued = max_queued
        # Replies are read by redis_fastpath.read_replies when start() finds it
        # usable and ``fast_path`` allows it, else through redis-py's public API.
        self._fast_path_allowed = fast_path
        self.fast_path = False  # whether the fast reader is in use (set by start)
        self._read_replies: ReplyReader = read_replies_public
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._writing: list[_Op] | None = None  # the batch the writer is sending now
        # batches written on the connection whose replies are not read yet
        self._sent: deque[tuple[list[_Op], float, AbstractConnection]] = deque()
        self._replies = asyncio.Event()
        self._room = asyncio.Event()
        self._probe: asyncio.Task[None] | None = None
        self._conn: AbstractConnection | None = None
        self._healthy = True
        self._listener: HealthListener | None = None
        self._closed = False
        # Why calls fail at once without being queued: the store is closed, or
        # its writer or reader task ended (see _task_ended). One check per call.
        self._refusal: str | None = None
        # Counters for tests and metrics: pipelined writes and operations sent,
        # operations failed (StoreUnavailable), outages begun.
        self.round_trips = 0
        self.operations = 0
        self.errors = 0
        self.outages = 0
        # Called with the seconds of each round trip (the hub's latency histogram).
        self.on_round_trip: Callable[[float], None] | None = None

    # -- lifecycle ---------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def queue_depth(self) -> int:
        """Operations waiting for the next pipelined write (``/metrics``)."""
        return len(self._queue)

    def set_health_listener(self, listener: HealthListener | None) -> None:
        self._listener = listener

    async def start(self) -> None:
        self._choose_reader()
        loop = asyncio.get_running_loop()
        self._runner = loop.create_task(self._run(), name="redis-writer")
        self._reader = loop.create_task(self._read(), name="redis-reader")
        self._runner.add_done_callback(self._task_ended)
        self._reader.add_done_callback(self._task_ended)
        try:
            conn = self._conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
            async with asyncio.timeout(self._op_timeout):
                await self._load_scripts(conn)
        except _UNAVAILABLE as exc:
            await self._drop_connection()
            self._mark_unhealthy(exc)
        try:
            await self.ping()
        except StoreUnavailable:
            # A hub may start while Redis is down: it serves what it can and
            # reconnects by itself (the probe is already running).
            log.warning("store_unavailable_at_start", url=without_password(self.url))

    def _choose_reader(self) -> None:
        if self._fast_path_allowed:
            support = fast_path_check()
            enabled, reason = support.enabled, support.reason
        else:
            enabled, reason = False, "turned off (redis_fast_path=False)"
        self.fast_path = enabled
        self._read_replies = read_replies if enabled else read_replies_public
        log.info("redis_fast_path", enabled=enabled, reason=reason, url=without_password(self.url))

    async def close(self) -> None:
        """Fail what is waiting, end the tasks, drop the connections; bounded.

        Safe while the event loop shuts down (``asyncio.run`` cancels every
        task at exit, the store's own included): every operation still waiting
        fails with StoreUnavailable before the first await, and each wait after
        that has a timeout, none on a task that may be gone already.
        """
        if self._closed:
            return
        self._closed = True
        self._refusal = "the store is closed"
        tasks = [t for t in (self._runner, self._reader, self._probe, *self._side_tasks)
                 if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        self._fail_waiting(StoreUnavailable("the store is closed"))
        if tasks:
            _, left = await asyncio.wait(tasks, timeout=_CLOSE_WAIT)
            if left:
                log.warning("store_close_tasks_left", url=without_password(self.url),
                            tasks=sorted(t.get_name() for t in left))
        for step in (self._drop_connection, self._pool.disconnect):
            try:
                async with asyncio.timeout(_CLOSE_WAIT):
                    await step()
            except _UNAVAILABLE as exc:  # TimeoutError included: give up on that socket
                log.warning("store_close_disconnect_failed", url=without_password(self.url),
                            error=str(exc) or type(exc).__name__)

    def _fail_waiting(self, err: StoreUnavailable) -> None:
        """Every operation not answered yet (sent, being written, queued) fails now."""
        ops = [op for batch, _, _ in self._sent for op in batch] + (self._writing or [])
        ops += self._queue
        self._sent.clear()
        self._writing = None
        self._queue = []
        self._room.set()
        for op in ops:
            if not op.future.done():
                op.future.set_exception(err)
                run_continuation(op.future)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        """The writer or the reader ended. Unless close() ended it, the event loop
        is shutting down (``asyncio.run`` cancels every task at exit) or it failed:
        nothing would answer an operation any more, so everything waiting fails
        and every later call fails at once (instead of waiting forever)."""
        if self._closed:
            return
        self._refusal = f"the store's {task.get_name()} task ended (event loop shutting down?)"
        error = None if task.cancelled() else task.exception()
        log.warning("store_task_ended", url=without_password(self.url), task=task.get_name(),
                    error=None if error is None else repr(error))
        self._fail_waiting(StoreUnavailable(self._refusal))

    def ping(self) -> asyncio.Future[None]:
        return self._call(None, ("PING",), _nothing)

    # -- batching -----------------------------------------------------------
    def _call(self, script: str | None, args: tuple[Any, ...],
              parse: Callable[[Any], Any] | None = None) -> asyncio.Future[Any]:
        """Queue one command (or script call) for the next pipelined write."""
        loop = self._loop
        if loop is None:
            # Cached: on Python 3.11 get_running_loop() costs a getpid() system call.
            loop = self._loop = asyncio.get_running_loop()
        fut: StoreFuture[Any] = StoreFuture(loop=loop)
        if self._refusal is not None:
            fut.set_exception(StoreUnavailable(self._refusal))
        elif not self._healthy:
            self.errors += 1
            fut.set_exception(StoreUnavailable("Redis is unreachable (reconnecting)"))
        elif len(self._queue) >= self._max_queued:
            # Bounded: a Redis slower than the hub's callers fails them fast
            # instead of growing the hub's memory without limit.
            self.errors += 1
            fut.set_exception(StoreUnavailable(
                f"the store is overloaded: {len(self._queue)} operations queued"))
        else:
            self._queue.append(_Op(script, args, fut, parse))
            self._wakeup.set()
        return fut

    # The connection is fully pipelined: a writer sends each batch as soon as
    # it is ready, without waiting for the replies of the previous one, and a
    # reader takes the replies in order. Redis runs one connection's commands
    # in order, so the store's writes keep the order the hub made them in,
    # and the hub never idles for a round trip while work is queued.
    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                if len(self._sent) >= _MAX_BATCHES_IN_FLIGHT:
                    self._room.clear()
                    await self._room.wait()
                    continue
                batch = self._queue[:_MAX_BATCH]
                del self._queue[:_MAX_BATCH]
                if not self._healthy:
                    # The probe owns reconnecting: nothing is written meanwhile.
                    self._fail_ops(batch, StoreUnavailable("Redis is unreachable (reconnecting)"))
                    continue
                # Cleared only when the write is done: a writer cancelled
                # mid-write leaves the batch for close() or _task_ended to fail.
                self._writing = batch
                await self._write(batch)
                self._writing = None

    def _command(self, op: _Op) -> tuple[Any, ...]:
        if op.script is None:
            return op.args
        return (b"EVALSHA", self._sha_bytes[op.script], *op.args)

    async def _write(self, batch: list[_Op]) -> None:
        try:
            async with asyncio.timeout(self._op_timeout):
                conn = self._conn
                if conn is None:
                    conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
                    self._conn = conn
                elif not self._sent:
                    # Nothing is being read: PING a connection idle for a second
                    # first (redis-py's health check), so a Redis restarted
                    # meanwhile costs a reconnect, not a failed batch.
                    await conn.check_health()  # type: ignore[no-untyped-call]
                await conn.send_packed_command(_resp([self._command(op) for op in batch]),
                                               check_health=False)
        except Exception as exc:  # unreachable, -BUSY on the health check, anything: fail over
            await self._fail_all(exc, batch)
            return
        self.round_trips += 1
        self.operations += len(batch)
        self._sent.append((batch, time.perf_counter(), conn))
        self._replies.set()

    async def _read(self) -> None:
        while True:
            await self._replies.wait()
            while self._sent:
                batch, start, conn = self._sent[0]
                try:
                    async with asyncio.timeout(self._op_timeout):
                        results = await self._read_replies(conn, len(batch))
                except Exception as exc:  # the connection is no longer trustworthy
                    await self._fail_all(exc)
                    break
                if not self._sent or self._sent[0][0] is not batch:
                    continue  # failed meanwhile by the writer (its futures are done)
                self._sent.popleft()
                self._room.set()
                if self.on_round_trip is not None:
                    self.on_round_trip(time.perf_counter() - start)
                if not self._resolve(batch, results):
                    # Someone flushed Redis's script cache. Handled as a short
                    # outage, here and now (not in a task that could outlive
                    # the connection and fail the next one's work): everything
                    # after these fails at once with StoreUnavailable, and the
                    # probe loads the scripts again before traffic resumes, so
                    # nothing runs out of order.
                    await self._fail_all(NoScriptError("scripts flushed"))
                    break
            if not self._sent:
                self._replies.clear()

    def _resolve(self, batch: list[_Op], results: list[Any]) -> bool:
        """Settle a batch's futures from its replies; False when a script was
        missing (those operations did not run and fail; the caller fails the rest)."""
        noscript: list[_Op] = []
        for op, res in zip(batch, results, strict=True):
            if op.future.done():
                continue
            if isinstance(res, NoScriptError):
                noscript.append(op)  # the script did not run
            elif isinstance(res, ResponseError):
                self.errors += 1
                op.future.set_exception(StoreUnavailable(f"Redis error: {res}"))
                log.error("store_command_failed", error=str(res), command=op.script or op.args[0])
                run_continuation(op.future)
            elif op.parse is None:
                op.future.set_result(res)
                run_continuation(op.future)
            else:
                try:
                    value = op.parse(res)
                except Exception as err:
                    op.future.set_exception(err)
                else:
                    op.future.set_result(value)
                run_continuation(op.future)
        if noscript:
            self._fail_ops(noscript, StoreUnavailable("Redis lost its scripts (SCRIPT FLUSH)"))
            return False
        return True

    def _fail_ops(self, ops: list[_Op], err: StoreUnavailable) -> None:
        for op in ops:
            if not op.future.done():
                self.errors += 1
                op.future.set_exception(err)
                run_continuation(op.future)

    async def _fail_all(self, exc: BaseException, extra: list[_Op] | None = None) -> None:
        """The connection failed: every batch sent on it, everything queued, and
        ``extra`` fail at once; the probe reconnects (docs/guide.md, Guarantees: no hang)."""
        ops = [op for batch, _, _ in self._sent for op in batch] + (extra or []) + self._queue
        self._sent.clear()
        self._queue = []
        self._room.set()
        self._mark_unhealthy(exc)
        # Failed before the await: a task cancelled while dropping the
        # connection must not leave these waiting forever.
        self._fail_ops(ops, StoreUnavailable(f"Redis is unreachable: {exc}"))
        await self._drop_connection()

    async def _load_scripts(self, conn: AbstractConnection) -> None:
        for src in SCRIPTS.values():
            await conn.send_command("SCRIPT", "LOAD", src)
            await conn.read_response()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect()
            await self._pool.release(conn)

    # -- health ---------------------------------------------------------------
    def _mark_unhealthy(self, exc: BaseException) -> None:
        if not self._healthy or self._refusal is not None:
            return
        self._healthy = False
        self.outages += 1
        log.error("store_unreachable", url=without_password(self.url), error=str(exc))
        if self._listener is not None:
            self._listener(False, exc)
        self._probe = asyncio.get_running_loop().create_task(self._reconnect(), name="redis-probe")

    async def _reconnect(self) -> None:
        """Probe until Redis answers, then take traffic again."""
        while not self._closed:
            await asyncio.sleep(self._probe_interval)
            conn: AbstractConnection | None = None
            try:
                # A connection of its own, swapped in only once it works: the
                # writer and reader never share a socket with the probe.
                conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
                async with asyncio.timeout(self._op_timeout):
                    await conn.send_command("PING")
                    await conn.read_response()
                    await self._load_scripts(conn)
            except Exception:  # still down, or not ready (-LOADING, -BUSY): try again
                if conn is not None:
                    await conn.disconnect()
                    await self._pool.release(conn)
                continue
            await self._drop_connection()
            self._conn = conn
            self._healthy = True
            self._probe = None
            log.info("store_reconnected", url=without_password(self.url))
            if self._listener is not None:
                self._listener(True, None)
            return

    # -- keys -------------------------------------------------------------------
    def _k_cmd(self, cmd_id: str) -> str:
        return f"{self.prefix}:cmd:{cmd_id}"

    def _k_pending(self, agent_id: str) -> str:
        return f"{self.prefix}:agent:{agent_id}:pending"

    def _k_agent(self, agent_id: str) -> str:
        return f"{self.prefix}:agent:{agent_id}"

    @property
    def _k_deadlines(self) -> str:
        return f"{self.prefix}:deadlines"

    @property
    def _k_agents(self) -> str:
        return f"{self.prefix}:agents"

    # -- commands ---------------------------------------------------------------
    def create_command(
        self, cmd: CommandInfo, *, drop: DropSpec = None, max_pending: int | None = None,
        locate: bool = True, job: str | None = None,
    ) -> asyncio.Future[CreateResult]:
        drop_arg = "" if not drop else (f"k:{drop}" if isinstance(drop, str) else "*")
        cmd.job = job  # only a job's claimed part belongs to a job
        prefix = self.prefix
        keys: tuple[Any, ...] = (
            self._k_cmd(cmd.id), self._k_pending(cmd.agent_id), self._k_deadlines,
            f"{prefix}:history", f"{prefix}:history:agent:{cmd.agent_id}",
            f"{prefix}:history:key:{cmd.key}")
        if job is not None:
            keys += (self._k_job(job), f"{prefix}:history:job:{job}")
        return self._call("create", (
            len(keys), *keys,
            prefix, cmd.id, cmd.agent_id, cmd.key, cmd.group or "", cmd.ts,
            "" if cmd.deadline is None else cmd.deadline, cmd.origin, pack(cmd.payload),
            drop_arg, max_pending or 0, self._retention_ms, _PACKED_DROPPED,
            1 if locate else 0, job or "", pack([cmd.id, cmd.agent_id, cmd.key, job]),
        ), lambda res: self._created(cmd, max_pending, res))

    def _created(self, cmd: CommandInfo, max_pending: int | None, res: Any) -> CreateResult:
        status = res[0]
        if status == 0:
            return CreateResult(_command_from_hash(res[1]), created=False)
        if status == -1:
            raise TooManyCommands(
                f"agent {cmd.agent_id!r} already has {max_pending} commands not COMPLETE"
            )
        if status == -2:
            raise JobPartRefused(_s(res[1]), _s(res[2]) or None)
        stored = cmd.copy()
        stored.status, stored.outcome, stored.updated = "PENDING", None, cmd.ts
        location = _s(res[3]) or None
        dropped = [
            CommandInfo(
                id=_s(d[0]), agent_id=cmd.agent_id, key=_s(d[1]), status="COMPLETE",
                outcome="dropped", group=_s(d[2]) or None, ts=_i(d[4]), updated=cmd.ts,
                origin=_s(d[3]), result=dict(DROPPED_RESULT), job=_s(d[5]) or None,
            )
            for d in res[2]
        ]
        return CreateResult(stored, created=True, dropped=dropped, coalesced=bool(res[1]),
                            location=location)

    def mark_active(self, cmd_id: str, agent_id: str, now: int) -> asyncio.Future[None]:
        def check(res: Any) -> None:
            if res != 1:
                raise UnknownCommand(_REJECTIONS[res].format(id=cmd_id, agent=agent_id))

        return self._call("mark_active", (1, self._k_cmd(cmd_id), agent_id, now), check)

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
        return self._call("complete", (
            2, self._k_cmd(cmd_id), self._k_deadlines, self.prefix, outcome, now,
            pack(result), b"" if error is None else pack(error), agent_id or "",
            self._retention_ms,
        ), lambda res: _completed(cmd_id, outcome, res, now=now, result=result, error=error,
                                  agent_id=agent_id))

    def next_in_group(self, agent_id: str, group: str) -> asyncio.Future[CommandInfo | None]:
        return self._call("next_in_group", (1, self._k_pending(agent_id), self.prefix, group),
                          _command_or_none)

    def get_command(self, cmd_id: str) -> asyncio.Future[CommandInfo | None]:
        return self._call(None, ("HGETALL", self._k_cmd(cmd_id)), _command_or_none)

    def list_pending(self, agent_id: str) -> asyncio.Future[list[CommandInfo]]:
        return self._call("list_pending", (1, self._k_pending(agent_id), self.prefix),
                          _commands)

    def list_commands(self, where: HistoryFilter, *, limit: int,
                      before: tuple[int, str] | None, now: int) -> asyncio.Future[HistoryPage]:
        prefix = self.prefix
        keys = [f"{prefix}:history:{kind}:{value}" for kind, value in (
            ("agent", where.agent_id), ("key", where.key), ("job", where.job),
            ("outcome", where.outcome)) if value is not None]
        packed = not keys
        if packed:
            keys = [f"{prefix}:history"]

        def parse(res: Any) -> HistoryPage:
            found, more, last_ts, last_id = res
            after = (_i(last_ts), _s(last_id)) if more else None
            return HistoryPage([_command_from_hash(h) for h in found], after)

        return self._call("list_commands", (
            len(keys), *keys, prefix, where.agent_id or "", where.key or "",
            where.status or "", where.outcome or "", where.job or "", limit,
            "" if before is None else before[0], "" if before is None else before[1],
            HISTORY_SCAN, "1" if packed else "0"), parse)

    def trim_history(self, now: int, limit: int = 1000) -> asyncio.Future[int]:
        cutoff = now - int(self._retention_ms)
        return self._call("trim_history", (1, f"{self.prefix}:history", self.prefix, cutoff,
                                           limit), int)

    def touch_agents(self, agents: Sequence[tuple[str, str]], now: int) -> asyncio.Future[int]:
        if not agents:
            return resolved(asyncio.get_running_loop(), 0)
        return self._call("touch_agents", (
            0, self.prefix, now, *(item for pair in agents for item in pair)), int)

    def overdue(self, now: int, limit: int = 100) -> asyncio.Future[list[CommandInfo]]:
        return self._call("overdue", (1, self._k_deadlines, self.prefix, now, limit), _commands)

    # -- jobs ---------------------------------------------------------------------
    def _k_job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    @property
    def _k_jobs(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def _k_jobs_running(self) -> str:
        return f"{self.prefix}:jobs:running"

    def create_job(self, job: JobRecord) -> asyncio.Future[tuple[JobRecord, bool]]:
        info = job.info
        return self._call("create_job", (
            3, self._k_job(info.id), self._k_jobs, self._k_jobs_running, self.prefix, info.id,
            info.key, pack(info.payload), pack(info.target), pack(info.agents), info.ts,
            _opt(info.batch), _opt(info.max_failures), info.origin, _opt(job.timeout_ms),
            self._retention_ms, *info.agents,
        ), lambda res: (_job_from_hash(res[1]), res[0] == 1))

    def get_job(self, job_id: str) -> asyncio.Future[JobRecord | None]:
        return self._call(None, ("HGETALL", self._k_job(job_id)),
                          lambda res: _job_from_hash(res) if res else None)

    def list_jobs(self, limit: int) -> asyncio.Future[list[JobInfo]]:
        return self._call("list_jobs", (1, self._k_jobs, self.prefix, limit),
                          lambda res: [_job_info(dict(zip(JOB_INFO_FIELDS, r, strict=True)))
                                       for r in res])

    def end_job_parts(self, job_id: str, ended: Sequence[tuple[str, str]],
                      now: int) -> asyncio.Future[JobInfo | None]:
        return self._call("end_job_parts", (
            2, self._k_job(job_id), self._k_jobs_running, now, self._retention_ms,
            *(x for pair in ended for x in pair),
        ), lambda res: _job_info(dict(zip(JOB_COUNT_FIELDS, res, strict=True))) if res else None)

    def skip_job_parts(self, job_id: str, agents: Sequence[str] | None, now: int, *,
                       origin: str | None = None,
                       cancel: bool = False) -> asyncio.Future[JobRecord | None]:
        return self._call("skip_job_parts", (
            2, self._k_job(job_id), self._k_jobs_running, now, self._retention_ms,
            origin or "", 1 if cancel else 0, 1 if agents is None else 0, *(agents or ()),
        ), lambda res: _job_from_hash(res) if res else None)

    def adopt_jobs(self, hub_id: str) -> asyncio.Future[list[str]]:
        return self._call("adopt_jobs", (1, self._k_jobs_running, self.prefix, hub_id),
                          lambda res: [_s(r) for r in res])

    # -- agents -------------------------------------------------------------------
    def register_agent(self, info: AgentInfo) -> asyncio.Future[AgentInfo | None]:
        return self._call("register_agent", (
            3, self._k_agent(info.id), self._k_agents, self._k_hub_agents(info.hub_id),
            info.id, info.hub_id, info.session, info.connected_at, info.last_seen,
            pack(info.meta), self.prefix,
        ), _agent_or_none)

    def unregister_agent(self, agent_id: str, session: str) -> asyncio.Future[bool]:
        return self._call("unregister_agent", (
            2, self._k_agent(agent_id), self._k_agents, agent_id, session, self.prefix), bool)

    # -- cluster membership ---------------------------------------------------------
    def _k_hub_agents(self, hub_id: str) -> str:
        return f"{self.prefix}:hub:{hub_id}:agents"

    def make_bus(self, hub_id: str) -> RedisBus:
        return RedisBus(self.url, [self.hub_channel(hub_id), self.events_channel],
                        self.hub_channel(hub_id), self.publish,
                        probe_interval=self._bus_probe[0], probe_timeout=self._bus_probe[1])

    def hub_channel(self, hub_id: str) -> str:
        """Pub/sub channel of frames routed to that hub (docs/redis.md)."""
        return f"{self.prefix}:hub:{hub_id}"

    @property
    def events_channel(self) -> str:
        return f"{self.prefix}:events"

    @property
    def feed_channel(self) -> str:
        return f"{self.prefix}:feed"

    def make_feed_bus(self) -> RedisBus:
        return RedisBus(self.url, [self.feed_channel], self.feed_channel, self.publish,
                        probe_interval=self._bus_probe[0], probe_timeout=self._bus_probe[1])

    def listeners(self, channel: str) -> asyncio.Future[int]:
        return self._call(None, ("PUBSUB", "NUMSUB", channel), lambda res: _i(res[1]))

    def hub_alive(self, hub_id: str, ttl_ms: int) -> asyncio.Future[bool]:
        return self._call("hub_alive", (2, f"{self.prefix}:hub:{hub_id}:alive",
                                        f"{self.prefix}:hubs", hub_id, ttl_ms), bool)

    def hub_reset(self, hub_id: str) -> asyncio.Future[list[AgentInfo]]:
        return self._call("hub_reset", (2, self._k_hub_agents(hub_id), self._k_agents,
                                        self.prefix, hub_id), _agents)

    def restore_agent(self, info: AgentInfo) -> asyncio.Future[bool]:
        return self._call("restore_agent", (
            3, self._k_agent(info.id), self._k_agents, self._k_hub_agents(info.hub_id),
            info.id, info.hub_id, info.session, info.connected_at, info.last_seen,
            pack(info.meta)), bool)

    def hub_gone(self, hub_id: str) -> asyncio.Future[None]:
        return self._call("hub_gone", (3, f"{self.prefix}:hub:{hub_id}:alive",
                                       f"{self.prefix}:hubs", self._k_hub_agents(hub_id),
                                       hub_id), _nothing)

    def reap_dead_hubs(self, me: str) -> asyncio.Future[list[AgentInfo]]:
        return self._call("reap_dead_hubs", (2, f"{self.prefix}:hubs", self._k_agents,
                                             self.prefix, me), _agents)

    def progress_origin(self, cmd_id: str, agent_id: str | None) -> asyncio.Future[str]:
        """The origin hub of a command that takes progress from ``agent_id``."""
        def check(res: Any) -> str:
            if res[0] != 1:
                raise UnknownCommand(_REJECTIONS[res[0]].format(id=cmd_id, agent=agent_id))
            return _s(res[1])

        return self._call("progress_check", (1, self._k_cmd(cmd_id), agent_id or ""), check)

    def publish(self, channel: str, data: bytes) -> asyncio.Future[Any]:
        """Publish in the next pipelined write (fire and forget is fine: the future
        holds the outcome and failures are reported by the health listener)."""
        fut = self._call(None, ("PUBLISH", channel, data))
        fut.add_done_callback(_consume)
        return fut

    def get_agent(self, agent_id: str) -> asyncio.Future[AgentInfo | None]:
        return self._call(None, ("HGETALL", self._k_agent(agent_id)), _agent_or_none)

    def list_agents(self) -> asyncio.Future[list[AgentInfo]]:
        return self._call("list_agents", (1, self._k_agents, self.prefix), _agents)

    # -- queued frames ----------------------------------------------------------------
    def _k_frames(self, agent_id: str) -> str:
        return f"{self.prefix}:agent:{agent_id}:events"

    @property
    def _k_queues(self) -> str:
        return f"{self.prefix}:queues"

    def queue_frame(self, agent_id: str, frame: bytes, *, now: int, max_len: int,
                    ttl_ms: int) -> asyncio.Future[bool]:
        def parse(res: Any) -> bool:
            queued, expired, evicted = res
            self.frames_expired += int(expired)
            self.frames_evicted += int(evicted)
            return bool(queued)

        return self._call("queue_frame", (
            2, self._k_frames(agent_id), self._k_queues, pack([now, frame]), max_len, ttl_ms,
            now - ttl_ms, now, self._max_queues, agent_id, self.prefix), parse)

    def take_frames(self, agent_id: str, *, now: int,
                    ttl_ms: int) -> asyncio.Future[tuple[list[bytes], int]]:
        def parse(entries: Any) -> tuple[list[bytes], int]:
            fresh: list[bytes] = []
            for raw in entries:
                ts, frame = unpack(raw)
                if ts + ttl_ms > now:
                    fresh.append(frame)
            return fresh, len(entries) - len(fresh)

        return self._call("take_frames", (2, self._k_frames(agent_id), self._k_queues,
                                          agent_id), parse)

    def requeue_frames(self, agent_id: str, frames: list[bytes], *, now: int,
                       ttl_ms: int = 3_600_000) -> asyncio.Future[None]:
        if not frames:
            return resolved(asyncio.get_running_loop(), None)

        def parse(evicted: Any) -> None:
            self.frames_evicted += int(evicted)

        # One script: the push, the expiry (same as queue_frame's, so an agent
        # that never returns leaves nothing) and the bound of queues, in one step.
        return self._call("requeue_frames", (
            2, self._k_frames(agent_id), self._k_queues, ttl_ms, now, self._max_queues,
            agent_id, self.prefix, *(pack([now, f]) for f in reversed(frames))), parse)


# -- decoding ---------------------------------------------------------------------

def _nothing(res: Any) -> None:
    return None


def _command_or_none(res: Any) -> CommandInfo | None:
    return _command_from_hash(res) if res else None


def _commands(res: Any) -> list[CommandInfo]:
    return [_command_from_hash(h) for h in res]


def _agent_or_none(res: Any) -> AgentInfo | None:
    return _agent_from_hash(res) if res else None


def _agents(res: Any) -> list[AgentInfo]:
    return [_agent_from_hash(h) for h in res]


def _completed(cmd_id: str, outcome: Outcome, res: Any, *, now: int, result: Any,
               error: dict[str, Any] | None, agent_id: str | None) -> Completion:
    """The COMPLETE script's reply as the completed command and group members."""
    if res[0] != 1:
        raise UnknownCommand(_REJECTIONS[res[0]].format(id=cmd_id, agent=agent_id))
    _, agent, key, group, origin, ts, deadline, members, watchers, job = res
    agent_s, group_s = _s(agent), _s(group) or None
    return Completion(
        CommandInfo(
            id=cmd_id, agent_id=agent_s, key=_s(key), status="COMPLETE", outcome=outcome,
            group=group_s, ts=_i(ts), updated=now,
            deadline=_i(deadline) if deadline else None, origin=_s(origin),
            result=result, error=error, job=_s(job) or None,
        ),
        tuple(CommandInfo(id=_s(m[0]), agent_id=agent_s, key=_s(m[1]), status="COMPLETE",
                          outcome=outcome, group=group_s, ts=_i(m[3]), updated=now,
                          origin=_s(m[2]), result=result, error=error, job=_s(m[4]) or None)
              for m in members) if members else (),
        # Usually no watchers: no generator made for nothing (hot path).
        tuple(w for w in _s(watchers).split(",") if w) if watchers else (),
    )


def _resp(commands: list[tuple[Any, ...]]) -> bytes:
    """Commands in the Redis protocol (RESP), packed in one go.

    What redis-py's pack_commands does, several times cheaper: it was the
    largest single cost of the Redis engine's hot path (docs/benchmarks.md).
    hiredis' C encoder, when the installed hiredis has one, is twice as
    fast again (measured: 2.7 against 6.1 µs for one command's two scripts).
    """
    if _pack_command is not None:
        try:
            return b"".join([_pack_command(args) for args in commands])
        except TypeError:  # a type hiredis refuses (None, bool...): never fail a batch for it
            pass
    return _resp_python(commands)


def _resp_python(commands: list[tuple[Any, ...]]) -> bytes:
    out: list[bytes] = []
    push = out.append
    for args in commands:
        push(b"*%d\r\n" % len(args))
        for arg in args:
            kind = type(arg)
            if kind is bytes:
                data = arg
            elif kind is str:
                data = arg.encode()
            elif kind is int:
                data = b"%d" % arg
            else:
                data = repr(arg).encode()  # floats
            push(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


_pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack_command
    _pack_command = _hiredis_pack_command
except ImportError:  # pragma: no cover - hiredis is a dependency; older ones lack it
    _pack_command = None


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _s(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _i(value: Any) -> int:
    return int(value) if value not in (None, b"", "") else 0


def _pairs(flat: Sequence[Any]) -> dict[str, Any]:
    it = iter(flat)
    return {_s(k): v for k, v in zip(it, it, strict=True)}


def _unpack_or_none(value: Any) -> Any:
    return unpack(value) if value else None


def _command_from_hash(flat: Sequence[Any]) -> CommandInfo:
    h = _pairs(flat)
    outcome = _s(h.get("outcome")) or None
    deadline = h.get("deadline")
    return CommandInfo(
        id=_s(h.get("id")),
        agent_id=_s(h.get("agent")),
        key=_s(h.get("key")),
        status=_s(h.get("status")) or "PENDING",  # type: ignore[arg-type]
        outcome=outcome,  # type: ignore[arg-type]
        group=_s(h.get("group")) or None,
        ts=_i(h.get("ts")),
        updated=_i(h.get("updated")),
        deadline=_i(deadline) if deadline else None,
        origin=_s(h.get("origin")),
        payload=_unpack_or_none(h.get("payload")),
        result=_unpack_or_none(h.get("result")) if outcome else None,
        error=_unpack_or_none(h.get("error")),
        job=_s(h.get("job")) or None,
    )


def _opt(value: int | None) -> int | str:
    return "" if value is None else value


def _opt_int(value: Any) -> int | None:
    return None if value in (None, b"", "") else int(value)


def _job_info(h: dict[str, Any]) -> JobInfo:
    """A job's public record from its hash fields (JOB_INFO_FIELDS at least)."""
    ended = {o: _i(h.get(f"n:{o}")) for o in ("ok", "error", "timeout", "cancelled", "dropped")}
    agents = _unpack_or_none(h.get("agents")) or []
    return JobInfo(
        id=_s(h.get("id")), key=_s(h.get("key")), payload=_unpack_or_none(h.get("payload")),
        target=_unpack_or_none(h.get("target")), agents=agents,
        status=_s(h.get("status")) or "RUNNING",  # type: ignore[arg-type]
        counts=job_counts(_i(h.get("n:agents")), _i(h.get("n:started")),
                          _i(h.get("n:skipped")), ended),
        ts=_i(h.get("ts")), updated=_i(h.get("updated")), batch=_opt_int(h.get("batch")),
        max_failures=_opt_int(h.get("max_failures")), origin=_s(h.get("origin")),
    )


def _job_from_hash(flat: Sequence[Any]) -> JobRecord:
    h = _pairs(flat)
    parts: dict[str, str] = {}
    skipped: set[str] = set()
    ended: dict[str, str] = {}
    for name, value in h.items():
        if name.startswith("p:"):
            part = _s(value)
            if part == "!":
                skipped.add(name[2:])
            elif part:
                parts[name[2:]] = part
        elif name.startswith("o:"):
            ended[name[2:]] = _s(value)
    return JobRecord(_job_info(h), _opt_int(h.get("timeout")), parts, skipped, ended,
                     _s(h.get("cancelled")) == "1")


def _agent_from_hash(flat: Sequence[Any]) -> AgentInfo:
    h = _pairs(flat)
    meta = _unpack_or_none(h.get("meta"))
    return AgentInfo(
        id=_s(h.get("id")), hub_id=_s(h.get("hub")), session=_s(h.get("session")),
        connected_at=_i(h.get("connected")), last_seen=_i(h.get("last_seen")),
        meta=meta if isinstance(meta, dict) else {},
    )
