"""Exceptions the hub raises to the programs that embed it."""

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
    "StoreUnavailable",
    "TooManyCommands",
    "UnknownCommand",
]


class StoreUnavailable(DispatcherError):
    """The store (Redis) cannot be reached; nothing was changed."""


class UnknownCommand(DispatcherError):
    """No such command, already COMPLETE, or not addressed to the agent that answered."""


class TooManyCommands(DispatcherError):
    """The agent already has ``max_inflight_per_agent`` commands that are not COMPLETE."""


class HubClosed(DispatcherError):
    """The hub closed while the caller was waiting; the stored command lives on."""


class InvalidTransition(DispatcherError):
    """A command lifecycle event that the state table does not allow."""


class DeliveryTimeout(DispatcherError):
    """``emit_to`` timed out; ``pending`` lists the agents that did not answer ``received``."""

    def __init__(self, pending: list[str]) -> None:
        super().__init__(f"no receipt from {len(pending)} agent(s): {', '.join(pending[:10])}")
        self.pending = pending
