"""``Dispatcher``: the public hub. It composes the hub's parts and owns their lifetime.

The parts, bottom up (docs/design-notes.md draws them): the store; the
connections registry; the command path (``commands``); events; routed calls;
sessions (attach, detach, catch-up); the frame router; the cluster (or no
peers); the agents' WebSocket server and the admin HTTP server. ``Dispatcher``
wires them together and offers the public API of docs/guide.md, nothing else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Any

import structlog

from agent_client import protocol as P

from .admin import AdminServer
from .calls import Calls
from .cluster import Cluster
from .commands import Commands
from .config import HubConfig
from .connections import Connections
from .emitter import EventEmitter, Handler
from .errors import StoreUnavailable
from .events import Events
from .feed import Feed
from .handle import CommandHandle
from .history import History
from .ids import new_hub_id
from .jobs import JobHandle, JobListener, Jobs
from .metrics import Levels, Metrics
from .models import AgentInfo, CommandInfo, CommandPage, JobInfo
from .peers import NoPeers, Peers
from .router import FrameRouter
from .sessions import Sessions
from .store.base import Store
from .store.memory import MemoryStore
from .tasks import TaskOwner
from .transport import AgentServer

__all__ = ["Dispatcher", "make_store"]

log = structlog.get_logger(__name__)


def make_store(config: HubConfig) -> Store:
    """The engine ``config`` selects: Redis when ``redis_url`` is set, else memory."""
    if config.redis_url:
        from .store.redis import RedisStore  # noqa: PLC0415 - optional engine

        return RedisStore(config.redis_url, prefix=config.prefix, retention=config.retention,
                          probe_interval=config.bus_probe_interval,
                          probe_timeout=config.bus_probe_timeout,
                          fast_path=config.redis_fast_path,
                          max_queued=config.redis_max_queued,
                          max_queues=config.max_offline_queues)
    return MemoryStore(retention=config.retention, max_retained=config.max_retained,
                       max_queues=config.max_offline_queues,
                       max_queued_bytes=config.max_offline_bytes)


class Dispatcher:
    """A hub. ``await hub.listen()`` serves agents and the admin API; ``await hub.close()``.

    ``Dispatcher(HubConfig(...))``; with no config, settings come from the
    ``DISPATCHER_*`` environment variables.
    """

    def __init__(self, config: HubConfig | None = None, *, store: Store | None = None) -> None:
        config = config if config is not None else HubConfig.from_env()
        self.config = config
        self.hub_id = config.hub_id or new_hub_id()
        self._store = store if store is not None else make_store(config)
        self._emitter = EventEmitter()
        emit = self._emitter.emit
        self._tasks = TaskOwner()
        self._metrics = Metrics()
        self._connections = Connections()
        bus = self._store.make_bus(self.hub_id)
        self._bus = bus
        self._feed = Feed(store=self._store, tasks=self._tasks, metrics=self._metrics,
                          shared=bus is not None, buffer=config.stream_buffer)
        self._history = History(store=self._store, tasks=self._tasks)
        hub_event = self._hub_event
        self._cluster = Cluster(config=config, hub_id=self.hub_id, store=self._store,
                                tasks=self._tasks, emit=hub_event) if bus is not None else None
        peers: Peers = self._cluster if self._cluster is not None else NoPeers()
        parts: dict[str, Any] = {"config": config, "hub_id": self.hub_id, "store": self._store,
                                 "connections": self._connections, "peers": peers}
        self._commands = Commands(**parts, tasks=self._tasks, metrics=self._metrics,
                                  feed=self._feed)
        self._events = Events(**parts, emit=emit, feed=self._feed)
        self._calls = Calls(commands=self._commands, connections=self._connections,
                            events=self._events, tasks=self._tasks)
        self._sessions = Sessions(**parts, events=self._events, tasks=self._tasks,
                                  metrics=self._metrics, emit=hub_event)
        self._jobs = Jobs(config=config, hub_id=self.hub_id, store=self._store,
                          commands=self._commands, tasks=self._tasks,
                          takeover=self._cluster is not None)
        self._jobs.on_job_changed(self._job_changed)
        self._router = FrameRouter(commands=self._commands, events=self._events,
                                   calls=self._calls, tasks=self._tasks)
        if self._cluster is not None:
            self._cluster.bind(commands=self._commands, connections=self._connections,
                               events=self._events, sessions=self._sessions, feed=self._feed)
            self._feed.on_first_watcher = self._cluster.announce_watcher
        # The public method below, without its call: execute_on_agent is the hot
        # path of every round-trip benchmark row (a Python call per command saved).
        self.execute_on_agent = self._commands.submit  # type: ignore[method-assign]
        self._metrics.watch(self._levels, self._store)
        self._store.set_health_listener(self._on_store_health)
        self._agents_server = AgentServer(config=config, hub_id=self.hub_id,
                                          sessions=self._sessions, router=self._router,
                                          connections=self._connections,
                                          metrics=self._metrics)
        self._admin_server = AdminServer(self) if config.admin_port is not None else None
        self._listening = False
        self._draining = False
        self._closed = False

    # -- properties ---------------------------------------------------------------
    @property
    def engine(self) -> str:
        """The store engine: ``memory`` or ``redis``."""
        return self._store.engine

    @property
    def store(self) -> Store:
        """The store this hub keeps its state in."""
        return self._store

    @property
    def metrics(self) -> Metrics:
        """This hub's metrics (``metrics.render()``: the Prometheus exposition)."""
        return self._metrics

    @property
    def feed(self) -> Feed:
        """What happens on the cluster, for watchers: ``await feed.subscribe(kinds)``;
        parts of the hub ``feed.publish(kind, data)`` (docs/guide.md, The feed)."""
        return self._feed

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

    @property
    def connected_count(self) -> int:
        """Agents connected to this hub (``list_connected_agents`` covers the cluster)."""
        return len(self._connections)

    @property
    def accepting(self) -> bool:
        """True while the hub takes agents and commands: listening, not draining or
        closed (``/readyz`` adds the store's reachability)."""
        return self._listening and not self._draining and not self._closed

    @property
    def bus_status(self) -> str | None:
        """The cluster bus: ``ok``, ``deaf`` (not known to deliver), or None when
        the hub is alone (``/healthz``)."""
        if self._cluster is None:
            return None
        return "deaf" if self._cluster.deaf else "ok"

    # -- the emitter (docs/guide.md: hub.on, hub.once, hub.off) -----------------------------
    def on(self, key: str, handler: Handler | None = None) -> Any:
        """Register ``handler`` for ``key``; usable as a decorator when ``handler`` is omitted."""
        return self._emitter.on(key, handler)

    def once(self, key: str, handler: Handler) -> Handler:
        return self._emitter.once(key, handler)

    def off(self, key: str, handler: Handler | None = None) -> None:
        """Remove ``handler`` (every handler of ``key`` when omitted)."""
        self._emitter.off(key, handler)

    # -- commands -------------------------------------------------------------------
    def execute_on_agent(
        self,
        agent_id: str,
        command_key: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        group: str | bool | None = None,
        drop_all_pending: bool | str = False,
        command_id: str | None = None,
        require_online: bool = False,
    ) -> CommandHandle:
        """Submit a command; returns its handle at once (docs/guide.md). (Each instance
        binds the name straight to the command path's ``submit``, see __init__.)"""
        return self._commands.submit(
            agent_id, command_key, payload, timeout=timeout, group=group,
            drop_all_pending=drop_all_pending, command_id=command_id,
            require_online=require_online)

    async def cancel_command(self, cmd_id: str) -> bool:
        """Cancel a command that is not COMPLETE; False when it already was."""
        return await self._commands.cancel(cmd_id)

    async def apply_command_response(self, cmd_id: str, result: Any) -> bool:
        """Apply a result as if its agent had sent it; ``UnknownCommand`` if not applicable."""
        await self._commands.complete(cmd_id, "ok", result=result)
        return True

    async def apply_command_error(self, cmd_id: str, error: Any) -> bool:
        """Apply a failure: a map with ``code``/``message``/``data``, or an exception."""
        await self._commands.complete(cmd_id, "error", error=_error_map(error))
        return True

    async def apply_command_progress(self, cmd_id: str, data: Any) -> bool:
        """Pass a progress update to the command's handle."""
        fut = self._commands.progress(cmd_id, data, None)
        if fut is not None:
            await fut
        return True

    async def list_pending_commands(self, agent_id: str) -> list[CommandInfo]:
        return await self._store.list_pending(agent_id)

    async def get_command(self, cmd_id: str) -> CommandInfo | None:
        return await self._store.get_command(cmd_id)

    # -- jobs (docs/fleets.md) ----------------------------------------------------
    def execute_on_agents(
        self,
        target: str | list[str] | dict[str, str],
        command_key: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        batch: int | str | None = None,
        max_failures: int | str | None = None,
        require_online: bool = False,
        job_id: str | None = None,
    ) -> JobHandle:
        """Run a command on many agents as a job; returns its handle at once.

        Argument errors raise here (``ValueError``/``TypeError``); the target is
        resolved and the job stored afterwards: ``await handle.resolved()`` gives
        the agents or raises ``NoAgentsMatched`` (and, with ``require_online``,
        ``AgentOffline`` naming the listed agents that are not connected).
        """
        return self._jobs.submit(target, command_key, payload, timeout=timeout, batch=batch,
                                 max_failures=max_failures, require_online=require_online,
                                 job_id=job_id)

    async def get_job(self, job_id: str) -> JobInfo | None:
        return await self._jobs.get_job(job_id)

    async def list_jobs(self, limit: int = 50) -> list[JobInfo]:
        """The newest jobs first (at most ``limit``, capped at 1,000)."""
        return await self._jobs.list_jobs(limit)

    async def list_job_commands(self, job_id: str) -> list[CommandInfo]:
        """The commands of the job's started parts still retained, in target order."""
        return await self._jobs.job_commands(job_id) or []

    async def follow_job(self, job_id: str) -> JobHandle | None:
        """A handle on an existing job (run here or by another hub); None when unknown."""
        return await self._jobs.follow(job_id)

    async def cancel_job(self, job_id: str) -> JobInfo | None:
        """Cancel a job's unfinished parts and skip those not started; None when
        there is no such job or it had ended (COMPLETE)."""
        return await self._jobs.cancel(job_id)

    def on_job_changed(self, listener: JobListener) -> Callable[[], None]:
        """Call ``listener(job_info)`` whenever a job this hub runs changes (created,
        a part ended, skipped, COMPLETE); returns a function removing it."""
        return self._jobs.on_job_changed(listener)
    async def list_commands(self, *, agent_id: str | None = None, key: str | None = None,
                            status: str | None = None, outcome: str | None = None,
                            job: str | None = None, limit: int = 100,
                            cursor: str | None = None) -> CommandPage:
        """Retained commands, COMPLETE or not, newest first (docs/guide.md, History):
        ``.commands`` and ``.next`` (the cursor of the next page, or None).
        Raises ``ValueError`` for an unknown status or outcome, a limit outside
        1..1000 or a malformed cursor."""
        return await self._history.list(agent_id=agent_id, key=key, status=status,
                                        outcome=outcome, job=job, limit=limit, cursor=cursor)

    # -- events -----------------------------------------------------------------
    async def emit_to(self, agent_id: str | list[str], key: str, data: Any = None, *,
                      timeout: float | None = None) -> None:
        """Send an event; resolves when every target answered ``received``.

        Agents that are away get it from their queue when they connect.
        Raises ``DeliveryTimeout`` (``.pending``: who did not receive) after
        ``timeout`` seconds (default: ``command_timeout``).
        """
        await self._events.emit_to(agent_id, key, data, timeout)

    async def broadcast(self, key: str, data: Any = None) -> int:
        """Send an event to every connected agent, without receipts; returns how many."""
        return self._events.broadcast(key, data)

    # -- agents -----------------------------------------------------------------
    async def list_connected_agents(self) -> list[AgentInfo]:
        return await self._store.list_agents()

    async def get_agent(self, agent_id: str) -> AgentInfo | None:
        return await self._store.get_agent(agent_id)

    # -- lifetime ---------------------------------------------------------------
    async def listen(self) -> None:
        """Start the store and both servers; resolves once agents can connect."""
        if self._listening:
            return
        await self._store.start()
        try:
            if self._cluster is not None and self._bus is not None:
                # Before agents can connect: a previous life's registrations go first.
                await self._cluster.start(self._bus)
            await self._agents_server.start()
            if self._admin_server is not None:
                await self._admin_server.start()
            self._jobs.start()
            self._feed.start()
            self._history.start()
            self._tasks.spawn(self._sessions.touch_forever(), name="last-seen")
        except BaseException:
            await self.close()
            raise
        self._listening = True
        if not self.auth_required:
            log.warning("agents_unauthenticated", hub_id=self.hub_id,
                        note="no agent_secret or agent_tokens: any client may connect as any "
                             "agent id")
        log.info(
            "hub_listening", hub_id=self.hub_id, engine=self.engine, port=self.port,
            admin_port=self.admin_port, auth=self.auth_required,
        )

    async def drain(self, timeout: float | None = None) -> int:
        """Stop accepting agents and submissions (``HubClosed``), then wait up to
        ``timeout`` seconds (default ``drain_timeout``) for the commands ACTIVE on
        this hub's agents to end; returns how many still are. Connected agents
        stay connected (to answer) until :meth:`close`. ``dispatcher serve`` runs
        this on SIGTERM, then ``close``."""
        timeout = self.config.drain_timeout if timeout is None else timeout
        self._draining = True
        settled = self._commands.stop_accepting()
        self._agents_server.accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        log.info("hub_draining", hub_id=self.hub_id, timeout=timeout)
        active = -1
        while True:
            settled.clear()
            try:
                now_active = await self._active_here()
            except StoreUnavailable:
                log.warning("hub_drain_store_unavailable", hub_id=self.hub_id)
                break
            if now_active != active:
                active = now_active
                if active:
                    log.info("hub_drain_waiting", hub_id=self.hub_id, active=active)
            left = deadline - loop.time()
            if not active or left <= 0:
                break
            try:
                # A command ending here sets the event; the bound re-checks the
                # store for ends seen elsewhere (another hub's sweeper, on Redis).
                async with asyncio.timeout(min(left, 1.0)):
                    await settled.wait()
            except TimeoutError:
                pass
        (log.warning if active > 0 else log.info)(
            "hub_drained", hub_id=self.hub_id, still_active=max(active, 0))
        return max(active, 0)

    async def _active_here(self) -> int:
        """Commands ACTIVE on the agents connected to this hub."""
        pending = await asyncio.gather(*(self._store.list_pending(agent_id)
                                         for agent_id in list(self._connections.by_id)))
        return sum(1 for cmds in pending for cmd in cmds if cmd.status == "ACTIVE")

    async def close(self) -> None:
        """Graceful and idempotent: stop accepting, close agents with 1001, keep the store.

        On the in-memory engine, commands not COMPLETE are lost with the
        process: their number is logged (``commands_lost``)."""
        if self._closed:
            return
        self._closed = True
        self._jobs.close()
        lost = self._store.unfinished
        if lost:
            log.warning("commands_lost", hub_id=self.hub_id, count=lost,
                        note="in-memory engine: commands not COMPLETE end with the process")
        self._commands.close()
        await self._feed.close()  # the admin API's streams end now
        await self._agents_server.close()
        if self._admin_server is not None:
            await self._admin_server.close()
        if self._cluster is not None:
            await self._cluster.close()
        self._events.close()
        await self._tasks.close()
        await self._emitter.close()
        await self._store.close()
        log.info("hub_closed", hub_id=self.hub_id)

    async def __aenter__(self) -> Dispatcher:
        await self.listen()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- internals ----------------------------------------------------------------
    def _hub_event(self, key: str, *args: Any) -> bool:
        """A hub event (agent-connected, agent-disconnected): the emitter's handlers,
        and the feed's watchers when there are any."""
        if self._feed.active and key in ("agent-connected", "agent-disconnected"):
            data = args[0].to_dict()
            if len(args) > 1:
                data["reason"] = args[1]
            self._feed.publish(key, data)
        return self._emitter.emit(key, *args)

    def _job_changed(self, info: JobInfo) -> None:
        """A job this hub runs changed: the feed's watchers learn it (``/stream``)."""
        if self._feed.active:
            self._feed.publish("job", info.to_dict())

    def _on_store_health(self, ok: bool, exc: BaseException | None) -> None:
        """The store's outage listener: ``internal.db.error`` once per outage."""
        if not ok:
            log.error("store_outage", error=str(exc))
            self._emitter.emit("internal.db.error", exc)
            return
        log.info("store_recovered")
        if not self._closed and self._cluster is not None:
            # Redis may have come back empty (no persistence), and frames may have
            # been published while this hub could not listen: catch up.
            self._cluster.recover("store_recovered")

    def _events_dropped(self) -> dict[str, int]:
        """Frames for agents not delivered, by reason (``dispatcher_events_dropped``)."""
        dropped = dict(self._events.dropped_by)
        dropped["evicted"] += self._store.frames_evicted
        dropped["expired"] += self._store.frames_expired
        return dropped

    def _levels(self) -> Levels:
        store = self._store
        return Levels(
            hub_id=self.hub_id, engine=store.engine, agents_connected=len(self._connections),
            store_up=store.healthy, commands_waiting=self._commands.waiting,
            events_awaiting_receipt=self._events.awaiting_receipt,
            events_dropped=self._events_dropped(), calls_in_flight=self._calls.in_flight,
            send_buffer_bytes=sum(s.buffered() for s in self._connections.sessions()),
            store_queue_depth=getattr(store, "queue_depth", None),
            store_counters={name: getattr(store, name, 0)
                            for name in ("round_trips", "operations", "errors", "outages")},
            cluster_sent=self._cluster.sent if self._cluster is not None else 0,
            cluster_received=self._cluster.received if self._cluster is not None else 0,
            bus_deaf=self._cluster.deaf if self._cluster is not None else None,
        )


def _error_map(error: Any) -> dict[str, Any]:
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return P.error_info(error["code"], str(error.get("message", "")), error.get("data"))
    if isinstance(error, BaseException):
        code = getattr(error, "code", None) or type(error).__name__
        return P.error_info(str(code), str(error), getattr(error, "data", None))
    return P.error_info("error", str(error))
