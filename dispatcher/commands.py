"""The command path: submit, complete, groups, deadlines and sweeping, written once.

Every step is a store call followed by what it means for the command's handle,
its agent and its group. Store calls return futures (``store/base.py``) and the
path continues after each with :func:`~dispatcher.futures.then`, whichever
engine answers: there is no task per command, and no variant per engine.

How a command travels: ``submit`` stores it (``create_command``) and sends the
``cmd`` frame to its agent (here through :class:`Connections`, or on another
hub through :class:`Peers`); an answer, a timeout or a cancel completes it in
the store (first answer wins) and :meth:`Commands.settle` resolves the handle,
tells the submitting hub, cancels the agent's work where needed and moves the
command's group on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import structlog

from agent_client import protocol as P

from .clock import now_ms
from .config import HubConfig
from .connections import Connections
from .deadlines import Deadlines
from .errors import AgentOffline, CommandTimeout, DispatcherError, HubClosed, UnknownCommand
from .feed import Feed
from .futures import then
from .handle import CommandHandle
from .ids import IdFactory
from .metrics import Metrics
from .models import CommandInfo, Outcome
from .peers import Peers
from .store.base import Completion, CreateResult, DropSpec, Store
from .tasks import TaskOwner

__all__ = ["Commands", "cmd_frame"]

log = structlog.get_logger(__name__)

_TIMED_OUT: dict[str, Any] = {"code": P.ErrorCode.TIMEOUT, "message": "the command timed out"}
_CANCELLED: dict[str, Any] = {"code": P.ErrorCode.CANCELLED,
                              "message": "the command was cancelled"}
# How often overdue commands are asked for at once (the sweeper loops until done).
SWEEP_BATCH = 100
# A command whose store write has not finished when its deadline passes is
# timed out this much later; one whose store failed, a second later.
_RETRY_UNSUBMITTED = 0.05
_RETRY_STORE_DOWN = 1.0


def cmd_frame(cmd: CommandInfo) -> bytes:
    """The ``cmd`` frame of a stored command (docs/protocol.md, Commands and redelivery)."""
    # Hot path: the map of P.CmdFrame.to_wire, built directly.
    return P.pack({"t": "cmd", "id": cmd.id, "key": cmd.key, "payload": cmd.payload,
                   "ts": cmd.ts, "deadline": cmd.deadline})


class Commands:
    """Every command this hub submits, completes or times out."""

    def __init__(self, *, config: HubConfig, hub_id: str, store: Store,
                 connections: Connections, peers: Peers, tasks: TaskOwner,
                 metrics: Metrics, feed: Feed) -> None:
        self.config = config
        self.hub_id = hub_id
        self.store = store
        self.connections = connections
        self.peers = peers
        self.tasks = tasks
        self.metrics = metrics
        self.feed = feed
        self._handles: dict[str, CommandHandle] = {}
        self._deadlines = Deadlines(self._handles, self._on_deadline)
        self._new_id = IdFactory()
        self._timeout_ms = int(config.command_timeout * 1000)
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended_log: Any = None
        self._draining = False
        self._settled: asyncio.Event | None = None  # set by settle() while draining

    def _ended_logger(self) -> Any:
        """The logger of ``command_ended`` (one line per command): the module's
        logger itself once structlog caches it (``cache_logger_on_first_use``, as
        ``dispatcher serve`` configures it), which is what the module's lazy proxy
        would use from then on anyway, without the proxy's ~0.7 µs per call
        (benchmark rows "roundtrip"); the proxy otherwise (e.g. under
        ``structlog.testing.capture_logs``)."""
        if structlog.get_config().get("cache_logger_on_first_use"):
            self._ended_log = log.bind()
            return self._ended_log
        return log

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = self.tasks.loop
        return self._loop

    # -- queries ----------------------------------------------------------------
    def waiting_ids(self) -> list[str]:
        """Commands whose handles wait on this hub."""
        return list(self._handles)

    @property
    def waiting(self) -> int:
        return len(self._handles)

    # -- submit -----------------------------------------------------------------
    def submit(
        self,
        agent_id: str,
        command_key: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        group: str | bool | None = None,
        drop_all_pending: bool | str = False,
        command_id: str | None = None,
        require_online: bool = False,
        job: str | None = None,
    ) -> CommandHandle:
        """``execute_on_agent`` (docs/guide.md): returns the handle at once.

        ``job``: the command is that job's part for ``agent_id`` (the store claims
        the part with the command, see ``Store.create_command``); not an argument
        of the public ``execute_on_agent``.

        Argument errors raise here, synchronously (``ValueError``/``TypeError``);
        everything that happens later (store, agent) arrives through the handle.
        """
        if self._closing or self._draining:
            raise HubClosed("the hub is closed" if self._closing else
                            "the hub is draining: submit to another hub")
        # Connected agents' ids were checked at their hello: skip the regex.
        if not (type(agent_id) is str and agent_id in self.connections.by_id) \
                and not P.is_valid_agent_id(agent_id):
            raise ValueError(f"invalid agent id {agent_id!r}")
        if not isinstance(command_key, str) or not 0 < len(command_key) <= P.MAX_KEY_LENGTH:
            raise ValueError("command_key must be a non-empty string of at most 256 characters")
        if command_id is not None:
            if not isinstance(command_id, str) or not 0 < len(command_id) <= P.MAX_ID_LENGTH:
                raise ValueError("command_id must be a non-empty string of at most 128 characters")
            existing = self._handles.get(command_id)
            if existing is not None:  # idempotent submit of a command waiting here
                return existing
        if timeout is not None and not 0 < timeout < 1e8:
            raise ValueError("timeout must be a positive number of seconds")
        if group is True:
            group = f"{agent_id}:{command_key}"
        elif group is False:
            group = None
        if group is not None and (not isinstance(group, str) or not group):
            raise ValueError("group must be a non-empty string or True")
        ts = now_ms()
        timeout_ms = self._timeout_ms if timeout is None else int(timeout * 1000)
        cmd = CommandInfo(
            id=command_id or self._new_id(), agent_id=agent_id, key=command_key, group=group,
            ts=ts, updated=ts, deadline=ts + timeout_ms, origin=self.hub_id, payload=payload,
            job=job,
        )
        # Encoded once, here: fails fast (TypeError) on payloads that cannot
        # cross the wire or be stored, and is the frame the agent gets.
        frame = cmd_frame(cmd)
        handle = CommandHandle(cmd.id, agent_id, command_key, self._loop or self._get_loop(),
                               self.cancel)
        self._handles[cmd.id] = handle
        self._deadlines.add(cmd.id, handle, timeout_ms / 1000)
        drop: DropSpec = drop_all_pending or None
        if require_online and agent_id not in self.connections.by_id:
            then(self.store.get_agent(agent_id), self._online_checked, handle, cmd, frame, drop)
        else:
            self._create(handle, cmd, frame, drop)
        return handle

    def _online_checked(self, handle: CommandHandle, cmd: CommandInfo, frame: bytes,
                        drop: DropSpec, fut: asyncio.Future[Any]) -> None:
        exc = _failure(fut)
        if exc is None and fut.result() is None:
            exc = AgentOffline(f"agent {cmd.agent_id!r} is not connected")
        if exc is not None:
            self._submit_failed(handle, cmd, exc)
        else:
            self._create(handle, cmd, frame, drop)

    def _create(self, handle: CommandHandle, cmd: CommandInfo, frame: bytes,
                drop: DropSpec) -> None:
        """Store ``cmd`` (a job's part when ``cmd.job`` is set), then deliver it."""
        # The agent's hub matters only if it is not connected here: the lookup
        # is skipped otherwise, and if the agent left meanwhile, delivery looks
        # it up after all (location "unknown", see _created).
        located = cmd.agent_id not in self.connections.by_id
        fut = self.store.create_command(cmd, drop=drop,
                                        max_pending=self.config.max_inflight_per_agent,
                                        locate=located, job=cmd.job)
        if fut.done():  # then(), spelled out: see its docstring
            self._created(handle, cmd, frame, located, fut)
        else:
            then(fut, self._created, handle, cmd, frame, located)

    def _created(self, handle: CommandHandle, cmd: CommandInfo, frame: bytes, located: bool,
                 fut: asyncio.Future[CreateResult]) -> None:
        try:
            res = fut.result()  # one call for the common case (hot path)
        except (asyncio.CancelledError, Exception):  # the store's failure: the handle's
            exc = _failure(fut)
            assert exc is not None
            self._submit_failed(handle, cmd, exc)
            return
        if handle._submit_state is False:
            handle._set_submitted()
        # Dropped commands first: their cancels go out before the new command.
        heads: dict[str, CommandInfo] | None = {} if res.dropped else None
        for info in res.dropped:
            self.settle(info, tell_agent=True, move_group=False)
            assert heads is not None
            head = heads.get(info.group or "")
            if info.group is not None and (head is None or _older(info, head)):
                heads[info.group] = info
        stored = res.command
        if not res.created:
            # Idempotent submit of a command this hub was not waiting for
            # (another hub's, or one from before a restart).
            if stored.status == "COMPLETE":
                self._handles.pop(cmd.id, None)
                handle._resolve(stored)
            elif stored.deadline is not None:
                delay = max(0.0, (stored.deadline - now_ms()) / 1000)
                self._deadlines.add(cmd.id, handle, delay)
        else:
            self.metrics.commands_submitted += 1
            if self.feed.active:
                self.feed.publish("command", stored.to_dict())
            if not res.coalesced:
                # Not looked up: unknown (None), see _deliver.
                self._deliver(stored, res.location if located else None, frame, located)
        # A dropped group leader must not strand the members behind it (a drop
        # by key can spare them): the next one runs, as after a timeout.
        if heads:
            for head in heads.values():
                self._release_group(head, spare=stored.id)

    def _submit_failed(self, handle: CommandHandle, cmd: CommandInfo,
                       exc: BaseException) -> None:
        if self._handles.get(cmd.id) is handle:
            del self._handles[cmd.id]
        if not isinstance(exc, DispatcherError):
            log.error("submit_failed", command_id=cmd.id, agent_id=cmd.agent_id, exc_info=exc)
            exc = DispatcherError(f"submit failed: {exc!r}")
        handle._fail(exc)

    def _deliver(self, cmd: CommandInfo, location: str | None = None,
                 frame: bytes | None = None, known: bool = False) -> None:
        """Send a stored command to its agent, here or on the hub it is connected to;
        otherwise it stays PENDING until the agent connects (docs/protocol.md, Handshake,
        step 4). ``location``: the agent's hub when ``known`` (None: nowhere);
        looked up by the peers otherwise."""
        if frame is None:
            frame = cmd_frame(cmd)
        if self.connections.send(cmd.agent_id, frame, cmd.id):
            return
        if not known or (location is not None and location != self.hub_id):
            self.peers.route_cmd(cmd, frame, location)

    # -- complete ---------------------------------------------------------------
    def complete(
        self,
        cmd_id: str,
        outcome: Outcome,
        *,
        result: Any = None,
        error: dict[str, Any] | None = None,
        agent_id: str | None = None,
        tell_agent: bool = False,
    ) -> asyncio.Future[Completion]:
        """Complete in the store (first answer wins), then :meth:`settle` it.

        The future fails with ``UnknownCommand`` when nothing was applied (an
        unknown or COMPLETE id, or one not addressed to ``agent_id``); the
        caller owns that failure.
        """
        fut = self.store.complete(cmd_id, outcome, now=now_ms(), result=result, error=error,
                                  agent_id=agent_id)
        if fut.done():  # then(), spelled out: see its docstring
            self._completed(tell_agent, fut)
        else:
            then(fut, self._completed, tell_agent)
        return fut

    def _completed(self, tell_agent: bool, fut: asyncio.Future[Completion]) -> None:
        try:
            done = fut.result()  # one call for the common case (hot path)
        except (asyncio.CancelledError, Exception):  # the caller owns the failure
            return
        info = done.command
        self.settle(info, tell_agent=tell_agent, watchers=done.watchers)
        for other in done.group:
            # The group's answer completed its PENDING members too. Only a group's
            # oldest member is ever sent to the agent, so the ones younger than
            # the answered command never were: no cancel for them.
            self.settle(other, tell_agent=_older(other, info), move_group=False)

    def settle(self, info: CommandInfo, *, tell_agent: bool, move_group: bool = True,
               watchers: Sequence[str] = ()) -> None:
        """This hub's store write completed ``info``: count it (here, so once),
        resolve its handle here and on the hubs waiting for it (its origin and
        ``watchers``), stop the agent's work if asked, log it, and
        (``move_group``) move its group on."""
        self.metrics.command_completed(info)
        if self._settled is not None:
            self._settled.set()
        handle = self._handles.pop(info.id, None)  # resolve(), inlined (hot path)
        if handle is not None:
            handle._resolve(info)
        if watchers or info.origin != self.hub_id:  # other hubs wait on it
            self.peers.notify_done(info, watchers)
        if tell_agent:
            # Through Connections.send: during a catch-up the cancel waits behind
            # the redelivered commands instead of overtaking its own command.
            sent = self.connections.send(info.agent_id, P.encode(P.CancelFrame(info.id)))
            if not sent and not self._closing:
                self.peers.route_cancel(info.agent_id, info.id)
        # The one place a command's end is logged: every outcome, once.
        (self._ended_log or self._ended_logger()).info(
            "command_ended", command_id=info.id, agent_id=info.agent_id, key=info.key,
            outcome=info.outcome, job=info.job)
        if self.feed.active:
            self.feed.publish("command", info.to_dict())
        if move_group and info.group is not None and info.outcome not in ("ok", "error") \
                and not self._closing:
            # A leader that ended without an answer lets the next member run (an
            # answer completed the PENDING members with it: Completion.group).
            self._release_group(info)

    def resolve(self, info: CommandInfo) -> None:
        """``info`` is COMPLETE (here, or on another hub): its handle here, if any, learns it."""
        handle = self._handles.pop(info.id, None)
        if handle is not None:
            handle._resolve(info)

    # -- groups -----------------------------------------------------------------
    def _release_group(self, head: CommandInfo, spare: str | None = None) -> None:
        """``head`` ended without an answer: if it led its group, the next member runs
        (unless it is ``spare``, just sent). Only then: an older member may still be
        in flight."""
        assert head.group is not None

        def next_found(fut: asyncio.Future[CommandInfo | None]) -> None:
            if _failure(fut) is not None:
                return
            nxt = fut.result()
            if nxt is not None and nxt.status == "PENDING" and nxt.id != spare \
                    and _older(head, nxt):
                self._deliver(nxt)

        then(self.store.next_in_group(head.agent_id, head.group), next_found)

    # -- answers from agents (the frame router's) ---------------------------------
    def ack(self, agent_id: str, cmd_id: str) -> asyncio.Future[None]:
        fut = self.store.mark_active(cmd_id, agent_id, now_ms())
        if self.feed.active:
            then(fut, self._acked, cmd_id)
        return fut

    def _acked(self, cmd_id: str, fut: asyncio.Future[None]) -> None:
        """Somebody watches the feed: tell it the command is ACTIVE."""
        if _failure(fut) is None:
            then(self.store.get_command(cmd_id), self._publish_found)

    def _publish_found(self, fut: asyncio.Future[CommandInfo | None]) -> None:
        if _failure(fut) is None:
            info = fut.result()
            if info is not None:
                self.feed.publish("command", info.to_dict())

    def progress(self, cmd_id: str, data: Any,
                 agent_id: str | None) -> asyncio.Future[str] | None:
        """Pass progress to the command's handle, here or on the hub that submitted it.
        None when it was delivered at once; otherwise the lookup's future, which fails
        with ``UnknownCommand`` for a command that takes no progress (from that agent)."""
        handle = self._handles.get(cmd_id)
        if handle is not None and (agent_id is None or handle.agent_id == agent_id):
            handle._push_progress(data)
            if self.feed.active:
                self.feed.publish("progress", {"id": cmd_id, "data": data})
            return None
        fut = self.store.progress_origin(cmd_id, agent_id)

        def found(fut: asyncio.Future[str]) -> None:
            if not fut.cancelled() and fut.exception() is None:
                self.peers.notify_progress(fut.result(), cmd_id, data)
                if self.feed.active:
                    self.feed.publish("progress", {"id": cmd_id, "data": data})

        then(fut, found)
        return fut

    def push_progress(self, cmd_id: str, data: Any) -> None:
        """Progress relayed by another hub for a command submitted here."""
        handle = self._handles.get(cmd_id)
        if handle is not None:
            handle._push_progress(data)

    # -- timeouts and cancels ---------------------------------------------------
    async def cancel(self, cmd_id: str) -> bool:
        """Cancel a command that is not COMPLETE; False when it already was."""
        try:
            await self.complete(cmd_id, "cancelled", error=_CANCELLED, tell_agent=True)
        except UnknownCommand:
            return False
        return True

    def _on_deadline(self, cmd_id: str) -> None:
        if not self._closing:
            then(self.complete(cmd_id, "timeout", error=_TIMED_OUT, tell_agent=True),
                 self._expired, cmd_id)

    def _expired(self, cmd_id: str, fut: asyncio.Future[Completion]) -> None:
        exc = _failure(fut)
        handle = self._handles.get(cmd_id)
        if exc is None or handle is None:
            return  # timed out, or completed meanwhile: nothing left to do
        if not isinstance(exc, UnknownCommand):
            # The store failed: retry soon, its deadline still stands (docs/guide.md, Guarantees).
            if not isinstance(exc, DispatcherError):
                log.error("timeout_failed", command_id=cmd_id, exc_info=exc)
            self._deadlines.add(cmd_id, handle, _RETRY_STORE_DOWN)
        elif not handle.is_submitted():
            # Still being stored (a slow store): time it out right after.
            self._deadlines.add(cmd_id, handle, _RETRY_UNSUBMITTED)
        else:
            then(self.store.get_command(cmd_id), self._expired_gone, cmd_id)

    def _expired_gone(self, cmd_id: str, fut: asyncio.Future[CommandInfo | None]) -> None:
        """The store refused to time out a command this hub waits for."""
        handle = self._handles.get(cmd_id)
        if handle is None or _failure(fut) is not None:
            if handle is not None:
                self._deadlines.add(cmd_id, handle, _RETRY_STORE_DOWN)
            return
        info = fut.result()
        if info is None:
            # Past its deadline and gone from the store (Redis restarted
            # empty, FLUSHALL, a fail-over that lost it): it timed out.
            del self._handles[cmd_id]
            handle._fail(CommandTimeout(f"command {cmd_id} timed out (lost by the store)"))
        elif info.status == "COMPLETE":
            self.resolve(info)

    async def sweep_once(self, grace_ms: int = 250) -> int:
        """Time out every overdue command in the store; returns how many this hub did.

        Commands waited on here have precise local timers; the grace keeps the
        sweeper from racing them and only catches the others (their hub died, or
        they were submitted before this hub restarted). Asks in batches until
        the store has no overdue command left, so a backlog is cleared at once.
        """
        done = 0
        while True:
            overdue = await self.store.overdue(now_ms() - grace_ms, SWEEP_BATCH)
            # A batch at once: its writes share one pipelined round trip.
            results = await asyncio.gather(
                *(self.complete(info.id, "timeout", error=_TIMED_OUT, tell_agent=True)
                  for info in overdue), return_exceptions=True)
            this_batch = 0
            for res in results:
                if isinstance(res, UnknownCommand):
                    continue  # another hub's sweeper, or the agent, was first
                if isinstance(res, BaseException):
                    raise res
                this_batch += 1
            done += this_batch
            if len(overdue) < SWEEP_BATCH or this_batch == 0 or self._closing:
                return done

    # -- shutdown -----------------------------------------------------------------
    def stop_accepting(self) -> asyncio.Event:
        """Refuse new submissions from now on (``HubClosed``); commands already stored
        still complete. The event returned is set whenever a command completes here."""
        self._draining = True
        if self._settled is None:
            self._settled = asyncio.Event()
        return self._settled

    def close(self) -> None:
        """Stop submitting and timing out; every handle still waiting raises HubClosed
        (its command stays stored)."""
        self._closing = True
        handles = list(self._handles.values())
        self._handles.clear()
        self._deadlines.close()
        for handle in handles:
            handle._fail(HubClosed("the hub closed; the command stays stored"))


def _older(a: CommandInfo, b: CommandInfo) -> bool:
    """Whether ``a`` comes before ``b`` in an agent's pending order (oldest first)."""
    return (a.ts, a.id) < (b.ts, b.id)


def _failure(fut: asyncio.Future[Any]) -> BaseException | None:
    """The exception a store future ended with (a cancelled one: the store closed)."""
    if fut.cancelled():
        return HubClosed("the store was closed")
    return fut.exception()
