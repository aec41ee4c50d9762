"""What the hub's parts ask of the other hubs of a cluster, as one narrow interface.

:class:`~dispatcher.cluster.Cluster` implements it over the store's bus;
:class:`NoPeers` is the hub that is alone (an engine without a bus, such as the
in-memory one). The command path calls these methods unconditionally: whether
there are other hubs is the implementation's business, never a branch there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from .models import CommandInfo

__all__ = ["NoPeers", "Peers"]


class Peers(Protocol):
    """The other hubs of the cluster, as the command path and events see them."""

    def route_cmd(self, cmd: CommandInfo, frame: bytes, hub_id: str | None) -> None:
        """Send a stored command to its agent on another hub: ``hub_id`` if known,
        else the hub the store says the agent is on (nothing if it is nowhere)."""

    def route_cancel(self, agent_id: str, cmd_id: str) -> None:
        """Tell the agent, on whichever other hub it is, that ``cmd_id`` is cancelled."""

    async def route_frame(self, agent_id: str, frame: bytes, event_id: str | None) -> bool:
        """Send a frame to the agent on another hub; False if it is connected nowhere."""

    def notify_done(self, info: CommandInfo, watchers: Sequence[str] = ()) -> None:
        """A command completed here: wake its handle on the hub that submitted it
        and on the ``watchers`` (other hubs waiting on it)."""

    def notify_progress(self, origin: str, cmd_id: str, data: Any) -> None:
        """Progress for a command submitted on hub ``origin``."""

    def notify_received(self, event_id: str, agent_id: str) -> None:
        """An agent received an event whose ``emit_to`` waits on another hub."""

    def kick(self, hub_id: str, agent_id: str, session: str) -> None:
        """The agent connected here: its older connection on ``hub_id`` is replaced."""

    def publish_emit(self, sender: str | None, key: str, frame: bytes) -> None:
        """An event for every hub's subscribers (or, without sender, every agent)."""


class NoPeers:
    """A hub alone: there is nobody to route to or to notify."""

    def route_cmd(self, cmd: CommandInfo, frame: bytes, hub_id: str | None) -> None:
        return None

    def route_cancel(self, agent_id: str, cmd_id: str) -> None:
        return None

    async def route_frame(self, agent_id: str, frame: bytes, event_id: str | None) -> bool:
        return False

    def notify_done(self, info: CommandInfo, watchers: Sequence[str] = ()) -> None:
        return None

    def notify_progress(self, origin: str, cmd_id: str, data: Any) -> None:
        return None

    def notify_received(self, event_id: str, agent_id: str) -> None:
        return None

    def kick(self, hub_id: str, agent_id: str, session: str) -> None:
        return None

    def publish_emit(self, sender: str | None, key: str, frame: bytes) -> None:
        return None
