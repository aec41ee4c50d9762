"""The hub's one-timer deadline queue (``dispatcher.deadlines``), on a real event loop.

End-to-end timeouts are in test_commands.py; this checks the queue's own
promises: each live deadline fires once, in order, forgotten ones never fire,
shorter deadlines behind longer ones are not delayed, and the queue stays
proportional to the commands still waiting however many have completed.
"""

from __future__ import annotations

import asyncio

from dispatcher.deadlines import MIN_COMPACT, Deadlines

WAIT = 5.0


class Timed:
    def __init__(self) -> None:
        self._deadline: float | None = None


class Fired:
    def __init__(self, handles: dict[str, Timed]) -> None:
        self.ids: list[str] = []
        self.handles = handles
        self.changed = asyncio.Event()

    def __call__(self, cmd_id: str) -> None:
        self.ids.append(cmd_id)
        self.handles.pop(cmd_id, None)  # as the hub does once a command times out
        self.changed.set()

    async def until(self, n: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.ids) < n:
                self.changed.clear()
                await self.changed.wait()


async def test_live_deadlines_fire_once_in_order_and_forgotten_ones_never() -> None:
    handles: dict[str, Timed] = {}
    fired = Fired(handles)
    deadlines = Deadlines(handles, fired)
    for name, delay in (("late", 0.12), ("forgotten", 0.02), ("early", 0.03)):
        handles[name] = Timed()
        deadlines.add(name, handles[name], delay)
    handles["forgotten"]._deadline = None  # completed: the handle forgets it
    # A shorter deadline behind a longer one (the heap) is not held up by it.
    await fired.until(1)
    assert fired.ids == ["early"]
    await fired.until(2)
    assert fired.ids == ["early", "late"]
    assert len(deadlines) == 0
    deadlines.close()


async def test_a_rearmed_deadline_replaces_the_old_one() -> None:
    handles: dict[str, Timed] = {"cmd": Timed()}
    fired = Fired(handles)
    deadlines = Deadlines(handles, fired)
    deadlines.add("cmd", handles["cmd"], 0.01)
    deadlines.add("cmd", handles["cmd"], 0.08)  # e.g. an idempotent resubmit
    handles["other"] = Timed()
    deadlines.add("other", handles["other"], 0.04)
    await fired.until(2)
    assert fired.ids == ["other", "cmd"]  # once each, the first deadline was dropped
    deadlines.close()


async def test_completed_commands_do_not_accumulate() -> None:
    handles: dict[str, Timed] = {}
    fired = Fired(handles)
    deadlines = Deadlines(handles, fired)
    waiting = Timed()
    handles["waiting"] = waiting
    deadlines.add("waiting", waiting, 60.0)
    for i in range(20 * MIN_COMPACT):
        handle = handles[f"c{i}"] = Timed()
        deadlines.add(f"c{i}", handle, 60.0)
        del handles[f"c{i}"]  # completed at once
        handle._deadline = None
    assert len(deadlines) <= 2 * MIN_COMPACT + 1
    deadlines.close()
    assert fired.ids == []


async def test_close_stops_everything() -> None:
    handles: dict[str, Timed] = {"cmd": Timed(), "probe": Timed()}
    fired = Fired(handles)
    deadlines = Deadlines(handles, fired)
    deadlines.add("cmd", handles["cmd"], 0.01)
    deadlines.close()
    # A second queue on the same loop shows time passed beyond the first deadline.
    probe = Deadlines(handles, fired)
    probe.add("probe", handles["probe"], 0.05)
    await fired.until(1)
    assert fired.ids == ["probe"]
    probe.close()
