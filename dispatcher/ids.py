"""Identifiers: unique across hubs and restarts, cheap to make on the hot path."""

from __future__ import annotations

import itertools
import os
import secrets

__all__ = ["IdFactory", "new_hub_id", "new_session_id"]


class IdFactory:
    """``<random 64-bit prefix>-<counter>``: unique without a uuid4 per command.

    The prefix is drawn anew in every process, so ids never repeat after a
    restart even when ``hub_id`` is fixed by configuration.
    """

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        # Fixed width, so ids sort in creation order (ties in the pending index).
        return f"{self._prefix}-{next(self._counter):010x}"


def new_hub_id() -> str:
    return "hub-" + secrets.token_hex(4)


def new_session_id() -> str:
    return secrets.token_hex(12)
