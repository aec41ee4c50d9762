"""Events: ``emit_to`` with receipts, ``broadcast``, agent emits and subscriptions.

docs/protocol.md, Events and receipts. The hub forwards an agent's ``emit`` to the agents
subscribed to its key (exact keys and ``prefix*`` patterns, never back to the
sender) or to the ``to`` list, and raises it on its own emitter. ``emit_to``
sends events with an ``id`` and resolves when every target answered
``received``. Frames for agents that are away wait in the store's bounded queue
and go out, oldest first, right after ``welcome``; events sent but not yet
received when a connection drops are queued again, so receipts mean delivery.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import structlog

from agent_client import protocol as P

from .clock import now_ms
from .config import HubConfig
from .connections import Connections, Session
from .errors import DeliveryTimeout, DispatcherError
from .feed import Feed
from .peers import Peers
from .store.base import Store

__all__ = ["DROP_REASONS", "MAX_SUBSCRIPTIONS", "Events"]

log = structlog.get_logger(__name__)

# Subscriptions one agent may hold; more is refused with bad_frame.
MAX_SUBSCRIPTIONS = 1000
# The ``reason`` label of dispatcher_events_dropped; "evicted" is the store's
# count (frames dropped to keep all queues within their bounds).
DROP_REASONS = ("queue_full", "expired", "evicted", "store_unavailable")


class _Receipts:
    """One ``emit_to`` call waiting for its targets' ``received``."""

    __slots__ = ("future", "remaining")

    def __init__(self, targets: set[str], future: asyncio.Future[None]) -> None:
        self.remaining = targets
        self.future = future


