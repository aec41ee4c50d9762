"""The HTTP admin API (docs/admin-api.md): every route, its errors, its OpenAPI.

Real hubs on port 0 with a real HTTP client; most tests run on both engines.
The last test fuzzes the served ``/openapi.json`` with schemathesis against a
live hub: no 500, and no answer that breaks the document.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from agent_client import Agent, CommandError
from dispatcher import Dispatcher
from dispatcher.admin import ROUTES, jsonable, openapi_document

from ..conftest import HubFactory, ws_url
from ..support import WAIT, RedisProcess, hub_config, wait_for

TOKEN = "admin-s3cret"


class Api:
    """A client of one hub's admin API; answers are (status, decoded JSON or text)."""

    def __init__(self, http: aiohttp.ClientSession, hub: Dispatcher, token: str | None) -> None:
        self.http = http
        self.base = f"http://127.0.0.1:{hub.admin_port}"
        self.token = token

    async def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                   token: str | None = "default", headers: dict[str, str] | None = None,
                   ) -> tuple[int, Any]:
        token = self.token if token == "default" else token
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        async with self.http.request(method, self.base + path, data=data, headers=sent) as resp:
            text = await resp.text()
            self.last = resp
            if resp.content_type == "application/json":
                return resp.status, json.loads(text)
            return resp.status, text

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return await self.call("GET", path, **kw)

    async def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        return await self.call("POST", path, body, **kw)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def hub(make_hub: HubFactory) -> Dispatcher:
    return await make_hub(admin_token=TOKEN, command_timeout=5.0)


@pytest.fixture
def api(http: aiohttp.ClientSession, hub: Dispatcher) -> Api:
    return Api(http, hub, TOKEN)


async def _worker(hub: Dispatcher, make_agent: Callable[..., Agent], agent_id: str = "w1",
                  **kwargs: Any) -> Agent:
    """An agent with echo, fail, slow and blob commands, connected and attached."""
    agent = make_agent(ws_url(hub), agent_id, **kwargs)

    @agent.command("echo")
    async def echo(payload: Any, ctx: Any) -> Any:
        return payload

    @agent.command("fail")
    async def fail(payload: Any, ctx: Any) -> Any:
        raise CommandError("disk_full", "no space left", {"free_mb": 3})

    @agent.command("slow")
    async def slow(payload: Any, ctx: Any) -> Any:
        await asyncio.sleep(30)

    @agent.command("blob")
    async def blob(payload: Any, ctx: Any) -> Any:
        return {"raw": b"\x00\xffhi", "nan": float("nan"), 7: "int key"}

    await agent.start()
    await agent.wait_connected(WAIT)
    await wait_for(lambda: hub.get_agent(agent_id), what="the agent's registration")
    return agent


def _error(body: Any, code: str) -> str:
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message
    return message


# -- health, auth, unknown routes -------------------------------------------------------

async def test_healthz_needs_no_token(api: Api, hub: Dispatcher) -> None:
    status, body = await api.get("/healthz", token=None)
    assert status == 200
    expected = {"status": "ok", "engine": hub.engine, "hub": hub.hub_id, "agents": 0}
    if hub.engine == "redis":
        expected["bus"] = "ok"  # the cluster channel is heard
    assert body == expected
    assert await api.get("/readyz", token=None) == (200, expected)
    assert await api.get("/livez", token=None) == (200, {"status": "ok"})


@pytest.mark.parametrize("path", ["/agents", "/metrics", "/commands/x", "/agents/a/commands"])
async def test_every_other_route_needs_the_bearer_token(api: Api, path: str) -> None:
    for token, headers in ((None, None), ("wrong", None), (None, {"Authorization": TOKEN}),
                           (None, {"Authorization": f"Basic {TOKEN}"})):
        status, body = await api.get(path, token=token, headers=headers)
        assert status == 401, (token, headers)
        _error(body, "unauthorized")
        assert api.last.headers["WWW-Authenticate"].startswith("Bearer")
    status, _ = await api.get(path, token=None, headers={"Authorization": f"bearer {TOKEN}"})
    assert status in (200, 404)


async def test_no_token_configured_means_open(make_hub: HubFactory,
                                              http: aiohttp.ClientSession) -> None:
    hub = await make_hub()
    status, body = await Api(http, hub, None).get("/agents")
    assert (status, body) == (200, [])
    assert "security" not in openapi_document()["paths"]["/agents"]["get"]


async def test_unknown_path_and_method_are_json_errors(api: Api) -> None:
    status, body = await api.get("/nope")
    assert status == 404
    _error(body, "not_found")
    status, body = await api.call("PUT", "/events", {"key": "k"})
    assert status == 405
    _error(body, "method_not_allowed")
    assert "POST" in api.last.headers["Allow"]


