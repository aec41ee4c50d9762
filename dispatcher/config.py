"""``HubConfig``: every setting of a hub in one object, readable from ``DISPATCHER_*``."""

from __future__ import annotations

import dataclasses
import os
import ssl as ssl_module
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FIELDS", "PREFIX", "SECRETS", "Field", "HubConfig", "SettingError", "env_values",
           "read_secret"]

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
    # Limits (docs/security.md): each is answered by a named error or close code.
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
        for name in ("port", "admin_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"HubConfig.{name} must be a port number, 0 to 65535")
        for name in ("sweep_interval", "hub_ttl", "bus_probe_interval", "bus_probe_timeout",
                     "event_queue_ttl"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HubConfig.{name} must be positive")
        if self.drain_timeout < 0:
            raise ValueError("HubConfig.drain_timeout must be 0 or more")
        for name in ("max_send_buffer", "max_inflight_per_agent", "max_agents",
                     "max_handshakes", "max_event_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"HubConfig.{name} must be at least 1")

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
        """Read ``DISPATCHER_<FIELD>`` variables (and ``_FILE`` for secrets);
        ``overrides`` (not None) win. ``dispatcher serve`` adds a TOML file and
        flags, and refuses unknown variables (``dispatcher.settings``)."""
        values, _ = env_values(os.environ if env is None else env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# --------------------------------------------------------------------------
# Fields as text: what variables, the TOML file and flags set
# (``dispatcher.settings`` layers them). Derived from the dataclass, so a new
# field gets its variable and flag without a line written for it.

PREFIX = "DISPATCHER_"
# Values that must never be shown; each can also be read from a file.
SECRETS = frozenset({"agent_secret", "admin_token"})
# Not settable from text: a Python ``ssl.SSLContext`` (certfile/keyfile are its text form).
OBJECT_ONLY = frozenset({"ssl"})

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class SettingError(ValueError):
    """A setting that cannot be used; ``str()`` is the one line to show, naming its source."""


@dataclass(frozen=True, slots=True)
class Field:
    """One ``HubConfig`` field as the outside world sets it."""

    name: str
    kind: type  # bool, int, float or str
    optional: bool  # None is a value ("none" in text)
    mapping: bool  # a table is accepted from the TOML file (agent_tokens)
    default: Any

    @property
    def variable(self) -> str:
        return PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def secret(self) -> bool:
        return self.name in SECRETS

    def expected(self) -> str:
        what = {bool: "a boolean (true/false, 1/0, yes/no, on/off)", int: "an integer",
                float: "a number", str: "a string"}[self.kind]
        return what + (" or none" if self.optional and self.kind is not str else "")

    def parse(self, raw: Any) -> Any:
        """Text (or a TOML value) as this field's type; ``ValueError`` saying what was expected."""
        if isinstance(raw, str):
            text = raw.strip()
            if self.optional and self.kind is not str and text.lower() in ("none", ""):
                return None
            if self.kind is bool:
                if text.lower() in _TRUE:
                    return True
                if text.lower() in _FALSE:
                    return False
                raise ValueError(self.expected())
            if self.kind in (int, float):
                try:
                    return self.kind(text)
                except ValueError:
                    raise ValueError(self.expected()) from None
            return raw
        # TOML's own types
        if self.kind is bool and isinstance(raw, bool):
            return raw
        if self.kind in (int, float) and isinstance(raw, int) and not isinstance(raw, bool):
            return self.kind(raw)
        if self.kind is float and isinstance(raw, float):
            return raw
        if self.mapping and isinstance(raw, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
            return dict(raw)
        raise ValueError(self.expected() + (" or a table of strings" if self.mapping else ""))

    def value(self, raw: Any, where: str) -> Any:
        """:meth:`parse`, failing with a :class:`SettingError` that names ``where``."""
        try:
            return self.parse(raw)
        except ValueError as exc:
            raise SettingError(f"{where}: expected {exc}") from None


def _fields() -> tuple[Field, ...]:
    hints = typing.get_type_hints(HubConfig)
    out = []
    for f in dataclasses.fields(HubConfig):
        if f.name in OBJECT_ONLY:
            continue
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        rest = [a for a in args if a is not type(None)]
        mapping = any(isinstance(typing.get_origin(a), type)
                      and issubclass(typing.get_origin(a), Mapping) for a in rest)
        kinds = [a for a in rest if a in (bool, int, float, str)]
        if len(kinds) != 1:
            raise TypeError(f"HubConfig.{f.name}: no text form for {hint!r} "
                            "(give it a plain type, or add it to config.OBJECT_ONLY)")
        out.append(Field(f.name, kinds[0], type(None) in args, mapping, f.default))
    return tuple(out)


FIELDS: tuple[Field, ...] = _fields()


def env_values(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The fields that ``DISPATCHER_<FIELD>`` (or ``DISPATCHER_<SECRET>_FILE``) variables
    set, and for each the variable it came from. Raises :class:`SettingError`."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for field in FIELDS:
        raw = env.get(field.variable)
        file_var = field.variable + "_FILE"
        if field.secret and env.get(file_var):
            if raw:
                raise SettingError(f"set {field.variable} or {file_var}, not both")
            values[field.name] = read_secret(env[file_var], f"{file_var}={env[file_var]}")
            sources[field.name] = file_var
            continue
        if raw is None or raw == "":
            continue
        shown = "***" if field.secret else raw
        values[field.name] = field.value(raw, f"{field.variable}={shown}")
        sources[field.name] = field.variable
    return values, sources


def read_secret(path: str, where: str) -> str:
    """A secret kept in a file: its whole text, surrounding whitespace removed."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingError(f"{where}: cannot read the file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SettingError(f"{where}: the file is not UTF-8 text") from None
    if not text:
        raise SettingError(f"{where}: the file is empty")
    return text
