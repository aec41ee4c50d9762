"""Routing between hubs that share one store: per-hub channels, liveness, resync.

docs/deployment.md, How it works: a frame for an agent on another hub goes only to that
hub's channel; an answer or progress goes back only to the hub that submitted
the command; only agent-emitted events (and ``broadcast``) go to every hub.
Each hub refreshes its alive key; when one dies, the others forget its agents.

:class:`Cluster` implements :class:`~dispatcher.peers.Peers` over the store's
bus (a hub whose engine has no bus uses :class:`~dispatcher.peers.NoPeers`).
Messages between hubs are the typed values below, each a msgpack array on the
wire whose first item is its ``KIND``: ``cmd``, ``frame``, ``cancel``,
``done``, ``progress``, ``received`` and ``kick`` on ``P:hub:HUB_ID``;
``emit`` on ``P:events``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass
from typing import Any, ClassVar

import structlog

from agent_client import protocol as P

from .clock import now_ms
from .commands import Commands, cmd_frame
from .config import HubConfig
from .connections import Connections
from .errors import DispatcherError
from .events import Events
from .feed import Feed
from .lifecycle import redeliverable
from .models import CommandInfo
from .sessions import Sessions
from .store.base import Bus, Store
from .tasks import TaskOwner

__all__ = ["Cluster", "Message", "decode_message", "encode_message"]

log = structlog.get_logger(__name__)


# -- messages between hubs -----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CmdMsg:
    """Deliver a stored command to an agent connected to the receiving hub."""

    KIND: ClassVar[str] = "cmd"
    agent: str
    cmd_id: str
    frame: bytes
    deadline: int | None = None


@dataclass(frozen=True, slots=True)
class FrameMsg:
    """Send a frame (an event, a call's reply) to an agent of the receiving hub."""

    KIND: ClassVar[str] = "frame"
    agent: str
    event_id: str | None
    frame: bytes


@dataclass(frozen=True, slots=True)
class CancelMsg:
    KIND: ClassVar[str] = "cancel"
    agent: str
    cmd_id: str


@dataclass(frozen=True, slots=True)
class DoneMsg:
    """A command submitted by the receiving hub is COMPLETE."""

    KIND: ClassVar[str] = "done"
    cmd_id: str
    agent: str
    key: str
    outcome: str
    result: Any
    error: Any


@dataclass(frozen=True, slots=True)
class ProgressMsg:
    KIND: ClassVar[str] = "progress"
    cmd_id: str
    data: Any


@dataclass(frozen=True, slots=True)
class ReceivedMsg:
    KIND: ClassVar[str] = "received"
    event_id: str
    agent: str


@dataclass(frozen=True, slots=True)
class KickMsg:
    """The agent connected elsewhere: close its connection ``session`` here (4409)."""

    KIND: ClassVar[str] = "kick"
    agent: str
    session: str


@dataclass(frozen=True, slots=True)
class EmitMsg:
    """An agent-emitted event (or a broadcast, without sender) for every hub."""

    KIND: ClassVar[str] = "emit"
    hub: str
    sender: str | None
    key: str
    frame: bytes


@dataclass(frozen=True, slots=True)
class WatchMsg:
    """A hub has its first watcher of the feed: every hub publishes to it from now on
    (without waiting for its next poll of the channel's listeners)."""

    KIND: ClassVar[str] = "watch"
    hub: str


@dataclass(frozen=True, slots=True)
class GoneMsg:
    """A hub ended without notice (reaped as dead, or restarted under its id): the
    completions it stored just before may never have been told to the hubs waiting on
    them. Every hub reads its waiting commands from the store once."""

    KIND: ClassVar[str] = "gone"
    hub: str


Message = (CmdMsg | FrameMsg | CancelMsg | DoneMsg | ProgressMsg | ReceivedMsg | KickMsg
           | EmitMsg | WatchMsg | GoneMsg)

# kind -> (class, accepted argument counts, type checks of the leading fields)
_STR = (str,)
_OPT_STR = (str, type(None))
_BYTES = (bytes,)
_ANY = (object,)
_MESSAGES: dict[str, tuple[type[Any], tuple[int, ...], tuple[tuple[type, ...], ...]]] = {
    "cmd": (CmdMsg, (3, 4), (_STR, _STR, _BYTES, (int, type(None)))),
    "frame": (FrameMsg, (3,), (_STR, _OPT_STR, _BYTES)),
    "cancel": (CancelMsg, (2,), (_STR, _STR)),
    "done": (DoneMsg, (6,), (_STR, _STR, _STR, _STR, _ANY, _ANY)),
    "progress": (ProgressMsg, (2,), (_STR, _ANY)),
    "received": (ReceivedMsg, (2,), (_STR, _STR)),
    "kick": (KickMsg, (2,), (_STR, _STR)),
    "emit": (EmitMsg, (4,), (_STR, _OPT_STR, _STR, _BYTES)),
    "watch": (WatchMsg, (1,), (_STR,)),
    "gone": (GoneMsg, (1,), (_STR,)),
}


def encode_message(msg: Message) -> bytes:
    return P.pack([msg.KIND, *astuple(msg)])


def decode_message(body: Any) -> Message | None:
    """The message a bus payload holds, or None when it is not a valid one."""
    if not isinstance(body, list) or not body or not isinstance(body[0], str):
        return None
    spec = _MESSAGES.get(body[0])
    if spec is None:
        return None
    cls, counts, types = spec
    args = body[1:]
    if len(args) not in counts or not all(isinstance(a, t) for a, t in zip(args, types,
                                                                          strict=False)):
        return None
    msg: Message = cls(*args)
    return msg


class Cluster:
    """One hub's view of the cluster: the :class:`~dispatcher.peers.Peers` of a
    shared store, its inbox, its alive key and the reaping of dead hubs."""

    def __init__(self, *, config: HubConfig, hub_id: str, store: Store, tasks: TaskOwner,
                 emit: Callable[..., bool]) -> None:
        self.store = store
        self.me = hub_id
        self.tasks = tasks
        self._emit = emit
        self.bus: Bus | None = None
        self.sent = 0
        self.received = 0
        self._sweep_interval = config.sweep_interval
        ttl = config.hub_ttl
        self._ttl_ms = int(ttl * 1000)
        self._refresh = max(ttl / 3, 0.05)
        self._commands: Commands | None = None
        self._connections: Connections | None = None
        self._events: Events | None = None
        self._sessions: Sessions | None = None
        self._feed: Feed | None = None
        self._checking = False  # a GoneMsg's pass over the waiting commands runs
        # Recovery (see recover): one task at a time, run again if asked meanwhile.
        self._recovering: asyncio.Task[None] | None = None
        self._recover_again = False
        self._reset_pending = True  # a previous life's agents are not forgotten yet
        # No reaping before this (loop time): after this hub (re)gains the store,
        # the other hubs need up to a refresh period to say they are alive again.
        self._reap_after = 0.0

    @property
    def deaf(self) -> bool:
        return self.bus is not None and self.bus.deaf

    def bind(self, *, commands: Commands, connections: Connections, events: Events,
             sessions: Sessions, feed: Feed) -> None:
        """The parts that messages from other hubs are applied to."""
        self._commands = commands
        self._connections = connections
        self._events = events
        self._sessions = sessions
        self._feed = feed

    async def start(self, bus: Bus) -> None:
        """Join the cluster, before this hub accepts agents: forget what a previous
        life of this hub id left registered, say this hub is alive, listen."""
        with contextlib.suppress(DispatcherError):  # retried by recover()
            await self._reset()
            await self.store.hub_alive(self.me, self._ttl_ms)
        self.bus = bus
        await bus.start(self._on_message, self._on_subscribed)
        if self._reset_pending:
            self.recover("start")
        self.tasks.spawn(self._liveness_forever(), name="hub-liveness")
        # Deadlines from the store too (docs/guide.md, Guarantees): commands whose
        # hub died, or that were submitted before this hub restarted, still time out.
        # (A hub alone, on an engine without a bus, holds only commands it waits on
        # itself, each with its local timer: it has nothing to sweep.)
        self.tasks.spawn(self._sweep_forever(), name="deadline-sweeper")

    async def _reset(self) -> None:
        if not self._reset_pending:
            return
        forgotten = await self.store.hub_reset(self.me)
        for info in forgotten:
            log.warning("agent_forgotten", agent_id=info.id, hub_id=self.me,
                        reason="hub_restarted")
            self._emit("agent-disconnected", info, "hub_restarted")
        self._reset_pending = False
        if forgotten:  # a previous life of this hub id ended without notice
            self._announce_gone(self.me)

    async def close(self) -> None:
        if self.bus is not None:
            await self.bus.close()
            self.bus = None
        with contextlib.suppress(DispatcherError):  # its alive key expires by itself
            await self.store.hub_gone(self.me)

    # -- Peers: outgoing ----------------------------------------------------------------
    def _to_hub(self, hub_id: str, msg: Message) -> None:
        self.sent += 1
        self.store.publish(self.store.hub_channel(hub_id), encode_message(msg))

    async def _locate(self, agent_id: str) -> str | None:
        """The other hub the agent is connected to, or None."""
        info = await self.store.get_agent(agent_id)
        if info is None or info.hub_id == self.me:
            return None
        return info.hub_id

    def route_cmd(self, cmd: CommandInfo, frame: bytes, hub_id: str | None) -> None:
        msg = CmdMsg(cmd.agent_id, cmd.id, frame, cmd.deadline)
        if hub_id is not None:
            self._to_hub(hub_id, msg)
        else:
            self.tasks.spawn(self._route(cmd.agent_id, msg), name=f"route:{cmd.id}")

    def route_cancel(self, agent_id: str, cmd_id: str) -> None:
        self.tasks.spawn(self._route(agent_id, CancelMsg(agent_id, cmd_id)),
                         name=f"route-cancel:{cmd_id}")

    async def _route(self, agent_id: str, msg: Message) -> None:
        with contextlib.suppress(DispatcherError):  # nowhere to send it: it stays stored
            hub_id = await self._locate(agent_id)
            if hub_id is not None:
                self._to_hub(hub_id, msg)

    async def route_frame(self, agent_id: str, frame: bytes, event_id: str | None) -> bool:
        hub_id = await self._locate(agent_id)
        if hub_id is None:
            return False
        self._to_hub(hub_id, FrameMsg(agent_id, event_id, frame))
        return True

    def notify_done(self, info: CommandInfo, watchers: Sequence[str] = ()) -> None:
        hubs = {info.origin, *watchers} - {self.me, ""}
        if hubs:
            msg = DoneMsg(info.id, info.agent_id, info.key, info.outcome or "", info.result,
                          info.error)
            for hub_id in hubs:
                self._to_hub(hub_id, msg)

    def notify_progress(self, origin: str, cmd_id: str, data: Any) -> None:
        if origin and origin != self.me:
            self._to_hub(origin, ProgressMsg(cmd_id, data))

    def notify_received(self, event_id: str, agent_id: str) -> None:
        # Event ids are "e.<hub id>.<n>" (events.py): the waiting hub is in the id.
        if event_id.startswith("e.") and event_id.count(".") >= 2:
            hub_id = event_id[2:].rsplit(".", 1)[0]
            if hub_id != self.me:
                self._to_hub(hub_id, ReceivedMsg(event_id, agent_id))

    def kick(self, hub_id: str, agent_id: str, session: str) -> None:
        self._to_hub(hub_id, KickMsg(agent_id, session))

    def announce_watcher(self) -> None:
        """This hub has its first feed watcher: tell every hub (``WatchMsg``)."""
        self.sent += 1
        self.store.publish(self.store.events_channel, encode_message(WatchMsg(self.me)))

    def _announce_gone(self, hub_id: str) -> None:
        self.sent += 1
        self.store.publish(self.store.events_channel, encode_message(GoneMsg(hub_id)))

    def publish_emit(self, sender: str | None, key: str, frame: bytes) -> None:
        self.sent += 1
        self.store.publish(self.store.events_channel,
                           encode_message(EmitMsg(self.me, sender, key, frame)))

    # -- incoming ----------------------------------------------------------------
    def _on_message(self, channel: str, body: Any) -> None:
        msg = decode_message(body)
        if msg is None:
            log.warning("cluster_bad_message", channel=channel)
            return
        self.received += 1
        commands, connections, events, sessions = (
            self._commands, self._connections, self._events, self._sessions)
        assert commands is not None and connections is not None and events is not None \
            and sessions is not None, "Cluster.bind() first"
        if isinstance(msg, CmdMsg):
            # Never deliver a command past its deadline (docs/guide.md, Guarantees).
            if msg.deadline is None or msg.deadline > now_ms():
                connections.send(msg.agent, msg.frame, msg.cmd_id)
        elif isinstance(msg, FrameMsg):
            if connections.send(msg.agent, msg.frame):
                if msg.event_id is not None:
                    events.sent(msg.agent, msg.frame)
            else:  # it moved on meanwhile: it gets the frame from its queue
                self.tasks.spawn(events.deliver(msg.agent, msg.frame, msg.event_id,
                                                route=False))
        elif isinstance(msg, CancelMsg):
            connections.send(msg.agent, P.encode(P.CancelFrame(msg.cmd_id)))
        elif isinstance(msg, DoneMsg):
            commands.resolve(CommandInfo(
                id=msg.cmd_id, agent_id=msg.agent, key=msg.key, status="COMPLETE",
                outcome=msg.outcome,  # type: ignore[arg-type]
                result=msg.result, error=msg.error, origin=self.me))
        elif isinstance(msg, ProgressMsg):
            commands.push_progress(msg.cmd_id, msg.data)
        elif isinstance(msg, ReceivedMsg):
            events.receipt(msg.event_id, msg.agent)
        elif isinstance(msg, KickMsg):
            sessions.kick(msg.agent, msg.session)
        elif isinstance(msg, GoneMsg):
            if not self._checking:  # one pass at a time; it reads every waiting command
                self._checking = True
                self.tasks.spawn(self._check_waiting(f"hub_gone:{msg.hub}"),
                                 name="check-waiting")
        elif isinstance(msg, WatchMsg):
            if self._feed is not None:
                self._feed.watched()
        elif msg.hub != self.me:  # EmitMsg: our own comes back to us too
            events.fan_out_local(msg.sender, msg.key, msg.frame)

    def _on_subscribed(self, first: bool) -> None:
        if not first:
            # Pub/sub kept nothing while we were not listening: catch up from the store.
            self.recover("bus_resubscribed")

    def recover(self, reason: str) -> None:
        """Make the store's view of this hub right again and catch up on what this
        hub may have missed: after a store outage, a bus that reconnected, or an
        alive key that lapsed (this hub was frozen or cut off longer than its ttl,
        or Redis came back empty), when other hubs may have reaped its agents and
        published frames nobody heard (docs/guide.md, Guarantees). Retried
        until it succeeds; one run at a time."""
        self._recover_again = True
        # Their alive keys may have lapsed in the same outage: give the other hubs
        # a ttl to refresh them before this one reaps anybody (docs/guide.md, Guarantees: no
        # agent reaped while its hub lives).
        self._reap_after = self.tasks.loop.time() + self._ttl_ms / 1000
        if self._recovering is None or self._recovering.done():
            self._recovering = self.tasks.spawn(self._recover_until_done(reason),
                                                name="cluster-recover")

    async def _recover_until_done(self, reason: str) -> None:
        delay = 0.05
        while self._recover_again:
            self._recover_again = False
            try:
                await self._recover_once()
            except DispatcherError as exc:
                log.info("cluster_recover_retry", reason=reason, error=str(exc))
                self._recover_again = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        log.info("cluster_recovered", reason=reason)

    async def _recover_once(self) -> None:
        commands, connections, sessions = self._commands, self._connections, self._sessions
        assert commands is not None and connections is not None and sessions is not None
        await self._reset()
        # This hub's agents back in the registry, unless a newer connection of one
        # registered elsewhere meanwhile: then the one here is stale (4409).
        for session in connections.sessions():
            if not await self.store.restore_agent(session.info):
                log.info("agent_moved_meanwhile", agent_id=session.agent_id)
                sessions.kick(session.agent_id, session.session_id)
        # What local agents may have missed (their commands) and handles whose
        # completion message was lost.
        for agent_id in connections.ids():
            pending = await self.store.list_pending(agent_id)
            for cmd in redeliverable(pending, now_ms()):
                connections.send(agent_id, cmd_frame(cmd), cmd.id)
        await self._resolve_finished()

    async def _resolve_finished(self) -> None:
        """Handles waiting here whose command is COMPLETE in the store learn it (its
        completion message was lost: a bus outage, or the completing hub died between
        its store write and its message). One pipelined read per waiting command."""
        commands = self._commands
        assert commands is not None
        waiting = commands.waiting_ids()
        found = await asyncio.gather(*(self.store.get_command(i) for i in waiting))
        for info in found:
            if info is not None and info.status == "COMPLETE":
                commands.resolve(info)

    async def _check_waiting(self, reason: str) -> None:
        try:
            await self._resolve_finished()
        except DispatcherError as exc:  # the store failed: recover() does it when back
            log.warning("check_waiting_failed", reason=reason, error=str(exc))
        finally:
            self._checking = False

    async def _sweep_forever(self) -> None:
        commands = self._commands
        assert commands is not None
        while True:
            await asyncio.sleep(self._sweep_interval)
            try:
                await commands.sweep_once()
            except DispatcherError:
                continue  # reported by the store's health listener; next turn

    async def _liveness_forever(self) -> None:
        reap_every = 2
        turn = 0
        while True:
            await asyncio.sleep(self._refresh)
            turn += 1
            try:
                if not await self.store.hub_alive(self.me, self._ttl_ms):
                    log.warning("hub_alive_lapsed", hub_id=self.me)
                    self.recover("alive_lapsed")
                if turn % reap_every == 0 and self.tasks.loop.time() >= self._reap_after:
                    reaped = await self.store.reap_dead_hubs(self.me)
                    for info in reaped:
                        log.warning("agent_reaped", agent_id=info.id, hub_id=info.hub_id,
                                    reason="hub_dead")
                        info.last_seen = now_ms()
                        self._emit("agent-disconnected", info, "hub_dead")
                    for hub_id in {info.hub_id for info in reaped}:
                        self._announce_gone(hub_id)
            except DispatcherError:
                continue
