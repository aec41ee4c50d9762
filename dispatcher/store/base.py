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

from ..models import JOB_COUNT_KEYS, AgentInfo, CommandInfo, JobInfo, Outcome

__all__ = ["HISTORY_SCAN", "Bus", "Completion", "CreateResult", "DropSpec", "HistoryFilter",
           "HistoryPage", "JobRecord", "Store", "job_counts"]

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

# Index entries one ``list_commands`` call looks at, at most: a filter that
# matches few of the entries of the index walked returns a short page (and a
# cursor to go on from) instead of walking the whole index in one call.
HISTORY_SCAN = 2000  # also bounds how long one listing holds Redis (~10 ms)


@dataclass(slots=True, frozen=True)
class HistoryFilter:
    """What ``list_commands`` selects (None: any). Validated by the caller."""

    agent_id: str | None = None
    key: str | None = None
    status: str | None = None
    outcome: str | None = None
    job: str | None = None

    def matches(self, agent_id: str, key: str, job: str | None, status: str,
                outcome: str | None) -> bool:
        return ((self.agent_id is None or agent_id == self.agent_id)
                and (self.key is None or key == self.key)
                and (self.job is None or job == self.job)
                and (self.status is None or status == self.status)
                and (self.outcome is None or outcome == self.outcome))


@dataclass(slots=True)
class HistoryPage:
    """What ``list_commands`` found: ``commands`` newest first, and where the next
    page starts (``(ts, id)`` of the last entry looked at), None when no entry is left."""

    commands: list[CommandInfo]
    after: tuple[int, str] | None = None


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
    dropped: Sequence[CommandInfo] = ()
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


@dataclass(slots=True)
class JobRecord:
    """A job as the store keeps it: its public record and each agent's part.

    ``parts``: agent id -> the command id its part started with; ``skipped``:
    agents whose part will never start; ``ended``: agent id -> outcome of the
    parts that ended. ``timeout_ms``: each part's command timeout (None: the
    hub's default). ``cancelled``: the job was cancelled (nothing starts any more).
    ``info.counts`` is always complete (see :func:`job_counts`).
    """

    info: JobInfo
    timeout_ms: int | None = None
    parts: dict[str, str] = field(default_factory=dict)
    skipped: set[str] = field(default_factory=set)
    ended: dict[str, str] = field(default_factory=dict)
    cancelled: bool = False


