"""Plain records the hub hands out: commands (``CommandInfo``) and agents (``AgentInfo``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["JOB_COUNT_KEYS", "STATUSES", "TERMINAL_OUTCOMES", "AgentInfo", "CommandInfo",
           "CommandPage", "JobInfo", "JobStatus", "Outcome", "Status"]

Status = Literal["PENDING", "ACTIVE", "COMPLETE"]
Outcome = Literal["ok", "error", "timeout", "cancelled", "dropped"]
TERMINAL_OUTCOMES: frozenset[str] = frozenset({"ok", "error", "timeout", "cancelled", "dropped"})
JobStatus = Literal["RUNNING", "COMPLETE"]
# JobInfo.counts, always all of them: parts not started yet (``pending``), started
# and not ended (``active``), never started (``skipped``), and ended, by outcome.
JOB_COUNT_KEYS: tuple[str, ...] = ("pending", "active", "skipped", "ok", "error", "timeout",
                                   "cancelled", "dropped")
STATUSES: frozenset[str] = frozenset({"PENDING", "ACTIVE", "COMPLETE"})


@dataclass(slots=True)
class CommandInfo:
    """One command as the store keeps it (docs/redis.md, ``P:cmd:ID``).

    ``ts``, ``updated`` and ``deadline`` are unix milliseconds. ``result`` is set
    when ``outcome`` is ``ok`` or ``dropped``; ``error`` (a map with ``code``,
    ``message`` and optional ``data``) for every other outcome.
    """

    id: str
    agent_id: str
    key: str
    status: Status = "PENDING"
    outcome: Outcome | None = None
    group: str | None = None
    ts: int = 0
    updated: int = 0
    deadline: int | None = None
    origin: str = ""
    payload: Any = None
    result: Any = None
    error: dict[str, Any] | None = None
    job: str | None = None  # the job this command is an agent's part of

    def copy(self) -> CommandInfo:
        # Spelled out: dataclasses.replace costs several times more, and the
        # in-memory engine copies on its hot path.
        return CommandInfo(
            self.id, self.agent_id, self.key, self.status, self.outcome, self.group, self.ts,
            self.updated, self.deadline, self.origin, self.payload, self.result, self.error,
            self.job,
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict. Nested values are the record's own, not copies:
        ``dataclasses.asdict`` copies them recursively, which fails with
        RecursionError on agent data nested a few hundred levels deep."""
        return _fields(self)


@dataclass(slots=True)
class CommandPage:
    """One page of ``list_commands``: ``commands`` newest first; ``next`` is the
    opaque cursor of the following page, or None on the last one."""

    commands: list[CommandInfo]
    next: str | None = None


@dataclass(slots=True)
class AgentInfo:
    """A connected agent (docs/redis.md, ``P:agent:ID``); times are unix ms."""

    id: str
    hub_id: str
    session: str
    connected_at: int
    last_seen: int
    meta: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> AgentInfo:
        return dataclasses.replace(self, meta=dict(self.meta))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict. Nested values are the record's own, not copies:
        ``dataclasses.asdict`` copies them recursively, which fails with
        RecursionError on agent data nested a few hundred levels deep."""
        return _fields(self)


@dataclass(slots=True)
class JobInfo:
    """A job: one command run on many agents (docs/fleets.md); times are unix ms.

    ``agents``: the targeted agent ids, in rollout order. ``batch``: at most this
    many parts unfinished at once (None: all at once); ``max_failures``: more
    parts than this ending other than ``ok`` stops the rollout (None: never).
    Both are the numbers the submitted values (``"25%"``) resolved to.
    ``origin``: the hub running the rollout (another hub's id after a takeover).
    """

    id: str
    key: str
    payload: Any = None
    target: Any = None
    agents: list[str] = field(default_factory=list)
    status: JobStatus = "RUNNING"
    counts: dict[str, int] = field(default_factory=dict)
    ts: int = 0
    updated: int = 0
    batch: int | None = None
    max_failures: int | None = None
    origin: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _fields(self)


def _fields(record: Any) -> dict[str, Any]:
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
