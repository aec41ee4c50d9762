"""agent_client: the agent side of dispatcher (asyncio library and pure protocol module).

Never imports ``dispatcher`` and never needs Redis (docs/design-notes.md, The shape of the hub).
"""

from __future__ import annotations

from .client import Agent, CommandContext, CommandHandler, EventContext, EventHandler
from .errors import (
    AgentOffline,
    AgentRefused,
    AgentReplaced,
    CommandCancelled,
    CommandError,
    CommandFailed,
    CommandTimeout,
    DispatcherError,
    HelloRefused,
    NotConnected,
)

__all__ = [
    "Agent",
    "AgentOffline",
    "AgentRefused",
    "AgentReplaced",
    "CommandCancelled",
    "CommandContext",
    "CommandError",
    "CommandFailed",
    "CommandHandler",
    "CommandTimeout",
    "DispatcherError",
    "EventContext",
    "EventHandler",
    "HelloRefused",
    "NotConnected",
]
__version__ = "0.1.0"
