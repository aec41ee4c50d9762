"""A reference model of the command lifecycle, pure (no I/O, no clock, no asyncio).

What the stateful tests (``test_lifecycle_model.py``, ``store/test_store_model.py``)
compare both store engines and the hub with. It is the contract written as
plainly as possible, from ``dispatcher/store/base.py``'s docstrings, docs/guide.md
(``execute_on_agent``: ``command_id``, ``group``, ``drop_all_pending``) and
docs/protocol.md (Commands, Redelivery):

- a command is PENDING, then ACTIVE (``ack``), then COMPLETE with one outcome;
  the first completion wins, later ones are refused (``UnknownCommand``);
- an agent's commands that are not COMPLETE are listed oldest first
  (``ts``, then ``id``, the order of Redis's sorted sets);
- ``create`` with an existing id changes nothing; otherwise ``max_pending`` is
  checked first, then ``drop`` completes the selected PENDING commands as
  ``dropped``, then the command is stored; it is ``coalesced`` when another
  command of its agent and group is still not COMPLETE;
- an answer (``ok``/``error``) is refused (``UnknownCommand``) once the
  command's deadline is at or before ``now``: past its deadline a command only
  ends ``timeout`` or ``cancelled``;
- an answer to a group member completes, in the same step, every PENDING
  member of its group whose deadline has not passed (``Completion.group``),
  with the same outcome, result or error; members past their deadline stay
  PENDING (they time out);
- after a (re)connection the agent is sent its commands not COMPLETE, oldest
  first, one per group (the oldest).

Where the contract is silent (an ``ack`` after the deadline)
:meth:`Model.unspecified` says so, and the machines only require the engines
to agree, then adopt what they did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dispatcher.errors import TooManyCommands, UnknownCommand
from dispatcher.models import CommandInfo

__all__ = ["DROPPED", "Completed", "Created", "Model", "project"]

DROPPED: dict[str, Any] = {"dropped": True}

# Fields every engine fills in the records that create/complete
# return (the Redis engine builds them from its script's reply: no payload, and
# no deadline for dropped or group-completed records).
RETURNED_FIELDS = ("id", "agent_id", "key", "status", "outcome", "group", "ts", "updated",
                   "origin", "result", "error")


def project(info: CommandInfo, fields: tuple[str, ...] = RETURNED_FIELDS) -> dict[str, Any]:
    return {name: getattr(info, name) for name in fields}


@dataclass(slots=True)
class Created:
    command: CommandInfo
    created: bool
    dropped: list[CommandInfo] = field(default_factory=list)
    coalesced: bool = False


@dataclass(slots=True)
class Completed:
    """What :meth:`Model.complete` did (``store.base.Completion`` without watchers)."""

    command: CommandInfo
    group: list[CommandInfo] = field(default_factory=list)


def _order(cmd: CommandInfo) -> tuple[int, str]:
    return (cmd.ts, cmd.id)


class Model:
    """Every command ever created (COMPLETE ones are kept: retention is long in the tests)."""

    def __init__(self) -> None:
        self.cmds: dict[str, CommandInfo] = {}

    # -- queries -------------------------------------------------------------
    def get(self, cmd_id: str) -> CommandInfo | None:
        cmd = self.cmds.get(cmd_id)
        return None if cmd is None else cmd.copy()

    def pending(self, agent_id: str) -> list[CommandInfo]:
        """The agent's commands not COMPLETE, oldest first."""
        out = [c for c in self.cmds.values() if c.agent_id == agent_id and c.status != "COMPLETE"]
        out.sort(key=_order)
        return out

    def next_in_group(self, agent_id: str, group: str) -> CommandInfo | None:
        for cmd in self.pending(agent_id):
            if cmd.group == group:
                return cmd
        return None

    def overdue(self, now: int, limit: int) -> list[CommandInfo]:
        out = [c for c in self.cmds.values()
               if c.status != "COMPLETE" and c.deadline is not None and c.deadline <= now]
        out.sort(key=lambda c: (c.deadline or 0, c.id))
        return out[:limit]

    def redeliverable(self, agent_id: str) -> list[CommandInfo]:
        """What a (re)connected agent is sent: oldest first, one per group."""
        out: list[CommandInfo] = []
        seen: set[str] = set()
        for cmd in self.pending(agent_id):
            if cmd.group is not None:
                if cmd.group in seen:
                    continue
                seen.add(cmd.group)
            out.append(cmd)
        return out

    @staticmethod
    def past_deadline(cmd: CommandInfo, now: int) -> bool:
        return cmd.deadline is not None and cmd.deadline <= now

    def unspecified(self, op: str, cmd_id: str, now: int) -> bool:
        """True where the contract does not say what happens (see the module docstring)."""
        cmd = self.cmds.get(cmd_id)
        if cmd is None or cmd.status == "COMPLETE" or not self.past_deadline(cmd, now):
            return False
        return op == "ack"

    # -- changes -------------------------------------------------------------
    def create(self, cmd: CommandInfo, *, drop: bool | str | None = None,
               max_pending: int | None = None) -> Created:
        existing = self.cmds.get(cmd.id)
        if existing is not None:
            return Created(existing.copy(), created=False)
        mine = self.pending(cmd.agent_id)
        if max_pending is not None and len(mine) >= max_pending:
            raise TooManyCommands(f"{cmd.agent_id} has {len(mine)} commands not COMPLETE")
        dropped: list[CommandInfo] = []
        coalesced = False
        for other in mine:
            if drop and other.status == "PENDING" and self.drops(drop, cmd, other):
                self._finish(other, "dropped", cmd.ts, dict(DROPPED), None)
                dropped.append(other.copy())
            elif cmd.group is not None and other.group == cmd.group:
                coalesced = True
        stored = cmd.copy()
        stored.status, stored.outcome, stored.updated = "PENDING", None, cmd.ts
        stored.result = stored.error = None
        self.cmds[cmd.id] = stored
        return Created(stored.copy(), created=True, dropped=dropped, coalesced=coalesced)

    @staticmethod
    def drops(drop: bool | str, new: CommandInfo, other: CommandInfo) -> bool:
        """Whether ``drop_all_pending`` of ``new`` selects ``other`` (if PENDING)."""
        if isinstance(drop, str):
            return other.key == drop
        return new.group is None or other.group != new.group

    def would_drop(self, cmd: CommandInfo, drop: bool | str | None) -> list[CommandInfo]:
        if not drop or cmd.id in self.cmds:
            return []
        return [o for o in self.pending(cmd.agent_id)
                if o.status == "PENDING" and self.drops(drop, cmd, o)]

    def _addressed(self, cmd_id: str, agent_id: str | None) -> CommandInfo:
        cmd = self.cmds.get(cmd_id)
        if cmd is None:
            raise UnknownCommand(f"no command {cmd_id!r}")
        if agent_id is not None and cmd.agent_id != agent_id:
            raise UnknownCommand(f"{cmd_id!r} is not addressed to {agent_id!r}")
        if cmd.status == "COMPLETE":
            raise UnknownCommand(f"{cmd_id!r} is already COMPLETE")
        return cmd

    def mark_active(self, cmd_id: str, agent_id: str, now: int) -> None:
        cmd = self._addressed(cmd_id, agent_id)
        cmd.status, cmd.updated = "ACTIVE", now

    def complete(self, cmd_id: str, outcome: str, *, now: int, result: Any = None,
                 error: dict[str, Any] | None = None, agent_id: str | None = None
                 ) -> Completed:
        cmd = self._addressed(cmd_id, agent_id)
        answer = outcome in ("ok", "error")
        if answer and self.past_deadline(cmd, now):
            raise UnknownCommand(f"{cmd_id!r} is past its deadline")
        self._finish(cmd, outcome, now, result, error)
        group: list[CommandInfo] = []
        if answer and cmd.group is not None:
            for other in self.pending(cmd.agent_id):
                if other.group == cmd.group and other.status == "PENDING" \
                        and not self.past_deadline(other, now):
                    self._finish(other, outcome, now, result, error)
                    group.append(other.copy())
        return Completed(cmd.copy(), group)

    def _finish(self, cmd: CommandInfo, outcome: str, now: int, result: Any,
                error: dict[str, Any] | None) -> None:
        assert cmd.status != "COMPLETE"
        cmd.status = "COMPLETE"
        cmd.outcome = outcome  # type: ignore[assignment]
        cmd.updated = now
        cmd.result = result
        cmd.error = error
