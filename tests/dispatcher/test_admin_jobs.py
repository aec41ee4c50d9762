"""The admin API's job rows: POST/GET/DELETE /jobs and the job's event stream (SSE).

A real hub on both engines, real agents, real HTTP (aiohttp client)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from agent_client import Agent
from dispatcher import Dispatcher

from ..conftest import HubFactory
from ..support import WAIT, wait_for
from .test_admin import TOKEN, Api
from .test_jobs import Fleet, start_fleet


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def setup(make_hub: HubFactory, make_agent: Callable[..., Agent],
                http: aiohttp.ClientSession) -> tuple[Dispatcher, Fleet, Api]:
    hub = await make_hub(admin_token=TOKEN, stream_keepalive=0.05)
    fleet = await start_fleet(hub, make_agent, {"web-1": {"role": "web"},
                                                "web-2": {"role": "web"},
                                                "db-1": {"role": "db"}})
    return hub, fleet, Api(http, hub, TOKEN)


async def read_events(api: Api, path: str, commented: asyncio.Event | None = None
                      ) -> tuple[list[tuple[str, Any]], int]:
    """The SSE events of ``path`` until the stream closes, and the keep-alive comments
    (``commented`` is set at the first)."""
    events: list[tuple[str, Any]] = []
    comments = 0
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with asyncio.timeout(WAIT), api.http.get(api.base + path, headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        event = None
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith(":"):
                comments += 1
                if commented is not None:
                    commented.set()
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((str(event), json.loads(line[6:])))
    return events, comments


async def test_post_get_list_and_stream(setup: tuple[Dispatcher, Fleet, Api]) -> None:
    _, fleet, api = setup
    fleet.gate = asyncio.Event()
    status, job = await api.post("/jobs", {"target": "role=web", "key": "work", "batch": 1,
                                           "job_id": "j1"})
    assert status == 202, job
    assert (job["id"], job["agents"], job["status"], job["batch"]) == (
        "j1", ["web-1", "web-2"], "RUNNING", 1)
    commented = asyncio.Event()
    stream = asyncio.ensure_future(read_events(api, "/jobs/j1/stream", commented))
    await asyncio.wait_for(fleet.started.get(), WAIT)
    await asyncio.wait_for(commented.wait(), WAIT)  # silence while the part runs
    fleet.gate.set()
    events, comments = await asyncio.wait_for(stream, WAIT)
    kinds = [e for e, _ in events]
    assert kinds.count("result") == 2 and kinds[-1] == "end"
    assert {d["agent_id"] for e, d in events if e == "result"} == {"web-1", "web-2"}
    assert all(d["data"] == {"at": d["agent_id"]} for e, d in events if e == "progress")
    assert events[-1][1]["status"] == "COMPLETE" and events[-1][1]["counts"]["ok"] == 2
    assert comments >= 1
    status, got = await api.get("/jobs/j1")
    assert status == 200 and [c["agent_id"] for c in got["commands"]] == ["web-1", "web-2"]
    assert all(c["job"] == "j1" and c["outcome"] == "ok" for c in got["commands"])
    status, listed = await api.get("/jobs?limit=1")
    assert status == 200 and [j["id"] for j in listed] == ["j1"]
    # A finished job's stream replays its results and ends.
    events, _ = await read_events(api, "/jobs/j1/stream")
    assert [e for e, _ in events] == ["result", "result", "end"]


async def test_errors(setup: tuple[Dispatcher, Fleet, Api]) -> None:
    _, _, api = setup
    for body, status, code in [
        ({"target": "cache-*", "key": "work"}, 404, "no_agents_matched"),
        ({"target": "role=cache", "key": "work"}, 404, "no_agents_matched"),
        ({"target": ["web-1", "gone"], "key": "work", "require_online": True}, 409,
         "agent_offline"),
        ({"target": "web-1", "key": "work", "batch": "200%"}, 400, "bad_request"),
        ({"target": "web-1", "key": "work", "batch": 0}, 400, "bad_request"),
        ({"target": "we b", "key": "work"}, 400, "bad_request"),
        ({"target": "web-1"}, 400, "bad_request"),
        ({"target": "web-1", "key": "work", "extra": 1}, 400, "bad_request"),
    ]:
        got_status, got = await api.post("/jobs", body)
        assert (got_status, got["error"]["code"]) == (status, code), (body, got)
    for path in ("/jobs/nope", "/jobs/nope/stream"):
        status, got = await api.get(path)
        assert (status, got["error"]["code"]) == (404, "not_found")
    assert (await api.call("DELETE", "/jobs/nope"))[0] == 404
    assert (await api.get("/jobs?limit=0"))[0] == 400
    assert (await api.get("/jobs?limit=x"))[0] == 400


async def test_delete_cancels_then_conflicts(setup: tuple[Dispatcher, Fleet, Api]) -> None:
    _, fleet, api = setup
    fleet.gate = asyncio.Event()  # never set: the first part runs until cancelled
    status, job = await api.post("/jobs", {"target": "*", "key": "work", "batch": 1})
    assert status == 202
    await asyncio.wait_for(fleet.started.get(), WAIT)
    status, cancelled = await api.call("DELETE", f"/jobs/{job['id']}")
    assert status == 200 and cancelled["counts"]["skipped"] == 2

    async def complete() -> bool:
        return bool((await api.get(f"/jobs/{job['id']}"))[1]["status"] == "COMPLETE")

    await wait_for(complete, what="the cancelled job to complete")
    status, got = await api.call("DELETE", f"/jobs/{job['id']}")
    assert (status, got["error"]["code"]) == (409, "already_complete")
    assert len(fleet.runs) == 1
