"""Where a hub's settings come from: defaults, a TOML file, ``DISPATCHER_*``, flags.

Lowest to highest precedence: ``HubConfig``'s defaults, the TOML file
(``--config FILE`` or ``DISPATCHER_CONFIG``; its keys are ``HubConfig``'s field
names), ``DISPATCHER_<FIELD>`` environment variables, command-line flags.
Everything here is derived from the ``HubConfig`` dataclass (fields, types,
defaults), so a new field gets its variable, file key and flag without a line
written for it. Secrets may come from files (``DISPATCHER_<FIELD>_FILE``,
``<field>_file`` in the TOML file) and are never shown: not in errors, not in
``dispatcher config``.

Every mistake is one :class:`SettingError` whose message names where the
value came from (file and key, variable, or flag) and what was expected.
"""

from __future__ import annotations

import difflib
import re
import ssl
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent_client.proctitle import without_password

from .config import (
    FIELDS,
    PREFIX,
    SECRETS,
    HubConfig,
    SettingError,
    env_values,
    read_secret,
)
from .transport import load_tokens

__all__ = ["CONFIG_VARIABLE", "FLAG_ALIASES", "HELP", "Resolved", "known_variables", "masked",
           "resolve"]

# Variables of this prefix belong to the project's test suite, not to the hub.
TEST_PREFIX = "DISPATCHER_TEST_"
CONFIG_VARIABLE = "DISPATCHER_CONFIG"
# Flags kept under an older, documented name as well as the field's own.
FLAG_ALIASES: dict[str, tuple[str, ...]] = {"redis_url": ("--redis",)}

_BY_NAME = {f.name: f for f in FIELDS}

# What each flag's --help says (a field missing here shows its name and default).
HELP: dict[str, str] = {
    "host": "Interface for agents and the admin API.",
    "port": "Agents' WebSocket port.",
    "admin_host": "Interface of the admin API (unset: the same as --host).",
    "admin_port": "Admin HTTP API port (0: any free port; none: no admin API).",
    "redis_url": "Redis URL; without it the in-memory engine runs.",
    "prefix": "Redis key prefix.",
    "hub_id": "This hub's id (random when unset).",
    "heartbeat": "Seconds between pings; two without an answer drop the agent.",
    "hello_timeout": "Seconds an agent has to say hello.",
    "command_timeout": "Default command timeout, seconds.",
    "retention": "Seconds COMPLETE commands stay readable.",
    "max_retained": "COMPLETE commands kept by the in-memory engine.",
    "max_frame": "Largest frame, bytes.",
    "agent_secret": "Secret that derives agent tokens (HMAC-SHA256). Prefer the _FILE variable.",
    "agent_tokens": "File of 'AGENT_ID TOKEN' lines.",
    "admin_token": "Bearer token the admin API requires. Prefer the _FILE variable.",
    "certfile": "TLS certificate (PEM) for both ports.",
    "keyfile": "TLS private key (PEM).",
    "max_send_buffer": "Bytes buffered per connection before a reader that does not read is "
                       "dropped.",
    "max_inflight_per_agent": "Commands not COMPLETE per agent.",
    "max_agents": "Agents connected to this hub (more: HTTP 503).",
    "max_handshakes": "Connections still in their handshake (more: HTTP 503).",
    "max_control_rate": "Ping/Pong frames per second per connection (0: no limit).",
    "max_frame_rate": "Frames per second per connection (0: no limit).",
    "rate_limit_grace": "Seconds over the frame rate before the close (1008).",
    "max_event_queue": "Events queued per offline agent.",
    "event_queue_ttl": "Seconds a queued event waits for its agent.",
    "max_offline_queues": "Agents with events queued, all together.",
    "max_offline_bytes": "Bytes of queued events, all together (in-memory engine).",
    "sweep_interval": "Seconds between looks for overdue commands.",
    "hub_ttl": "Seconds after which a silent hub counts as dead (Redis).",
    "bus_probe_interval": "Seconds between loopback probes through Redis pub/sub.",
    "bus_probe_timeout": "Seconds after which a missing probe means the bus is deaf.",
    "drain_timeout": "Seconds SIGTERM waits for running commands before closing.",
    "redis_fast_path": "Read Redis replies straight from hiredis when possible.",
    "redis_max_queued": "Redis operations waiting for a write; more fail at once.",
    "ws_fast_path": "The websockets fast path, when the installed release allows it.",
}


@dataclass(frozen=True, slots=True)
class Resolved:
    """The effective configuration and, per field, where its value came from."""

    config: HubConfig
    sources: dict[str, str]  # field -> "default", "FILE: key", "VARIABLE", "--flag"


def known_variables(extra: Iterable[str] = ()) -> set[str]:
    """Every ``DISPATCHER_*`` variable the hub reads (``extra``: the other programs')."""
    names = {f.variable for f in FIELDS}
    names |= {PREFIX + s.upper() + "_FILE" for s in SECRETS}
    names.add(CONFIG_VARIABLE)
    names.update(extra)
    return names


