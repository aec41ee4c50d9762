"""Jobs: one command run on many agents, rolled out in batches (docs/fleets.md).

A job's record lives in the store (``Store.create_job``); each agent's part is an
ordinary command made through the command path with ``job=`` set, whose store
write claims the part in the same atomic step, so no part ever starts twice.
The hub that runs a job (its ``origin``) starts parts while fewer than
``batch`` are unfinished and the failures do not exceed ``max_failures``, and
records each part's end in the job. On a shared store another hub takes the
rollout over when the origin dies (:meth:`Jobs.adopt_once`, from the sweeper).

``JobHandle`` is what ``execute_on_agents`` returns at once; it follows a job
run here as it happens, or, for a job run by another hub, by reading the store
every ``sweep_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any, cast

import structlog

from agent_client import protocol as P

from .clock import now_ms
from .commands import Commands
from .config import HubConfig
from .errors import (
    AgentOffline,
    CommandTimeout,
    DispatcherError,
    HubClosed,
    JobPartRefused,
    NoAgentsMatched,
    StoreUnavailable,
    TooManyCommands,
)
from .handle import CommandHandle
from .ids import IdFactory
from .models import CommandInfo, JobInfo
from .store.base import JobRecord, Store
from .targets import TargetSpec, match, parse_amount, parse_target, resolve_amount
from .tasks import TaskOwner

__all__ = ["JobHandle", "Jobs", "JobListener"]

log = structlog.get_logger(__name__)

JobListener = Callable[[JobInfo], None]

# Longest caller-chosen job id: a part's command id is ``JOB.INDEX`` (at most 128).
MAX_JOB_ID = 100
# Progress updates buffered per progress() reader; a slow reader loses the oldest.
_PROGRESS_BUFFER = 256


def skipped_info(job: JobInfo, agent_id: str, now: int) -> CommandInfo:
    """The record a never-started part is reported with (outcome ``skipped``)."""
    return CommandInfo(id="", agent_id=agent_id, key=job.key, status="COMPLETE",
                       outcome=cast(Any, "skipped"), ts=now, updated=now, job=job.id,
                       payload=job.payload)


class _Run:
    """What this hub knows of one job, as it happens: the state a JobHandle reads."""

    def __init__(self, job_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.id = job_id
        self.loop = loop
        self.info: JobInfo | None = None
        self.agents: asyncio.Future[list[str]] = loop.create_future()
        self.done: asyncio.Future[JobInfo] = loop.create_future()
        for fut in (self.agents, self.done):
            fut.add_done_callback(_consume)
        self.results: list[CommandInfo] = []  # bounded by the job's targets
        self.reported: set[str] = set()  # agents whose result is in ``results``
        self.changed: asyncio.Future[None] = loop.create_future()
        self.progress_readers: list[deque[tuple[str, Any]]] = []
        self.relayed: set[str] = set()  # command ids whose progress is relayed
        self.inflight: dict[str, CommandHandle] = {}  # agent -> its part's handle, here
        self.task: asyncio.Task[Any] | None = None
        self.following = False  # run by another hub: read from the store

    def wake(self) -> None:
        if not self.changed.done():
            self.changed.set_result(None)
        self.changed = self.loop.create_future()

    def report(self, info: CommandInfo) -> None:
        if info.agent_id not in self.reported:
            self.reported.add(info.agent_id)
            self.results.append(info)

    def fail(self, exc: BaseException) -> None:
        for fut in (self.agents, self.done):
            if not fut.done():
                fut.set_exception(exc)
        self.wake()

    def finish(self, info: JobInfo) -> None:
        self.info = info
        if not self.agents.done():
            self.agents.set_result(list(info.agents))
        if not self.done.done():
            self.done.set_result(info)
        self.wake()


def _put(queue: asyncio.Queue[str], agent: str, _fut: asyncio.Future[Any]) -> None:
    queue.put_nowait(agent)


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class JobHandle:
    """A job in flight. ``await handle`` gives its ``JobInfo`` once every part ended.

    ``id`` is known at once; ``await handle.resolved()`` gives the targeted agent
    ids (raises ``NoAgentsMatched``, ``ValueError`` for a bad target,
    ``AgentOffline``, ``StoreUnavailable``); ``async for info in handle.results()``
    yields each agent's final ``CommandInfo`` as it ends (outcome ``skipped``
    for agents never started); ``async for agent_id, data in handle.progress()``;
    ``await handle.cancel()``.
    """

    __slots__ = ("_jobs", "_run", "id")

    def __init__(self, run: _Run, jobs: Jobs) -> None:
        self.id = run.id
        self._run = run
        self._jobs = jobs

    def __repr__(self) -> str:
        return f"<JobHandle {self.id} {'done' if self._run.done.done() else 'running'}>"

    def __await__(self) -> Generator[Any, None, JobInfo]:
        return asyncio.shield(self._run.done).__await__()

    def done(self) -> bool:
        return self._run.done.done()

    async def resolved(self) -> list[str]:
        """The targeted agent ids, once the target is resolved and the job stored."""
        return list(await asyncio.shield(self._run.agents))

    async def results(self) -> AsyncIterator[CommandInfo]:
        """Each agent's final record as its part ends, then stops when the job ended."""
        run = self._run
        seen = 0
        while True:
            while seen < len(run.results):
                seen += 1
                yield run.results[seen - 1]
            if run.done.done():
                if run.done.exception() is not None:
                    raise cast(BaseException, run.done.exception())
                if seen >= len(run.results):
                    return
                continue
            await asyncio.shield(run.changed)

    async def progress(self) -> AsyncIterator[tuple[str, Any]]:
        """``(agent_id, data)`` for each progress update of a part run by this hub,
        until the job ends (a reader more than 256 updates behind loses the oldest)."""
        run = self._run
        buffer: deque[tuple[str, Any]] = deque(maxlen=_PROGRESS_BUFFER)
        run.progress_readers.append(buffer)
        self._jobs.relay_progress(run)
        try:
            while True:
                while buffer:
                    yield buffer.popleft()
                if run.done.done():
                    return
                await asyncio.shield(run.changed)
        finally:
            run.progress_readers.remove(buffer)

    async def cancel(self) -> bool:
        """Cancel the unfinished parts and skip the agents not started; False when the
        job had already ended."""
        with contextlib.suppress(DispatcherError, ValueError, TypeError):
            await asyncio.shield(self._run.agents)
        return await self._jobs.cancel(self.id) is not None


