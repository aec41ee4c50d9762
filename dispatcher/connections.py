"""Who is connected to this hub, and sending frames to them.

The registry of this hub's agent connections (:class:`Session`, implemented by
the transport) and the one way to send them a frame. While a new connection's
catch-up runs (docs/protocol.md, Handshake, step 4) frames for it wait in its
backlog, so that nothing overtakes the redelivered commands.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from .models import AgentInfo

__all__ = ["Connections", "Session"]


class Session(Protocol):
    """One agent connection as the hub sees it (the transport implements it)."""

    agent_id: str
    session_id: str
    info: AgentInfo

    def send(self, data: bytes, frame_type: str | None = None) -> bool:
        """Queue one frame without waiting; False if the connection is gone.
        ``frame_type``, when the caller knows it, spares reading it from ``data``."""

    def close(self, code: int, reason: str) -> None:
        """Start closing the connection with a close code of docs/protocol.md."""

    def buffered(self) -> int:
        """Bytes queued for this connection and not yet sent."""

    def refused(self) -> None:
        """One of its frames was refused with an error frame (the transport charges
        the connection's rate for it)."""

    @staticmethod
    def send_many(sessions: list[Any], data: bytes) -> int:
        """Send one frame to many sessions of this type; returns how many it reached."""


class _Delivery:
    """A session's delivery state: ``ready`` once its catch-up is done."""

    __slots__ = ("backlog", "ready")

    def __init__(self) -> None:
        self.ready = False
        self.backlog: list[tuple[str | None, bytes]] = []  # (command id or None, frame)


class Connections:
    """The agents connected to this hub and their delivery state."""

    __slots__ = ("_delivery", "_sessions", "by_id")

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        # Read-only view for the hot paths: ``agent_id in connections.by_id``
        # costs a dict lookup, ``agent_id in connections`` a method call more.
        self.by_id: Mapping[str, Session] = self._sessions
        self._delivery: dict[str, _Delivery] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._sessions

    def get(self, agent_id: str) -> Session | None:
        return self._sessions.get(agent_id)

    def ids(self) -> list[str]:
        return list(self._sessions)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    # -- membership (the sessions module's) -------------------------------------
    def add(self, session: Session) -> None:
        """Register a new connection; frames for it wait until :meth:`ready`."""
        self._sessions[session.agent_id] = session
        self._delivery[session.agent_id] = _Delivery()

    def remove(self, session: Session) -> bool:
        """Forget the connection if it is still the agent's current one."""
        if self._sessions.get(session.agent_id) is not session:
            return False
        del self._sessions[session.agent_id]
        del self._delivery[session.agent_id]
        return True

    def is_ready(self, agent_id: str) -> bool:
        """Whether the agent is connected here and its catch-up is done."""
        delivery = self._delivery.get(agent_id)
        return delivery is not None and delivery.ready

    def is_current(self, session: Session) -> bool:
        return self._sessions.get(session.agent_id) is session

    def ready(self, session: Session, skip: set[str]) -> None:
        """The catch-up is sent: send what waited (except commands in ``skip``,
        already redelivered) and from now on send at once."""
        delivery = self._delivery[session.agent_id]
        for cmd_id, data in delivery.backlog:
            if cmd_id is None or cmd_id not in skip:
                session.send(data)
        delivery.ready = True
        delivery.backlog = []

    # -- sending ------------------------------------------------------------------
    def send(self, agent_id: str, data: bytes, cmd_id: str | None = None) -> bool:
        """Send a frame to an agent connected here; False if it is not."""
        session = self._sessions.get(agent_id)
        if session is None:
            return False
        delivery = self._delivery[agent_id]
        if not delivery.ready:
            delivery.backlog.append((cmd_id, data))
            return True
        return session.send(data, None if cmd_id is None else "cmd")

    def send_many(self, agent_ids: Iterable[str], data: bytes, skip: str | None = None) -> int:
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
