"""This hub (``dispatcher.Dispatcher``) as a benchmark server, on either store engine.

``python -m benchmarks.servers.ours [--redis-url URL --prefix P]``: no URL means the
in-memory engine. Every ``HubConfig`` setting is at its default except the
per-connection frame-rate limit, off unless ``--max-frame-rate`` is given.
Logging is at warning level on stderr, as an operator would run it under load
(no per-connection info lines on the console).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable
from typing import Any

from ..common import COMMAND_KEY, EVENT_KEY, agent_id
from .base import Peer, main


class OursPeer(Peer):
    name = "ours"

    def __init__(self, redis_url: str | None, prefix: str,
                 max_frame_rate: float | None = None,
                 overrides: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.overrides = overrides or {}
        self.redis_url = redis_url
        self.prefix = prefix
        self.max_frame_rate = max_frame_rate
        self.hub: Any = None
        self._ids: list[str] = []

    async def start(self) -> int:
        from dispatcher import Dispatcher, HubConfig  # noqa: PLC0415

        options: dict[str, Any] = dict(self.overrides)
        if self.max_frame_rate is not None:
            options["max_frame_rate"] = self.max_frame_rate
        self.hub = hub = Dispatcher(HubConfig(
            host="127.0.0.1", port=0, admin_port=None, redis_url=self.redis_url,
            prefix=self.prefix, **options,
        ))
        hub.on("agent-connected", lambda _info: self.agent_connected())
        hub.on("agent-disconnected", lambda _info, _reason: self.agent_disconnected())
        await hub.listen()
        # As `dispatcher serve` does once it listens: this server process runs
        # the hub the way the product's entry point runs it.
        from dispatcher.runtime import tune_gc  # noqa: PLC0415

        tune_gc()
        return int(hub.port)

    async def close(self) -> None:
        if self.hub is not None:
            await self.hub.close()

    def call(self, index: int, payload: Any) -> Awaitable[Any]:
        ids = self._ids
        while len(ids) <= index:
            ids.append(agent_id(len(ids)))
        handle: Awaitable[Any] = self.hub.execute_on_agent(ids[index], COMMAND_KEY, payload)
        return handle

    async def fanout(self, data: Any) -> None:
        broadcast = getattr(self.hub, "broadcast", None)
        if broadcast is None:
            raise NotImplementedError("Dispatcher.broadcast is not implemented yet")
        await broadcast(EVENT_KEY, data)

    def counters(self) -> dict[str, int]:
        store = self.hub.store
        if not hasattr(store, "round_trips"):
            return {}
        return {"round_trips": store.round_trips, "operations": store.operations}

    def info(self) -> dict[str, Any]:
        return {"engine": self.hub.engine,
                "max_frame_rate": getattr(self.hub.config, "max_frame_rate", None)}


def _configure_logging() -> None:
    import structlog  # noqa: PLC0415

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        # As configure_logging does for `dispatcher serve`: without it every log
        # call below the level (command_ended: one per command) binds a new logger.
        cache_logger_on_first_use=True,
    )


def _overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        name, _, raw = item.partition("=")
        value: Any = raw
        if raw.strip().lower() in ("true", "false"):
            out[name.strip()] = raw.strip().lower() == "true"
            continue
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                continue
        out[name.strip()] = value
    return out


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--prefix", default="bench")
    # The per-connection frame-rate limit (HubConfig.max_frame_rate, 20,000/s by
    # default) drops frames beyond it: one agent with 100 commands in flight goes
    # past it on a fast machine, and dropped results would stall the closed loops.
    # The benchmark measures the hub's speed, so it is off unless given here.
    parser.add_argument("--max-frame-rate", type=float, default=0.0)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="another HubConfig setting, for experiments (e.g. retention=5)")


if __name__ == "__main__":
    _configure_logging()
    main(lambda a: OursPeer(a.redis_url, a.prefix, a.max_frame_rate, _overrides(a.set)), _args)
