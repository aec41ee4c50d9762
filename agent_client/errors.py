"""Exceptions shared by the hub and the agent library (the hub re-exports them).

``agent.call()`` on an agent raises exactly the types that awaiting a command
handle raises on the hub, so code that handles one handles the other.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AgentOffline",
    "AgentRefused",
    "AgentReplaced",
    "CommandCancelled",
    "CommandError",
    "CommandFailed",
    "CommandTimeout",
    "DispatcherError",
    "HelloRefused",
    "NotConnected",
]


class DispatcherError(Exception):
    """Base class of every exception of the hub and of the agent library."""


class CommandFailed(DispatcherError):
    """The agent answered with a ``fail`` frame; ``code`` is the agent's error code."""

    def __init__(self, code: str, message: str, data: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data


class CommandTimeout(DispatcherError, TimeoutError):
    """The command's deadline passed before the agent answered (also a ``TimeoutError``)."""


class CommandCancelled(DispatcherError):
    """The command was cancelled (by its caller, an operator, or a drop)."""


class AgentOffline(DispatcherError):
    """The target agent is not connected (``require_online`` or a routed call)."""


class CommandError(Exception):
    """Raise in a command handler to answer with a ``fail`` frame of this ``code``."""

    def __init__(self, code: str, message: str = "", data: Any = None) -> None:
        super().__init__(message or code)
        self.code = code
        self.message = message
        self.data = data


class NotConnected(DispatcherError):
    """The agent has no live connection to a hub right now."""


class HelloRefused(DispatcherError):
    """The hub refused the handshake (``code`` is the error code, e.g. ``unauthorized``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AgentReplaced(DispatcherError):
    """Another connection with this agent id replaced this one (close 4409)."""


class AgentRefused(HelloRefused):
    """The hub refused this agent for good: its credential (``unauthorized``) or its
    protocol version (``unsupported_version``). ``Agent.run()`` raises it instead of
    retrying, since the same hello would be refused again."""
