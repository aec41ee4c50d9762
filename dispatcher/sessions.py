"""Agent sessions: attach (replace, register, welcome, catch up) and detach.

docs/protocol.md, Handshake: one live connection per agent id across the cluster
(a new one replaces the old with 4409), and right after ``welcome`` the agent
gets, oldest first, every command of its that is not COMPLETE and every event
queued while it was away; what arrives meanwhile waits behind them
(:class:`~dispatcher.connections.Connections`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from agent_client import protocol as P

from .clock import now_ms
from .commands import cmd_frame
from .config import HubConfig
from .connections import Connections, Session
from .errors import DispatcherError
from .events import Events
from .lifecycle import redeliverable
from .metrics import Metrics
from .peers import Peers
from .store.base import Store
from .tasks import TaskOwner

__all__ = ["Sessions"]

log = structlog.get_logger(__name__)


class Sessions:
    """Connections coming and going, as the transport reports them."""

    def __init__(self, *, config: HubConfig, hub_id: str, store: Store,
                 connections: Connections, events: Events, peers: Peers, tasks: TaskOwner,
                 metrics: Metrics, emit: Callable[..., bool]) -> None:
        self.config = config
        self.hub_id = hub_id
        self.store = store
        self.connections = connections
        self.events = events
        self.peers = peers
        self.tasks = tasks
        self.metrics = metrics
        self._emit = emit

    async def attach(self, session: Session, subs: tuple[str, ...] = ()) -> None:
        """A new authenticated connection: replace, register, welcome, catch up.

        Raises ``StoreUnavailable`` when the agent cannot be registered; the
        transport then refuses the connection.
        """
        agent_id = session.agent_id
        carried: list[bytes] = []
        old = self.connections.get(agent_id)
        if old is not None:
            carried = self._replace(old)
        self.connections.add(session)
        welcomed = False
        try:
            previous = await self.store.register_agent(session.info)
            if previous is not None and previous.hub_id != self.hub_id:
                self.peers.kick(previous.hub_id, agent_id, previous.session)
            if subs and self.connections.is_current(session):
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
            if self.connections.remove(session):
                carried += self.events.connection_gone(agent_id)
                if welcomed:
                    self.metrics.connection_closed("attach_failed")
            await self.events.requeue(agent_id, carried)
            raise
        if not self.connections.is_current(session):
            await self.events.requeue(agent_id, carried + queued)
            return  # replaced while we waited on the store
        # docs/protocol.md, Handshake, step 4: commands not COMPLETE, then queued
        # events, oldest first; then what arrived for it meanwhile.
        sent: set[str] = set()
        for cmd in redeliverable(pending, now_ms()):
            sent.add(cmd.id)
            session.send(cmd_frame(cmd))
        for data in carried + queued:
            session.send(data)
            self.events.sent(agent_id, data)
        self.connections.ready(session, sent)
        log.info("agent_connected", agent_id=agent_id, session=session.session_id,
                 redelivered=len(sent), queued=len(carried) + len(queued))
        self._emit("agent-connected", session.info.copy())

    def _replace(self, old: Session) -> list[bytes]:
        """One live connection per agent id (docs/protocol.md, Handshake, step 3).

        Returns the events the old connection had not acknowledged, for the new one.
        """
        old.send(P.encode(P.ErrorFrame(
            P.ErrorCode.REPLACED, "replaced by a newer connection of the same agent"
        )))
        old.close(P.CloseCode.REPLACED, "replaced")
        self.connections.remove(old)
        self.metrics.connection_closed("replaced")
        log.info("agent_replaced", agent_id=old.agent_id, session=old.session_id)
        self._emit("agent-disconnected", old.info.copy(), "replaced")
        return self.events.connection_gone(old.agent_id)

    async def detach(self, session: Session, reason: str) -> None:
        """The connection ended. Its commands stay in the store for the next one."""
        if not self.connections.remove(session):
            return  # already replaced (and reported) or never attached
        await self.events.requeue(session.agent_id,
                                  self.events.connection_gone(session.agent_id))
        try:
            await self.store.unregister_agent(session.agent_id, session.session_id)
        except DispatcherError as exc:
            log.debug("unregister_failed", agent_id=session.agent_id, error=str(exc))
        self.metrics.connection_closed(reason)
        log.info("agent_disconnected", agent_id=session.agent_id, session=session.session_id,
                 reason=reason)
        self._emit("agent-disconnected", session.info.copy(), reason)

    async def touch_once(self) -> int:
        """``last_seen`` of every agent connected here is now, in one store call.

        A connection is alive while its Pongs (or any other frame) keep coming:
        the transport drops one that is silent for two heartbeats. So an agent
        still connected here was seen within that bound, and one write per
        heartbeat for all of them keeps ``AgentInfo.last_seen`` current without
        a store write per frame or per agent.
        """
        sessions = self.connections.sessions()
        if not sessions:
            return 0
        now = now_ms()
        for session in sessions:
            session.info.last_seen = now
        return await self.store.touch_agents(
            [(s.agent_id, s.session_id) for s in sessions], now)

    async def touch_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat)
            try:
                await self.touch_once()
            except DispatcherError as exc:  # the store's health listener reports outages
                log.debug("touch_failed", error=str(exc))

    def kick(self, agent_id: str, session_id: str) -> None:
        """Another hub took this agent's new connection: close the old one here (4409)."""
        session = self.connections.get(agent_id)
        if session is not None and session.session_id == session_id:
            carried = self._replace(session)
            self.tasks.spawn(self.events.requeue(agent_id, carried))
