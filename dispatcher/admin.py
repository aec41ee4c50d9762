"""The admin HTTP server (aiohttp) on ``admin_port``: health, agents, commands."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .errors import StoreUnavailable

if TYPE_CHECKING:
    from .core import HubCore

__all__ = ["AdminServer"]


class AdminServer:
    """Serves the HTTP admin API of API.md for one hub."""

    def __init__(self, core: HubCore) -> None:
        self.core = core
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        self.app = app

    async def start(self) -> int:
        config = self.core.config
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, config.admin_host or config.host,
                           config.admin_port or 0, ssl_context=config.ssl_context())
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        """Liveness plus store reachability: 503 while the store is down."""
        store = self.core.store
        ok = store.healthy
        if ok:
            try:
                async with asyncio.timeout(2.0):
                    await store.ping()
            except (StoreUnavailable, TimeoutError):
                ok = False
        body: dict[str, Any] = {"status": "ok" if ok else "store_unavailable",
                                "engine": store.engine, "hub": self.core.hub_id,
                                "agents": self.core.connected_count}
        return web.json_response(body, status=200 if ok else 503)
