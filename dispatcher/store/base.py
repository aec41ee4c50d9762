"""The store interface: what the hub core needs from an engine (memory or Redis).

The core is written against this class only; the two engines implement it and
one contract test suite (``tests/dispatcher/store/test_contract.py``) runs unchanged
against both. Every method that touches the store raises ``StoreUnavailable``
(and only that) when the backing service cannot be reached, and changes
nothing in that case. Times are unix milliseconds, passed in by the caller so
that an engine never reads a clock of its own.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from ..models import AgentInfo, CommandInfo, Outcome

__all__ = ["Bus", "Completion", "CreateResult", "DropSpec", "Store"]

class Bus(Protocol):
    """Messages between hubs (see ``redis_bus.py``)."""

    deaf: bool
    reconnects: int
    messages: int

    async def start(self, on_message: Callable[[str, Any], None],
                    on_subscribed: Callable[[bool], None]) -> None: ...

    async def close(self) -> None: ...


# ``drop_all_pending`` of ``execute_on_agent``: True drops every PENDING
# command of the agent in another group; a string drops those with that key.
DropSpec = bool | str | None

DROPPED_RESULT: dict[str, Any] = {"dropped": True}


@dataclass(slots=True)
class CreateResult:
    """What ``create_command`` did.

    ``created`` is False when a command with that id existed already
    (idempotent submit): ``command`` is then the stored one and nothing else
    changed. ``dropped`` lists the commands ``drop`` completed as ``dropped``.
    ``coalesced`` is True when another command of the same agent and group is
    not COMPLETE yet: this one waits and takes the group's first answer.
    """

    command: CommandInfo
    created: bool
    dropped: list[CommandInfo] = field(default_factory=list)
    coalesced: bool = False
    location: str | None = None  # hub the agent is connected to (shared stores), if any


@dataclass(slots=True)
class Completion:
    """What ``complete`` did: ``command`` as completed; ``group``: the PENDING
    members of its group that an answer completed in the same step, the same way;
    ``watchers``: hubs other than its origin that wait on it too (they submitted
    it again with its id) and must be told."""

    command: CommandInfo
    group: Sequence[CommandInfo] = ()
    watchers: Sequence[str] = ()


class Store(ABC):
    """Command, agent and event-queue state shared by the hubs using it.

    One calling convention: every data method returns an :class:`asyncio.Future`
    (the in-memory engine's is already finished when returned; the Redis
    engine's resolves when its pipelined reply is read). Failures arrive through
    the future, never as an exception from the call itself. Only ``start`` and
    ``close`` are coroutines.
    """

    engine: ClassVar[str]
    # Frames this store object removed from the queues of agents that are away
    # without delivering them (``/metrics``, dispatcher_events_dropped): to make
    # room under the bound of all queues together (``evicted``; see
    # ``queue_frame``), and expired ones cleared from a full queue (``expired``).
    frames_evicted: int = 0
    frames_expired: int = 0

    @property
    def unfinished(self) -> int | None:
        """Commands not COMPLETE that go with this store object when it closes (the
        in-memory engine's); None for a shared store, which keeps them."""
        return None

    @property
    def healthy(self) -> bool:
        """False while the backing service is unreachable (``/healthz`` answers 503)."""
        return True

    def set_health_listener(  # noqa: B027 - engines that cannot fail keep this no-op
        self, listener: Callable[[bool, BaseException | None], None] | None
    ) -> None:
        """``listener(False, exc)`` once when an outage starts, ``(True, None)`` when it ends."""

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect; may raise ``StoreUnavailable``."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; idempotent."""

    @abstractmethod
    def ping(self) -> asyncio.Future[None]:
        """Raise ``StoreUnavailable`` unless the store answers."""

    # -- commands ----------------------------------------------------------
    @abstractmethod
    def create_command(
        self, cmd: CommandInfo, *, drop: DropSpec = None, max_pending: int | None = None,
        locate: bool = True,
    ) -> asyncio.Future[CreateResult]:
        """Store a new PENDING command and index it, atomically.

        ``locate`` False: the caller does not need ``CreateResult.location``
        (an engine may leave it None without looking it up).

        When ``cmd.id`` exists already, return it with ``created=False`` and
        change nothing. Otherwise first complete the agent's PENDING commands
        selected by ``drop`` with outcome ``dropped`` (same atomic step).
        Raises ``TooManyCommands`` (changing nothing) when the agent already
        has ``max_pending`` commands that are not COMPLETE.
        """

    @abstractmethod
    def mark_active(self, cmd_id: str, agent_id: str, now: int) -> asyncio.Future[None]:
        """PENDING or ACTIVE → ACTIVE (the agent's ``ack``).

        Raises ``UnknownCommand`` when the id is unknown, COMPLETE, or not
        addressed to ``agent_id``.
        """

    @abstractmethod
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
        """Complete a command if it is not COMPLETE yet: the first answer wins.

        Removes it from the pending index and lets it expire after the
        retention period. With ``agent_id``, only a command addressed to that
        agent is completed. An answer (``ok``/``error``) is refused once the
        command's deadline is at or before ``now``: past its deadline a command
        only ends ``timeout`` or ``cancelled``. An answer to a group member
        completes, in the same atomic step, every PENDING member of the group
        whose deadline has not passed, with the same result or error
        (``Completion.group``). Fails with ``UnknownCommand`` when nothing was
        applied.
        """

    @abstractmethod
    def next_in_group(self, agent_id: str, group: str) -> asyncio.Future[CommandInfo | None]:
        """The oldest command of the agent's group that is not COMPLETE, if any."""

    @abstractmethod
    def get_command(self, cmd_id: str) -> asyncio.Future[CommandInfo | None]:
        """The command, while it exists (COMPLETE ones until retention passes)."""

    @abstractmethod
    def list_pending(self, agent_id: str) -> asyncio.Future[list[CommandInfo]]:
        """The agent's commands that are not COMPLETE, oldest first."""

    @abstractmethod
    def overdue(self, now: int, limit: int = 100) -> asyncio.Future[list[CommandInfo]]:
        """Commands not COMPLETE whose deadline is at or before ``now``, soonest first."""

    # -- agents ------------------------------------------------------------
    @abstractmethod
    def register_agent(self, info: AgentInfo) -> asyncio.Future[AgentInfo | None]:
        """Record a connected agent; return the record it replaces, if any."""

    @abstractmethod
    def unregister_agent(self, agent_id: str, session: str) -> asyncio.Future[bool]:
        """Forget the agent if its record is still this ``session``'s."""

    @abstractmethod
    def get_agent(self, agent_id: str) -> asyncio.Future[AgentInfo | None]: ...

    @abstractmethod
    def list_agents(self) -> asyncio.Future[list[AgentInfo]]: ...

    @abstractmethod
    def progress_origin(self, cmd_id: str, agent_id: str | None) -> asyncio.Future[str]:
        """The origin hub of a command not COMPLETE (addressed to ``agent_id`` if given);
        fails with ``UnknownCommand`` otherwise."""

    # -- routing between hubs ---------------------------------------------------
    # An engine that serves one hub has no bus: ``make_bus`` returns None and
    # the hub then never calls the other methods of this section.
    def make_bus(self, hub_id: str) -> Bus | None:
        """The message bus between hubs, subscribed to ``hub_id``'s channels."""
        return None

    def hub_channel(self, hub_id: str) -> str:
        return f"hub:{hub_id}"

    @property
    def events_channel(self) -> str:
        return "events"

    def publish(self, channel: str, data: bytes) -> asyncio.Future[Any]:
        """Send a message to a channel (fire and forget: the future holds the outcome)."""
        raise NotImplementedError

    def hub_alive(self, hub_id: str, ttl_ms: int) -> asyncio.Future[bool]:
        """Refresh this hub's alive key; False when it had lapsed (the hub was frozen
        or cut off longer than its ttl, or the store lost it): other hubs may have
        reaped its agents."""
        raise NotImplementedError

    def hub_reset(self, hub_id: str) -> asyncio.Future[list[AgentInfo]]:
        """A hub starts: forget (and return) the agents that a previous life of the
        same hub id left registered."""
        raise NotImplementedError

    def restore_agent(self, info: AgentInfo) -> asyncio.Future[bool]:
        """Register a connected agent again after its record may have been lost;
        False (changing nothing) when another session of the agent holds it."""
        raise NotImplementedError

    def hub_gone(self, hub_id: str) -> asyncio.Future[None]:
        """This hub leaves the cluster cleanly."""
        raise NotImplementedError

    def reap_dead_hubs(self, me: str) -> asyncio.Future[list[AgentInfo]]:
        """Forget the agents of hubs whose alive key expired; returns them."""
        raise NotImplementedError

    # -- frames queued for agents that are away ---------------------------------
    @abstractmethod
    def queue_frame(self, agent_id: str, frame: bytes, *, now: int, max_len: int,
                    ttl_ms: int) -> asyncio.Future[bool]:
        """Append a frame (an event, a call's reply) to the agent's queue.

        Returns False, changing nothing, when the queue already holds
        ``max_len`` frames; the caller reports the refusal. Frames older than
        ``ttl_ms`` are not delivered (``take_frames`` drops them).

        The queues of all agents together are bounded too (the engine's
        ``max_queues``, and on the in-memory engine ``max_queued_bytes``): past
        a bound the oldest queues (by last push) or their oldest frames are
        dropped to make room, each dropped frame counted in ``frames_evicted``.
        """

    @abstractmethod
    def take_frames(self, agent_id: str, *, now: int,
                    ttl_ms: int) -> asyncio.Future[tuple[list[bytes], int]]:
        """Remove and return the agent's queued frames, oldest first, and how
        many were dropped for being older than ``ttl_ms``."""

    @abstractmethod
    def requeue_frames(self, agent_id: str, frames: list[bytes], *, now: int,
                       ttl_ms: int = 3_600_000) -> asyncio.Future[None]:
        """Put frames back at the head of the queue, in order (sent but not received);
        the bounds of all queues together apply as in ``queue_frame``."""