# -- agents -------------------------------------------------------------------------------

async def test_agents_list_and_one_agent(api: Api, hub: Dispatcher, make_agent: Any) -> None:
    status, body = await api.get("/agents")
    assert (status, body) == (200, [])
    await _worker(hub, make_agent, "w1", meta={"v": "1.4", "key": b"\x01\x02"})
    status, body = await api.get("/agents")
    assert status == 200 and [a["id"] for a in body] == ["w1"]
    status, one = await api.get("/agents/w1")
    assert status == 200
    assert one == body[0]
    assert one["hub_id"] == hub.hub_id and one["meta"] == {"v": "1.4", "key": "AQI="}
    assert isinstance(one["connected_at"], int) and one["connected_at"] <= one["last_seen"]


async def test_unknown_and_invalid_agent_ids(api: Api) -> None:
    status, body = await api.get("/agents/ghost")
    assert status == 404
    assert "ghost" in _error(body, "not_found")
    status, body = await api.get("/agents/bad%20id")
    assert status == 400
    assert "agent id" in _error(body, "bad_request")
    status, body = await api.get("/agents/" + "a" * 129 + "/commands")
    assert status == 400


async def test_pending_commands_of_an_agent(api: Api) -> None:
    status, body = await api.get("/agents/later/commands")
    assert (status, body) == (200, [])
    ids = []
    for n in range(2):
        status, body = await api.post("/agents/later/commands",
                                      {"key": "echo", "payload": {"n": n}, "wait": False})
        assert status == 202 and body["status"] == "PENDING"
        ids.append(body["id"])
    status, body = await api.get("/agents/later/commands")
    assert status == 200
    assert [c["id"] for c in body] == ids  # oldest first
    assert body[0]["payload"] == {"n": 0} and body[0]["status"] == "PENDING"
    assert body[0]["outcome"] is None and body[0]["agent_id"] == "later"


# -- commands -------------------------------------------------------------------------------

async def test_exec_waits_and_answers_the_finished_command(api: Api, hub: Dispatcher,
                                                           make_agent: Any) -> None:
    await _worker(hub, make_agent)
    status, body = await api.post("/agents/w1/commands", {"key": "echo", "payload": {"x": [1]}})
    assert status == 200
    assert body["status"] == "COMPLETE" and body["outcome"] == "ok"
    assert body["result"] == {"x": [1]} and body["payload"] == {"x": [1]}
    assert body["agent_id"] == "w1" and body["key"] == "echo" and body["error"] is None
    assert body["ts"] <= body["updated"]


async def test_exec_of_a_failing_command_is_200_with_outcome_error(api: Api, hub: Dispatcher,
                                                                   make_agent: Any) -> None:
    await _worker(hub, make_agent)
    status, body = await api.post("/agents/w1/commands", {"key": "fail"})
    assert status == 200
    assert body["outcome"] == "error"
    assert body["error"] == {"code": "disk_full", "message": "no space left",
                             "data": {"free_mb": 3}}


async def test_exec_timeout_is_504_naming_the_command(api: Api, hub: Dispatcher,
                                                      make_agent: Any) -> None:
    await _worker(hub, make_agent)
    start = time.monotonic()
    status, body = await api.post("/agents/w1/commands", {"key": "slow", "timeout": 0.2})
    assert status == 504 and time.monotonic() - start < 3
    _error(body, "timeout")
    cmd_id = body["error"]["command_id"]
    status, info = await api.get(f"/commands/{cmd_id}")
    assert status == 200 and info["outcome"] == "timeout" and info["error"]["code"] == "timeout"


async def test_exec_results_msgpack_cannot_say_in_json(api: Api, hub: Dispatcher,
                                                       make_agent: Any) -> None:
    await _worker(hub, make_agent)
    status, body = await api.post("/agents/w1/commands", {"key": "blob"})
    assert status == 200
    assert body["result"] == {"raw": "AP9oaQ==", "nan": "nan", "7": "int key"}


async def test_exec_no_wait_then_get_command(api: Api, hub: Dispatcher, make_agent: Any) -> None:
    await _worker(hub, make_agent)
    status, body = await api.post("/agents/w1/commands",
                                  {"key": "echo", "payload": 5, "wait": False})
    assert status == 202 and set(body) == {"id", "status"}
    cmd_id = body["id"]

    async def done() -> bool:
        return (await api.get(f"/commands/{cmd_id}"))[1]["status"] == "COMPLETE"

    await wait_for(done, what="the command to complete")
    status, info = await api.get(f"/commands/{cmd_id}")
    assert status == 200 and info["result"] == 5 and info["id"] == cmd_id


