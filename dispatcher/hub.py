"""``Dispatcher``: the public hub, the core plus its servers and store."""

from __future__ import annotations

from types import TracebackType

import structlog

from .admin import AdminServer
from .config import HubConfig
from .core import HubCore
from .store.base import Store
from .store.memory import MemoryStore
from .transport import AgentServer

__all__ = ["Dispatcher"]

log = structlog.get_logger(__name__)


def make_store(config: HubConfig) -> Store:
    """The engine ``config`` selects: Redis when ``redis_url`` is set, else memory."""
    if config.redis_url:
        from .store.redis import RedisStore  # noqa: PLC0415 - optional engine

        return RedisStore(config.redis_url, prefix=config.prefix, retention=config.retention,
                          probe_interval=config.bus_probe_interval,
                          probe_timeout=config.bus_probe_timeout,
                          fast_path=config.redis_fast_path,
                          max_queued=config.redis_max_queued)
    return MemoryStore(retention=config.retention, max_retained=config.max_retained)


class Dispatcher(HubCore):
    """A hub. ``await hub.listen()`` serves agents and the admin API; ``await hub.close()``.

    ``Dispatcher(HubConfig(...))``; with no config, settings come from the
    ``DISPATCHER_*`` environment variables.
    """

    def __init__(self, config: HubConfig | None = None, *, store: Store | None = None) -> None:
        config = config if config is not None else HubConfig.from_env()
        super().__init__(config, store if store is not None else make_store(config))
        self._agents_server = AgentServer(self)
        self._admin_server = AdminServer(self) if config.admin_port is not None else None
        self._listening = False
        self._closed = False

    @property
    def engine(self) -> str:
        return self.store.engine

    @property
    def port(self) -> int | None:
        """The agents' port once listening (useful with ``port=0``)."""
        return self._agents_server.port

    @property
    def admin_port(self) -> int | None:
        return self._admin_server.port if self._admin_server is not None else None

    @property
    def auth_required(self) -> bool:
        return self._agents_server.auth_required

    async def listen(self) -> None:
        """Start the store and both servers; resolves once agents can connect."""
        if self._listening:
            return
        await self.store.start()
        try:
            await self._agents_server.start()
            if self._admin_server is not None:
                await self._admin_server.start()
        except BaseException:
            await self.close()
            raise
        self._listening = True
        if not self.auth_required:
            log.warning("agents_unauthenticated", hub_id=self.hub_id,
                        note="no agent_secret or agent_tokens: any client may connect as any "
                             "agent id")
        await self.cluster.start()
        self.start_sweeper()
        log.info(
            "hub_listening", hub_id=self.hub_id, engine=self.engine, port=self.port,
            admin_port=self.admin_port, auth=self.auth_required,
        )

    async def close(self) -> None:
        """Graceful and idempotent: stop accepting, close agents with 1001, keep the store."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        await self._agents_server.close()
        if self._admin_server is not None:
            await self._admin_server.close()
        await self.cluster.close()
        await self._close_core()
        await self.store.close()
        log.info("hub_closed", hub_id=self.hub_id)

    async def __aenter__(self) -> Dispatcher:
        await self.listen()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
