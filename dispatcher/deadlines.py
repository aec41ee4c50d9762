"""Local command timeouts: one event-loop timer for the whole hub, not one per command.

A timer per command costs a ``call_later`` and a ``cancel`` (measured on uvloop:
~2 µs together, a tenth of a command's whole cost on the hub) for a deadline
that almost never fires. Here a deadline is a tuple appended to a queue; a
command that completes just forgets its deadline (``CommandHandle._deadline``
goes back to None) and its entry is skipped later. The queue is compacted
once stale entries reach three times the live ones, so it stays proportional
to the commands in flight.

Commands submitted with the hub's default timeout arrive with non-decreasing
deadlines: they go to a FIFO (O(1)). A deadline earlier than the FIFO's last
one (a shorter explicit timeout) goes to a heap.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import deque
from collections.abc import Callable, Mapping
from typing import Protocol

__all__ = ["Deadlines"]

# Deadlines this close together (seconds) expire in one timer callback.
SLACK = 0.001
# Compaction threshold floor: below this many entries, stale ones are left be.
MIN_COMPACT = 1024


class _Timed(Protocol):
    _deadline: float | None


Entry = tuple[float, str]


class Deadlines:
    """Fires ``expire(cmd_id)`` once per handle whose deadline (loop time) passed."""

    __slots__ = ("_armed", "_armed_at", "_expire", "_fifo", "_handles", "_heap", "_limit",
                 "_loop")

    def __init__(self, handles: Mapping[str, _Timed], expire: Callable[[str], None]) -> None:
        self._handles = handles  # command id -> handle waiting on this hub
        self._expire = expire
        self._fifo: deque[Entry] = deque()
        self._heap: list[Entry] = []
        self._armed: asyncio.TimerHandle | None = None
        self._armed_at = float("inf")
        self._limit = MIN_COMPACT
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._fifo) + len(self._heap)

    def add(self, cmd_id: str, handle: _Timed, delay: float) -> None:
        """Expire ``cmd_id`` in ``delay`` seconds unless its handle forgets the deadline."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        when = loop.time() + delay
        handle._deadline = when
        fifo = self._fifo
        if not fifo or fifo[-1][0] <= when:
            fifo.append((when, cmd_id))
        else:
            heapq.heappush(self._heap, (when, cmd_id))
        if when < self._armed_at:
            self._arm(loop, when)
        if len(fifo) + len(self._heap) > self._limit:
            self._compact()

    def close(self) -> None:
        if self._armed is not None:
            self._armed.cancel()
            self._armed = None
        self._armed_at = float("inf")
        self._fifo.clear()
        self._heap.clear()

    # -- internals -------------------------------------------------------------
    def _live(self, entry: Entry) -> bool:
        handle = self._handles.get(entry[1])
        return handle is not None and handle._deadline == entry[0]

    def _compact(self) -> None:
        live = self._live
        self._fifo = deque([e for e in self._fifo if live(e)])
        self._heap = [e for e in self._heap if live(e)]
        heapq.heapify(self._heap)
        # Stale entries may reach 3 times the live ones: compaction then costs
        # about one check per added deadline.
        self._limit = max(MIN_COMPACT, 4 * (len(self._fifo) + len(self._heap)))

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._armed is not None:
            self._armed.cancel()
        self._armed_at = when
        self._armed = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._armed = None
        self._armed_at = float("inf")
        loop = self._loop
        assert loop is not None
        horizon = loop.time() + SLACK
        due: list[str] = []
        live = self._live
        fifo, heap = self._fifo, self._heap
        while fifo and fifo[0][0] <= horizon:
            entry = fifo.popleft()
            if live(entry):
                due.append(entry[1])
        while heap and heap[0][0] <= horizon:
            entry = heapq.heappop(heap)
            if live(entry):
                due.append(entry[1])
        # Arm for the next live deadline only: entries of completed commands
        # at the front would wake the loop for nothing.
        while fifo and not live(fifo[0]):
            fifo.popleft()
        while heap and not live(heap[0]):
            heapq.heappop(heap)
        nxt = min(fifo[0][0] if fifo else float("inf"), heap[0][0] if heap else float("inf"))
        if nxt != float("inf"):
            self._arm(loop, nxt)
        for cmd_id in due:
            handle = self._handles.get(cmd_id)
            if handle is not None:
                handle._deadline = None
            self._expire(cmd_id)
