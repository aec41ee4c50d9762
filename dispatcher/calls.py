"""Routed calls: an agent's ``call`` runs as a real command on the target agent.

docs/protocol.md, Routed calls. The command has the full lifecycle, store and
guarantees of any other (it shows in ``list_pending_commands``); its outcome
goes back to the caller as a ``reply`` frame, queued like an event if the
caller is away at that moment.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import structlog

from agent_client import protocol as P
from agent_client.errors import (
    AgentOffline,
    CommandCancelled,
    CommandFailed,
    CommandTimeout,
)

from .commands import Commands
from .connections import Connections, Session
from .errors import HubClosed
from .events import Events
from .handle import outcome_exception
from .models import CommandInfo
from .tasks import TaskOwner

__all__ = ["MAX_CALLS_IN_FLIGHT", "Calls", "reply_error"]

log = structlog.get_logger(__name__)

# Calls one agent may have waiting at once; more are refused with rate_limited.
MAX_CALLS_IN_FLIGHT = 1000


def call_command_id(caller: str, call_id: str) -> str:
    """The command id of a routed call: stable across resends, at most 128 characters."""
    raw = f"call:{caller}:{call_id}"
    if len(raw) <= P.MAX_ID_LENGTH:
        return raw
    return "call:" + hashlib.sha256(raw.encode()).hexdigest()


def _reply_bytes(call_id: str, info: CommandInfo) -> bytes:
    exc = outcome_exception(info)
    if exc is None:
        return P.encode(P.ReplyFrame(call_id, ok=True, data=info.result))
    return P.encode(P.ReplyFrame(call_id, ok=False, error=reply_error(exc)))


def reply_error(exc: BaseException) -> dict[str, Any]:
    """The ``error`` map of a failed call's ``reply`` (codes of docs/protocol.md)."""
    if isinstance(exc, CommandFailed):
        return P.error_info(exc.code, exc.message, exc.data)
    if isinstance(exc, CommandTimeout):
        return P.error_info(P.ErrorCode.TIMEOUT, str(exc) or "the call timed out")
    if isinstance(exc, AgentOffline):
        return P.error_info(P.ErrorCode.AGENT_OFFLINE, str(exc))
    if isinstance(exc, CommandCancelled):
        return P.error_info(P.ErrorCode.CANCELLED, str(exc) or "the call was cancelled")
    return P.error_info(P.ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")


class Calls:
    """Runs agents' calls as commands and answers them."""

    def __init__(self, *, commands: Commands, connections: Connections, events: Events,
                 tasks: TaskOwner) -> None:
        self.commands = commands
        self.connections = connections
        self.events = events
        self.tasks = tasks
        self._in_flight: dict[str, int] = {}

    @property
    def in_flight(self) -> int:
        """Calls waiting for their target, from every agent of this hub."""
        return sum(self._in_flight.values())

    async def on_call(self, session: Session, frame: P.CallFrame) -> None:
        caller = session.agent_id
        if frame.agent == caller:
            self._reply_now(session, frame.id, P.error_info(
                P.ErrorCode.BAD_REQUEST, "an agent cannot call itself"))
            return
        if self._in_flight.get(caller, 0) >= MAX_CALLS_IN_FLIGHT:
            self._reply_now(session, frame.id, P.error_info(
                P.ErrorCode.RATE_LIMITED, f"at most {MAX_CALLS_IN_FLIGHT} calls in flight"))
            return
        # The command's id derives from the caller and its call id, so a call the
        # agent sends again after a reconnect (its reply may have been lost with
        # the old connection) finds the same command instead of running twice.
        command_id = call_command_id(caller, frame.id)
        existing = await self.commands.store.get_command(command_id)
        if existing is not None and existing.status == "COMPLETE":
            session.send(_reply_bytes(frame.id, existing))
            return
        try:
            handle = self.commands.submit(
                frame.agent, frame.key, frame.payload, timeout=frame.timeout,
                command_id=command_id, require_online=existing is None)
        except (ValueError, TypeError) as exc:
            self._reply_now(session, frame.id, P.error_info(P.ErrorCode.BAD_REQUEST, str(exc)))
            return
        self._in_flight[caller] = self._in_flight.get(caller, 0) + 1
        handle.add_done_callback(lambda fut: self._done(caller, frame.id, fut))

    def _reply_now(self, session: Session, call_id: str, error: dict[str, Any]) -> None:
        session.send(P.encode(P.ReplyFrame(call_id, ok=False, error=error)))

    def _done(self, caller: str, call_id: str, fut: asyncio.Future[Any]) -> None:
        left = self._in_flight.get(caller, 1) - 1
        if left:
            self._in_flight[caller] = left
        else:
            self._in_flight.pop(caller, None)
        if fut.cancelled():
            return
        exc = fut.exception()
        if isinstance(exc, HubClosed):
            return  # the command stays stored; this hub just stopped waiting
        if exc is None:
            reply = P.ReplyFrame(call_id, ok=True, data=fut.result())
        else:
            reply = P.ReplyFrame(call_id, ok=False, error=reply_error(exc))
        data = P.encode(reply)
        if not self.connections.send(caller, data):
            # The caller moved to another hub or is away: route or queue it like an event.
            self.tasks.spawn(self._route_reply(caller, data), name=f"reply:{call_id}")

    async def _route_reply(self, caller: str, data: bytes) -> None:
        if not await self.events.deliver(caller, data):
            log.warning("reply_dropped_queue_full", agent_id=caller)