class Events:
    """The hub's event routing, one per hub."""

    def __init__(self, *, config: HubConfig, hub_id: str, store: Store,
                 connections: Connections, peers: Peers,
                 emit: Callable[..., bool], feed: Feed) -> None:
        self.config = config
        self.store = store
        self.connections = connections
        self.peers = peers
        self._emit = emit  # the hub's emitter: agent events raise there too
        self.feed = feed  # and watchers of the cluster see them
        self._exact: dict[str, set[str]] = {}
        self._prefix: dict[str, set[str]] = {}
        self._agent_subs: dict[str, set[str]] = {}
        # event id -> (waiter, agent) for receipts this hub waits for
        self._waiting: dict[str, tuple[_Receipts, str]] = {}
        # agent id -> {event id: frame} sent on its connection, not yet received
        self._unacked: dict[str, dict[str, bytes]] = {}
        self._ids = itertools.count(1)
        self._id_prefix = f"e.{hub_id}."
        # Frames not delivered, by reason: queue_full (the agent's queue, or its
        # events awaiting receipt, at max_event_queue), expired (older than
        # event_queue_ttl when the agent came back), store_unavailable (could
        # not be queued again). The store counts those it evicted for room.
        self.dropped_by: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)

    @property
    def dropped(self) -> int:
        """Frames this hub dropped, all reasons together (store evictions aside)."""
        return sum(self.dropped_by.values())

    @property
    def awaiting_receipt(self) -> int:
        """Events sent by ``emit_to`` on this hub still waiting for a ``received``."""
        return len(self._waiting)

    # -- subscriptions -----------------------------------------------------------
    def subscribe(self, agent_id: str, keys: tuple[str, ...]) -> None:
        reserved = [k for k in keys if P.is_reserved_key(k.rstrip("*"))]
        if reserved:
            raise P.ProtocolError(P.ErrorCode.RESERVED_KEY,
                                  f"cannot subscribe to reserved key {reserved[0]!r}")
        subs = self._agent_subs.setdefault(agent_id, set())
        if len(subs | set(keys)) > MAX_SUBSCRIPTIONS:
            raise P.ProtocolError(P.ErrorCode.BAD_FRAME,
                                  f"at most {MAX_SUBSCRIPTIONS} subscriptions per agent")
        for key in keys:
            subs.add(key)
            index = self._prefix if key.endswith("*") else self._exact
            index.setdefault(key[:-1] if key.endswith("*") else key, set()).add(agent_id)

    def unsubscribe(self, agent_id: str, keys: tuple[str, ...] | None = None) -> None:
        """Drop some (or, with ``None``, all) of the agent's subscriptions."""
        subs = self._agent_subs.get(agent_id)
        if not subs:
            return
        for key in list(subs) if keys is None else keys:
            if key not in subs:
                continue
            subs.discard(key)
            index = self._prefix if key.endswith("*") else self._exact
            name = key[:-1] if key.endswith("*") else key
            members = index.get(name)
            if members is not None:
                members.discard(agent_id)
                if not members:
                    del index[name]
        if not subs:
            del self._agent_subs[agent_id]

    def subscribers(self, key: str) -> set[str]:
        out = set(self._exact.get(key, ()))
        for prefix, members in self._prefix.items():
            if key.startswith(prefix):
                out |= members
        return out

    def subscriptions(self, agent_id: str) -> set[str]:
        return set(self._agent_subs.get(agent_id, ()))

    # -- sending -----------------------------------------------------------------------
    def _send_or_none(self, agent_id: str, data: bytes, event_id: str | None) -> bool:
        """Send to an agent connected here; remember it until ``received`` if it has an id."""
        if not self.connections.send(agent_id, data):
            return False
        if event_id is not None:
            self._track(agent_id, event_id, data)
        return True

    def _track(self, agent_id: str, event_id: str, data: bytes) -> None:
        """Remember a sent event until ``received``, at most ``max_event_queue`` per
        agent like its queue: an agent that never answers must not grow the hub."""
        unacked = self._unacked.setdefault(agent_id, {})
        if event_id in unacked or len(unacked) < self.config.max_event_queue:
            unacked[event_id] = data
        else:
            self.dropped_by["queue_full"] += 1

    async def deliver(self, agent_id: str, data: bytes, event_id: str | None = None, *,
                      route: bool = True) -> bool:
        """Send now (here or through the agent's hub) or queue for later;
        False when the agent's queue is full."""
        if self._send_or_none(agent_id, data, event_id):
            return True
        if route and await self.peers.route_frame(agent_id, data, event_id):
            return True
        config = self.config
        queued = await self.store.queue_frame(
            agent_id, data, now=now_ms(), max_len=config.max_event_queue,
            ttl_ms=int(config.event_queue_ttl * 1000),
        )
        if not queued:
            self.dropped_by["queue_full"] += 1
            log.warning("event_queue_full", agent_id=agent_id, limit=config.max_event_queue)
        return queued

    async def emit_to(self, agent_ids: str | list[str], key: str, data: Any,
                      timeout: float | None = None) -> None:
        targets = [agent_ids] if isinstance(agent_ids, str) else list(dict.fromkeys(agent_ids))
        for agent_id in targets:
            if not P.is_valid_agent_id(agent_id):
                raise ValueError(f"invalid agent id {agent_id!r}")
        _check_key(key)
        P.pack(data)
        if not targets:
            return
        loop = asyncio.get_running_loop()
        waiter = _Receipts(set(targets), loop.create_future())
        ids: list[str] = []
        try:
            for agent_id in targets:
                event_id = f"{self._id_prefix}{next(self._ids)}"
                ids.append(event_id)
                self._waiting[event_id] = (waiter, agent_id)
                frame = P.encode(P.EventFrame(key, data, id=event_id))
                await self.deliver(agent_id, frame, event_id)
            limit = self.config.command_timeout if timeout is None else timeout
            try:
                async with asyncio.timeout(limit):
                    await waiter.future
            except TimeoutError:
                raise DeliveryTimeout(sorted(waiter.remaining)) from None
        finally:
            for event_id in ids:
                self._waiting.pop(event_id, None)

    def broadcast(self, key: str, data: Any) -> int:
        """Send to every connected agent (every hub), without receipts; returns how
        many were sent from this hub."""
        _check_key(key)
        frame = P.encode(P.EventFrame(key, data))
        self.peers.publish_emit(None, key, frame)
        return self.fan_out_local(None, key, frame)

    def fan_out_local(self, sender: str | None, key: str, frame: bytes) -> int:
        """An event for this hub's agents: subscribers of ``key`` other than the
        sender, or everyone when there is no sender (broadcast)."""
        targets = self.connections.ids() if sender is None else self.subscribers(key)
        return self.connections.send_many(targets, frame, skip=sender)

    # -- frames from agents ---------------------------------------------------------------
    async def on_emit(self, session: Session, frame: P.EmitFrame) -> None:
        if P.is_reserved_key(frame.key):
            raise P.ProtocolError(P.ErrorCode.RESERVED_KEY,
                                  f"key {frame.key!r} is reserved for the hub")
        sender = session.agent_id
        self._emit(frame.key, frame.data, sender)
        if self.feed.active:
            self.feed.publish("event", {"key": frame.key, "data": frame.data, "from": sender})
        data = P.encode(P.EventFrame(frame.key, frame.data, sender=sender))
        if frame.to is not None:
            full = [a for a in dict.fromkeys(frame.to)
                    if a != sender and not await self.deliver(a, data, None)]
            if full:
                raise P.ProtocolError(
                    "queue_full", f"queue full for agent(s) {', '.join(full[:10])}; "
                    "event not delivered to them")
            return
        self.peers.publish_emit(sender, frame.key, data)
        self.fan_out_local(sender, frame.key, data)

    def on_received(self, session: Session, event_id: str) -> None:
        unacked = self._unacked.get(session.agent_id)
        if unacked is not None:
            unacked.pop(event_id, None)
        if event_id in self._waiting:
            self.receipt(event_id, session.agent_id)
        else:
            self.peers.notify_received(event_id, session.agent_id)

    def receipt(self, event_id: str, agent_id: str) -> None:
        """``agent_id`` received event ``event_id`` (here or on another hub)."""
        entry = self._waiting.get(event_id)
        if entry is None:
            return  # late, or a receipt nobody waits for
        waiter, target = entry
        if target != agent_id:
            return
        del self._waiting[event_id]
        waiter.remaining.discard(target)
        if not waiter.remaining and not waiter.future.done():
            waiter.future.set_result(None)

    # -- connection lifecycle ---------------------------------------------------------------
    async def take_queued(self, agent_id: str) -> list[bytes]:
        """The frames queued while the agent was away, oldest first (expired ones dropped)."""
        ttl_ms = int(self.config.event_queue_ttl * 1000)
        frames, expired = await self.store.take_frames(agent_id, now=now_ms(), ttl_ms=ttl_ms)
        if expired:
            self.dropped_by["expired"] += expired
            log.warning("queued_events_expired", agent_id=agent_id, count=expired)
        return frames

    def sent(self, agent_id: str, data: bytes) -> None:
        """A queued frame went out on a new connection: track its receipt."""
        event_id = _event_id(data)
        if event_id is not None:
            self._track(agent_id, event_id, data)

    def connection_gone(self, agent_id: str) -> list[bytes]:
        """The agent's connection ended or was replaced: forget its subscriptions
        and return the events it was sent but did not acknowledge, oldest first."""
        self.unsubscribe(agent_id)
        unacked = self._unacked.pop(agent_id, None)
        return list(unacked.values()) if unacked else []

    async def requeue(self, agent_id: str, frames: list[bytes]) -> None:
        """Queue unacknowledged events again, ahead of newer ones."""
        if not frames:
            return
        try:
            await self.store.requeue_frames(
                agent_id, frames, now=now_ms(), ttl_ms=int(self.config.event_queue_ttl * 1000))
        except DispatcherError:
            self.dropped_by["store_unavailable"] += len(frames)
            log.warning("events_lost_store_unavailable", agent_id=agent_id, count=len(frames))

    def close(self) -> None:
        for waiter, _ in list(self._waiting.values()):
            if not waiter.future.done():
                waiter.future.cancel()
        self._waiting.clear()


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not 0 < len(key) <= P.MAX_KEY_LENGTH:
        raise ValueError("event key must be a non-empty string of at most 256 characters")


def _event_id(data: bytes) -> str | None:
    try:
        frame = P.decode(data)
    except P.ProtocolError:
        return None
    return frame.id if isinstance(frame, P.EventFrame) else None

