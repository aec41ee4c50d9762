"""``HubConfig``: every setting of a hub in one object, readable from ``DISPATCHER_*``."""

from __future__ import annotations

import dataclasses
import os
import ssl as ssl_module
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["HubConfig"]

MiB = 1024 * 1024


@dataclass(slots=True, frozen=True)
class HubConfig:
    """Settings of one hub. Times are seconds, sizes bytes.

    Every field can be set from the environment as ``DISPATCHER_<FIELD>``
    (``HubConfig.from_env()``); the command line maps its flags one to one.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    admin_host: str | None = None  # None: same as host
    admin_port: int | None = 8081  # None: no admin server; 0: any free port
    redis_url: str | None = None  # None: in-memory engine
    prefix: str = "dispatcher"
    hub_id: str | None = None  # random when unset
    heartbeat: float = 20.0
    hello_timeout: float = 10.0
    command_timeout: float = 60.0
    retention: float = 3600.0
    max_retained: int = 1_000_000  # COMPLETE commands kept, in-memory engine (oldest go first)
    max_frame: int = 1 * MiB
    agent_secret: str | None = None
    agent_tokens: Mapping[str, str] | str | None = None  # mapping, or a file of "id token" lines
    admin_token: str | None = None
    ssl: ssl_module.SSLContext | None = None
    certfile: str | None = None
    keyfile: str | None = None
    # Limits (API.md, Security): each is answered by a named error or close code.
    max_send_buffer: int = 4 * MiB  # per connection; a reader that does not read is dropped
    max_inflight_per_agent: int = 10_000  # commands not COMPLETE per agent
    max_agents: int = 100_000  # connected agents on this hub (more: HTTP 503)
    # Connections in their handshake, waiting for a turn included (more: HTTP 503).
    max_handshakes: int = 10_000
    # Handshakes worked on at once (upgrade to hello answered); the others wait
    # their turn, at most hello_timeout, before the upgrade (docs/guide.md).
    handshake_concurrency: int = 64
    max_control_rate: float = 100.0  # Ping/Pong frames/s per connection (0: no limit; fast path)
    max_frame_rate: float = 20_000.0  # frames/s per connection (0: no limit)
    rate_limit_grace: float = 5.0  # seconds over max_frame_rate before the close (1008)
    max_job_agents: int = 10_000  # agents one job may target (more: refused at submission)
    max_event_queue: int = 1000  # events queued per offline agent
    event_queue_ttl: float = 3600.0  # how long a queued event waits for its agent
    # All agents' queues together (the oldest go first): an agent can send events
    # to any id, so without these, never-seen ids would each keep a queue.
    max_offline_queues: int = 10_000  # agents with frames queued
    max_offline_bytes: int = 64 * MiB  # bytes of queued frames (in-memory engine)
    # Operations
    sweep_interval: float = 1.0  # how often overdue commands are looked for in the store
    hub_ttl: float = 5.0  # a hub whose alive key is this old is dead (shared stores)
    bus_probe_interval: float = 2.0  # loopback probes through the cluster bus
    bus_probe_timeout: float = 5.0  # a probe this late means the bus is deaf
    drain_timeout: float = 10.0  # bounded graceful shutdown
    # Admin event streams (SSE): a comment line at least this often, and the items
    # one reader may fall behind before it is dropped.
    stream_keepalive: float = 15.0
    stream_buffer: int = 1000
    # Redis engine (docs/redis.md)
    redis_fast_path: bool = True  # read replies straight from hiredis when the check allows
    redis_max_queued: int = 100_000  # operations waiting for a write; more fail at once
    # The websockets fast path (dispatcher.ws_fastpath), used when the installed
    # websockets has the internals it needs; off: websockets' public API only.
    ws_fast_path: bool = True

    def __post_init__(self) -> None:
        for name in ("heartbeat", "hello_timeout", "command_timeout", "retention",
                     "rate_limit_grace", "stream_keepalive"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HubConfig.{name} must be positive")
        if self.max_frame_rate != 0 and self.max_frame_rate < 1:
            raise ValueError("HubConfig.max_frame_rate must be 0 (no limit) or at least 1")
        if self.max_control_rate != 0 and self.max_control_rate < 1:
            raise ValueError("HubConfig.max_control_rate must be 0 (no limit) or at least 1")
        if self.max_retained < 0:
            raise ValueError("HubConfig.max_retained must be 0 or more")
        if self.max_frame < 1024:
            raise ValueError("HubConfig.max_frame must be at least 1024 bytes")
        for name in ("max_offline_queues", "max_offline_bytes", "stream_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"HubConfig.{name} must be at least 1")
        if self.max_job_agents < 1:
            raise ValueError("HubConfig.max_job_agents must be at least 1")
        if self.handshake_concurrency < 1:
            raise ValueError("HubConfig.handshake_concurrency must be at least 1")
        if self.redis_max_queued < 1:
            raise ValueError("HubConfig.redis_max_queued must be at least 1")
        if not self.prefix or any(c in self.prefix for c in " \t\r\n"):
            raise ValueError("HubConfig.prefix must be a non-empty word")

    def ssl_context(self) -> ssl_module.SSLContext | None:
        """The TLS context for both ports: ``ssl`` if given, else built from cert/key files."""
        if self.ssl is not None:
            return self.ssl
        if self.certfile:
            ctx = ssl_module.create_default_context(ssl_module.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(self.certfile, self.keyfile)
            return ctx
        return None

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> HubConfig:
        """Read ``DISPATCHER_<FIELD>`` variables; ``overrides`` (not None) win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "ssl":
                continue
            raw = env.get(f"DISPATCHER_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.name, str(f.type), raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _convert(name: str, type_name: str, raw: str) -> Any:
    if type_name == "bool":
        word = raw.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ValueError(f"DISPATCHER_{name.upper()}={raw!r} is not a boolean "
                         "(use 0/1, true/false, yes/no or on/off)")
    try:
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
    except ValueError:
        raise ValueError(f"DISPATCHER_{name.upper()}={raw!r} is not a number") from None
    return raw
