"""The admin HTTP API (aiohttp) on ``admin_port``: health, metrics, agents, commands, jobs,
events.

docs/admin-api.md. Every route is one row of :data:`ROUTES` (method,
path, handler, request-body schema, response schemas, summary): the server
registers its handlers from that table and ``GET /openapi.json`` is generated
from the same rows, so the document cannot drift from what is served.
Request bodies are checked against their declared schema (a small validator
for the JSON-schema subset used here) before a handler runs; every error is
``{"error": {"code", "message"}}`` with a fitting status, never a bare 500.

With ``admin_token`` set, every route except the probes (``/healthz``,
``/livez``, ``/readyz``) and ``/openapi.json`` (a description, no data) needs
``Authorization: Bearer TOKEN``, compared in constant time; ``/metrics`` needs it too (Prometheus
sends it with ``authorization: {credentials: TOKEN}`` in its scrape config).

Payloads travel as msgpack and may hold what JSON cannot: bytes are shown as
base64 strings, non-finite floats as strings, map keys as strings.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from agent_client import protocol as P

from . import dashboard
from .errors import (
    AgentOffline,
    CommandCancelled,
    CommandFailed,
    CommandTimeout,
    DeliveryTimeout,
    DispatcherError,
    HubClosed,
    NoAgentsMatched,
    StoreUnavailable,
    TooManyCommands,
)
from .feed import CLUSTER_KINDS, Subscription
from .history import MAX_LIMIT
from .models import JOB_COUNT_KEYS, STATUSES, TERMINAL_OUTCOMES, CommandInfo, JobInfo
from .sse import OnItem, OnOpen, SseStream, serve

if TYPE_CHECKING:
    from .hub import Dispatcher

__all__ = ["ROUTES", "AdminServer", "ApiError", "Route", "jsonable", "openapi_document",
           "validate"]

log = structlog.get_logger(__name__)

JSON = dict[str, Any]
Handler = Callable[["AdminServer", web.Request, Any], Awaitable[web.StreamResponse]]

# Longest wait a request may ask for (a command or an event receipt): a year.
MAX_TIMEOUT = 365 * 24 * 3600.0


class ApiError(Exception):
    """Answered as ``{"error": {"code", "message", **extra}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def response(self, headers: Mapping[str, str] | None = None) -> web.Response:
        return _json({"error": {"code": self.code, "message": self.message, **self.extra}},
                     self.status, headers)


# --------------------------------------------------------------------------
# JSON out: what msgpack carries that JSON does not.

# Agent-provided values (a hello's ``meta``, a command's result) are rendered
# at most this deep; a deeper subtree becomes a string saying so. The hub
# refuses deeper metas at hello (protocol.MAX_META_DEPTH), but results, and
# metas an older hub stored, may nest up to msgpack's own limit: rendering
# (and json.dumps after it) must never recurse that far.
MAX_JSON_DEPTH = 64
TOO_DEEP = f"<nested deeper than {MAX_JSON_DEPTH} levels>"


def jsonable(value: Any, _depth: int = 0) -> Any:
    """``value`` with bytes as base64 strings, non-finite floats and odd keys as strings,
    and subtrees deeper than ``MAX_JSON_DEPTH`` as the string ``TOO_DEEP``."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict | list | tuple):
        if _depth >= MAX_JSON_DEPTH:
            return TOO_DEEP
        depth = _depth + 1
        if isinstance(value, dict):
            return {_json_key(k): jsonable(v, depth) for k, v in value.items()}
        return [jsonable(v, depth) for v in value]
    return str(value)  # e.g. a msgpack Timestamp or ExtType


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        return base64.b64encode(key).decode("ascii")
    return json.dumps(key) if isinstance(key, bool | int | float | None) else str(key)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _json(value: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(value, status=status, headers=headers, dumps=_dumps)


# --------------------------------------------------------------------------
# JSON in: a validator for the JSON-schema subset the route table uses.

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
}


def validate(schema: JSON, value: Any, where: str = "body") -> None:
    """Raise ``ApiError(400)`` naming the first place where ``value`` breaks ``schema``.

    Supports ``type`` (one or a list), ``enum``, ``properties``, ``required``,
    ``additionalProperties: false``, ``items``, ``minLength``/``maxLength``,
    ``pattern`` (the whole string must match), ``minimum``/``maximum`` and
    ``exclusiveMinimum``: what :data:`ROUTES` uses, nothing more. Other
    keywords (``$ref``, ``anyOf``) only document; a payload msgpack cannot
    carry is refused by the encoder instead, with a 400 too.
    """
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_TYPES[name](value) for name in names):
            raise ApiError(400, "bad_request", f"{where}: must be {' or '.join(names)}, "
                           f"not {_json_type(value)}")
    if "enum" in schema and value not in schema["enum"]:
        raise ApiError(400, "bad_request", f"{where}: must be one of {schema['enum']}")
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                raise ApiError(400, "bad_request", f"{where}: not valid Unicode") from None
        if len(value) < schema.get("minLength", 0):
            raise ApiError(400, "bad_request", f"{where}: must not be empty"
                           if schema["minLength"] == 1 else
                           f"{where}: needs at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise ApiError(400, "bad_request",
                           f"{where}: at most {schema['maxLength']} characters")
        if "pattern" in schema and _pattern(schema["pattern"]).fullmatch(value) is None:
            raise ApiError(400, "bad_request", f"{where}: must match {schema['pattern']}")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise ApiError(400, "bad_request", f"{where}: must be >= {schema['minimum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            raise ApiError(400, "bad_request", f"{where}: must be > {schema['exclusiveMinimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise ApiError(400, "bad_request", f"{where}: must be <= {schema['maximum']}")
    elif isinstance(value, dict):
        for name in schema.get("required", ()):
            if name not in value:
                raise ApiError(400, "bad_request", f"{where}: '{name}' is required")
        props: JSON = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            unknown = [k for k in value if k not in props]
            if unknown:
                raise ApiError(400, "bad_request", f"{where}: unknown field '{unknown[0]}' "
                               f"(fields: {', '.join(props)})")
        for name, sub in props.items():
            if name in value:
                validate(sub, value[name], f"{where}.{name}" if where != "body" else name)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            validate(schema["items"], item, f"{where}[{i}]")


@functools.cache
def _pattern(pattern: str) -> re.Pattern[str]:
    # Patterns here are anchored ^...$; Python's $ would also accept a final newline.
    return re.compile(pattern.removeprefix("^").removesuffix("$"))


def _json_type(value: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _TYPES[name](value):
            return name
    return type(value).__name__


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _read_json(request: web.Request, schema: JSON) -> Any:
    raw = await request.read()  # aiohttp answers 413 past client_max_size
    if not raw.strip():
        raise ApiError(400, "bad_json", "a JSON body is required")
    try:
        body = json.loads(raw, parse_constant=_no_constants)
        # \ud800 escapes decode to lone surrogates, which no agent could receive.
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ApiError(400, "bad_json", "strings must be valid Unicode (a lone "
                       "surrogate escape such as \\ud800 is not)") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
    validate(schema, body)
    return body


# --------------------------------------------------------------------------
# The route table.

@dataclass(frozen=True, slots=True)
class Answer:
    """One documented response: a description and the schema of its JSON body."""

    description: str
    schema: JSON | None = None
    content_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class Route:
    """One operation of the admin API: served by ``handler``, documented from the rest."""

    method: str
    path: str
    handler: Handler
    name: str  # operationId
    summary: str
    responses: Mapping[int, Answer]
    body: JSON | None = None
    params: Mapping[str, JSON] = field(default_factory=dict)
    query: Mapping[str, JSON] = field(default_factory=dict)  # optional query parameters
    description: str = ""
    auth: bool = True
    tag: str = "hub"


def _ref(name: str) -> JSON:
    return {"$ref": f"#/components/schemas/{name}"}


ANY_VALUE: JSON = {"description": "Any JSON value; msgpack bytes appear as base64 strings, "
                   "non-finite floats as strings."}
# What a request may carry to an agent: JSON that msgpack can encode (integers of
# at most 64 bits). The validator leaves it to the encoder, which answers 400.
VALUE: JSON = {"$ref": "#/components/schemas/Value"}
AGENT_ID: JSON = {"title": "agent id", "type": "string", "pattern": "^[A-Za-z0-9._:@-]{1,128}$",
                  "minLength": 1, "maxLength": P.MAX_ID_LENGTH,
                  "description": "1 to 128 characters of A-Z a-z 0-9 . _ : @ -"}
COMMAND_ID: JSON = {"title": "command id", "type": "string", "minLength": 1,
                    "description": "A command id."}
KEY: JSON = {"type": "string", "minLength": 1, "maxLength": P.MAX_KEY_LENGTH}
TIMEOUT: JSON = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT}

SCHEMAS: dict[str, JSON] = {
    "Value": {
        "description": "Any JSON value msgpack can carry to the agent: numbers between "
        "-2^63 and 2^64-1, strings, booleans, null, and arrays and objects of these.",
        "anyOf": [
            {"type": ["null", "boolean", "string"]},
            {"type": "number", "minimum": -(2**63), "maximum": 2**64 - 1},
            {"type": "array", "items": VALUE},
            {"type": "object", "additionalProperties": VALUE},
        ],
    },
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "A short snake_case word."},
                "message": {"type": "string"},
                "command_id": {"type": "string", "description": "With code 'timeout'."},
                "pending": {"type": "array", "items": {"type": "string"},
                            "description": "With 'delivery_timeout': agents that did not "
                            "receive the event."},
            }}},
    },
    "AgentInfo": {
        "type": "object",
        "required": ["id", "hub_id", "session", "connected_at", "last_seen", "meta"],
        "properties": {
            "id": {"type": "string"},
            "hub_id": {"type": "string", "description": "The hub it is connected to."},
            "session": {"type": "string"},
            "connected_at": {"type": "integer", "description": "Unix milliseconds."},
            "last_seen": {"type": "integer", "description": "Unix milliseconds."},
            "meta": {"type": "object", "description": "What the agent sent in its hello; "
                     "bytes as base64 strings."},
        },
    },
    "CommandInfo": {
        "type": "object",
        "required": ["id", "agent_id", "key", "status", "outcome", "group", "ts", "updated",
                     "payload", "result", "error"],
        "properties": {
            "id": {"type": "string"},
            "agent_id": {"type": "string"},
            "key": {"type": "string"},
            "status": {"type": "string", "enum": ["PENDING", "ACTIVE", "COMPLETE"]},
            "outcome": {"type": ["string", "null"],
                        "enum": [None, "ok", "error", "timeout", "cancelled", "dropped",
                                 "skipped"],
                        "description": "null until COMPLETE; 'skipped' only in a job's "
                        "results, for an agent whose part never started."},
            "group": {"type": ["string", "null"]},
            "ts": {"type": "integer", "description": "Submitted, unix milliseconds."},
            "updated": {"type": "integer", "description": "Last change, unix milliseconds."},
            "deadline": {"type": ["integer", "null"], "description": "Unix milliseconds."},
            "origin": {"type": "string", "description": "The hub that submitted it."},
            "job": {"type": ["string", "null"],
                    "description": "The job this command is an agent's part of."},
            "payload": ANY_VALUE,
            "result": {**ANY_VALUE, "description": "The agent's answer when outcome is "
                       "'ok' (bytes as base64 strings)."},
            "error": {"type": ["object", "null"], "required": ["code", "message"],
                      "properties": {"code": {"type": "string"},
                                     "message": {"type": "string"}, "data": ANY_VALUE},
                      "description": "Set for outcomes error, timeout and cancelled."},
        },
    },
    "JobInfo": {
        "type": "object",
        "required": ["id", "key", "payload", "target", "agents", "status", "counts", "ts",
                     "updated", "batch", "max_failures", "origin"],
        "properties": {
            "id": {"type": "string"},
            "key": {"type": "string"},
            "payload": ANY_VALUE,
            "target": {**ANY_VALUE, "description": "The target as submitted: an id, a list "
                       "of ids, a glob, or a selector object."},
            "agents": {"type": "array", "items": {"type": "string"},
                       "description": "The targeted agents, in rollout order."},
            "status": {"type": "string", "enum": ["RUNNING", "COMPLETE"]},
            "counts": {"type": "object", "required": list(JOB_COUNT_KEYS),
                       "additionalProperties": {"type": "integer", "minimum": 0},
                       "description": "Parts by state: pending (not started), active "
                       "(started, not ended), skipped, and ended by outcome."},
            "ts": {"type": "integer", "description": "Submitted, unix milliseconds."},
            "updated": {"type": "integer", "description": "Last change, unix milliseconds."},
            "batch": {"type": ["integer", "null"], "minimum": 1},
            "max_failures": {"type": ["integer", "null"], "minimum": 0},
            "origin": {"type": "string", "description": "The hub running the rollout."},
            "commands": {"type": "array", "items": _ref("CommandInfo"),
                         "description": "GET /jobs/{id} only: the started parts' commands."},
        },
    },
    "Health": {
        "type": "object", "required": ["status", "engine", "hub", "agents"],
        "properties": {
            "status": {"type": "string",
                       "enum": ["ok", "store_unavailable", "bus_deaf", "not_accepting"],
                       "description": "not_accepting: /readyz only, while the hub starts "
                       "or drains."},
            "engine": {"type": "string", "enum": ["memory", "redis"]},
            "hub": {"type": "string"},
            "agents": {"type": "integer", "minimum": 0,
                       "description": "Agents connected to this hub."},
            "bus": {"type": "string", "enum": ["ok", "deaf"],
                    "description": "Redis engine: whether this hub hears the cluster "
                    "channels (deaf: 503 until its subscriber is rebuilt)."},
        },
    },
}

EXEC_BODY: JSON = {
    "type": "object", "required": ["key"], "additionalProperties": False,
    "properties": {
        "key": {**KEY, "description": "The command key the agent registered."},
        "payload": VALUE,
        "timeout": {**TIMEOUT, "description": "Seconds; default: the hub's command_timeout."},
        "group": {"type": ["string", "boolean"], "minLength": 1, "maxLength": 256,
                  "description": "Coalescing group; true means agent + key."},
        "command_id": {"type": "string", "minLength": 1, "maxLength": P.MAX_ID_LENGTH,
                       "description": "Caller-chosen id: submitting it again returns the "
                       "existing command (idempotent)."},
        "wait": {"type": "boolean", "default": True,
                 "description": "true: answer when the command is finished; false: answer "
                 "202 once it is stored."},
        "require_online": {"type": "boolean", "default": False,
                           "description": "true: answer 409 agent_offline when the agent "
                           "is not connected, instead of letting the command wait."},
    },
}
EMIT_BODY: JSON = {
    "type": "object", "required": ["key"], "additionalProperties": False,
    "properties": {
        "key": KEY, "data": VALUE,
        "timeout": {**TIMEOUT, "description": "Seconds to wait for the receipt; default: "
                    "the hub's command_timeout."},
    },
}
BROADCAST_BODY: JSON = {
    "type": "object", "required": ["key"], "additionalProperties": False,
    "properties": {"key": KEY, "data": VALUE},
}

# Patterns of the targets the hub accepts (dispatcher/targets.py parses them).
_ID = "[A-Za-z0-9._:@-]{1,128}"
_PAIR = _ID + "=[^,\\s][^,]{0,255}"
TARGET_STRING = f"^({_ID}(,{_ID})*|[A-Za-z0-9._:@*?\\[\\]!-]{{1,128}}|{_PAIR}(,{_PAIR})*)$"
PERCENT = "^(100|[1-9][0-9]?(\\.[0-9]+)?)%$"
JOB_BODY: JSON = {
    "type": "object", "required": ["target", "key"], "additionalProperties": False,
    "properties": {
        "target": {"description": "An agent id, a list of ids ('web-1,web-2' too), a glob on "
                   "ids ('web-*'), or a selector on meta: an object or 'role=db,region=eu*' "
                   "(values may be globs; the key 'id' matches the agent id).",
                   "anyOf": [{"type": "string", "pattern": TARGET_STRING},
                             {"type": "array", "items": AGENT_ID, "minItems": 1,
                              "maxItems": 10_000},
                             {"type": "object", "minProperties": 1,
                              "propertyNames": {"pattern": f"^{_ID}$"},
                              "additionalProperties": {"type": "string", "minLength": 1,
                                                       "maxLength": 256}}]},
        "key": {**KEY, "description": "The command key the agents registered."},
        "payload": VALUE,
        "timeout": {**TIMEOUT, "description": "Seconds per command; default: the hub's "
                    "command_timeout."},
        "batch": {"anyOf": [{"type": "integer", "minimum": 1},
                            {"type": "string", "pattern": PERCENT}],
                  "description": "At most this many parts unfinished at once: a number or "
                  "a percentage of the targets such as '25%' (rounded down, at least 1)."},
        "max_failures": {"anyOf": [{"type": "integer", "minimum": 0},
                                   {"type": "string", "pattern": PERCENT}],
                         "description": "Once more parts than this ended other than ok, no "
                         "further part starts: a number or a percentage such as '10%'."},
        "require_online": {"type": "boolean", "default": False,
                           "description": "Refuse (409) when a listed agent is not connected."},
        "job_id": {"type": "string", "pattern": "^[A-Za-z0-9._:@-]{1,100}$",
                   "description": "Caller-chosen id: submitting it again returns that job."},
    },
}
SSE_EVENT: JSON = {"type": "object", "description": "One event; 'data' is JSON text.",
                   "properties": {"event": {"type": "string",
                                            "enum": ["progress", "result", "end",
                                                     "error"]},
                                  "data": {"type": "string"}}}
JOB_ID: JSON = {"title": "job id", "type": "string", "minLength": 1, "description": "A job id."}
LIMIT: JSON = {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}

E400 = Answer("Bad JSON, a bad field or a bad path parameter.", _ref("Error"))
E401 = Answer("The admin token is missing or wrong (only when the hub has one).", _ref("Error"))
E404 = Answer("Not found.", _ref("Error"))
E413 = Answer("The body is larger than the hub's max_frame.", _ref("Error"))
E503 = Answer("The store is unreachable, or the hub is closing.", _ref("Error"))
SSE = Answer("Server-Sent Events: 'event: KIND' and one 'data:' line of JSON each; a "
             "': keep-alive' comment line at least every stream_keepalive seconds (15).",
             {"type": "string"}, "text/event-stream")
FILTER: JSON = {"type": "string", "minLength": 1, "maxLength": 1024}
HISTORY_QUERY: dict[str, JSON] = {
    "agent": {**FILTER, "description": "Only this agent's commands."},
    "key": {**FILTER, "description": "Only commands with this key."},
    "status": {"type": "string", "enum": sorted(STATUSES)},
    "outcome": {"type": "string", "enum": sorted(TERMINAL_OUTCOMES)},
    "job": {**FILTER, "description": "Only the commands of this job."},
    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100},
    "cursor": {**FILTER, "description": "The 'next' of the previous page, unchanged."},
}
COMMAND_PAGE: JSON = {
    "type": "object", "required": ["commands", "next"],
    "properties": {"commands": {"type": "array", "items": _ref("CommandInfo")},
                   "next": {"type": ["string", "null"],
                            "description": "The cursor of the next (older) page; null on "
                            "the last one."}},
}


def _list(name: str) -> JSON:
    return {"type": "array", "items": _ref(name)}


# --------------------------------------------------------------------------
# Handlers (one per row of ROUTES).

async def _health(hub: Dispatcher) -> tuple[bool, JSON]:
    """Store reachability and, with Redis, whether this hub hears the cluster."""
    store = hub.store
    ok = store.healthy
    if ok:
        try:
            async with asyncio.timeout(2.0):
                await store.ping()
        except (StoreUnavailable, TimeoutError):
            ok = False
    answer: JSON = {"status": "ok" if ok else "store_unavailable", "engine": store.engine,
                    "hub": hub.hub_id, "agents": hub.connected_count}
    bus = hub.bus_status
    if bus is not None:
        # A subscriber that hears nothing (not even its own probes) loses other
        # hubs' frames: not useful, even with Redis answering.
        answer["bus"] = bus
        if ok and bus == "deaf":
            ok = False
            answer["status"] = "bus_deaf"
    return ok, answer


async def _healthz(admin: AdminServer, request: web.Request, body: Any) -> web.StreamResponse:
    """Liveness plus store reachability: 503 while the store is down."""
    ok, answer = await _health(admin.hub)
    return _json(answer, 200 if ok else 503)


async def _livez(admin: AdminServer, request: web.Request, body: Any) -> web.StreamResponse:
    """The process answers: nothing else is checked (a restart would not fix the store)."""
    return _json({"status": "ok"})


async def _readyz(admin: AdminServer, request: web.Request, body: Any) -> web.StreamResponse:
    """Ready for traffic: accepting agents and work (not starting, not draining) and the
    store reachable."""
    ok, answer = await _health(admin.hub)
    if not admin.hub.accepting:
        ok = False
        answer["status"] = "not_accepting"
    return _json(answer, 200 if ok else 503)


async def _metrics(admin: AdminServer, request: web.Request, body: Any) -> web.StreamResponse:
    return web.Response(body=admin.hub.metrics.render(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _openapi(admin: AdminServer, request: web.Request, body: Any) -> web.StreamResponse:
    return _json(admin.openapi)


async def _dashboard_page(admin: AdminServer, request: web.Request, body: Any
                          ) -> web.StreamResponse:
    return admin.dashboard.response(request, "index.html")


async def _dashboard_script(admin: AdminServer, request: web.Request, body: Any
                            ) -> web.StreamResponse:
    return admin.dashboard.response(request, "app.js")


async def _dashboard_style(admin: AdminServer, request: web.Request, body: Any
                           ) -> web.StreamResponse:
    return admin.dashboard.response(request, "app.css")


async def _agents(admin: AdminServer, request: web.Request, body: Any) -> web.StreamResponse:
    agents = await admin.hub.list_connected_agents()
    return _json([jsonable(a.to_dict()) for a in agents])


async def _agent(admin: AdminServer, request: web.Request, body: Any) -> web.StreamResponse:
    agent_id = request.match_info["id"]
    agent = await admin.hub.get_agent(agent_id)
    if agent is None:
        raise ApiError(404, "not_found", f"agent {agent_id!r} is not connected")
    return _json(jsonable(agent.to_dict()))


async def _pending(admin: AdminServer, request: web.Request, body: Any) -> web.StreamResponse:
    pending = await admin.hub.list_pending_commands(request.match_info["id"])
    return _json([_command(c) for c in pending])


async def _exec(admin: AdminServer, request: web.Request, body: Any) -> web.StreamResponse:
    hub = admin.hub
    agent_id = request.match_info["id"]
    try:
        handle = hub.execute_on_agent(
            agent_id, body["key"], body.get("payload"), timeout=body.get("timeout"),
            group=body.get("group"), command_id=body.get("command_id"),
            require_online=body.get("require_online", False),
        )
    except (ValueError, TypeError) as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    clog = log.bind(agent_id=agent_id, command_id=handle.id, key=handle.key)
    try:
        await admin.wait(handle.submitted())
    except AgentOffline as exc:
        raise ApiError(409, "agent_offline", str(exc)) from None
    clog.info("admin_command_submitted", wait=body.get("wait", True))
    if not body.get("wait", True):
        stored = await hub.get_command(handle.id)
        status = stored.status if stored is not None else "PENDING"
        return _json({"id": handle.id, "status": status}, 202)
    result: Any = None
    failure: DispatcherError | None = None
    try:
        result = await admin.wait(handle.result())
    except CommandTimeout:
        raise ApiError(504, "timeout", f"command {handle.id} timed out", command_id=handle.id
                       ) from None
    except (CommandFailed, CommandCancelled) as exc:
        failure = exc
    info = await hub.get_command(handle.id)
    if info is None:  # already gone (a retention shorter than the request)
        info = _finished(handle.id, agent_id, handle.key, result, failure)
    return _json(_command(info))


async def _get_command(admin: AdminServer, request: web.Request, body: Any
                       ) -> web.StreamResponse:
    cmd_id = request.match_info["id"]
    info = await admin.hub.get_command(cmd_id)
    if info is None:
        raise ApiError(404, "not_found", f"no command {cmd_id!r}")
    return _json(_command(info))


async def _list_commands(admin: AdminServer, request: web.Request, body: Any
                         ) -> web.StreamResponse:
    query = request.query
    unknown = sorted(set(query) - set(HISTORY_QUERY))
    if unknown:
        raise ApiError(400, "bad_request", f"unknown query parameter {unknown[0]!r} "
                       f"(parameters: {', '.join(HISTORY_QUERY)})")
    for name, value in query.items():
        if name != "limit":
            validate(HISTORY_QUERY[name], value, name)
    limit = 100
    if "limit" in query:
        try:
            limit = int(query["limit"])
        except ValueError:
            raise ApiError(400, "bad_request", "limit must be an integer from 1 to "
                           f"{MAX_LIMIT}") from None
    try:
        page = await admin.hub.list_commands(
            agent_id=query.get("agent"), key=query.get("key"), status=query.get("status"),
            outcome=query.get("outcome"), job=query.get("job"), limit=limit,
            cursor=query.get("cursor"))
    except ValueError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    return _json({"commands": [_command(c) for c in page.commands], "next": page.next})


async def stream_response(admin: AdminServer, request: web.Request, sub: Subscription,
                          on_item: OnItem, *, on_open: OnOpen | None = None,
                          on_tick: OnOpen | None = None) -> web.StreamResponse:
    """An SSE response relaying ``sub`` (``sse.serve`` with this hub's settings): what
    every stream route of this API answers with."""
    hub = admin.hub
    return await serve(request, hub.feed, sub, keepalive=hub.config.stream_keepalive,
                       encode=lambda value: _dumps(jsonable(value)), metrics=hub.metrics,
                       on_item=on_item, on_open=on_open, on_tick=on_tick)


async def _command_stream(admin: AdminServer, request: web.Request, body: Any
                          ) -> web.StreamResponse:
    hub = admin.hub
    cmd_id = request.match_info["id"]
    if await hub.get_command(cmd_id) is None:
        raise ApiError(404, "not_found", f"no command {cmd_id!r}")
    sub = await hub.feed.subscribe({"command", "progress"},
                                   match=lambda kind, data: data.get("id") == cmd_id)

    async def ended(stream: SseStream) -> bool:
        # Subscribed first, then read: a completion is seen one way or the other.
        info = await hub.get_command(cmd_id)
        if info is not None and info.status != "COMPLETE":
            return False
        await stream.send("end", None if info is None else _command(info))
        return True

    async def on_item(stream: SseStream, kind: str, data: Any) -> bool:
        if kind == "progress":
            await stream.send("progress", data.get("data"))
            return False
        if data.get("status") == "COMPLETE":
            await stream.send("end", data)
            return True
        return False

    return await stream_response(admin, request, sub, on_item, on_open=ended, on_tick=ended)


async def _cluster_stream(admin: AdminServer, request: web.Request, body: Any
                          ) -> web.StreamResponse:
    sub = await admin.hub.feed.subscribe(CLUSTER_KINDS)

    async def on_item(stream: SseStream, kind: str, data: Any) -> bool:
        await stream.send(kind, data)
        return False

    return await stream_response(admin, request, sub, on_item)


async def _cancel(admin: AdminServer, request: web.Request, body: Any) -> web.StreamResponse:
    hub = admin.hub
    cmd_id = request.match_info["id"]
    info = await hub.get_command(cmd_id)
    if info is None:
        raise ApiError(404, "not_found", f"no command {cmd_id!r}")
    if info.status == "COMPLETE" or not await hub.cancel_command(cmd_id):
        raise ApiError(409, "already_complete", f"command {cmd_id} is already COMPLETE")
    log.info("admin_command_cancelled", command_id=cmd_id, agent_id=info.agent_id)
    info = await hub.get_command(cmd_id) or info
    return _json(_command(info))


async def _emit(admin: AdminServer, request: web.Request, body: Any) -> web.StreamResponse:
    agent_id = request.match_info["id"]
    try:
        await admin.wait(admin.hub.emit_to(agent_id, body["key"], body.get("data"),
                                            timeout=body.get("timeout")))
    except (ValueError, TypeError) as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    except DeliveryTimeout as exc:
        raise ApiError(504, "delivery_timeout", str(exc), pending=exc.pending) from None
    log.info("admin_event_delivered", agent_id=agent_id, key=body["key"])
    return _json({"received": [agent_id]})


async def _broadcast(admin: AdminServer, request: web.Request, body: Any
                     ) -> web.StreamResponse:
    try:
        sent = await admin.hub.broadcast(body["key"], body.get("data"))
    except (ValueError, TypeError) as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    return _json({"agents": sent}, 202)


async def _submit_job(admin: AdminServer, request: web.Request, body: Any
                      ) -> web.StreamResponse:
    hub = admin.hub
    try:
        handle = hub.execute_on_agents(
            body["target"], body["key"], body.get("payload"), timeout=body.get("timeout"),
            batch=body.get("batch"), max_failures=body.get("max_failures"),
            require_online=body.get("require_online", False), job_id=body.get("job_id"))
        await admin.wait(handle.resolved())
    except (ValueError, TypeError) as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    except NoAgentsMatched as exc:
        raise ApiError(404, "no_agents_matched", str(exc)) from None
    except AgentOffline as exc:
        raise ApiError(409, "agent_offline", str(exc)) from None
    info = await hub.get_job(handle.id)
    if info is None:  # already gone (a retention shorter than the request)
        raise ApiError(404, "not_found", f"no job {handle.id!r}")
    log.info("admin_job_submitted", job_id=info.id, key=info.key, agents=len(info.agents))
    return _json(_job(info), 202)


async def _list_jobs(admin: AdminServer, request: web.Request, body: Any
                     ) -> web.StreamResponse:
    raw = request.query.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise ApiError(400, "bad_request", f"limit must be an integer from 1 to 1000, not {raw!r}")
    return _json([_job(j) for j in await admin.hub.list_jobs(int(raw))])


async def _found_job(admin: AdminServer, job_id: str) -> JobInfo:
    info = await admin.hub.get_job(job_id)
    if info is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    return info


async def _get_job(admin: AdminServer, request: web.Request, body: Any) -> web.StreamResponse:
    info = await _found_job(admin, request.match_info["id"])
    out = _job(info)
    out["commands"] = [_command(c) for c in await admin.hub.list_job_commands(info.id)]
    return _json(out)


async def _cancel_job(admin: AdminServer, request: web.Request, body: Any
                      ) -> web.StreamResponse:
    job_id = request.match_info["id"]
    info = await _found_job(admin, job_id)
    if info.status == "COMPLETE" or await admin.hub.cancel_job(job_id) is None:
        raise ApiError(409, "already_complete", f"job {job_id} is already COMPLETE")
    log.info("admin_job_cancelled", job_id=job_id)
    return _json(_job(await _found_job(admin, job_id)))


async def _job_stream(admin: AdminServer, request: web.Request, body: Any
                      ) -> web.StreamResponse:
    """``progress`` {agent_id, data} and ``result`` (CommandInfo) events as the job's
    parts report, then ``end`` (JobInfo), and the stream closes. The job's handle
    (run here, or followed from the store) fills a subscription of the stream's own,
    served like every other stream (``sse.serve``: bounded, keep-alives)."""
    hub = admin.hub
    job_id = request.match_info["id"]
    handle = await hub.follow_job(job_id)
    if handle is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    sub = Subscription(None, None, hub.config.stream_buffer)

    def push(kind: str, data: Any) -> bool:
        if sub.push(kind, data):
            return True
        hub.metrics.stream_dropped()
        log.warning("stream_subscriber_dropped", reason="overflow", path=request.path)
        return False

    async def progress() -> None:
        async for agent_id, data in handle.progress():
            if not push("progress", {"agent_id": agent_id, "data": data}):
                return

    async def results() -> None:
        async for info in handle.results():
            if not push("result", _command(info)):
                return

    async def follow() -> None:
        reporting = asyncio.ensure_future(progress())
        try:
            await results()
            push("end", _job(await handle))
        except DispatcherError as exc:  # the answer has begun: say it, then close
            push("error", {"code": type(exc).__name__, "message": str(exc)})
        finally:
            reporting.cancel()
            await asyncio.gather(reporting, return_exceptions=True)

    async def on_item(stream: SseStream, kind: str, data: Any) -> bool:
        await stream.send(kind, data)
        return kind in ("end", "error")

    following = asyncio.ensure_future(follow())
    try:
        return await stream_response(admin, request, sub, on_item)
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)


def _job(info: JobInfo) -> JSON:
    out: JSON = jsonable(info.to_dict())
    return out


def _command(info: CommandInfo) -> JSON:
    out: JSON = jsonable(info.to_dict())
    return out


def _finished(cmd_id: str, agent_id: str, key: str, result: Any,
              failure: DispatcherError | None) -> CommandInfo:
    outcome: Any = "ok"
    error = None
    if isinstance(failure, CommandFailed):
        outcome, error = "error", P.error_info(failure.code, failure.message, failure.data)
    elif failure is not None:
        outcome, error = "cancelled", P.error_info(P.ErrorCode.CANCELLED, str(failure))
    return CommandInfo(cmd_id, agent_id, key, "COMPLETE", outcome, result=result, error=error)


ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", _healthz, "healthz", "Liveness and store reachability",
          {200: Answer("The hub and its store answer.", _ref("Health")),
           503: Answer("The store is unreachable, or this hub does not hear the cluster "
                       "channels.", _ref("Health"))},
          auth=False, tag="operations",
          description="For load balancers: never needs the admin token."),
    Route("GET", "/livez", _livez, "livez", "Liveness: the process answers",
          {200: Answer("The hub's process answers.",
                       {"type": "object", "required": ["status"],
                        "properties": {"status": {"type": "string", "enum": ["ok"]}}})},
          auth=False, tag="operations",
          description="For a liveness probe: checks nothing else, never needs the token."),
    Route("GET", "/readyz", _readyz, "readyz", "Readiness: accepting agents and work",
          {200: Answer("Accepting agents and commands, and the store answers.",
                       _ref("Health")),
           503: Answer("Starting, draining (SIGTERM), the store is unreachable, or this hub "
                       "does not hear the cluster channels.", _ref("Health"))},
          auth=False, tag="operations",
          description="For a readiness probe or a load balancer: never needs the token."),
    Route("GET", "/metrics", _metrics, "metrics", "Prometheus metrics",
          {200: Answer("Prometheus text exposition format.", {"type": "string"},
                       "text/plain"), 401: E401},
          tag="operations", description="Every metric name starts with dispatcher_."),
    Route("GET", "/openapi.json", _openapi, "openapi", "This document",
          {200: Answer("The OpenAPI document of this API.", {"type": "object"})},
          auth=False, tag="operations"),
    Route("GET", "/", _dashboard_page, "dashboard", "The web dashboard",
          {200: Answer("The dashboard's page; it asks for the admin token when the hub has "
                       "one, and reads everything from this API.", {"type": "string"},
                       "text/html"),
           304: Answer("Not modified (If-None-Match)")},
          auth=False, tag="dashboard"),
    Route("GET", "/ui/app.js", _dashboard_script, "dashboardScript", "The dashboard's script",
          {200: Answer("JavaScript.", {"type": "string"}, "text/javascript"),
           304: Answer("Not modified (If-None-Match)")},
          auth=False, tag="dashboard"),
    Route("GET", "/ui/app.css", _dashboard_style, "dashboardStyle", "The dashboard's style",
          {200: Answer("CSS.", {"type": "string"}, "text/css"),
           304: Answer("Not modified (If-None-Match)")},
          auth=False, tag="dashboard"),
    Route("GET", "/agents", _agents, "listAgents", "Connected agents (whole cluster)",
          {200: Answer("Every connected agent.", _list("AgentInfo")), 401: E401, 503: E503}),
    Route("GET", "/agents/{id}", _agent, "getAgent", "One connected agent",
          {200: Answer("The agent.", _ref("AgentInfo")), 400: E400, 401: E401,
           404: Answer("The agent is not connected.", _ref("Error")), 503: E503},
          params={"id": AGENT_ID}),
    Route("GET", "/agents/{id}/commands", _pending, "listPendingCommands",
          "The agent's commands that are not COMPLETE, oldest first",
          {200: Answer("Pending and active commands (empty for an unknown agent).",
                       _list("CommandInfo")), 400: E400, 401: E401, 503: E503},
          params={"id": AGENT_ID}),
    Route("POST", "/agents/{id}/commands", _exec, "executeOnAgent", "Run a command on an agent",
          {200: Answer("The finished command: outcome ok, error (the agent failed it; see "
                       "'error'), cancelled or dropped.", _ref("CommandInfo")),
           202: Answer("With wait: false, once the command is stored.",
                       {"type": "object", "required": ["id", "status"],
                        "properties": {"id": {"type": "string"},
                                       "status": {"type": "string",
                                                  "enum": ["PENDING", "ACTIVE", "COMPLETE"]}}}),
           400: E400, 401: E401,
           409: Answer("With require_online: the agent is not connected (agent_offline).",
                       _ref("Error")),
           413: E413,
           429: Answer("The agent has too many commands that are not COMPLETE.",
                       _ref("Error")),
           503: E503,
           504: Answer("The command timed out (error.command_id names it).", _ref("Error"))},
          body=EXEC_BODY, params={"id": AGENT_ID},
          description="A command for an agent that is not connected waits, PENDING, until "
          "it connects or its timeout passes. By default the request waits for the outcome."),
    Route("GET", "/commands", _list_commands, "listCommands",
          "Command history: every retained command, newest first, filtered",
          {200: Answer("One page; follow 'next' for older ones (a page may be short, even "
                       "empty, with 'next' set when few commands match).", COMMAND_PAGE),
           400: Answer("An unknown status or outcome, a limit outside 1..1000, a malformed "
                       "cursor or an unknown parameter.", _ref("Error")),
           401: E401, 503: E503},
          query=HISTORY_QUERY,
          description="COMPLETE commands stay listed for the hub's retention. Filters "
          "combine with 'and'."),
    Route("GET", "/commands/{id}/stream", _command_stream, "streamCommand",
          "A command's progress, then its end, as Server-Sent Events",
          {200: SSE, 401: E401, 404: Answer("No such command.", _ref("Error")), 503: E503},
          params={"id": COMMAND_ID},
          description="'progress' events (the agent's progress data), then one 'end' event "
          "(the CommandInfo) and the stream closes; 'end' at once for a COMPLETE command."),
    Route("GET", "/stream", _cluster_stream, "streamCluster",
          "What happens on the cluster, as Server-Sent Events",
          {200: SSE, 401: E401, 503: E503},
          description="Events: agent-connected (AgentInfo), agent-disconnected (AgentInfo "
          "with reason), command (CommandInfo, when a command is created, becomes ACTIVE "
          "or completes), job (a job changed), event (an agent emitted {key, data, "
          "from}). On the Redis engine it covers every hub of the cluster."),
    Route("GET", "/commands/{id}", _get_command, "getCommand", "One command",
          {200: Answer("The command (COMPLETE ones stay readable for the hub's retention).",
                       _ref("CommandInfo")),
           401: E401, 404: Answer("No such command.", _ref("Error")), 503: E503},
          params={"id": COMMAND_ID}),
    Route("DELETE", "/commands/{id}", _cancel, "cancelCommand", "Cancel a command",
          {200: Answer("Cancelled: the command, now COMPLETE with outcome cancelled.",
                       _ref("CommandInfo")),
           401: E401, 404: Answer("No such command.", _ref("Error")),
           409: Answer("The command is already COMPLETE.", _ref("Error")), 503: E503},
          params={"id": COMMAND_ID}),
    Route("POST", "/jobs", _submit_job, "submitJob", "Run a command on many agents (a job)",
          {202: Answer("The job is stored and rolling out.", _ref("JobInfo")),
           400: E400, 401: E401,
           404: Answer("The target matched no connected agent.", _ref("Error")),
           409: Answer("require_online: a listed agent is not connected.", _ref("Error")),
           413: E413, 503: E503},
          body=JOB_BODY, tag="jobs",
          description="Listed agent ids may be offline (their parts wait, PENDING); globs "
          "and selectors match connected agents only."),
    Route("GET", "/jobs", _list_jobs, "listJobs", "Jobs, newest first",
          {200: Answer("The newest jobs.", _list("JobInfo")), 400: E400, 401: E401,
           503: E503},
          query={"limit": LIMIT}, tag="jobs"),
    Route("GET", "/jobs/{id}", _get_job, "getJob", "One job with its parts' commands",
          {200: Answer("The job, with 'commands'.", _ref("JobInfo")), 401: E401,
           404: Answer("No such job.", _ref("Error")), 503: E503},
          params={"id": JOB_ID}, tag="jobs"),
    Route("DELETE", "/jobs/{id}", _cancel_job, "cancelJob", "Cancel a job",
          {200: Answer("Cancelled: the parts not started are skipped, the unfinished ones "
                       "cancelled.", _ref("JobInfo")),
           401: E401, 404: Answer("No such job.", _ref("Error")),
           409: Answer("The job is already COMPLETE.", _ref("Error")), 503: E503},
          params={"id": JOB_ID}, tag="jobs"),
    Route("GET", "/jobs/{id}/stream", _job_stream, "streamJob", "Follow a job (SSE)",
          {200: Answer("Server-Sent Events: 'progress' {agent_id, data}, 'result' "
                       "(CommandInfo) per part as it ends, then 'end' (JobInfo) and the "
                       "stream closes; a ': keep-alive' comment line at least every 15 s.",
                       SSE_EVENT, "text/event-stream"),
           401: E401, 404: Answer("No such job.", _ref("Error")), 503: E503},
          params={"id": JOB_ID}, tag="jobs"),
    Route("POST", "/agents/{id}/events", _emit, "emitToAgent",
          "Send an event to one agent and wait for its receipt",
          {200: Answer("The agent answered 'received'.",
                       {"type": "object", "required": ["received"],
                        "properties": {"received": {"type": "array",
                                                    "items": {"type": "string"}}}}),
           400: E400, 401: E401, 413: E413, 503: E503,
           504: Answer("No receipt in time; the event stays queued for the agent.",
                       _ref("Error"))},
          body=EMIT_BODY, params={"id": AGENT_ID}, tag="events",
          description="An agent that is away gets the event from its queue when it connects."),
    Route("POST", "/events", _broadcast, "broadcast",
          "Send an event to every connected agent, without receipts",
          {202: Answer("Sent; 'agents' is how many agents it went to.",
                       {"type": "object", "required": ["agents"],
                        "properties": {"agents": {"type": "integer", "minimum": 0}}}),
           400: E400, 401: E401, 413: E413, 503: E503},
          body=BROADCAST_BODY, tag="events"),
)


def openapi_document(routes: tuple[Route, ...] = ROUTES, *, token: bool = False,
                     server: str | None = None) -> JSON:
    """The OpenAPI 3.1 document of ``routes`` (``token``: the hub requires the admin token)."""
    from . import __version__  # noqa: PLC0415 - the package imports this module

    paths: JSON = {}
    for route in routes:
        op: JSON = {"operationId": route.name, "summary": route.summary, "tags": [route.tag]}
        if route.description:
            op["description"] = route.description
        if route.params or route.query:
            op["parameters"] = [
                *({"name": name, "in": "path", "required": True, "schema": schema}
                  for name, schema in route.params.items()),
                *({"name": name, "in": "query", "required": False, "schema": schema}
                  for name, schema in route.query.items())]
        if route.body is not None:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": route.body}}}
        op["responses"] = {
            str(status): {"description": answer.description, **(
                {"content": {answer.content_type: {"schema": answer.schema}}}
                if answer.schema is not None else {})}
            for status, answer in sorted(route.responses.items())
        }
        if token:
            op["security"] = [{"bearerAuth": []}] if route.auth else []
        paths.setdefault(route.path, {})[route.method.lower()] = op
    doc: JSON = {
        "openapi": "3.1.0",
        "info": {"title": "dispatcher admin API", "version": __version__,
                 "description": "Operate a dispatcher hub: agents, commands, events. Errors "
                 "are {\"error\": {\"code\", \"message\"}}. Payloads are msgpack on the "
                 "wire: bytes appear as base64 strings in answers."},
        "paths": paths,
        "components": {"schemas": SCHEMAS, "securitySchemes": {
            "bearerAuth": {"type": "http", "scheme": "bearer",
                           "description": "The hub's admin_token."}}},
    }
    if server is not None:
        doc["servers"] = [{"url": server}]
    return doc


# --------------------------------------------------------------------------
# The server.

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden",
                 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


class AdminServer:
    """Serves the HTTP admin API of docs/admin-api.md for one hub."""

    def __init__(self, hub: Dispatcher) -> None:
        self.hub = hub
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._closing = False
        self._waiting: set[asyncio.Future[Any]] = set()
        token = hub.config.admin_token
        self._token = token.encode() if token else None
        self.openapi = openapi_document(token=self._token is not None)
        self.dashboard = dashboard.Files()
        # A body is a frame's content plus a little JSON around it.
        app = web.Application(middlewares=[self._middleware],
                              client_max_size=hub.config.max_frame + 64 * 1024)
        for route in ROUTES:
            app.router.add_route(route.method, route.path, self._endpoint(route),
                                 name=route.name)
        self.app = app

    async def start(self) -> int:
        config = self.hub.config
        # Requests still waiting at close answer 503 at once (see close), so
        # a short shutdown bound only covers a slow client reading its answer.
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     shutdown_timeout=2.0)
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
        """Idempotent: requests waiting for a command or receipt answer 503, then stop."""
        self._closing = True
        for fut in list(self._waiting):
            fut.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait(self, awaitable: Awaitable[Any]) -> Any:
        """Await a command, a receipt or a store write; 503 if the hub closes meanwhile."""
        if self._closing:
            raise ApiError(503, "hub_closed", "the hub is closing")
        fut = asyncio.ensure_future(awaitable)
        self._waiting.add(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closing and fut.cancelled() and (task is None or not task.cancelling()):
                raise ApiError(503, "hub_closed", "the hub is closing") from None
            raise
        finally:
            self._waiting.discard(fut)
            if not fut.done():
                fut.cancel()

    def _endpoint(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def endpoint(request: web.Request) -> web.StreamResponse:
            if route.auth and self._token is not None:
                self._authorize(request)
            for name, schema in route.params.items():
                validate(schema, request.match_info[name], schema.get("title", name))
            body = None if route.body is None else await _read_json(request, route.body)
            return await route.handler(self, request, body)

        return endpoint

    def _authorize(self, request: web.Request) -> None:
        assert self._token is not None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        supplied = given.strip().encode("utf-8", "replace")
        # compare_digest runs whatever the scheme, so timing tells nothing.
        if not hmac.compare_digest(supplied, self._token) or scheme.lower() != "bearer":
            raise ApiError(401, "unauthorized", "missing or wrong admin token "
                           "(Authorization: Bearer TOKEN)")

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        start = time.perf_counter()
        info = request.match_info.route
        route = info.name or "unmatched"
        headers: dict[str, str] = {}
        try:
            response = await handler(request)
        except ApiError as exc:
            if exc.status == 401:
                headers["WWW-Authenticate"] = 'Bearer realm="dispatcher"'
            response = exc.response(headers)
        except web.HTTPException as exc:  # aiohttp's own: 404, 405, 413 ...
            if exc.status == 405:
                headers["Allow"] = exc.headers.get("Allow", "")
            code = _STATUS_CODES.get(exc.status, "http_error")
            response = ApiError(exc.status, code, exc.reason).response(headers)
        except TooManyCommands as exc:
            response = ApiError(429, "too_many_commands", str(exc)).response()
        except StoreUnavailable as exc:
            response = ApiError(503, "store_unavailable", str(exc)).response()
        except HubClosed as exc:
            response = ApiError(503, "hub_closed", str(exc)).response()
        except DispatcherError as exc:
            response = ApiError(500, "internal", f"{type(exc).__name__}: {exc}").response()
            log.error("admin_request_failed", route=route, exc_info=exc)
        except Exception as exc:  # a bug answers one 500, never a dropped connection
            log.exception("admin_request_failed", route=route)
            response = ApiError(500, "internal", f"internal error: {type(exc).__name__}"
                                ).response()
        self.hub.metrics.admin_request(route, request.method, response.status)
        log.debug("admin_request", method=request.method, path=request.path,
                  status=response.status, ms=round((time.perf_counter() - start) * 1000, 2))
        return response
