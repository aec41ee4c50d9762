"""The frame router: applies each frame an agent sends, whichever way it arrived.

The transport hands over every decoded frame of an attached agent here (and
``result`` frames' fields on its fast path); answers go to the command path,
events, subscriptions and calls to theirs. :meth:`FrameRouter.frame_failed` is
the one place where a frame's failure becomes the ``error`` frame docs/protocol.md
names: a bad frame costs that error frame, never the connection or the hub.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine
from typing import Any

import structlog

from agent_client import protocol as P

from .calls import Calls
from .commands import Commands
from .connections import Session
from .errors import StoreUnavailable, UnknownCommand
from .events import Events
from .tasks import TaskOwner

__all__ = ["FrameRouter"]

log = structlog.get_logger(__name__)


class FrameRouter:
    """Agent frames into the hub's parts; answers bad ones with an ``error`` frame."""

    __slots__ = ("calls", "commands", "events", "tasks")

    def __init__(self, *, commands: Commands, events: Events, calls: Calls,
                 tasks: TaskOwner) -> None:
        self.commands = commands
        self.events = events
        self.calls = calls
        self.tasks = tasks

    def apply(self, session: Session, frame: P.Frame) -> asyncio.Future[Any] | None:
        """Apply one frame from ``session``'s agent. Never raises. Returns the future
        of work still under way (the transport bounds how many it lets pile up),
        or None when the frame was applied at once."""
        try:
            if isinstance(frame, P.ResultFrame):
                return self.apply_result(session, frame.id, frame.data)
            if isinstance(frame, P.AckFrame):
                return self._watch(session, frame.id, frame.TYPE,
                                   self.commands.ack(session.agent_id, frame.id))
            if isinstance(frame, P.FailFrame):
                return self._watch(session, frame.id, frame.TYPE, self.commands.complete(
                    frame.id, "error", error=frame.error, agent_id=session.agent_id))
            if isinstance(frame, P.ProgressFrame):
                # Through the store like the answers, so progress cannot overtake
                # the result that follows it (store calls keep their order).
                fut = self.commands.progress(frame.id, frame.data, session.agent_id)
                return None if fut is None else self._watch(session, frame.id, frame.TYPE, fut)
            if isinstance(frame, P.ReceivedFrame):
                self.events.on_received(session, frame.id)
            elif isinstance(frame, P.SubFrame):
                self.events.subscribe(session.agent_id, frame.keys)
            elif isinstance(frame, P.UnsubFrame):
                self.events.unsubscribe(session.agent_id, frame.keys)
            elif isinstance(frame, P.EmitFrame):
                return self._run(session, frame, self.events.on_emit(session, frame))
            elif isinstance(frame, P.CallFrame):
                return self._run(session, frame, self.calls.on_call(session, frame))
            else:
                _refuse(frame)
        except Exception as exc:
            self.frame_failed(session, exc, getattr(frame, "id", None), frame.TYPE)
        return None

    def apply_result(self, session: Session, cmd_id: str,
                     data: Any) -> asyncio.Future[Any] | None:
        """A ``result`` frame's fields (the transport's fast path reads them without
        building a frame object; ``P.result_fields`` checked them)."""
        return self._watch(session, cmd_id, "result",
                           self.commands.complete(cmd_id, "ok", result=data,
                                                  agent_id=session.agent_id))

    def _watch(self, session: Session, ref: Any, frame_type: str,
               fut: asyncio.Future[Any]) -> asyncio.Future[Any] | None:
        if fut.done():  # _check, inlined: the in-memory engine's answers (hot)
            try:
                fut.result()
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # the frame's failure: its error frame
                self.frame_failed(session, exc, ref, frame_type)
            return None
        fut.add_done_callback(functools.partial(self._check, session, ref, frame_type))
        return fut

    def _check(self, session: Session, ref: Any, frame_type: str,
               fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and (exc := fut.exception()) is not None:
            self.frame_failed(session, exc, ref, frame_type)

    def _run(self, session: Session, frame: P.Frame,
             coro: Coroutine[Any, Any, None]) -> asyncio.Future[Any]:
        return self.tasks.spawn(self._guarded(session, frame, coro), name=f"frame:{frame.TYPE}")

    async def _guarded(self, session: Session, frame: P.Frame,
                       coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except Exception as exc:
            self.frame_failed(session, exc, getattr(frame, "id", None), frame.TYPE)

    def frame_failed(self, session: Session, exc: BaseException, ref: Any,
                     frame_type: str) -> None:
        """The one place a frame's failure becomes the error frame docs/protocol.md names."""
        if isinstance(exc, UnknownCommand):
            error = P.ErrorFrame(P.ErrorCode.UNKNOWN_COMMAND, str(exc), ref)
        elif isinstance(exc, P.ProtocolError):
            error = exc.to_frame()
        elif isinstance(exc, StoreUnavailable):
            log.debug("store_call_failed", agent_id=session.agent_id, type=frame_type,
                      error=str(exc))
            error = P.ErrorFrame(P.ErrorCode.INTERNAL,
                                 "the hub's store is unavailable; send it again later", ref)
        else:  # a bug
            log.error("frame_failed", agent_id=session.agent_id, type=frame_type, ref=ref,
                      exc_info=exc)
            error = P.ErrorFrame(P.ErrorCode.INTERNAL, "internal error", ref)
        session.refused()
        session.send(P.encode(error))


def _refuse(frame: P.Frame) -> None:
    if isinstance(frame, P.HelloFrame):
        raise P.ProtocolError(P.ErrorCode.BAD_FRAME, "'hello' is only valid as the first frame")
    if isinstance(frame, P.WelcomeFrame | P.CmdFrame | P.CancelFrame | P.EventFrame
                  | P.ReplyFrame | P.ErrorFrame):
        raise P.ProtocolError(
            P.ErrorCode.BAD_FRAME, f"{frame.TYPE!r} frames are sent by the hub, not by agents",
            getattr(frame, "id", None),
        )
    raise P.ProtocolError(P.ErrorCode.UNKNOWN_TYPE, f"unexpected {frame.TYPE!r} frame")
