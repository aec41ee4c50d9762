"""dispatcher: a realtime agent hub (commands with futures, events with receipts)."""

from __future__ import annotations

from .config import HubConfig
from .errors import (
    AgentOffline,
    CommandCancelled,
    CommandFailed,
    CommandTimeout,
    DeliveryTimeout,
    DispatcherError,
    HubClosed,
    NoAgentsMatched,
    StoreUnavailable,
    TooManyCommands,
    UnknownCommand,
)
from .handle import CommandHandle
from .hub import Dispatcher
from .jobs import JobHandle
from .models import AgentInfo, CommandInfo, CommandPage, JobInfo
from .transport import agent_token

__all__ = [
    "AgentInfo",
    "AgentOffline",
    "CommandCancelled",
    "CommandFailed",
    "CommandHandle",
    "CommandInfo",
    "CommandPage",
    "CommandTimeout",
    "DeliveryTimeout",
    "Dispatcher",
    "DispatcherError",
    "HubClosed",
    "HubConfig",
    "JobHandle",
    "JobInfo",
    "NoAgentsMatched",
    "StoreUnavailable",
    "TooManyCommands",
    "UnknownCommand",
    "agent_token",
]
__version__ = "0.1.0"
