"""The hub core: command lifecycle, futures, groups, timeouts, agent sessions.

Written against the store interface only (``store/base.py``) and against the
small :class:`Session` protocol that a transport implements; it never touches a
socket. The transport turns frames into calls of the ``on_*`` methods here; the
public :class:`~dispatcher.Dispatcher` adds the servers around it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine, Iterable
from typing import Any, Protocol

import structlog

from agent_client import protocol as P

from .calls import Calls
from .clock import now_ms
from .cluster import Cluster
from .config import HubConfig
from .deadlines import Deadlines
from .emitter import EventEmitter
from .errors import (
    AgentOffline,
    CommandTimeout,
    DispatcherError,
    HubClosed,
    StoreUnavailable,
    UnknownCommand,
)
from .events import Events
from .handle import CommandHandle
from .ids import IdFactory, new_hub_id
from .lifecycle import redeliverable
from .metrics import Metrics
from .models import AgentInfo, CommandInfo, Outcome
from .store.base import CreateResult, DropSpec, Store

__all__ = ["HubCore", "Session", "now_ms"]

log = structlog.get_logger(__name__)


class Session(Protocol):
    """One agent connection as the core sees it (the transport implements it)."""

    agent_id: str
    session_id: str
    info: AgentInfo

    def send(self, data: bytes, frame_type: str | None = None) -> bool:
        """Queue one frame without waiting; False if the connection is gone.
        ``frame_type``, when the caller knows it, spares reading it from ``data``."""

    def close(self, code: int, reason: str) -> None:
        """Start closing the connection with a close code of PROTOCOL.md."""

    @staticmethod
    def send_many(sessions: list[Any], data: bytes) -> int:
        """Send one frame to many sessions of this type; returns how many it reached."""


class _Delivery:
    """Per-session delivery state while the catch-up after ``welcome`` runs.

    Commands submitted during the catch-up wait here so that none is sent
    before ``welcome`` and none twice (PROTOCOL.md, Handshake, step 4).
    """

    __slots__ = ("backlog", "ready")

    def __init__(self) -> None:
        self.ready = False
        self.backlog: list[tuple[str | None, bytes]] = []  # (command id or None, frame)


class HubCore(EventEmitter):
    """Everything a hub does between its transports and its store."""

    def __init__(self, config: HubConfig, store: Store) -> None:
        super().__init__()
        self.config = config
        self.store = store
        self.hub_id = config.hub_id or new_hub_id()
        self._new_id = IdFactory()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sessions: dict[str, Session] = {}
        self._delivery: dict[str, _Delivery] = {}
        self._handles: dict[str, CommandHandle] = {}
        self._deadlines = Deadlines(self._handles, self._on_deadline)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed_tasks = False
        self._closing = False
        self._timeout_ms = int(config.command_timeout * 1000)
        self._sync_store = store.sync
        store.set_health_listener(self._on_store_health)
        self.events = Events(self)
        self.calls = Calls(self)
        self.cluster = Cluster(self)
        self.metrics = Metrics(self)

    # -- small helpers -------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Run ``coro`` as a task the hub owns and ends on close (after close, at once)."""
        task = self.loop.create_task(coro, name=name)
        if self._closed_tasks:
            task.cancel()  # nothing may outlive close(): it never runs
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            exc = task.exception()
            if exc is not None:
                log.error("hub_task_failed", task=task.get_name(), exc_info=exc)

    async def _cancel_tasks(self) -> None:
        self._closed_tasks = True
        while self._tasks:  # tasks spawned while others end are ended too
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def session_of(self, agent_id: str) -> Session | None:
        return self._sessions.get(agent_id)

    @property
    def connected_count(self) -> int:
        return len(self._sessions)

    # -- commands: submit ------------------------------------------------------
    def execute_on_agent(
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
    ) -> CommandHandle:
        """Submit a command; returns its handle at once (API.md).

        Argument errors raise here, synchronously (``ValueError``/``TypeError``);
        everything that happens later (store, agent) arrives through the handle.
        """
        if self._closing:
            raise HubClosed("the hub is closed")
        # Connected agents' ids were checked at their hello: skip the regex.
        if not (type(agent_id) is str and agent_id in self._sessions) \
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
        loop = self.loop
        ts = now_ms()
        timeout_ms = self._timeout_ms if timeout is None else int(timeout * 1000)
        cmd = CommandInfo(
            id=command_id or self._new_id(),
            agent_id=agent_id,
            key=command_key,
            group=group,
            ts=ts,
            updated=ts,
            deadline=ts + timeout_ms,
            origin=self.hub_id,
            payload=payload,
        )
        # Encoded once, here: fails fast (TypeError) on payloads that cannot
        # cross the wire or be stored, and is the frame the agent gets.
        frame = _cmd_bytes(cmd)
        handle = CommandHandle(cmd.id, agent_id, command_key, loop, self.cancel_command)
        drop: DropSpec = drop_all_pending or None
        self._handles[cmd.id] = handle
        self._deadlines.add(cmd.id, handle, timeout_ms / 1000)
        if self._sync_store:
            # In-process store: store and send now, no task per command.
            try:
                if require_online and cmd.agent_id not in self._sessions:
                    raise AgentOffline(f"agent {cmd.agent_id!r} is not connected")
                res = self.store.create_command_now(
                    cmd, drop=drop, max_pending=self.config.max_inflight_per_agent
                )
            except DispatcherError as exc:
                self._submit_failed(handle, cmd, exc)
                return handle
            heads = self._after_create(handle, cmd, res, frame, res.location)
            if heads:
                self._spawn(self._release_groups(heads, res.command.id))
        elif not require_online:
            # Networked store: a callback on the store's future, not a task.
            # The agent's hub matters only if it is not connected here: the
            # lookup is skipped, and if the agent left meanwhile, delivery
            # looks it up after all (location "unknown", see _created).
            located = agent_id not in self._sessions
            fut = self.store.create_command_start(
                cmd, drop=drop, max_pending=self.config.max_inflight_per_agent,
                locate=located)
            fut.add_done_callback(functools.partial(self._created, handle, cmd, frame,
                                                    located))
        else:
            self._spawn(self._submit(handle, cmd, frame, drop, require_online))
        return handle

    def _created(self, handle: CommandHandle, cmd: CommandInfo, frame: bytes, located: bool,
                 fut: asyncio.Future[CreateResult]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            if not isinstance(exc, DispatcherError):
                log.error("submit_failed", command_id=cmd.id, exc_info=exc)
                exc = DispatcherError(f"submit failed: {exc!r}")
            self._submit_failed(handle, cmd, exc)
            return
        res = fut.result()
        # Not looked up: unknown (True), not "nowhere" (None).
        heads = self._after_create(handle, cmd, res, frame,
                                   res.location if located else True)
        if heads and not self._closing:
            self._spawn(self._release_groups(heads, res.command.id))

    def _submit_failed(self, handle: CommandHandle, cmd: CommandInfo,
                       exc: DispatcherError) -> None:
        if self._handles.get(cmd.id) is handle:
            del self._handles[cmd.id]
        handle._fail(exc)
        if isinstance(exc, StoreUnavailable):
            self._store_failed(exc)

    async def _submit(
        self, handle: CommandHandle, cmd: CommandInfo, frame: bytes, drop: DropSpec,
        require_online: bool,
    ) -> None:
        try:
            if require_online and not await self._is_online(cmd.agent_id):
                raise AgentOffline(f"agent {cmd.agent_id!r} is not connected")
            res = await self.store.create_command(
                cmd, drop=drop, max_pending=self.config.max_inflight_per_agent
            )
        except DispatcherError as exc:
            self._submit_failed(handle, cmd, exc)
            return
        heads = self._after_create(handle, cmd, res, frame, res.location)
        if heads:
            await self._release_groups(heads, res.command.id)

    def _after_create(self, handle: CommandHandle, cmd: CommandInfo, res: CreateResult,
                      frame: bytes, location: str | bool | None,
                      ) -> dict[str, CommandInfo]:
        """The command is stored: resolve drops, deliver (``location`` as ``_deliver``
        takes it). Returns the dropped group leaders whose groups need their next
        member released."""
        handle._set_submitted()
        heads = self._drops_settled(res.dropped) if res.dropped else _NO_HEADS
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
            return heads
        self.metrics.command_submitted()
        if not res.coalesced:
            self._deliver(stored, location, frame)
        return heads

    def _drops_settled(self, dropped: list[CommandInfo]) -> dict[str, CommandInfo]:
        """Settle the commands a submit dropped; returns each group's oldest dropped one."""
        heads: dict[str, CommandInfo] = {}
        for info in dropped:
            self._settled(info, tell_agent=True)
            head = heads.get(info.group or "")
            if info.group is not None and (head is None or _older(info, head)):
                heads[info.group] = info
        return heads

    async def _release_groups(self, heads: dict[str, CommandInfo], new_id: str) -> None:
        """A dropped group leader must not strand the members behind it (drop by
        key can spare them): the next one runs, as after a timeout."""
        for group, head in heads.items():
            nxt = await self.store.next_in_group(head.agent_id, group)
            if nxt is not None and nxt.status == "PENDING" and nxt.id != new_id \
                    and _older(head, nxt):
                self._deliver(nxt)

    async def _is_online(self, agent_id: str) -> bool:
        if agent_id in self._sessions:
            return True
        return await self.store.get_agent(agent_id) is not None

    def _deliver(self, cmd: CommandInfo, location: str | bool | None = True,
                 frame: bytes | None = None) -> None:
        """Send a stored command to its agent, here or on the hub it is connected to;
        otherwise it stays PENDING until the agent connects (PROTOCOL.md, Handshake,
        step 4). ``location``: the agent's hub if known, None if it is nowhere,
        True to look it up."""
        if frame is None:
            frame = _cmd_bytes(cmd)
        if self.send_to_agent(cmd.agent_id, frame, cmd.id) or not self.cluster.enabled:
            return
        if location is True:
            self._spawn(self.cluster.route_cmd(cmd, frame), name=f"route:{cmd.id}")
        elif isinstance(location, str) and location != self.hub_id:
            self.cluster.send_cmd(location, cmd, frame)

    def cmd_frame(self, cmd: CommandInfo) -> bytes:
        return _cmd_bytes(cmd)

    def waiting_ids(self) -> list[str]:
        """Commands whose handles wait on this hub."""
        return list(self._handles)

    def send_to_agent(self, agent_id: str, data: bytes, cmd_id: str | None = None) -> bool:
        """Send a frame to an agent connected here; False if it is not.

        During the catch-up after ``welcome`` the frame waits in the session's
        backlog, so nothing overtakes the redelivered commands.
        """
        session = self._sessions.get(agent_id)
        if session is None:
            return False
        delivery = self._delivery[agent_id]
        if not delivery.ready:
            delivery.backlog.append((cmd_id, data))
            return True
        return session.send(data, None if cmd_id is None else "cmd")

    def send_to_many(self, agent_ids: Iterable[str], data: bytes,
                     skip: str | None = None) -> int:
        """One frame to every listed agent connected here (fan-out), in one pass;
        returns how many it reached (agents still in their catch-up get it next)."""
        ready: list[Session] = []
        waiting = 0
        for agent_id in agent_ids:
            if agent_id == skip:
                continue
            session = self._sessions.get(agent_id)
            if session is None:
                continue
            delivery = self._delivery[agent_id]
            if delivery.ready:
                ready.append(session)
            else:
                delivery.backlog.append((None, data))
                waiting += 1
        if not ready:
            return waiting
        return waiting + type(ready[0]).send_many(ready, data)

    def connected_ids(self) -> list[str]:
        """Agents connected to this hub."""
        return list(self._sessions)

    # -- commands: complete ------------------------------------------------------
    def _completed(self, info: CommandInfo, *, tell_agent: bool) -> None:
        """A command became COMPLETE in the store: resolve, cancel, log."""
        handle = self._handles.pop(info.id, None)
        if handle is not None:
            handle._resolve(info)
        if self.cluster.enabled:
            self.cluster.notify_done(info)  # a handle may wait on the submitting hub too
        if tell_agent:
            # Through send_to_agent: during a catch-up the cancel waits behind
            # the redelivered commands instead of overtaking its own command.
            sent = self.send_to_agent(info.agent_id, P.encode(P.CancelFrame(info.id)))
            if not sent and self.cluster.enabled and not self._closing:
                self._spawn(self.cluster.route_cancel(info.agent_id, info.id))
        if info.outcome not in ("ok", "error"):
            log.info(
                "command_ended", command_id=info.id, agent_id=info.agent_id,
                key=info.key, outcome=info.outcome,
            )

    async def _complete(
        self,
        cmd_id: str,
        outcome: Outcome,
        *,
        result: Any = None,
        error: dict[str, Any] | None = None,
        agent_id: str | None = None,
        tell_agent: bool = False,
    ) -> CommandInfo:
        """Complete in the store (first answer wins), then everything that follows."""
        now = now_ms()
        info = await self.store.complete(
            cmd_id, outcome, now=now, result=result, error=error, agent_id=agent_id
        )
        self._settled(info, tell_agent=tell_agent)
        if info.group is not None:
            await self._group_after(info)
        return info

    def _settled(self, info: CommandInfo, *, tell_agent: bool) -> None:
        """This hub's store write completed the command: count it (here, so once), then
        everything that follows for its handle and agent."""
        self.metrics.command_completed(info)
        self._completed(info, tell_agent=tell_agent)

    def _answer_applied(self, info: CommandInfo) -> None:
        """An agent's answer was stored (first answer wins); its group follows in a task."""
        self._settled(info, tell_agent=False)
        if info.group is not None and not self._closing:
            self._spawn(self._group_after(info))

    async def _group_after(self, info: CommandInfo) -> None:
        """What a group member's completion (``info``, as the store completed it)
        means for the rest of its group."""
        assert info.group is not None and info.outcome is not None
        if info.outcome in ("ok", "error"):
            # The group's first answer completes every PENDING member.
            for other in await self.store.complete_group(
                info.agent_id, info.group, info.outcome, now=info.updated, result=info.result,
                error=info.error,
            ):
                # Only a group's oldest member is ever sent to the agent, so the
                # ones younger than the answered command never were: no cancel.
                self._settled(other, tell_agent=_older(other, info))
        else:
            # The leader ended without an answer: the next member runs.
            # Only if it was the leader: an older member is still in flight.
            nxt = await self.store.next_in_group(info.agent_id, info.group)
            if nxt is not None and nxt.status == "PENDING" and _older(info, nxt):
                self._deliver(nxt)

    def _on_deadline(self, cmd_id: str) -> None:
        if self._closing:
            return
        self._spawn(self._expire(cmd_id), name=f"expire:{cmd_id}")

    async def _expire(self, cmd_id: str) -> None:
        try:
            await self._complete(
                cmd_id, "timeout",
                error={"code": P.ErrorCode.TIMEOUT, "message": "the command timed out"},
                tell_agent=True,
            )
        except UnknownCommand:
            handle = self._handles.get(cmd_id)
            if handle is None:
                return  # completed meanwhile: nothing to time out
            if not handle.is_submitted():
                # Still being stored (a slow store): time it out right after.
                self._deadlines.add(cmd_id, handle, 0.05)
                return
            info = await self.store.get_command(cmd_id)
            if info is None:
                # Past its deadline and gone from the store (Redis restarted
                # empty, FLUSHALL, a fail-over that lost it): it timed out.
                self._handles.pop(cmd_id, None)
                handle._fail(CommandTimeout(f"command {cmd_id} timed out (lost by the store)"))
            elif info.status == "COMPLETE":
                self._handles.pop(cmd_id, None)
                handle._resolve(info)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            handle = self._handles.get(cmd_id)
            if handle is not None:
                # Retry soon: the store's deadline still stands (ARCHITECTURE.md).
                self._deadlines.add(cmd_id, handle, 1.0)

    async def cancel_command(self, cmd_id: str) -> bool:
        """Cancel a command that is not COMPLETE; False when it already was."""
        try:
            await self._complete(
                cmd_id, "cancelled",
                error={"code": P.ErrorCode.CANCELLED, "message": "the command was cancelled"},
                tell_agent=True,
            )
        except UnknownCommand:
            return False
        return True

    async def apply_command_response(self, cmd_id: str, result: Any) -> bool:
        """Apply a result as if its agent had sent it; ``UnknownCommand`` if not applicable."""
        await self._complete(cmd_id, "ok", result=result)
        return True

    async def apply_command_error(self, cmd_id: str, error: Any) -> bool:
        """Apply a failure: a map with ``code``/``message``/``data``, or an exception."""
        await self._complete(cmd_id, "error", error=_error_map(error))
        return True

    async def apply_command_progress(self, cmd_id: str, data: Any) -> bool:
        """Pass a progress update to the command's handle."""
        return await self._progress(cmd_id, data, agent_id=None)

    async def _progress(self, cmd_id: str, data: Any, agent_id: str | None) -> bool:
        handle = self._handles.get(cmd_id)
        if handle is not None and (agent_id is None or handle.agent_id == agent_id):
            handle._push_progress(data)
            return True
        origin = await self.store.progress_origin(cmd_id, agent_id)
        if self.cluster.enabled:
            self.cluster.notify_progress(origin, cmd_id, data)
        return True

    def push_progress(self, cmd_id: str, data: Any) -> None:
        """Progress relayed by another hub for a command submitted here."""
        handle = self._handles.get(cmd_id)
        if handle is not None:
            handle._push_progress(data)

    def kick_local(self, agent_id: str, session_id: str) -> None:
        """Another hub took this agent's new connection: close the old one here (4409)."""
        session = self._sessions.get(agent_id)
        if session is not None and session.session_id == session_id:
            carried = self._replace(session)
            self._spawn(self.events.requeue(agent_id, carried))

    # -- events -----------------------------------------------------------------
    async def emit_to(self, agent_id: str | list[str], key: str, data: Any = None, *,
                      timeout: float | None = None) -> None:
        """Send an event; resolves when every target answered ``received``.

        Agents that are away get it from their queue when they connect.
        Raises ``DeliveryTimeout`` (``.pending``: who did not receive) after
        ``timeout`` seconds (default: ``command_timeout``).
        """
        await self.events.emit_to(agent_id, key, data, timeout)

    async def broadcast(self, key: str, data: Any = None) -> int:
        """Send an event to every connected agent, without receipts; returns how many."""
        return self.events.broadcast(key, data)

    # -- queries ---------------------------------------------------------------
    async def list_pending_commands(self, agent_id: str) -> list[CommandInfo]:
        return await self.store.list_pending(agent_id)

    async def get_command(self, cmd_id: str) -> CommandInfo | None:
        return await self.store.get_command(cmd_id)

    async def list_connected_agents(self) -> list[AgentInfo]:
        return await self.store.list_agents()

    async def get_agent(self, agent_id: str) -> AgentInfo | None:
        return await self.store.get_agent(agent_id)

    # -- sessions (called by the transport) ------------------------------------
    async def attach(self, session: Session, subs: tuple[str, ...] = ()) -> None:
        """A new authenticated connection: replace, register, welcome, catch up.

        Raises ``StoreUnavailable`` when the agent cannot be registered; the
        transport then refuses the connection.
        """
        agent_id = session.agent_id
        carried: list[bytes] = []
        old = self._sessions.get(agent_id)
        if old is not None:
            carried = self._replace(old)
        self._sessions[agent_id] = session
        delivery = self._delivery[agent_id] = _Delivery()
        welcomed = False
        try:
            previous = await self.store.register_agent(session.info)
            if previous is not None and previous.hub_id != self.hub_id and self.cluster.enabled:
                self.cluster.kick(previous.hub_id, agent_id, previous.session)
            if subs and self._sessions.get(agent_id) is session:
                # In force before welcome: an agent may act on welcome at once.
                try:
                    self.events.subscribe(agent_id, subs)
                except P.ProtocolError as exc:
                    session.send(P.encode(exc.to_frame()))
            session.send(P.encode(P.WelcomeFrame(
                v=P.PROTOCOL_VERSION, hub=self.hub_id, session=session.session_id,
                heartbeat=self.config.heartbeat,
            )))
            # Opened once welcomed: a connection replaced during its catch-up
            # is counted closed ("replaced"), so it must count as opened.
            welcomed = True
            self.metrics.connection_opened()
            pending = await self.store.list_pending(agent_id)
            queued = await self.events.take_queued(agent_id)
        except BaseException:
            if self._sessions.get(agent_id) is session:
                del self._sessions[agent_id]
                del self._delivery[agent_id]
                carried += self.events.connection_gone(agent_id)
                if welcomed:
                    self.metrics.connection_closed("attach_failed")
            await self.events.requeue(agent_id, carried)
            raise
        if self._sessions.get(agent_id) is not session:
            await self.events.requeue(agent_id, carried + queued)
            return  # replaced while we waited on the store
        # PROTOCOL.md, Handshake, step 4: commands not COMPLETE, then queued
        # events, oldest first; then what arrived for it meanwhile.
        sent: set[str] = set()
        for cmd in redeliverable(pending):
            sent.add(cmd.id)
            session.send(_cmd_bytes(cmd))
        for data in carried + queued:
            session.send(data)
            self.events.sent(agent_id, data)
        for cmd_id, data in delivery.backlog:
            if cmd_id is None or cmd_id not in sent:
                session.send(data)
        delivery.ready = True
        delivery.backlog = []
        log.info("agent_connected", agent_id=agent_id, session=session.session_id,
                 redelivered=len(sent), queued=len(carried) + len(queued))
        self._emit("agent-connected", session.info.copy())

    def _replace(self, old: Session) -> list[bytes]:
        """One live connection per agent id (PROTOCOL.md, Handshake, step 3).

        Returns the events the old connection had not acknowledged, for the new one.
        """
        old.send(P.encode(P.ErrorFrame(
            P.ErrorCode.REPLACED, "replaced by a newer connection of the same agent"
        )))
        old.close(P.CloseCode.REPLACED, "replaced")
        self._sessions.pop(old.agent_id, None)
        self._delivery.pop(old.agent_id, None)
        self.metrics.connection_closed("replaced")
        log.info("agent_replaced", agent_id=old.agent_id, session=old.session_id)
        self._emit("agent-disconnected", old.info.copy(), "replaced")
        return self.events.connection_gone(old.agent_id)

    async def detach(self, session: Session, reason: str) -> None:
        """The connection ended. Its commands stay in the store for the next one."""
        if self._sessions.get(session.agent_id) is not session:
            return  # already replaced (and reported) or never attached
        del self._sessions[session.agent_id]
        del self._delivery[session.agent_id]
        await self.events.requeue(session.agent_id,
                                  self.events.connection_gone(session.agent_id))
        try:
            await self.store.unregister_agent(session.agent_id, session.session_id)
        except StoreUnavailable as exc:
            self._store_failed(exc)
        self.metrics.connection_closed(reason)
        log.info("agent_disconnected", agent_id=session.agent_id, session=session.session_id,
                 reason=reason)
        self._emit("agent-disconnected", session.info.copy(), reason)

    # -- frames from an agent (called by the transport) --------------------------
    def answer_now(self, session: Session, frame: P.Frame) -> bool:
        """Apply a result/fail/ack at once on an in-process store; False for any
        other frame, which the caller hands to :meth:`on_frame`."""
        if not isinstance(frame, P.ResultFrame | P.FailFrame | P.AckFrame):
            return False
        if isinstance(frame, P.ResultFrame):
            self.result_now(session, frame.id, frame.data)
            return True
        store, agent_id = self.store, session.agent_id
        try:
            if isinstance(frame, P.FailFrame):
                self._answer_applied(store.complete_now(
                    frame.id, "error", now=now_ms(), error=frame.error, agent_id=agent_id))
            else:
                store.mark_active_now(frame.id, agent_id, now_ms())
        except Exception as exc:
            self._frame_failed(session, exc, frame.id, frame.TYPE)
        return True

    def result_now(self, session: Session, cmd_id: str, data: Any) -> None:
        """A ``result`` frame on an in-process store (the hot path: the transport
        hands over its fields, checked by ``P.result_fields``, without a frame object)."""
        try:
            self._answer_applied(self.store.complete_now(
                cmd_id, "ok", now=now_ms(), result=data, agent_id=session.agent_id))
        except Exception as exc:
            self._frame_failed(session, exc, cmd_id, "result")

    def on_result_nowait(self, session: Session, cmd_id: str, data: Any) -> asyncio.Future[Any]:
        """:meth:`on_answer_nowait` for a ``result`` frame's fields (networked store)."""
        fut = self.store.complete_start(cmd_id, "ok", now=now_ms(), result=data,
                                        agent_id=session.agent_id)
        fut.add_done_callback(functools.partial(self._answered, session, cmd_id))
        return fut

    def on_answer_nowait(self, session: Session, frame: P.Frame) -> asyncio.Future[Any] | None:
        """Apply an ack/result/fail through the store's future and a callback (no task);
        the future to bound how many are in flight. None for any other frame."""
        if isinstance(frame, P.ResultFrame):
            return self.on_result_nowait(session, frame.id, frame.data)
        agent_id = session.agent_id
        now = now_ms()
        fut: asyncio.Future[Any]
        if isinstance(frame, P.FailFrame):
            fut = self.store.complete_start(frame.id, "error", now=now, error=frame.error,
                                            agent_id=agent_id)
            fut.add_done_callback(functools.partial(self._answered, session, frame.id))
        elif isinstance(frame, P.AckFrame):
            fut = self.store.mark_active_start(frame.id, agent_id, now)
            fut.add_done_callback(functools.partial(self._acked, session, frame.id))
        elif isinstance(frame, P.ProgressFrame):
            # Same path as the answers, so a progress frame cannot overtake
            # the result that follows it (their store calls keep their order).
            handle = self._handles.get(frame.id)
            if handle is not None and handle.agent_id == agent_id:
                handle._push_progress(frame.data)
                return _done_future(self.loop)
            fut = self.store.progress_origin_start(frame.id, agent_id)
            fut.add_done_callback(functools.partial(self._progressed, session, frame.id,
                                                    frame.data))
        else:
            return None
        return fut

    def _progressed(self, session: Session, cmd_id: str, data: Any,
                    fut: asyncio.Future[str]) -> None:
        if fut.cancelled() or self._answer_failed(session, cmd_id, fut):
            return
        if self.cluster.enabled:
            self.cluster.notify_progress(fut.result(), cmd_id, data)

    def _answered(self, session: Session, cmd_id: str, fut: asyncio.Future[CommandInfo]) -> None:
        if fut.cancelled() or self._answer_failed(session, cmd_id, fut):
            return
        self._answer_applied(fut.result())

    def _acked(self, session: Session, cmd_id: str, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled():
            self._answer_failed(session, cmd_id, fut)

    def _answer_failed(self, session: Session, cmd_id: str, fut: asyncio.Future[Any]) -> bool:
        """Answer a failed ack/result/fail the way ``on_frame`` does; True if it failed."""
        exc = fut.exception()
        if exc is None:
            return False
        self._frame_failed(session, exc, cmd_id, "answer")
        return True

    def _frame_failed(self, session: Session, exc: BaseException, ref: Any,
                      frame_type: str) -> None:
        """The one place a frame's failure becomes the error frame PROTOCOL.md names:
        it costs that error frame, never the connection or the hub."""
        if isinstance(exc, UnknownCommand):
            error = P.ErrorFrame(P.ErrorCode.UNKNOWN_COMMAND, str(exc), ref)
        elif isinstance(exc, P.ProtocolError):
            error = exc.to_frame()
        elif isinstance(exc, StoreUnavailable):
            self._store_failed(exc)
            error = P.ErrorFrame(P.ErrorCode.INTERNAL,
                                 "the hub's store is unavailable; send it again later", ref)
        else:  # a bug
            log.error("frame_failed", agent_id=session.agent_id, type=frame_type, ref=ref,
                      exc_info=exc)
            error = P.ErrorFrame(P.ErrorCode.INTERNAL, "internal error", ref)
        session.send(P.encode(error))

    async def on_frame(self, session: Session, frame: P.Frame) -> None:
        """Apply one frame; answer bad ones with an ``error`` frame, never raise."""
        try:
            if isinstance(frame, P.ResultFrame):
                await self._complete(frame.id, "ok", result=frame.data,
                                     agent_id=session.agent_id)
            elif isinstance(frame, P.AckFrame):
                await self.store.mark_active(frame.id, session.agent_id, now_ms())
            elif isinstance(frame, P.FailFrame):
                await self._complete(frame.id, "error", error=frame.error,
                                     agent_id=session.agent_id)
            elif isinstance(frame, P.ProgressFrame):
                await self._progress(frame.id, frame.data, session.agent_id)
            else:
                await self._on_other_frame(session, frame)
        except Exception as exc:
            self._frame_failed(session, exc, getattr(frame, "id", None), frame.TYPE)

    async def _on_other_frame(self, session: Session, frame: P.Frame) -> None:
        if isinstance(frame, P.ReceivedFrame):
            self.events.on_received(session, frame.id)
        elif isinstance(frame, P.EmitFrame):
            await self.events.on_emit(session, frame)
        elif isinstance(frame, P.CallFrame):
            await self.calls.on_call(session, frame)
        elif isinstance(frame, P.SubFrame):
            self.events.subscribe(session.agent_id, frame.keys)
        elif isinstance(frame, P.UnsubFrame):
            self.events.unsubscribe(session.agent_id, frame.keys)
        else:
            self._refuse_frame(frame)

    def _refuse_frame(self, frame: P.Frame) -> None:
        if isinstance(frame, P.HelloFrame):
            raise P.ProtocolError(P.ErrorCode.BAD_FRAME, "'hello' is only valid as the first frame")
        if isinstance(frame, P.WelcomeFrame | P.CmdFrame | P.CancelFrame | P.EventFrame
                      | P.ReplyFrame | P.ErrorFrame):
            raise P.ProtocolError(
                P.ErrorCode.BAD_FRAME, f"{frame.TYPE!r} frames are sent by the hub, not by agents",
                getattr(frame, "id", None),
            )
        raise P.ProtocolError(P.ErrorCode.UNKNOWN_TYPE, f"unexpected {frame.TYPE!r} frame")

    # -- store health --------------------------------------------------------------
    def _store_failed(self, exc: StoreUnavailable) -> None:
        """One call failed; outages themselves are reported by the store's listener."""
        log.debug("store_call_failed", error=str(exc))

    def _on_store_health(self, ok: bool, exc: BaseException | None) -> None:
        """The store's outage listener: ``internal.db.error`` once per outage."""
        if not ok:
            log.error("store_outage", error=str(exc))
            self._emit("internal.db.error", exc)
            return
        log.info("store_recovered")
        if not self._closing:
            # Redis may have come back empty (no persistence): put this hub's
            # agents back in the registry so the cluster view is right again.
            self._spawn(self._reregister_agents(), name="reregister-agents")

    async def _reregister_agents(self) -> None:
        for session in list(self._sessions.values()):
            try:
                await self.store.register_agent(session.info)
            except StoreUnavailable:
                return

    # -- deadlines from the store -------------------------------------------------
    def start_sweeper(self) -> None:
        """Enforce deadlines from the store too (ARCHITECTURE.md, Guarantees): commands
        whose hub died, or that were submitted before this hub restarted, still time out."""
        if self.store.shared:
            self._spawn(self._sweep_forever(), name="deadline-sweeper")

    async def _sweep_forever(self) -> None:
        interval = self.config.sweep_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep_once()
            except StoreUnavailable:
                continue  # reported by the health listener; try again next turn

    async def sweep_once(self, grace_ms: int = 250) -> int:
        """Time out every overdue command in the store; returns how many this hub did.

        Commands waited on here have precise local timers; the grace keeps the
        sweeper from racing them and only catches the others.
        """
        done = 0
        for info in await self.store.overdue(now_ms() - grace_ms):
            try:
                await self._complete(
                    info.id, "timeout",
                    error={"code": P.ErrorCode.TIMEOUT, "message": "the command timed out"},
                    tell_agent=True,
                )
            except UnknownCommand:
                continue  # another hub's sweeper, or the agent, was first
            done += 1
        return done

    # -- shutdown ----------------------------------------------------------------
    async def _close_core(self) -> None:
        self._closing = True
        handles = list(self._handles.values())
        self._handles.clear()
        self._deadlines.close()
        for handle in handles:
            handle._fail(HubClosed("the hub closed; the command stays stored"))
        self.events.close()
        await self._cancel_tasks()
        await self._close_emitter()


# What _after_create returns when nothing was dropped (never mutated).
_NO_HEADS: dict[str, CommandInfo] = {}


def _older(a: CommandInfo, b: CommandInfo) -> bool:
    """Whether ``a`` comes before ``b`` in an agent's pending order (oldest first)."""
    return (a.ts, a.id) < (b.ts, b.id)


def _done_future(loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = loop.create_future()
    fut.set_result(None)
    return fut


def _cmd_bytes(cmd: CommandInfo) -> bytes:
    # Hot path: the map of P.CmdFrame.to_wire, built directly.
    return P.pack({"t": "cmd", "id": cmd.id, "key": cmd.key, "payload": cmd.payload,
                   "ts": cmd.ts, "deadline": cmd.deadline})


def _error_map(error: Any) -> dict[str, Any]:
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return P.error_info(error["code"], str(error.get("message", "")), error.get("data"))
    if isinstance(error, BaseException):
        code = getattr(error, "code", None) or type(error).__name__
        return P.error_info(str(code), str(error), getattr(error, "data", None))
    return P.error_info("error", str(error))