def job_counts(total: int, started: int, skipped: int,
               ended: dict[str, int]) -> dict[str, int]:
    """``JobInfo.counts`` from the store's counters (every key of JOB_COUNT_KEYS)."""
    counts = dict.fromkeys(JOB_COUNT_KEYS, 0)
    counts.update(ended)
    done = sum(ended.values())
    counts["skipped"] = skipped
    counts["pending"] = total - started - skipped
    counts["active"] = started - done
    return counts


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
        locate: bool = True, job: str | None = None,
    ) -> asyncio.Future[CreateResult]:
        """Store a new PENDING command and index it, atomically.

        ``job``: the command is the part of ``cmd.agent_id`` in that job (stored
        as the command's ``job``). In the same atomic step the store claims the
        part for ``cmd.id``, or fails with ``JobPartRefused``, changing nothing,
        when the part was started with another id or skipped, the job is not
        RUNNING, was cancelled, or is run by a hub other than ``cmd.origin``.
        Without ``job`` the command belongs to no job (``cmd.job`` is cleared).

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
    def list_commands(self, where: HistoryFilter, *, limit: int,
                      before: tuple[int, str] | None, now: int) -> asyncio.Future[HistoryPage]:
        """Retained commands (COMPLETE or not) that match ``where``, newest first
        (by ``ts``, then id), at most ``limit``, strictly older than ``before``.

        Answered from the store's history indexes (by agent, key, job and
        outcome): the smallest index that applies is walked, newest first, and
        its entries checked against the other filters; at most ``HISTORY_SCAN``
        entries per call (the page may then be short, with ``after`` set).
        Entries of commands that expired are dropped from the index when met.
        """

    @abstractmethod
    def trim_history(self, now: int, limit: int = 1000) -> asyncio.Future[int]:
        """Remove up to ``limit`` history index entries of commands that are gone
        (older than the retention period); returns how many were removed."""

    @abstractmethod
    def overdue(self, now: int, limit: int = 100) -> asyncio.Future[list[CommandInfo]]:
        """Commands not COMPLETE whose deadline is at or before ``now``, soonest first."""

    # -- jobs (docs/fleets.md) -------------------------------------------------
    # A job's parts are ordinary commands created by ``create_command(cmd,
    # job=JOB_ID)``, which also claims the agent's part in the job in the same
    # atomic step: a part never starts twice, not even from two hubs.
    @abstractmethod
    def create_job(self, job: JobRecord) -> asyncio.Future[tuple[JobRecord, bool]]:
        """Store a new RUNNING job (and index it for ``list_jobs``), unless a job with
        its id exists: then return that one and change nothing (idempotent).
        Returns the stored job and whether it was created."""

    @abstractmethod
    def get_job(self, job_id: str) -> asyncio.Future[JobRecord | None]:
        """The job with its parts, while it exists (COMPLETE ones until retention)."""

    @abstractmethod
    def list_jobs(self, limit: int) -> asyncio.Future[list[JobInfo]]:
        """The newest ``limit`` jobs, newest first."""

    @abstractmethod
    def end_job_parts(self, job_id: str, ended: Sequence[tuple[str, str]],
                      now: int) -> asyncio.Future[JobInfo | None]:
        """Record ``(agent id, outcome)`` of ended parts (each once: a repeat changes
        nothing); the job is COMPLETE, and expires after retention, once every part
        ended or was skipped. Returns the job (None: unknown) without its
        ``agents``, ``payload`` and ``target`` (empty: the caller has them, and this
        is called as often as parts end)."""

    @abstractmethod
    def skip_job_parts(self, job_id: str, agents: Sequence[str] | None, now: int, *,
                       origin: str | None = None,
                       cancel: bool = False) -> asyncio.Future[JobRecord | None]:
        """Mark the parts of ``agents`` (None: all) that have not started as skipped,
        atomically with respect to starting them. With ``origin``, only while that
        hub runs the job; ``cancel`` also marks the job cancelled. Returns the job
        (None: unknown, or not run by ``origin``)."""

    def adopt_jobs(self, hub_id: str) -> asyncio.Future[list[str]]:
        """Take over the RUNNING jobs whose hub is dead (its alive key expired) by
        making ``hub_id`` their origin, atomically per job; returns the ids of every
        RUNNING job ``hub_id`` now runs. Engines that serve one hub have no takeover."""
        raise NotImplementedError

    # -- agents ------------------------------------------------------------
    @abstractmethod
    def register_agent(self, info: AgentInfo) -> asyncio.Future[AgentInfo | None]:
        """Record a connected agent; return the record it replaces, if any."""

    @abstractmethod
    def unregister_agent(self, agent_id: str, session: str) -> asyncio.Future[bool]:
        """Forget the agent if its record is still this ``session``'s."""

    @abstractmethod
    def touch_agents(self, agents: Sequence[tuple[str, str]], now: int) -> asyncio.Future[int]:
        """Set ``last_seen`` to ``now`` for each ``(agent id, session)`` whose record is
        still that session's, in one store call; returns how many were updated."""

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

    @property
    def feed_channel(self) -> str:
        return "feed"

    def make_feed_bus(self) -> Bus | None:
        """A bus subscribed to ``feed_channel`` only (the cluster's feed for
        watchers, subscribed while this hub has watchers); None without a bus."""
        return None

    def listeners(self, channel: str) -> asyncio.Future[int]:
        """How many subscribers (hubs' buses) ``channel`` has."""
        raise NotImplementedError

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
