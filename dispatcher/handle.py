"""``CommandHandle``: what ``execute_on_agent`` returns at once; awaiting it gives the result."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from types import TracebackType
from typing import Any

from .errors import CommandCancelled, CommandFailed, CommandTimeout, DispatcherError
from .models import CommandInfo

__all__ = ["CommandHandle", "outcome_exception"]

# Progress updates kept per handle for late or slow iterators; older ones are
# dropped (an iterator that falls behind skips ahead, it never blocks the hub).
MAX_PROGRESS_BACKLOG = 256


def outcome_exception(info: CommandInfo) -> DispatcherError | None:
    """The exception a COMPLETE command raises to its caller, or None for a value."""
    if info.outcome in ("ok", "dropped"):
        return None
    err = info.error or {}
    if info.outcome == "timeout":
        return CommandTimeout(err.get("message") or f"command {info.id} timed out")
    if info.outcome == "cancelled":
        return CommandCancelled(err.get("message") or f"command {info.id} was cancelled")
    return CommandFailed(
        str(err.get("code", "error")), str(err.get("message", "")), err.get("data")
    )


def _consume(fut: asyncio.Future[Any]) -> None:
    # Nobody has to await a handle (fire-and-forget is legitimate), so its
    # exception is marked retrieved instead of being logged at garbage collection.
    if not fut.cancelled():
        fut.exception()


class CommandHandle:
    """A command in flight. ``await handle`` gives the agent's result or raises.

    ``id`` is known at once; ``await handle.submitted()`` resolves once the
    command is stored; ``async for update in handle.progress()`` follows the
    agent's progress frames; ``await handle.cancel()`` cancels it.

    The outcome is kept in the handle itself; an :class:`asyncio.Future` holding
    it is made only for the callers that ask for one (``add_done_callback``,
    ``result``, ``progress``): a future less per command on the hot path
    (benchmark rows "roundtrip" of the in-memory engine).
    """

    __slots__ = (
        "_canceller", "_deadline", "_future", "_loop", "_progress", "_progress_seq",
        "_progress_waiter", "_state", "_submit_state", "_submitted", "_tb", "_value",
        "_waiters", "agent_id", "id", "info", "key",
    )

    def __init__(
        self,
        cmd_id: str,
        agent_id: str,
        key: str,
        loop: asyncio.AbstractEventLoop,
        canceller: Callable[[str], Awaitable[bool]],
    ) -> None:
        self.id = cmd_id
        self.agent_id = agent_id
        self.key = key
        self._loop = loop
        # _WAITING, _VALUE (_value is the result) or _RAISED (_value is the exception)
        self._state = _WAITING
        self._value: Any = None
        self._tb: TracebackType | None = None
        self._future: asyncio.Future[Any] | None = None  # see _as_future
        self._waiters: list[asyncio.Future[None]] | None = None  # see __await__
        # Created only if someone asks (most callers never do): a future less
        # per command on the hot path. True/exception once known.
        self._submitted: asyncio.Future[None] | None = None
        self._submit_state: bool | BaseException = False
        self._canceller = canceller
        self._progress: deque[Any] | None = None
        self._progress_seq = 0
        self._progress_waiter: asyncio.Future[None] | None = None
        # When (loop time) the hub times it out locally, if it is waiting for
        # that: an entry in the hub's Deadlines, forgotten by setting None.
        self._deadline: float | None = None
        # The COMPLETE record, once the command completed (None if it failed
        # otherwise: not stored, the hub closed).
        self.info: CommandInfo | None = None

    def __repr__(self) -> str:
        state = "done" if self._state else "waiting"
        return f"<CommandHandle {self.id} {self.key!r} on {self.agent_id} {state}>"

    def __await__(self) -> Generator[Any, None, Any]:
        # Shielded: a caller's timeout (asyncio.wait_for) or cancellation ends
        # its wait, never the command's outcome. Done by hand rather than with
        # asyncio.shield (hot path): the caller waits on a future of its own,
        # which is what a cancellation cancels, and the hub wakes it directly
        # when the command completes (a done-callback relay would cost one
        # more event-loop turn per command).
        if not self._state:
            outer: asyncio.Future[None] = self._loop.create_future()
            waiters = self._waiters
            if waiters is None:
                waiters = self._waiters = []
            waiters.append(outer)
            try:
                yield from outer.__await__()
            except BaseException:
                with contextlib.suppress(ValueError):  # already woken
                    waiters.remove(outer)
                raise
        if self._state == _RAISED:
            # As asyncio.Future does: each await raises with the traceback the
            # exception had when set, not one that grows with every await.
            raise self._value.with_traceback(self._tb)
        return self._value

    def _wake(self) -> None:
        """The outcome is set: wake every ``await handle``."""
        waiters = self._waiters
        if waiters:
            self._waiters = None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _as_future(self) -> asyncio.Future[Any]:
        """A future that holds (or will hold) the outcome."""
        fut = self._future
        if fut is None:
            fut = self._future = self._loop.create_future()
            _settle(fut, self._state, self._value)
        return fut

    def done(self) -> bool:
        return self._state != _WAITING

    def add_done_callback(self, fn: Callable[[asyncio.Future[Any]], None]) -> None:
        """Call ``fn(future)`` once the command completes (the future holds the outcome)."""
        self._as_future().add_done_callback(fn)

    async def result(self, timeout: float | None = None) -> Any:
        """The result, waiting at most ``timeout`` seconds (the command keeps running)."""
        return await asyncio.wait_for(asyncio.shield(self._as_future()), timeout)

    async def submitted(self) -> None:
        """Resolve once the command is stored (raises ``StoreUnavailable`` if it was not)."""
        state = self._submit_state
        if state is True:
            return
        if isinstance(state, BaseException):
            raise state
        if self._submitted is None:
            self._submitted = self._loop.create_future()
            self._submitted.add_done_callback(_consume)
        await asyncio.shield(self._submitted)

    def is_submitted(self) -> bool:
        """True once the store has it (or the submit failed)."""
        return self._submit_state is not False

    async def cancel(self) -> bool:
        """Cancel the command: completes it as ``cancelled`` and tells the agent.

        Returns False when it had already completed.
        """
        if self._state:
            return False
        await self.submitted()
        return await self._canceller(self.id)

    async def progress(self) -> AsyncIterator[Any]:
        """Progress updates in order, ending when the command completes."""
        if self._progress is None:
            self._progress = deque(maxlen=MAX_PROGRESS_BACKLOG)
        seq = self._progress_seq - len(self._progress)
        while True:
            oldest = self._progress_seq - len(self._progress)
            seq = max(seq, oldest)
            while seq < self._progress_seq:
                yield self._progress[seq - oldest]
                seq += 1
                oldest = self._progress_seq - len(self._progress)
                seq = max(seq, oldest)
            if self._state:
                return
            if self._progress_waiter is None or self._progress_waiter.done():
                self._progress_waiter = self._loop.create_future()
            waiter = self._progress_waiter
            await asyncio.wait([waiter, self._as_future()], return_when=asyncio.FIRST_COMPLETED)

    # -- called by the hub core --------------------------------------------
    def _set_submitted(self) -> None:
        if self._submit_state is False:
            self._submit_state = True
            if self._submitted is not None and not self._submitted.done():
                self._submitted.set_result(None)

    def _push_progress(self, data: Any) -> None:
        if self._progress is None:
            self._progress = deque(maxlen=MAX_PROGRESS_BACKLOG)
        self._progress.append(data)
        self._progress_seq += 1
        waiter = self._progress_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _resolve(self, info: CommandInfo) -> None:
        if self._submit_state is False:
            self._set_submitted()
        self._deadline = None  # _forget_deadline, inlined (hot path)
        if self._state:
            return
        self.info = info
        exc = None if info.outcome == "ok" else outcome_exception(info)
        if exc is None:
            self._state = _VALUE
            self._value = info.result
            if self._future is not None:
                self._future.set_result(info.result)
            if self._waiters:
                self._wake()
        else:
            self._set_exception(exc)

    def _set_exception(self, exc: BaseException) -> None:
        self._state = _RAISED
        self._value = exc
        self._tb = exc.__traceback__
        if self._future is not None:
            _settle(self._future, _RAISED, exc)
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        self._forget_deadline()
        if self._submit_state is False:
            self._submit_state = exc
            if self._submitted is not None and not self._submitted.done():
                self._submitted.set_exception(exc)
        if not self._state:
            self._set_exception(exc)

    def _forget_deadline(self) -> None:
        self._deadline = None


_WAITING, _VALUE, _RAISED = 0, 1, 2


def _settle(fut: asyncio.Future[Any], state: int, value: Any) -> None:
    """Give ``fut`` the handle's outcome, if it has one."""
    if state == _VALUE:
        fut.set_result(value)
    elif state == _RAISED:
        # Nobody has to await a handle (fire-and-forget is legitimate): the
        # exception is marked retrieved so it is not logged at garbage collection.
        fut.set_exception(value)
        fut.exception()