class Jobs:
    """Every job this hub runs or follows."""

    def __init__(self, *, config: HubConfig, hub_id: str, store: Store, commands: Commands,
                 tasks: TaskOwner, takeover: bool) -> None:
        self.config = config
        self.hub_id = hub_id
        self.store = store
        self.commands = commands
        self.tasks = tasks
        self._takeover = takeover  # a shared store: dead hubs' jobs are carried on here
        self._runs: dict[str, _Run] = {}
        self._listeners: list[JobListener] = []
        self._new_id = IdFactory()
        self._closing = False

    # -- observing ----------------------------------------------------------------
    def on_job_changed(self, listener: JobListener) -> Callable[[], None]:
        """Call ``listener(job_info)`` whenever a job run here changes; returns a
        function that removes it."""
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    def _changed(self, run: _Run, info: JobInfo) -> None:
        run.info = info
        run.wake()
        for listener in list(self._listeners):
            try:
                listener(info)
            except Exception:  # a listener's bug must not stop a rollout
                log.exception("job_listener_failed", job_id=info.id)

    # -- submit -------------------------------------------------------------------
    def submit(self, target: object, command_key: str, payload: Any = None, *,
               timeout: float | None = None, batch: int | str | None = None,
               max_failures: int | str | None = None, require_online: bool = False,
               job_id: str | None = None) -> JobHandle:
        """``execute_on_agents``: checks the arguments (``ValueError``/``TypeError``
        here), then resolves the target, stores the job and rolls it out."""
        if self._closing:
            raise HubClosed("the hub is closed")
        if not isinstance(command_key, str) or not 0 < len(command_key) <= P.MAX_KEY_LENGTH:
            raise ValueError("command_key must be a non-empty string of at most 256 characters")
        if timeout is not None and (isinstance(timeout, bool) or not 0 < timeout < 1e8):
            raise ValueError("timeout must be a positive number of seconds")
        if job_id is not None and not (P.is_valid_agent_id(job_id) and len(job_id) <= MAX_JOB_ID):
            raise ValueError(f"invalid job_id {job_id!r}: at most {MAX_JOB_ID} characters "
                             "of A-Z a-z 0-9 . _ : @ -")
        spec = parse_target(target)
        if spec.ids is not None and len(spec.ids) > self.config.max_job_agents:
            raise ValueError(f"the target names {len(spec.ids)} agents, more than "
                             f"max_job_agents ({self.config.max_job_agents})")
        batch_n = parse_amount(batch, "batch", minimum=1)
        failures_n = parse_amount(max_failures, "max_failures", minimum=0)
        P.pack(payload)  # fails fast (TypeError) on what cannot cross the wire
        job_id = job_id or f"job-{self._new_id()}"
        run = self._runs.get(job_id)
        if run is None:
            run = self._runs[job_id] = _Run(job_id, self.tasks.loop)
            run.task = self.tasks.spawn(
                self._submitted(run, spec, command_key, payload, timeout=timeout, batch=batch_n,
                                max_failures=failures_n, require_online=require_online),
                name=f"job-{job_id}")
        return JobHandle(run, self)

    async def _submitted(self, run: _Run, spec: TargetSpec, key: str, payload: Any, *,
                         timeout: float | None, batch: int | float | None,
                         max_failures: int | float | None, require_online: bool) -> None:
        try:
            agents = await self._resolve(spec, require_online)
            now = now_ms()
            info = JobInfo(
                id=run.id, key=key, payload=payload, target=spec.describe(), agents=agents,
                ts=now, updated=now, batch=resolve_amount(batch, len(agents), minimum=1),
                max_failures=resolve_amount(max_failures, len(agents), minimum=0),
                origin=self.hub_id)
            timeout_ms = None if timeout is None else int(timeout * 1000)
            rec, created = await self.store.create_job(JobRecord(info, timeout_ms))
        except (DispatcherError, ValueError, TypeError) as exc:
            self._runs.pop(run.id, None)
            run.fail(exc)
            return
        if created:
            log.info("job_submitted", job_id=run.id, key=key, agents=len(agents),
                     batch=info.batch, max_failures=info.max_failures)
        await self._drive(run, rec)

    async def follow(self, job_id: str) -> JobHandle | None:
        """A handle on the job ``job_id``, run here or elsewhere; None when unknown."""
        run = self._runs.get(job_id)
        if run is None:
            rec = await self.store.get_job(job_id)
            if rec is None:
                return None
            run = self._runs.get(job_id)  # created meanwhile?
            if run is None:
                run = self._runs[job_id] = _Run(job_id, self.tasks.loop)
                run.task = self.tasks.spawn(self._drive(run, rec), name=f"job-{job_id}")
        return JobHandle(run, self)

    async def _resolve(self, spec: TargetSpec, require_online: bool) -> list[str]:
        if spec.ids is not None and not require_online:
            return list(spec.ids)
        connected = await self.store.list_agents()
        if spec.ids is not None:
            here = {a.id for a in connected}
            offline = [a for a in spec.ids if a not in here]
            if offline:
                raise AgentOffline(f"not connected: {', '.join(offline[:10])}"
                                   + (" ..." if len(offline) > 10 else ""))
            return list(spec.ids)
        agents = match(spec, connected)
        if not agents:
            raise NoAgentsMatched(f"no connected agent matches {spec.describe()!r}")
        if len(agents) > self.config.max_job_agents:
            raise ValueError(f"the target matches {len(agents)} agents, more than "
                             f"max_job_agents ({self.config.max_job_agents})")
        return agents

    async def _drive(self, run: _Run, rec: JobRecord) -> None:
        """Run, follow or report the stored job, whichever this hub should."""
        if not run.agents.done():
            run.agents.set_result(list(rec.info.agents))
        self._changed(run, rec.info)
        try:
            if rec.info.status == "COMPLETE":
                await self._report_stored(run, rec)
            elif rec.info.origin == self.hub_id:
                await self._rollout(run, rec)
            else:
                await self._follow(run)
        except DispatcherError as exc:
            if not isinstance(exc, HubClosed):
                log.warning("job_stopped", job_id=run.id, error=str(exc))
            run.fail(exc)
        finally:
            if self._runs.get(run.id) is run and run.done.done():
                del self._runs[run.id]

    # -- the rollout ------------------------------------------------------------
    async def _rollout(self, run: _Run, rec: JobRecord) -> None:
        """Start parts under the job's batch and failure bounds until every part ended
        or was skipped. Store failures are retried every ``sweep_interval``; losing
        the job to another hub turns this into following it."""
        info = rec.info
        # Agents whose part's handle finished; at most one entry per part in flight.
        queue: asyncio.Queue[str] = asyncio.Queue()
        inflight = run.inflight
        index = {agent: i for i, agent in enumerate(info.agents)}
        timeout = None if rec.timeout_ms is None else rec.timeout_ms / 1000

        def start(agent: str, cmd_id: str) -> None:
            handle = self.commands.submit(agent, info.key, info.payload, timeout=timeout,
                                          command_id=cmd_id, job=info.id)
            inflight[agent] = handle
            handle.add_done_callback(functools.partial(_put, queue, agent))
            if run.progress_readers:
                self._relay(run, agent, handle)

        while True:
            ended = dict(rec.ended)
            failures = sum(1 for o in ended.values() if o != "ok")
            self._report_skipped(run, rec)
            for agent, cmd_id in rec.parts.items():
                if agent not in ended and agent not in inflight:
                    start(agent, cmd_id)  # started before (another hub, an earlier life)
            todo = deque(a for a in info.agents if a not in rec.parts and a not in rec.skipped)
            refresh = False
            latest: JobInfo | None = None
            while todo or inflight:
                over = info.max_failures is not None and failures > info.max_failures
                if todo and (over or rec.cancelled):
                    skipped = await self.store.skip_job_parts(info.id, list(todo), now_ms(),
                                                              origin=self.hub_id)
                    todo.clear()
                    if skipped is None:
                        return await self._lost(run)
                    if over:
                        log.info("job_failure_threshold", job_id=info.id, failures=failures,
                                 max_failures=info.max_failures)
                    rec = skipped
                    self._report_skipped(run, rec)
                    self._changed(run, rec.info)
                while todo and (info.batch is None or len(inflight) < info.batch):
                    agent = todo.popleft()
                    start(agent, f"{info.id}.{index[agent]}")
                if not inflight:
                    break
                done = [await queue.get()]
                while not queue.empty():
                    done.append(queue.get_nowait())
                finished: list[CommandInfo] = []
                for agent in done:
                    handle = inflight.pop(agent)
                    outcome = await self._part_ended(run, agent, handle, finished)
                    if outcome == "lost":
                        return await self._lost(run)
                    if outcome == "refresh":
                        refresh = True
                    elif outcome == "retry":
                        todo.appendleft(agent)
                if finished:
                    job = latest = await self._record(info, finished)
                    if job is None:
                        return await self._lost(run)
                    for part in finished:
                        ended[part.agent_id] = cast(str, part.outcome)
                        failures += part.outcome != "ok"
                        run.report(part)
                    self._changed(run, job)
                if refresh and not inflight:
                    break
            if latest is not None and latest.status == "COMPLETE" \
                    and len(run.reported) == len(info.agents):
                # Every part's end was seen here: the last write's record is the job's.
                return self._complete(run, latest)
            stored = await self.store.get_job(info.id)
            if stored is None:
                raise DispatcherError(f"job {info.id} is gone from the store")
            rec = stored
            if rec.info.status == "COMPLETE":
                self._report_skipped(run, rec)
                await self._report_missing(run, rec)
                return self._complete(run, rec.info)
            if rec.info.origin != self.hub_id:
                return await self._lost(run)
            if not refresh:
                # Parts ended that this hub did not see end (e.g. cancelled from
                # another hub): look again shortly rather than spin.
                await asyncio.sleep(self.config.sweep_interval)

    def _complete(self, run: _Run, info: JobInfo) -> None:
        log.info("job_complete", job_id=info.id, **info.counts)
        run.finish(info)
        self._changed(run, info)

    async def _part_ended(self, run: _Run, agent: str, handle: CommandHandle,
                          finished: list[CommandInfo]) -> str:
        """What a finished part handle means: ``ended`` (its record is appended to
        ``finished``), ``retry`` (start it again), ``refresh`` (the stored job
        changed under this hub), or ``lost`` (another hub runs the job now)."""
        info = handle.info
        if info is not None:
            if not info.ts:  # told by another hub (a bare completion): read it whole
                info = await self.store.get_command(info.id) or info
            info.job = run.id
            finished.append(info)
            return "ended"
        try:
            await handle
        except JobPartRefused as exc:
            if exc.command_id:
                return "refresh"  # started already under another id: watch that one
            if "is run by hub" in exc.reason:
                return "lost"
            return "refresh"  # skipped or cancelled meanwhile
        except TooManyCommands as exc:
            # The agent has its fill of commands: its part is skipped, not queued forever.
            log.warning("job_part_skipped", job_id=run.id, agent_id=agent, error=str(exc))
            await self.store.skip_job_parts(run.id, [agent], now_ms(), origin=self.hub_id)
            return "refresh"
        except StoreUnavailable:
            await asyncio.sleep(self.config.sweep_interval)
            return "retry"
        except CommandTimeout as exc:  # timed out after the store lost it
            now = now_ms()
            finished.append(CommandInfo(
                id=handle.id, agent_id=agent, key=handle.key, status="COMPLETE",
                outcome="timeout", ts=now, updated=now, job=run.id,
                error={"code": "timeout", "message": str(exc)}))
            return "ended"
        except DispatcherError:
            raise
        return "refresh"  # not reached: a handle without info failed

    async def _record(self, job: JobInfo, finished: list[CommandInfo]) -> JobInfo | None:
        """Record ended parts in the job; retried while the store is away."""
        pairs = [(i.agent_id, cast(str, i.outcome)) for i in finished]
        while True:
            try:
                got = await self.store.end_job_parts(job.id, pairs, now_ms())
                if got is None:
                    return None
                return dataclasses.replace(got, agents=job.agents, payload=job.payload,
                                           target=job.target)
            except StoreUnavailable:
                if self._closing:
                    raise
                await asyncio.sleep(self.config.sweep_interval)

    def _report_skipped(self, run: _Run, rec: JobRecord) -> None:
        now = now_ms()
        for agent in rec.info.agents:
            if agent in rec.skipped and agent not in run.reported:
                run.report(skipped_info(rec.info, agent, now))

    async def _report_missing(self, run: _Run, rec: JobRecord) -> None:
        """Parts that ended without this hub seeing them end (another hub's, or cancels)."""
        missing = [rec.parts[a] for a in rec.info.agents
                   if a in rec.parts and a not in run.reported]
        for info in await asyncio.gather(*(self.store.get_command(c) for c in missing)):
            if info is not None:
                run.report(info)

    async def _lost(self, run: _Run) -> None:
        log.warning("job_taken_over", job_id=run.id, hub_id=self.hub_id)
        await self._follow(run)

    # -- following a job run elsewhere ------------------------------------------------
    async def _follow(self, run: _Run) -> None:
        """Report a job another hub runs, reading it every ``sweep_interval``."""
        run.following = True
        while True:
            rec = await self.store.get_job(run.id)
            if rec is None:
                raise DispatcherError(f"job {run.id} is gone from the store")
            self._report_skipped(run, rec)
            ended = [rec.parts[a] for a in rec.info.agents
                     if a in rec.ended and a in rec.parts and a not in run.reported]
            for info in await asyncio.gather(*(self.store.get_command(c) for c in ended)):
                if info is not None:
                    run.report(info)
            if rec.info.status == "COMPLETE":
                await self._report_missing(run, rec)
                run.finish(rec.info)
                return
            if rec.info != run.info:
                self._changed(run, rec.info)
            await asyncio.sleep(self.config.sweep_interval)

    async def _report_stored(self, run: _Run, rec: JobRecord) -> None:
        self._report_skipped(run, rec)
        await self._report_missing(run, rec)
        run.finish(rec.info)

    # -- progress ------------------------------------------------------------------
    def relay_progress(self, run: _Run) -> None:
        """A progress reader appeared: relay the parts in flight here (new parts are
        relayed as they start)."""
        for agent, handle in list(run.inflight.items()):
            self._relay(run, agent, handle)

    def _relay(self, run: _Run, agent: str, handle: CommandHandle) -> None:
        if handle.id in run.relayed or handle.done():
            return
        run.relayed.add(handle.id)

        async def relay() -> None:
            try:
                async for data in handle.progress():
                    for reader in list(run.progress_readers):
                        reader.append((agent, data))
                    run.wake()
            finally:
                run.relayed.discard(handle.id)

        self.tasks.spawn(relay(), name=f"job-progress-{handle.id}")

    # -- queries and cancel -------------------------------------------------------------
    async def get_job(self, job_id: str) -> JobInfo | None:
        rec = await self.store.get_job(job_id)
        return None if rec is None else rec.info

    async def list_jobs(self, limit: int = 50) -> list[JobInfo]:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError("limit must be a positive integer")
        return await self.store.list_jobs(min(limit, 1000))

    async def job_commands(self, job_id: str) -> list[CommandInfo] | None:
        """The parts' commands still retained, in the job's agent order (None: no job)."""
        rec = await self.store.get_job(job_id)
        if rec is None:
            return None
        ids = [rec.parts[a] for a in rec.info.agents if a in rec.parts]
        found = await asyncio.gather(*(self.store.get_command(c) for c in ids))
        return [c for c in found if c is not None]

    async def cancel(self, job_id: str) -> JobInfo | None:
        """Skip the parts not started and cancel the unfinished ones; None when there is
        no such job or it had ended."""
        current = await self.store.get_job(job_id)
        if current is None or current.info.status == "COMPLETE":
            return None
        rec = await self.store.skip_job_parts(job_id, None, now_ms(), cancel=True)
        if rec is None:
            return None
        log.info("job_cancelled", job_id=job_id, skipped=len(rec.skipped))
        unfinished = [c for a, c in rec.parts.items() if a not in rec.ended]
        await asyncio.gather(*(self.commands.cancel(c) for c in unfinished))
        run = self._runs.get(job_id)
        if run is not None:
            self._report_skipped(run, rec)
            self._changed(run, rec.info)
        return rec.info

    # -- takeover (shared stores) ---------------------------------------------------------
    async def adopt_once(self) -> list[str]:
        """Carry on the RUNNING jobs whose hub died (and this hub's own from an earlier
        life); returns the ids started here."""
        if not self._takeover or self._closing:
            return []
        started = []
        for job_id in await self.store.adopt_jobs(self.hub_id):
            run = self._runs.get(job_id)
            if run is not None and not run.following:
                continue
            rec = await self.store.get_job(job_id)
            if rec is None or rec.info.origin != self.hub_id:
                continue
            if run is not None and run.task is not None:
                run.task.cancel()  # it followed the job; now it runs it
                run.following = False
            if run is None:
                run = self._runs[job_id] = _Run(job_id, self.tasks.loop)
            log.warning("job_adopted", job_id=job_id, hub_id=self.hub_id,
                        started=len(rec.parts), ended=len(rec.ended))
            run.task = self.tasks.spawn(self._drive(run, rec), name=f"job-{job_id}")
            started.append(job_id)
        return started

    def start(self) -> None:
        """On a shared store: carry on dead hubs' jobs, every ``sweep_interval``."""
        if self._takeover:
            self.tasks.spawn(self._adopt_forever(), name="job-adopter")

    async def _adopt_forever(self) -> None:
        while True:
            # A store outage is reported by its health listener: try next turn.
            with contextlib.suppress(DispatcherError):
                await self.adopt_once()
            await asyncio.sleep(self.config.sweep_interval)

    def close(self) -> None:
        """Stop rolling out (jobs stay stored; on a shared store another hub carries
        them on); every handle still waiting raises HubClosed."""
        self._closing = True
        for run in self._runs.values():
            run.fail(HubClosed("the hub closed; the job stays stored"))
        self._runs.clear()
