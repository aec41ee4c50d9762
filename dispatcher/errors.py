"""Exceptions the hub raises to the programs that embed it.

Every one is a :class:`DispatcherError`; where Python has a matching built-in
kind, it is that too, so ``except TimeoutError`` or ``except ConnectionError``
in a caller's code does what it says::

    Exception
    └── DispatcherError
        ├── CommandFailed           the agent answered ``fail`` (.code, .message, .data)
        ├── CommandTimeout          + TimeoutError: the deadline passed
        ├── CommandCancelled        cancelled by its caller, an operator, or a drop
        ├── AgentOffline            require_online, or a routed call's target is away
        ├── DeliveryTimeout         + TimeoutError: emit_to got no receipt (.pending)
        ├── StoreUnavailable        + ConnectionError: the store cannot be reached
        ├── UnknownCommand          + LookupError: no such command, COMPLETE, or not
        │                             addressed to the agent that answered
        ├── NoAgentsMatched         + LookupError: a job's target matched no agent
        ├── JobPartRefused          a job's part was not started: the agent's part was
        │                             started or skipped already, or the job moved on
        ├── TooManyCommands         the agent has max_inflight_per_agent not COMPLETE
        ├── HubClosed               the hub closed while the caller waited
        └── InvalidTransition       a lifecycle move the state table forbids (a bug)

The first four are shared with the agent library (``agent_client.errors``):
``agent.call()`` raises exactly what awaiting a hub's command handle raises.
"""

from __future__ import annotations

from agent_client.errors import (
    AgentOffline,
    CommandCancelled,
    CommandFailed,
    CommandTimeout,
    DispatcherError,
)

__all__ = [
    "AgentOffline",
    "CommandCancelled",
    "CommandFailed",
    "CommandTimeout",
    "DeliveryTimeout",
    "DispatcherError",
    "HubClosed",
    "InvalidTransition",
    "JobPartRefused",
    "NoAgentsMatched",
    "StoreUnavailable",
    "TooManyCommands",
    "UnknownCommand",
]


class StoreUnavailable(DispatcherError, ConnectionError):
    """The store (Redis) cannot be reached; nothing was changed."""


class UnknownCommand(DispatcherError, LookupError):
    """No such command, already COMPLETE, or not addressed to the agent that answered."""


class NoAgentsMatched(DispatcherError, LookupError):
    """The target of ``execute_on_agents`` matched no agent (HTTP 404, CLI exit 3)."""


class JobPartRefused(DispatcherError):
    """The store refused to start an agent's part of a job: it was started (``.command_id``)
    or skipped already, the job was cancelled or completed, or another hub runs it now."""

    def __init__(self, reason: str, command_id: str | None = None) -> None:
        super().__init__(f"job part refused: {reason}")
        self.reason = reason
        self.command_id = command_id


class TooManyCommands(DispatcherError):
    """The agent already has ``max_inflight_per_agent`` commands that are not COMPLETE."""


class HubClosed(DispatcherError):
    """The hub closed while the caller was waiting; the stored command lives on."""


class InvalidTransition(DispatcherError):
    """A command lifecycle event that the state table does not allow."""


class DeliveryTimeout(DispatcherError, TimeoutError):
    """``emit_to`` timed out; ``pending`` lists the agents that did not answer ``received``."""

    def __init__(self, pending: list[str]) -> None:
        super().__init__(f"no receipt from {len(pending)} agent(s): {', '.join(pending[:10])}")
        self.pending = pending
