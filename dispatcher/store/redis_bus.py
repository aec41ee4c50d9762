"""The cluster's message bus on Redis pub/sub, built not to go deaf silently.

Each hub subscribes to its own channel ``P:hub:HUB_ID`` and to ``P:events``.
What users of other hubs report most (in python-socketio's and Centrifugo's
issue trackers) is a listener that dies or hangs while health checks stay
green. So:

- the subscriber connection has no read timeout (a timeout on a blocking
  subscriber only causes resubscribe storms); it is a loop that reconnects
  and resubscribes with backoff whenever the connection fails;
- a loopback probe is published to the hub's own channel every
  ``probe_interval``; when one has not come back within ``probe_timeout`` the
  bus is *deaf*: it says so (``deaf``, a log line, the hub's ``/healthz`` and
  metrics) and tears the subscriber down to build a new one;
- after every (re)subscription the hub is told to resynchronise, because
  pub/sub does not keep what was published while nobody listened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import structlog
from redis.exceptions import RedisError

from agent_client.protocol import pack, unpack

from .redis_url import make_client

__all__ = ["RedisBus"]

log = structlog.get_logger(__name__)

MessageHandler = Callable[[str, Any], None]

# Bound of the wait in close(): cancelled tasks end within a loop turn or two
# (a listener's last step closes its sockets, bounded by the connect timeout).
_CLOSE_WAIT = 2.0


class RedisBus:
    """Subscribes one hub to its channels; ``deaf`` is True while messages do not flow."""

    def __init__(
        self,
        url: str,
        channels: list[str],
        probe_channel: str,
        publish: Callable[[str, bytes], Any],
        *,
        probe_interval: float = 2.0,
        probe_timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.channels = channels
        self.probe_channel = probe_channel
        self._publish = publish
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self._on_message: MessageHandler | None = None
        self._on_subscribed: Callable[[bool], None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        # Listeners replaced by _restart_listener, until they have ended.
        self._replaced: set[asyncio.Task[None]] = set()
        self._nonce = os.urandom(6).hex()
        self._probe_seq = 0
        self._last_probe_seen = time.monotonic()
        self._subscribed = asyncio.Event()
        self._ever_subscribed = False
        self.deaf = False
        self.reconnects = 0
        self.messages = 0
        self._closed = False

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    async def start(self, on_message: MessageHandler,
                    on_subscribed: Callable[[bool], None]) -> None:
        """Start listening; ``on_subscribed(first)`` runs after every (re)subscription."""
        self._on_message = on_message
        self._on_subscribed = on_subscribed
        loop = asyncio.get_running_loop()
        self._listener = loop.create_task(self._listen_forever(), name="bus-listener")
        self._prober = loop.create_task(self._probe_forever(), name="bus-probe")
        with contextlib.suppress(TimeoutError):
            # Best effort: a hub starting while Redis is down still starts.
            await asyncio.wait_for(self._subscribed.wait(), 5.0)

    async def close(self) -> None:
        """End the listener and the prober; bounded, and safe while the event loop
        shuts down (the tasks may be cancelled or done already)."""
        self._closed = True
        tasks = [t for t in (self._listener, self._prober, *self._replaced)
                 if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            _, left = await asyncio.wait(tasks, timeout=_CLOSE_WAIT)
            if left:
                log.warning("bus_close_tasks_left", tasks=sorted(t.get_name() for t in left))

    # -- listening ---------------------------------------------------------------
    async def _listen_forever(self) -> None:
        delay = 0.1
        while not self._closed:
            client = make_client(self.url, socket_timeout=None, socket_connect_timeout=2.0,
                                 protocol=2)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*self.channels)
                self._subscribed.set()
                self._last_probe_seen = time.monotonic()
                first = not self._ever_subscribed
                self._ever_subscribed = True
                if not first:
                    self.reconnects += 1
                    log.info("bus_resubscribed", channels=self.channels)
                if self._on_subscribed is not None:
                    self._on_subscribed(first)
                delay = 0.1
                async for message in pubsub.listen():
                    self._dispatch(message)
            except (RedisError, OSError) as exc:
                log.warning("bus_connection_lost", error=str(exc))
            finally:
                self._subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(Exception):
                    await client.aclose()
            if self._closed:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("type") != "message":
            return
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else str(channel)
        try:
            body = unpack(message["data"])
        except Exception:  # a foreign publisher on our channel: ignore, say so
            log.warning("bus_bad_message", channel=channel)
            return
        self.messages += 1
        if isinstance(body, list) and body and body[0] == "probe":
            if len(body) == 2 and body[1] == self._nonce:
                self._last_probe_seen = time.monotonic()
                if self.deaf:
                    self.deaf = False
                    log.info("bus_hearing_again")
            return
        if self._on_message is not None:
            try:
                self._on_message(channel, body)
            except Exception:
                log.exception("bus_message_failed", channel=channel)

    # -- the loopback probe --------------------------------------------------------
    async def _probe_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.probe_interval)
            if self.subscribed:
                self._publish(self.probe_channel, pack(["probe", self._nonce]))
            silent = time.monotonic() - self._last_probe_seen
            if silent > self.probe_timeout and not self.deaf:
                self.deaf = True
                log.error("bus_deaf", silent_seconds=round(silent, 1),
                          note="no loopback probe came back; rebuilding the subscriber")
                self._restart_listener()

    def _restart_listener(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            if not self._listener.done():
                self._replaced.add(self._listener)
                self._listener.add_done_callback(self._replaced.discard)
        self._listener = asyncio.get_running_loop().create_task(
            self._listen_forever(), name="bus-listener")
