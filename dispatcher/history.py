"""Command history: ``list_commands`` (filters, limits, cursors) and the trim of its indexes.

The store keeps the indexes (by agent, key, job and outcome, docs/redis.md)
and walks them (``Store.list_commands``); this module checks what a caller
asks for, turns the store's position into an opaque cursor and back, and owns
the periodic trim that removes the index entries of expired commands.

A cursor names the last entry a page looked at (its ``ts`` and id): the next
page starts strictly after it, newest first, so commands created meanwhile
(newer) never shift the pages that follow.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

import structlog

from agent_client.protocol import pack, unpack

from .clock import now_ms
from .errors import DispatcherError
from .models import STATUSES, TERMINAL_OUTCOMES, CommandPage
from .store.base import HistoryFilter, Store
from .tasks import TaskOwner

__all__ = ["MAX_LIMIT", "History", "decode_cursor", "encode_cursor"]

log = structlog.get_logger(__name__)

MAX_LIMIT = 1000
# The trim: how often, and how many index entries one store call removes at most
# (a call is one short script; passes follow each other until a backlog is gone).
TRIM_INTERVAL = 10.0
TRIM_BATCH = 1000


def encode_cursor(after: tuple[int, str]) -> str:
    return base64.urlsafe_b64encode(pack([after[0], after[1]])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """The position a cursor names; ``ValueError`` for anything this hub did not make."""
    bad = ValueError(f"malformed cursor {cursor[:40]!r}: pass the 'next' value of a "
                     "previous page unchanged")
    if not isinstance(cursor, str) or not 0 < len(cursor) <= 1024:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = unpack(raw)
    except (binascii.Error, ValueError, TypeError):
        raise bad from None
    except Exception:  # msgpack's own errors for truncated or odd data
        raise bad from None
    if not (isinstance(value, list) and len(value) == 2 and type(value[0]) is int
            and isinstance(value[1], str)):
        raise bad
    return value[0], value[1]


def _filter_value(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


class History:
    """``list_commands`` for the hub, and the trim task of the history indexes."""

    def __init__(self, *, store: Store, tasks: TaskOwner) -> None:
        self.store = store
        self.tasks = tasks

    async def list(self, *, agent_id: str | None = None, key: str | None = None,
                   status: str | None = None, outcome: str | None = None,
                   job: str | None = None, limit: int = 100,
                   cursor: str | None = None) -> CommandPage:
        """docs/guide.md, History. ``ValueError`` names a bad filter, limit or cursor."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r} (one of "
                             f"{', '.join(sorted(STATUSES))})")
        if outcome is not None and outcome not in TERMINAL_OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r} (one of "
                             f"{', '.join(sorted(TERMINAL_OUTCOMES))})")
        if type(limit) is not int or not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be an integer from 1 to {MAX_LIMIT}")
        where = HistoryFilter(agent_id=_filter_value("agent_id", agent_id),
                              key=_filter_value("key", key), status=status, outcome=outcome,
                              job=_filter_value("job", job))
        before = None if cursor is None else decode_cursor(cursor)
        found = await self.store.list_commands(where, limit=limit, before=before,
                                               now=now_ms())
        return CommandPage(found.commands,
                           None if found.after is None else encode_cursor(found.after))

    def start(self) -> None:
        self.tasks.spawn(self._trim_forever(), name="history-trim")

    async def trim_once(self) -> int:
        """Remove the index entries of expired commands; returns how many."""
        removed = 0
        while True:
            n = await self.store.trim_history(now_ms(), TRIM_BATCH)
            removed += n
            if n < TRIM_BATCH:
                return removed
            await asyncio.sleep(0)  # other work between two store calls

    async def _trim_forever(self) -> None:
        while True:
            await asyncio.sleep(TRIM_INTERVAL)
            try:
                removed = await self.trim_once()
            except DispatcherError:
                continue  # the store's health listener reports outages
            if removed:
                log.debug("history_trimmed", removed=removed)