def resolve(
    *,
    file: str | None = None,
    env: Mapping[str, str],
    flags: Mapping[str, Any] | None = None,
    known: Iterable[str] = (),
    strict: bool = True,
) -> Resolved:
    """The configuration from the four layers; raises :class:`SettingError`.

    ``file``: the TOML file (else ``DISPATCHER_CONFIG``, else none). ``flags``:
    field -> value given on the command line (None: not given), already typed
    for booleans, text otherwise. ``known``: ``DISPATCHER_*`` variables other
    programs read (the CLI client's, the agent's), not errors. ``strict``:
    refuse unknown variables.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {f.name: "default" for f in FIELDS}
    raw: dict[str, Any] = {}  # as written, for messages
    named_by = f"--config {file}"
    if file is None and env.get(CONFIG_VARIABLE):
        file = env[CONFIG_VARIABLE]
        named_by = f"{CONFIG_VARIABLE}={file}"
    if file is not None:
        raw.update(_from_file(file, named_by, values, sources))
    _from_env(env, values, sources, known_variables(known), strict)
    raw.update({n: env[_BY_NAME[n].variable] for n, src in sources.items()
                if src == _BY_NAME[n].variable})
    for name, raw_flag in (flags or {}).items():
        if raw_flag is None:
            continue
        field = _BY_NAME[name]
        where = f"{field.flag} {'***' if field.secret else raw_flag}"
        values[name] = field.value(raw_flag, where)
        sources[name] = field.flag
        raw[name] = raw_flag
    try:
        config = HubConfig(**values)
    except (ValueError, TypeError) as exc:
        raise _checked(exc, {**values, **raw}, sources) from None
    _check_files(config, {**values, **raw}, sources)
    return Resolved(config, sources)


def _from_file(path: str, named_by: str, values: dict[str, Any], sources: dict[str, str]
               ) -> dict[str, Any]:
    """Read the TOML file into ``values``; returns the values as written."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SettingError(f"{named_by}: cannot read the file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingError(f"{named_by}: not valid TOML: {exc}") from None
    file_keys = {s + "_file" for s in SECRETS}
    written: dict[str, Any] = {}
    for key, raw in data.items():
        where = f"{path}: key '{key}'"
        if key in file_keys:
            name = key.removesuffix("_file")
            if name in data:
                raise SettingError(f"{path}: set '{name}' or '{key}', not both")
            if not isinstance(raw, str):
                raise SettingError(f"{where}: expected a file name (a string)")
            values[name] = read_secret(raw, where)
            sources[name] = f"{path}: {key}"
            continue
        field = _BY_NAME.get(key)
        if field is None:
            raise SettingError(f"{where}: unknown key{_did_you_mean(key, _file_keys())}")
        shown = "***" if field.secret else repr(raw)
        values[key] = field.value(raw, f"{where} = {shown}")
        sources[key] = f"{path}: {key}"
        written[key] = raw
    return written


def _from_env(env: Mapping[str, str], values: dict[str, Any], sources: dict[str, str],
              known: set[str], strict: bool) -> None:
    if strict:
        for name in sorted(env):
            if name.startswith(PREFIX) and name not in known \
                    and not name.startswith(TEST_PREFIX):
                raise SettingError(f"unknown variable {name}"
                                   f"{_did_you_mean(name, sorted(known))}")
    found, where = env_values(env)
    values.update(found)
    sources.update(where)


_CHECK = re.compile(r"HubConfig\.(\w+) (.*)")


def _checked(exc: Exception, values: Mapping[str, Any], sources: Mapping[str, str]
             ) -> SettingError:
    """HubConfig's own range checks ("HubConfig.heartbeat must be positive") with the
    place the value came from."""
    found = _CHECK.search(str(exc))
    if found is None or found.group(1) not in _BY_NAME:
        return SettingError(f"configuration: {exc}")
    name, problem = found.groups()
    return SettingError(f"{_where(name, values, sources)}: {problem}")


def _where(name: str, values: Mapping[str, Any], sources: Mapping[str, str]) -> str:
    """Where a value came from, as an error message starts: ``--port 70000``,
    ``DISPATCHER_PORT=70000``, ``hub.toml: key 'port' = 70000``, ``port (default 8080)``."""
    field = _BY_NAME[name]
    source = sources.get(name, "default")
    value = values.get(name, field.default)
    shown = "***" if field.secret else str(value)
    if source == "default":
        return f"{name} (default {shown})"
    if source.startswith("--"):
        return f"{source} {shown}"
    if ": " in source:  # a file and its key
        path, _, key = source.partition(": ")
        return f"{path}: key '{key}' = {'***' if field.secret else repr(value)}"
    return f"{source}={shown}"


def _check_files(config: HubConfig, values: Mapping[str, Any],
                 sources: Mapping[str, str]) -> None:
    """The files the settings name can be read: the agent tokens, the certificate and
    its key (read now, so that a mistake stops the hub before anything listens)."""
    if isinstance(config.agent_tokens, str):
        try:
            load_tokens(config.agent_tokens)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problem = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise SettingError(f"{_where('agent_tokens', values, sources)}: "
                               f"cannot use the tokens file: {problem}") from None
    if config.keyfile and not config.certfile:
        raise SettingError(f"{_where('keyfile', values, sources)}: needs certfile too")
    if config.certfile and config.ssl is None:
        try:
            config.ssl_context()
        except (OSError, ssl.SSLError) as exc:
            problem = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
            raise SettingError(f"{_where('certfile', values, sources)}: cannot load the "
                               f"certificate and key: {problem}") from None


def _file_keys() -> list[str]:
    return [f.name for f in FIELDS] + [s + "_file" for s in sorted(SECRETS)]


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def masked(name: str, value: Any) -> str:
    """A value as ``dispatcher config`` shows it: secrets as ``***``."""
    if value is None:
        return "none"
    if name in SECRETS:
        return "***"
    if isinstance(value, Mapping):
        return f"<{len(value)} agent tokens>"
    if name == "redis_url" and isinstance(value, str):
        return without_password(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
