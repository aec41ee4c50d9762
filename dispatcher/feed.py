"""The feed: what happens on the cluster, for watchers (the admin API's event streams).

Parts of the hub :meth:`Feed.publish` what happened (``kind``, ``data``: plain
values msgpack can carry); a watcher :meth:`Feed.subscribe` s and reads
``(kind, data)`` items from its :class:`Subscription`. Kinds: ``agent-connected``
and ``agent-disconnected`` (an ``AgentInfo`` as a dict, the latter with
``reason``), ``command`` (a ``CommandInfo`` as a dict: created, ACTIVE,
COMPLETE), ``progress`` (``{"id", "data"}``), ``event`` (an agent emitted
``{"key", "data", "from"}``) and ``job`` (published by the jobs part).

A hub alone delivers to its own watchers. On a shared store every item goes
through the channel ``P:feed``, so that a watcher on any hub sees the whole
cluster: a hub subscribes to that channel only while it has watchers, and
publishes only while someone listens (a hub that gets its first watcher tells
every hub at once over the cluster's bus; each also asks the store how many
subscribers the channel has every ``poll`` seconds, and stops at once when a
publish reached nobody). Nothing is published, or built, while nobody watches.

Each subscription holds at most ``buffer`` items: a watcher that falls that far
behind is dropped (its subscription ends with ``overflow``; counted in
``/metrics`` and logged), so a slow reader costs bounded memory. The feed is
lossy by design: what happens while a watcher is not subscribed is not kept.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Collection
from typing import Any

import structlog

from agent_client.protocol import pack

from .errors import DispatcherError, HubClosed
from .metrics import Metrics
from .store.base import Bus, Store
from .tasks import TaskOwner

__all__ = ["CLUSTER_KINDS", "Feed", "Subscription"]

log = structlog.get_logger(__name__)

# What the cluster stream (GET /stream) carries.
CLUSTER_KINDS: frozenset[str] = frozenset(
    {"agent-connected", "agent-disconnected", "command", "job", "event"})

Match = Callable[[str, Any], bool]


class Subscription:
    """One watcher's bounded queue of ``(kind, data)`` items.

    ``ended`` is None while it is live, then ``"closed"`` (unsubscribed, or the
    hub closes) or ``"overflow"`` (the watcher fell ``limit`` items behind).
    """

    __slots__ = ("_items", "_wake", "ended", "kinds", "limit", "match")

    def __init__(self, kinds: Collection[str] | None, match: Match | None, limit: int) -> None:
        self.kinds = None if kinds is None else frozenset(kinds)
        self.match = match
        self.limit = limit
        self.ended: str | None = None
        self._items: deque[tuple[str, Any]] = deque()
        self._wake = asyncio.Event()

    def wants(self, kind: str, data: Any) -> bool:
        return (self.kinds is None or kind in self.kinds) and (
            self.match is None or self.match(kind, data))

    def push(self, kind: str, data: Any) -> bool:
        """Queue an item; False (and the subscription ends) when it is full."""
        if self.ended is not None:
            return True
        if len(self._items) >= self.limit:
            self.end("overflow")
            return False
        self._items.append((kind, data))
        self._wake.set()
        return True

    def end(self, reason: str) -> None:
        if self.ended is None:
            self.ended = reason
            self._items.clear()
            self._wake.set()

    async def get(self, timeout: float) -> tuple[str, Any] | None:
        """The next item; None when ``timeout`` seconds passed without one or the
        subscription ended (then ``ended`` says why)."""
        if not self._items and self.ended is None:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
        if self._items and self.ended is None:
            return self._items.popleft()
        return None


class Feed:
    """This hub's side of the cluster's feed."""

    def __init__(self, *, store: Store, tasks: TaskOwner, metrics: Metrics, shared: bool,
                 buffer: int = 1000, poll: float = 1.0) -> None:
        self.store = store
        self.tasks = tasks
        self.metrics = metrics
        self.shared = shared
        self.buffer = buffer
        self.poll = poll
        self.channel = store.feed_channel
        self._subs: set[Subscription] = set()
        self._bus: Bus | None = None
        self._bus_lock = asyncio.Lock()
        self._remote = False  # shared store: somebody subscribes to the channel
        self._closed = False
        # Called when this hub gets its first watcher (on a shared store): the
        # cluster tells every hub, which then publishes at once (see watched()).
        self.on_first_watcher: Callable[[], None] | None = None

    @property
    def active(self) -> bool:
        """Whether anybody watches (here, or on a shared store anywhere): publishers
        check this before building an item."""
        return self._remote or bool(self._subs)

    @property
    def watchers(self) -> int:
        """Subscriptions on this hub."""
        return len(self._subs)

    def publish(self, kind: str, data: Any) -> None:
        """Tell every watcher of the cluster (nothing happens while nobody watches)."""
        if not self.active or self._closed:
            return
        if not self.shared:
            self._deliver(kind, data)
            return
        try:
            body = pack([kind, data])
        except (TypeError, ValueError) as exc:  # a value msgpack cannot carry
            log.warning("feed_item_unpackable", kind=kind, error=str(exc))
            return
        self.store.publish(self.channel, body).add_done_callback(self._published)

    def _published(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is None and fut.result() == 0:
            self._remote = False  # nobody listens any more: stop until the next poll

    def _deliver(self, kind: str, data: Any) -> None:
        for sub in list(self._subs):
            if sub.wants(kind, data) and not sub.push(kind, data):
                self._subs.discard(sub)
                self.metrics.stream_dropped()
                log.warning("stream_subscriber_dropped", reason="overflow", kind=kind,
                            buffer=sub.limit)

    def _on_message(self, channel: str, body: Any) -> None:
        if isinstance(body, list) and len(body) == 2 and isinstance(body[0], str):
            self._deliver(body[0], body[1])
        else:
            log.warning("feed_bad_message", channel=channel)

    async def subscribe(self, kinds: Collection[str] | None = None, *,
                        match: Match | None = None) -> Subscription:
        """A new subscription to ``kinds`` (all when None) whose items pass ``match``;
        on a shared store, returns once this hub listens to the channel."""
        if self._closed:
            raise HubClosed("the hub is closing")
        sub = Subscription(kinds, match, self.buffer)
        self._subs.add(sub)
        if self.shared:
            async with self._bus_lock:
                if self._bus is None:
                    bus = self.store.make_feed_bus()
                    if bus is not None:
                        await bus.start(self._on_message, _ignore)
                        self._bus = bus
                        if self.on_first_watcher is not None:
                            self.on_first_watcher()
            self._remote = True
        return sub

    def watched(self) -> None:
        """Another hub (or this one) has a watcher now: publish from now on, without
        waiting for the next poll of the channel's listeners (which would miss what
        happens here meanwhile, up to ``poll`` seconds)."""
        if self.shared and not self._closed:
            self._remote = True

    def unsubscribe(self, sub: Subscription) -> None:
        sub.end("closed")
        self._subs.discard(sub)

    def start(self) -> None:
        if self.shared:
            self.tasks.spawn(self._watch_forever(), name="feed-watch")

    async def _watch_forever(self) -> None:
        """Shared store: learn whether anybody listens; leave the channel when this
        hub's last watcher went."""
        while True:
            await asyncio.sleep(self.poll)
            if not self._subs and self._bus is not None:
                async with self._bus_lock:
                    if not self._subs and self._bus is not None:
                        bus, self._bus = self._bus, None
                        await bus.close()
            try:
                self._remote = await self.store.listeners(self.channel) > 0
            except DispatcherError:
                continue  # the store's health listener reports it

    async def close(self) -> None:
        """End every subscription (their streams close) and leave the channel."""
        self._closed = True
        for sub in list(self._subs):
            sub.end("closed")
        self._subs.clear()
        if self._bus is not None:
            bus, self._bus = self._bus, None
            await bus.close()


def _ignore(first: bool) -> None:
    return None