async def test_exec_with_command_id_is_idempotent(api: Api, hub: Dispatcher,
                                                  make_agent: Any) -> None:
    agent = await _worker(hub, make_agent)
    runs = 0

    @agent.command("count")
    async def count(payload: Any, ctx: Any) -> Any:
        nonlocal runs
        runs += 1
        return runs

    body = {"key": "count", "command_id": "job-1", "group": True}
    first = await api.post("/agents/w1/commands", body)
    second = await api.post("/agents/w1/commands", body)
    assert first[0] == second[0] == 200
    assert first[1]["id"] == second[1]["id"] == "job-1"
    assert first[1]["result"] == second[1]["result"] == 1 and runs == 1
    assert first[1]["group"] == "w1:count"


async def test_get_unknown_command_is_404(api: Api) -> None:
    status, body = await api.get("/commands/nope")
    assert status == 404
    _error(body, "not_found")


async def test_cancel_pending_then_again_then_unknown(api: Api) -> None:
    _, body = await api.post("/agents/away/commands", {"key": "echo", "wait": False})
    cmd_id = body["id"]
    status, info = await api.call("DELETE", f"/commands/{cmd_id}")
    assert status == 200
    assert info["status"] == "COMPLETE" and info["outcome"] == "cancelled"
    status, body = await api.call("DELETE", f"/commands/{cmd_id}")
    assert status == 409
    _error(body, "already_complete")
    status, body = await api.call("DELETE", "/commands/nope")
    assert status == 404
    _error(body, "not_found")
    assert (await api.get("/agents/away/commands"))[1] == []


async def test_cancel_answers_a_waiting_exec(api: Api) -> None:
    waiting = asyncio.ensure_future(api.post("/agents/away/commands",
                                             {"key": "echo", "command_id": "c-wait"}))

    async def stored() -> bool:
        return (await api.get("/commands/c-wait"))[0] == 200

    await wait_for(stored, what="the command to be stored")
    assert (await api.call("DELETE", "/commands/c-wait"))[0] == 200
    status, body = await asyncio.wait_for(waiting, WAIT)
    assert status == 200 and body["outcome"] == "cancelled"
    assert body["error"]["code"] == "cancelled"


async def test_too_many_commands_is_429(make_hub: HubFactory,
                                        http: aiohttp.ClientSession) -> None:
    api = Api(http, await make_hub(max_inflight_per_agent=1), None)
    assert (await api.post("/agents/busy/commands", {"key": "k", "wait": False}))[0] == 202
    status, body = await api.post("/agents/busy/commands", {"key": "k", "wait": False})
    assert status == 429
    _error(body, "too_many_commands")


@pytest.mark.parametrize(("raw", "code", "words"), [
    (b"", "bad_json", "required"),
    (b"{not json", "bad_json", "not valid JSON"),
    (b'{"key": "k", "payload": NaN}', "bad_json", "NaN"),
    (b'{"key": "\\ud800"}', "bad_json", "Unicode"),
    (b"\xff\xfe", "bad_json", "not valid JSON"),
    (b"[1, 2]", "bad_request", "must be object"),
    (b"null", "bad_request", "must be object"),
    (b"{}", "bad_request", "'key' is required"),
    (b'{"key": ""}', "bad_request", "key: must not be empty"),
    (b'{"key": 5}', "bad_request", "key: must be string"),
    (b'{"key": "k", "timout": 1}', "bad_request", "unknown field 'timout'"),
    (b'{"key": "k", "timeout": "soon"}', "bad_request", "timeout: must be number"),
    (b'{"key": "k", "timeout": true}', "bad_request", "timeout: must be number"),
    (b'{"key": "k", "timeout": 0}', "bad_request", "timeout: must be > 0"),
    (b'{"key": "k", "timeout": 1e12}', "bad_request", "timeout: must be <="),
    (b'{"key": "k", "wait": "yes"}', "bad_request", "wait: must be boolean"),
    (b'{"key": "k", "group": ""}', "bad_request", "group: must not be empty"),
    (b'{"key": "k", "group": 3}', "bad_request", "group: must be string or boolean"),
    (b'{"key": "k", "command_id": ""}', "bad_request", "command_id"),
    (b'{"key": "k", "payload": 100000000000000000000000}', "bad_request", "msgpack"),
])
async def test_bad_exec_bodies_are_400(api: Api, raw: bytes, code: str, words: str) -> None:
    status, body = await api.post("/agents/w1/commands", raw=raw)
    assert status == 400, body
    assert words in _error(body, code)
    assert (await api.get("/agents/w1/commands"))[1] == []  # nothing was stored


