"""Server-Sent Events for the admin API, written once: every event stream uses :func:`serve`.

A stream is a :class:`~dispatcher.feed.Subscription` to the hub's feed relayed
to one HTTP client as ``text/event-stream``: each message is ``event: KIND``
and one ``data:`` line of JSON, then a blank line. The route decides what to
send and when the stream is done through three callbacks:

- ``on_open(stream)``: once, after the response headers went out (send what is
  already known; True ends the stream, e.g. a command already COMPLETE);
- ``on_item(stream, kind, data)``: for each item of the subscription (True ends);
- ``on_tick(stream)``: after each second without an item (look at the store for
  what the feed may have missed; True ends). A client that went away is
  noticed then too.

Every stream sends the comment line ``: keep-alive`` whenever ``keepalive``
seconds passed since the last one, whatever the traffic. A stream ends when a
callback says so, when its subscription ends (the hub closes, or the reader
fell ``buffer`` items behind: ``overflow``), when the client goes away, or
when one write cannot be handed over within ``keepalive`` seconds (a reader
that does not read; counted in ``dispatcher_streams_dropped`` as overflow
is). It always unsubscribes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from .errors import DispatcherError
from .feed import Feed, Subscription
from .metrics import Metrics

__all__ = ["SseStream", "serve"]

log = structlog.get_logger(__name__)

# How often on_tick runs while no item arrives.
TICK = 1.0


class SseStream:
    """One open ``text/event-stream`` response."""

    def __init__(self, response: web.StreamResponse, encode: Callable[[Any], str],
                 write_timeout: float) -> None:
        self.response = response
        self.encode = encode
        self.write_timeout = write_timeout
        self.last_comment = time.monotonic()

    async def send(self, event: str, data: Any) -> None:
        """One message: ``event: EVENT`` and its data as one line of JSON."""
        await self._write(f"event: {event}\ndata: {self.encode(data)}\n\n".encode())

    async def comment(self, text: str = "keep-alive") -> None:
        self.last_comment = time.monotonic()
        await self._write(f": {text}\n\n".encode())

    async def _write(self, data: bytes) -> None:
        async with asyncio.timeout(self.write_timeout):
            await self.response.write(data)


OnOpen = Callable[[SseStream], Awaitable[bool]]
OnItem = Callable[[SseStream, str, Any], Awaitable[bool]]


async def serve(request: web.Request, feed: Feed, sub: Subscription, *, keepalive: float,
                encode: Callable[[Any], str], metrics: Metrics, on_item: OnItem,
                on_open: OnOpen | None = None, on_tick: OnOpen | None = None,
                ) -> web.StreamResponse:
    """Relay ``sub`` to the client until done (see the module's doc); returns the response."""
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no"})
    stream = SseStream(response, encode, keepalive)
    reason = "done"
    try:
        await response.prepare(request)
        await stream.comment("stream open")
        done = on_open is not None and await on_open(stream)
        while not done:
            wait = min(TICK, max(0.0, stream.last_comment + keepalive - time.monotonic()))
            item = await sub.get(wait)
            if sub.ended is not None:
                reason = sub.ended
                break
            transport = request.transport
            if transport is None or transport.is_closing():
                reason = "client_gone"  # noticed within a tick, not at the next write
                break
            if item is not None:
                done = await on_item(stream, item[0], item[1])
            elif on_tick is not None:
                done = await on_tick(stream)
            if not done and time.monotonic() - stream.last_comment >= keepalive:
                await stream.comment()
    except TimeoutError:
        reason = "slow_reader"  # a write could not be handed over in time
        metrics.stream_dropped()
        log.warning("stream_subscriber_dropped", reason=reason, path=request.path)
    except (ConnectionError, RuntimeError):  # the client went away (or closed the transport)
        reason = "client_gone"
    except DispatcherError as exc:  # the store failed a callback's read: end, said so
        reason = "store_error"
        log.warning("stream_store_error", path=request.path, error=str(exc))
    finally:
        feed.unsubscribe(sub)
    log.debug("stream_ended", path=request.path, reason=reason)
    if reason == "slow_reader":
        # Nothing more may be written to it: drop the connection.
        transport = request.transport
        if transport is not None:
            transport.abort()
    else:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
    return response
