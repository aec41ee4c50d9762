"""The command lifecycle as a transition table (PENDING → ACTIVE → COMPLETE).

Like h11's connection states: every allowed move is a row; anything else is a
typed error, never a silent change. The store engines consult this table so the
in-memory and the Redis engine agree on what is legal.
"""

from __future__ import annotations

from typing import Final, Literal

from .errors import InvalidTransition
from .models import CommandInfo, Status

__all__ = ["Event", "TRANSITIONS", "next_status", "redeliverable"]

Event = Literal["ack", "complete"]

# (status, event) -> new status. ``ack`` on ACTIVE is allowed: after a
# redelivery an agent that is still running a command acks it again
# (docs/protocol.md, Commands and redelivery).
TRANSITIONS: Final[dict[tuple[Status, Event], Status]] = {
    ("PENDING", "ack"): "ACTIVE",
    ("ACTIVE", "ack"): "ACTIVE",
    ("PENDING", "complete"): "COMPLETE",
    ("ACTIVE", "complete"): "COMPLETE",
}


def next_status(status: Status, event: Event) -> Status:
    try:
        return TRANSITIONS[(status, event)]
    except KeyError:
        raise InvalidTransition(f"{event!r} is not allowed on a {status} command") from None


def redeliverable(pending: list[CommandInfo], now: int) -> list[CommandInfo]:
    """Of an agent's commands not COMPLETE (oldest first), those sent to it again after
    a (re)connection (docs/protocol.md, Commands and redelivery): all, but one per group, whose
    answer completes the rest, and none whose deadline passed (unix ms ``now``):
    a command past its deadline is never delivered; a sweeper times it out."""
    out: list[CommandInfo] = []
    leaders: set[str] = set()
    for cmd in pending:
        if cmd.group is not None:
            if cmd.group in leaders:
                continue
            leaders.add(cmd.group)
        if cmd.deadline is None or cmd.deadline > now:
            out.append(cmd)
    return out
