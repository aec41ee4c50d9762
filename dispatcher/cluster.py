"""Routing between hubs that share one store: per-hub channels, liveness, resync.

ARCHITECTURE.md, Scale: a frame for an agent on another hub goes only to that
hub's channel; an answer or progress goes back only to the hub that submitted
the command; only agent-emitted events (and ``broadcast``) go to every hub.
Each hub refreshes its alive key; when one dies, the others forget its agents.
With the in-memory engine there is one hub and this component does nothing.

Messages are msgpack arrays whose first item names them:
``["cmd", agent, cmd_id, frame]``, ``["frame", agent, event_id|nil, frame]``,
``["cancel", agent, cmd_id]``, ``["done", cmd_id, agent, key, outcome, result, error]``,
``["progress", cmd_id, data]``, ``["received", event_id, agent]``,
``["kick", agent, session]`` on ``P:hub:HUB_ID``; ``["emit", hub, sender|nil, key,
frame]`` on ``P:events``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import structlog

from agent_client import protocol as P

from .clock import now_ms
from .errors import StoreUnavailable
from .lifecycle import redeliverable
from .models import CommandInfo
from .store.base import Bus

if TYPE_CHECKING:
    from .core import HubCore


__all__ = ["Cluster"]

log = structlog.get_logger(__name__)


class Cluster:
    """One hub's view of the cluster; owned by the core."""

    def __init__(self, core: HubCore) -> None:
        self.core = core
        self.store = core.store
        self.me = core.hub_id
        self.enabled = core.store.shared
        self.bus: Bus | None = None
        self.sent = 0
        self.received = 0
        ttl = core.config.hub_ttl
        self._ttl_ms = int(ttl * 1000)
        self._refresh = max(ttl / 3, 0.05)

    @property
    def deaf(self) -> bool:
        return self.bus is not None and self.bus.deaf

    async def start(self) -> None:
        if not self.enabled:
            return
        with contextlib.suppress(StoreUnavailable):  # the liveness loop keeps trying
            await self.store.hub_alive(self.me, self._ttl_ms)
        self.bus = self.store.make_bus(self.me)
        if self.bus is not None:
            await self.bus.start(self._on_message, self._on_subscribed)
        self.core._spawn(self._liveness_forever(), name="hub-liveness")

    async def close(self) -> None:
        if self.bus is not None:
            await self.bus.close()
            self.bus = None
        if self.enabled:
            with contextlib.suppress(StoreUnavailable):  # its alive key expires by itself
                await self.store.hub_gone(self.me)

    # -- outgoing ------------------------------------------------------------------
    def _to_hub(self, hub_id: str, message: list[Any]) -> None:
        self.sent += 1
        self.store.publish(self.store.hub_channel(hub_id), P.pack(message))

    async def locate(self, agent_id: str) -> str | None:
        """The hub another agent is connected to, or None."""
        info = await self.store.get_agent(agent_id)
        return info.hub_id if info is not None else None

    def send_cmd(self, hub_id: str, cmd: CommandInfo, frame: bytes) -> None:
        self._to_hub(hub_id, ["cmd", cmd.agent_id, cmd.id, frame])

    async def route_cmd(self, cmd: CommandInfo, frame: bytes) -> None:
        hub_id = await self.locate(cmd.agent_id)
        if hub_id is not None and hub_id != self.me:
            self.send_cmd(hub_id, cmd, frame)

    async def route_cancel(self, agent_id: str, cmd_id: str) -> None:
        hub_id = await self.locate(agent_id)
        if hub_id is not None and hub_id != self.me:
            self._to_hub(hub_id, ["cancel", agent_id, cmd_id])

    async def route_frame(self, agent_id: str, frame: bytes, event_id: str | None) -> bool:
        """Send to the agent on another hub; False if it is connected nowhere."""
        hub_id = await self.locate(agent_id)
        if hub_id is None or hub_id == self.me:
            return False
        self._to_hub(hub_id, ["frame", agent_id, event_id, frame])
        return True

    def notify_done(self, info: CommandInfo) -> None:
        if info.origin and info.origin != self.me:
            self._to_hub(info.origin, ["done", info.id, info.agent_id, info.key, info.outcome,
                                       info.result, info.error])

    def notify_progress(self, origin: str, cmd_id: str, data: Any) -> None:
        if origin and origin != self.me:
            self._to_hub(origin, ["progress", cmd_id, data])

    def notify_received(self, event_id: str, agent_id: str) -> None:
        # Event ids are "e.<hub id>.<n>" (events.py): the waiting hub is in the id.
        if event_id.startswith("e.") and event_id.count(".") >= 2:
            hub_id = event_id[2:].rsplit(".", 1)[0]
            if hub_id != self.me:
                self._to_hub(hub_id, ["received", event_id, agent_id])

    def kick(self, hub_id: str, agent_id: str, session: str) -> None:
        """The agent connected here: its older connection on ``hub_id`` is replaced (4409)."""
        self._to_hub(hub_id, ["kick", agent_id, session])

    def publish_emit(self, sender: str | None, key: str, frame: bytes) -> None:
        if self.enabled:
            self.sent += 1
            self.store.publish(self.store.events_channel,
                               P.pack(["emit", self.me, sender, key, frame]))

    # -- incoming ------------------------------------------------------------------
    def _on_message(self, channel: str, body: Any) -> None:
        if not isinstance(body, list) or not body or not isinstance(body[0], str):
            log.warning("cluster_bad_message", channel=channel)
            return
        self.received += 1
        kind, args = body[0], body[1:]
        core = self.core
        if kind == "cmd" and len(args) == 3:
            agent_id, cmd_id, frame = args
            core.send_to_agent(agent_id, frame, cmd_id)
        elif kind == "frame" and len(args) == 3:
            agent_id, event_id, frame = args
            if core.send_to_agent(agent_id, frame):
                if event_id is not None:
                    core.events.sent(agent_id, frame)
            else:  # it moved on meanwhile: it gets the frame from its queue
                core._spawn(core.events.deliver(agent_id, frame, event_id, route=False))
        elif kind == "cancel" and len(args) == 2:
            core.send_to_agent(args[0], P.encode(P.CancelFrame(args[1])))
        elif kind == "done" and len(args) == 6:
            cmd_id, agent_id, key, outcome, result, error = args
            core._completed(CommandInfo(id=cmd_id, agent_id=agent_id, key=key,
                                        status="COMPLETE", outcome=outcome, result=result,
                                        error=error, origin=self.me), tell_agent=False)
        elif kind == "progress" and len(args) == 2:
            core.push_progress(args[0], args[1])
        elif kind == "received" and len(args) == 2:
            core.events.receipt(args[0], args[1])
        elif kind == "kick" and len(args) == 2:
            core.kick_local(args[0], args[1])
        elif kind == "emit" and len(args) == 4:
            hub_id, sender, key, frame = args
            if hub_id != self.me:
                core.events.fan_out_local(sender, key, frame)
        else:
            log.warning("cluster_bad_message", channel=channel, kind=kind)

    def _on_subscribed(self, first: bool) -> None:
        if not first:
            # Pub/sub kept nothing while we were not listening: catch up from the store.
            self.core._spawn(self.resync(), name="cluster-resync")

    async def resync(self) -> None:
        """Redeliver what local agents may have missed and resolve finished handles."""
        core = self.core
        try:
            for agent_id in core.connected_ids():
                for cmd in redeliverable(await self.store.list_pending(agent_id)):
                    core.send_to_agent(agent_id, core.cmd_frame(cmd), cmd.id)
            for cmd_id in list(core.waiting_ids()):
                info = await self.store.get_command(cmd_id)
                if info is not None and info.status == "COMPLETE":
                    core._completed(info, tell_agent=False)
        except StoreUnavailable:
            return
        log.info("cluster_resynced", agents=len(core.connected_ids()))

    async def _liveness_forever(self) -> None:
        reap_every = 2
        turn = 0
        while True:
            await asyncio.sleep(self._refresh)
            turn += 1
            try:
                await self.store.hub_alive(self.me, self._ttl_ms)
                if turn % reap_every == 0:
                    for info in await self.store.reap_dead_hubs(self.me):
                        log.warning("agent_reaped", agent_id=info.id, hub_id=info.hub_id,
                                    reason="hub_dead")
                        info.last_seen = now_ms()
                        self.core._emit("agent-disconnected", info, "hub_dead")
            except StoreUnavailable:
                continue