async def test_key_longer_than_the_protocol_allows_is_400(api: Api) -> None:
    status, body = await api.post("/agents/w1/commands", {"key": "k" * 257})
    assert status == 400
    assert "at most 256" in _error(body, "bad_request")


async def test_body_larger_than_a_frame_is_413(make_hub: HubFactory,
                                               http: aiohttp.ClientSession) -> None:
    api = Api(http, await make_hub(max_frame=1024), None)
    blob = json.dumps({"key": "k", "payload": "x" * 200_000}).encode()
    status, body = await api.post("/agents/w1/commands", raw=blob)
    assert status == 413
    _error(body, "too_large")


# -- events ----------------------------------------------------------------------------------

async def test_emit_to_an_agent_waits_for_its_receipt(api: Api, hub: Dispatcher,
                                                      make_agent: Any) -> None:
    agent = make_agent(ws_url(hub), "listener")
    got: list[Any] = []

    @agent.on("config.*")
    async def on_config(data: Any, ctx: Any) -> None:
        got.append((ctx.key, data))

    await agent.start()
    await agent.wait_connected(WAIT)
    status, body = await api.post("/agents/listener/events",
                                  {"key": "config.reload", "data": {"v": 2}, "timeout": 5})
    assert (status, body) == (200, {"received": ["listener"]})
    assert got == [("config.reload", {"v": 2})]


async def test_emit_to_an_absent_agent_is_504_and_stays_queued(api: Api, hub: Dispatcher,
                                                               make_agent: Any) -> None:
    status, body = await api.post("/agents/absent/events", {"key": "hello", "timeout": 0.2})
    assert status == 504
    _error(body, "delivery_timeout")
    assert body["error"]["pending"] == ["absent"]
    agent = make_agent(ws_url(hub), "absent")
    got = asyncio.get_running_loop().create_future()
    agent.on("hello")(lambda data, ctx: got.set_result(ctx.key))
    await agent.start()
    assert await asyncio.wait_for(got, WAIT) == "hello"


async def test_bad_event_bodies_are_400(api: Api) -> None:
    for path in ("/agents/a/events", "/events"):
        status, body = await api.post(path, {"data": 1})
        assert status == 400 and "'key' is required" in _error(body, "bad_request")
        status, body = await api.post(path, {"key": "k", "extra": 1})
        assert status == 400 and "unknown field" in _error(body, "bad_request")
        status, body = await api.post(path, {"key": "k", "data": 2**70})
        assert status == 400 and "msgpack" in _error(body, "bad_request")
    status, body = await api.post("/agents/a/events", {"key": "k", "timeout": -1})
    assert status == 400


async def test_broadcast_is_202_with_the_count(api: Api, hub: Dispatcher,
                                               make_agent: Any) -> None:
    status, body = await api.post("/events", {"key": "news"})
    assert (status, body) == (202, {"agents": 0})
    agent = make_agent(ws_url(hub), "reader")
    got = asyncio.get_running_loop().create_future()
    agent.on("news")(lambda data, ctx: got.set_result(data))
    await agent.start()
    await agent.wait_connected(WAIT)
    status, body = await api.post("/events", {"key": "news", "data": [1, "two"]})
    assert (status, body) == (202, {"agents": 1})
    assert await asyncio.wait_for(got, WAIT) == [1, "two"]


# -- the hub around it -------------------------------------------------------------------------

async def test_store_outage_answers_503_not_500(http: aiohttp.ClientSession, prefix: str) -> None:
    redis = RedisProcess()
    redis.start()
    try:
        config = hub_config(port=0, admin_port=0, redis_url=redis.url, prefix=prefix)
        async with Dispatcher(config) as hub:
            api = Api(http, hub, None)
            assert (await api.get("/agents"))[0] == 200
            redis.stop()
            status, body = await api.post("/agents/a/commands", {"key": "k"})
            assert status == 503
            _error(body, "store_unavailable")
            for path in ("/agents", "/agents/a", "/agents/a/commands", "/commands/x"):
                status, body = await api.get(path)
                assert status == 503, path
                _error(body, "store_unavailable")
            status, body = await api.get("/healthz")
            assert status == 503 and body["status"] == "store_unavailable"
            status, body = await api.get("/readyz")  # out of the balancer, not restarted
            assert status == 503 and body["status"] == "store_unavailable"
            assert await api.get("/livez") == (200, {"status": "ok"})
    finally:
        redis.cleanup()


async def test_close_answers_waiting_requests_at_once(make_hub: HubFactory,
                                                      http: aiohttp.ClientSession) -> None:
    hub = await make_hub(command_timeout=60)
    api = Api(http, hub, None)
    waiting = asyncio.ensure_future(api.post("/agents/away/commands", {"key": "k"}))
    await wait_for(lambda: hub.list_pending_commands("away"), what="the command to be stored")
    start = time.monotonic()
    await hub.close()
    status, body = await asyncio.wait_for(waiting, WAIT)
    assert status == 503
    _error(body, "hub_closed")
    assert time.monotonic() - start < 3


async def test_logs_bind_agent_and_command_ids(api: Api, hub: Dispatcher,
                                               make_agent: Any) -> None:
    await _worker(hub, make_agent)
    with capture_logs() as logs:
        _, body = await api.post("/agents/w1/commands", {"key": "echo"})
        await api.call("DELETE", "/commands/" + body["id"])
    submitted = [e for e in logs if e["event"] == "admin_command_submitted"]
    assert submitted and submitted[0]["command_id"] == body["id"]
    assert submitted[0]["agent_id"] == "w1" and submitted[0]["key"] == "echo"


# -- the OpenAPI document -------------------------------------------------------------------------

async def test_openapi_is_served_and_matches_the_router(api: Api, hub: Dispatcher) -> None:
    status, doc = await api.get("/openapi.json", token=None)
    assert status == 200
    assert doc["openapi"].startswith("3.1")
    served = {(r.method, r.resource.canonical) for r in hub._admin_server.app.router.routes()}
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented == {(r.method, r.path) for r in ROUTES}
    assert {"/healthz", "/livez", "/readyz", "/metrics", "/agents", "/agents/{id}",
            "/agents/{id}/commands",
            "/commands/{id}", "/agents/{id}/events", "/events"} <= set(doc["paths"])
    assert doc["paths"]["/agents"]["get"]["security"] == [{"bearerAuth": []}]
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    for ops in doc["paths"].values():
        for op in ops.values():
            assert op["operationId"] and op["summary"]
            assert any(code.startswith("2") for code in op["responses"])


def test_jsonable_keeps_json_and_converts_the_rest() -> None:
    value = {"b": b"\x00", 1: [1.5, float("inf"), None, True], b"k": (1, "s")}
    assert jsonable(value) == {"b": "AA==", "1": [1.5, "inf", None, True], "aw==": [1, "s"]}


# -- schemathesis against the live document -------------------------------------------------------

def _fuzz(base: str, token: str, max_examples: int, budget: float) -> list[str]:
    """Run schemathesis on every operation of ``base``/openapi.json; returns failures."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        positive_data_acceptance,
        response_schema_conformance,
        status_code_conformance,
    )

    def no_server_error(ctx: Any, response: Any, case: Any) -> None:
        # 504 is the documented answer to a command or receipt that timed out.
        if response.status_code >= 500 and response.status_code != 504:
            raise AssertionError(f"{response.status_code}: {response.text[:300]}")

    checks = [no_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance, positive_data_acceptance]
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    headers = {"Authorization": f"Bearer {token}"}
    failures: list[str] = []
    deadline = time.monotonic() + budget
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.endswith("stream"):
            continue  # event streams never end by themselves: tests/dispatcher/test_streams.py

        @settings(max_examples=max_examples, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            if time.monotonic() > deadline:
                return  # the time limit: the remaining examples pass untried
            if isinstance(case.query, dict):
                # A cursor is opaque: only one the hub made is valid (a made-up one is
                # a 400, tests/dispatcher/test_streams.py), so none is generated here.
                case.query.pop("cursor", None)
            if isinstance(case.body, dict) and isinstance(case.body.get("timeout"), int | float):
                case.body["timeout"] = min(case.body["timeout"], 0.02)  # keep waits short
            response = case.call(base_url=base, headers=headers, timeout=10)
            case.validate_response(response, checks=checks)

        try:
            check()
        except Exception as exc:  # schemathesis' FailureGroup: report, go on
            failures.append(f"{operation.label}: {exc}")
    return failures


@pytest.mark.timeout(90)
async def test_schemathesis_finds_no_500_and_no_answer_off_the_schema(
        make_agent: Callable[..., Agent]) -> None:
    config = hub_config(port=0, admin_port=0, admin_token=TOKEN, command_timeout=0.05)
    async with Dispatcher(config) as hub:
        await _worker(hub, make_agent, "a1")
        failures = await asyncio.to_thread(
            _fuzz, f"http://127.0.0.1:{hub.admin_port}", TOKEN, 50, 30.0)
    assert not failures, "\n\n".join(failures)
