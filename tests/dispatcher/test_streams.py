"""The admin API's history and event streams: GET /commands, GET /commands/{id}/stream,
GET /stream, require_online; real hubs, real agents, both engines."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from agent_client import Agent
from dispatcher import Dispatcher

from ..conftest import HubFactory, ws_url
from ..support import WAIT, wait_for
from .test_admin import TOKEN, Api, _error, _worker


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def hub(make_hub: HubFactory) -> Dispatcher:
    return await make_hub(admin_token=TOKEN, command_timeout=5.0, stream_keepalive=0.3)


@pytest.fixture
def api(http: aiohttp.ClientSession, hub: Dispatcher) -> Api:
    return Api(http, hub, TOKEN)


class Sse:
    """A Server-Sent Events reader: ``(event, data)`` messages and comment lines."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.comments: list[str] = []

    async def next(self, timeout: float = WAIT) -> tuple[str, Any] | None:
        """The next message; None when the stream ended."""
        event, data = "message", None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.resp.content.readline()
                if not raw:
                    return None
                line = raw.decode().rstrip("\n")
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                elif line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                elif (line == "" and data is not None) or (line == "" and event != "message"):
                    return event, data

    async def keepalive(self, timeout: float = WAIT) -> None:
        """Read on until a ``: keep-alive`` comment line arrives."""
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.resp.content.readline()
                assert raw, "the stream ended"
                if raw.decode().strip() == ": keep-alive":
                    return

    async def until(self, event: str, match: Callable[[Any], bool] = lambda d: True,
                    timeout: float = WAIT) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.next()
                assert msg is not None, f"the stream ended before {event!r}"
                if msg[0] == event and match(msg[1]):
                    return msg[1]


async def open_stream(http: aiohttp.ClientSession, hub: Dispatcher, path: str
                      ) -> tuple[aiohttp.ClientResponse, Sse]:
    resp = await http.get(f"http://127.0.0.1:{hub.admin_port}{path}",
                          headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    return resp, Sse(resp)


# -- GET /commands ----------------------------------------------------------------------

async def test_get_commands_filters_and_pages(api: Api, hub: Dispatcher,
                                              make_agent: Callable[..., Agent]) -> None:
    await _worker(hub, make_agent, "w1")
    ok = [await api.post("/agents/w1/commands", {"key": "echo", "payload": i}) for i in range(3)]
    failed = await api.post("/agents/w1/commands", {"key": "fail"})
    assert failed[1]["outcome"] == "error"
    status, body = await api.get("/commands")
    assert status == 200 and body["next"] is None
    assert [c["id"] for c in body["commands"]] == \
        [failed[1]["id"]] + [c[1]["id"] for c in reversed(ok)]
    assert body["commands"][0]["job"] is None
    status, body = await api.get("/commands?agent=w1&key=echo&outcome=ok&status=COMPLETE")
    assert [c["payload"] for c in body["commands"]] == [2, 1, 0]
    status, body = await api.get("/commands?outcome=error")
    assert [c["id"] for c in body["commands"]] == [failed[1]["id"]]
    status, first = await api.get("/commands?limit=3")
    assert len(first["commands"]) == 3 and first["next"]
    status, rest = await api.get(f"/commands?limit=3&cursor={first['next']}")
    assert [c["payload"] for c in rest["commands"]] == [0] and rest["next"] is None
    assert (await api.get("/commands?agent=nobody"))[1] == {"commands": [], "next": None}


@pytest.mark.parametrize("query, word", [
    ("status=DONE", "status"), ("outcome=great", "outcome"), ("limit=0", "limit"),
    ("limit=1001", "limit"), ("limit=ten", "limit"), ("cursor=!!", "cursor"),
    ("colour=red", "colour")])
async def test_get_commands_bad_query_is_400(api: Api, query: str, word: str) -> None:
    status, body = await api.get(f"/commands?{query}")
    assert status == 400
    assert word in _error(body, "bad_request")


async def test_require_online_is_409_for_an_offline_agent(api: Api, hub: Dispatcher,
                                                         make_agent: Any) -> None:
    status, body = await api.post("/agents/away/commands",
                                  {"key": "echo", "require_online": True})
    assert status == 409
    assert "away" in _error(body, "agent_offline")
    assert (await api.get("/commands?agent=away"))[1]["commands"] == []
    await _worker(hub, make_agent, "here")
    status, body = await api.post("/agents/here/commands",
                                  {"key": "echo", "payload": 1, "require_online": True})
    assert status == 200 and body["result"] == 1


# -- GET /commands/{id}/stream ----------------------------------------------------------

async def test_command_stream_progress_then_end(http: aiohttp.ClientSession, api: Api,
                                                hub: Dispatcher,
                                                make_agent: Callable[..., Agent]) -> None:
    agent = make_agent(ws_url(hub), "p1")
    go = asyncio.Event()

    @agent.command("steps")
    async def steps(payload: Any, ctx: Any) -> Any:
        await go.wait()
        for i in range(3):
            await ctx.progress({"step": i})
        return "done"

    await agent.start()
    await agent.wait_connected(WAIT)
    handle = hub.execute_on_agent("p1", "steps")
    await handle.submitted()
    resp, sse = await open_stream(http, hub, f"/commands/{handle.id}/stream")
    go.set()
    seen = [await sse.next() for _ in range(4)]
    assert seen[:3] == [("progress", {"step": i}) for i in range(3)]
    assert seen[3] is not None and seen[3][0] == "end"
    assert seen[3][1]["id"] == handle.id and seen[3][1]["result"] == "done"
    assert await sse.next() is None  # and the stream closes
    resp.release()
    # Already COMPLETE: "end" at once.
    resp, sse = await open_stream(http, hub, f"/commands/{handle.id}/stream")
    msg = await sse.next()
    assert msg is not None and msg[0] == "end" and msg[1]["outcome"] == "ok"
    assert await sse.next() is None
    resp.release()
    status, body = await api.get("/commands/nope/stream")
    assert status == 404
    _error(body, "not_found")


# -- GET /stream ------------------------------------------------------------------------

async def test_cluster_stream_carries_agents_commands_and_events(
        http: aiohttp.ClientSession, hub: Dispatcher,
        make_agent: Callable[..., Agent]) -> None:
    resp, sse = await open_stream(http, hub, "/stream")
    agent = await _worker(hub, make_agent, "s1", meta={"role": "db"})
    connected = await sse.until("agent-connected", lambda d: d["id"] == "s1")
    assert connected["meta"] == {"role": "db"}
    handle = hub.execute_on_agent("s1", "echo", {"x": 1})
    await handle
    created = await sse.until("command", lambda d: d["id"] == handle.id)
    assert created["status"] == "PENDING" and created["payload"] == {"x": 1}
    done = await sse.until("command", lambda d: d["id"] == handle.id
                           and d["status"] == "COMPLETE")
    assert done["outcome"] == "ok" and done["result"] == {"x": 1}
    await agent.emit("metrics.cpu", {"load": 0.5})
    event = await sse.until("event")
    assert event == {"key": "metrics.cpu", "data": {"load": 0.5}, "from": "s1"}
    hub.feed.publish("job", {"id": "job-1", "status": "RUNNING"})  # the jobs part's hook
    assert await sse.until("job") == {"id": "job-1", "status": "RUNNING"}
    await agent.stop()
    gone = await sse.until("agent-disconnected", lambda d: d["id"] == "s1")
    assert gone["reason"]
    # keep-alive comments (stream_keepalive is 0.3 s here)
    await sse.keepalive(timeout=2)
    resp.release()


async def test_streams_end_when_the_hub_closes(http: aiohttp.ClientSession,
                                               make_hub: HubFactory) -> None:
    hub = await make_hub(admin_token=TOKEN)
    resp, sse = await open_stream(http, hub, "/stream")
    await wait_for(lambda: hub.feed.watchers == 1, what="the subscription")
    await hub.close()
    assert await sse.next(timeout=5) is None
    resp.release()
    assert hub.feed.watchers == 0


async def test_a_reader_too_far_behind_is_dropped(make_hub: HubFactory,
                                                  make_agent: Callable[..., Agent]) -> None:
    hub = await make_hub(stream_buffer=3)
    agent = await _worker(hub, make_agent, "e1")
    sub = await hub.feed.subscribe({"event"})
    other = await hub.feed.subscribe({"event"})
    for i in range(4):
        await agent.emit("tick", i)
    await wait_for(lambda: sub.ended is not None, what="the overflow")
    assert sub.ended == "overflow" and other.ended == "overflow"
    assert hub.feed.watchers == 0
    assert "dispatcher_streams_dropped_total 2.0" in hub.metrics.render().decode()


async def test_stream_covers_the_whole_cluster(http: aiohttp.ClientSession, engine: str,
                                               make_hub: HubFactory,
                                               make_agent: Callable[..., Agent]) -> None:
    if engine != "redis":
        pytest.skip("a cluster needs the Redis engine")
    watched = await make_hub(admin_token=TOKEN)
    other = await make_hub(admin_token=TOKEN)
    other.feed.poll = watched.feed.poll = 0.05  # how soon each learns who listens
    resp, sse = await open_stream(http, watched, "/stream")
    await wait_for(lambda: other.feed.active, what="the other hub to see a watcher")
    await _worker(other, make_agent, "far")
    seen = await sse.until("agent-connected", lambda d: d["id"] == "far")
    assert seen["hub_id"] == other.hub_id
    handle = other.execute_on_agent("far", "echo", 5)
    assert await handle == 5
    await sse.until("command", lambda d: d["id"] == handle.id and d["status"] == "COMPLETE")
    resp.close()
    # Nobody watches any more: the hubs stop publishing and leave the channel.
    await wait_for(lambda: not other.feed.active and watched.feed.watchers == 0,
                   what="the feed to go quiet")


async def test_a_first_watcher_is_announced_to_every_hub(http: aiohttp.ClientSession,
                                                         engine: str, make_hub: HubFactory,
                                                         make_agent: Callable[..., Agent]
                                                         ) -> None:
    """The other hubs learn of a first watcher from the cluster's bus at once, not at
    their next poll of the channel: what happens on them right after the stream opens
    is on it. Their polls are stopped here, so only the announcement can do it."""
    if engine != "redis":
        pytest.skip("a cluster needs the Redis engine")
    watched = await make_hub(admin_token=TOKEN)
    other = await make_hub(admin_token=TOKEN)
    for task in asyncio.all_tasks():
        if task.get_name() == "feed-watch":
            task.cancel()  # no poll of the channel's listeners from now on, on either hub
    assert not other.feed.active
    resp, sse = await open_stream(http, watched, "/stream")
    await wait_for(lambda: other.feed.active, what="the announcement to reach the other hub")
    await _worker(other, make_agent, "early")
    seen = await sse.until("agent-connected", lambda d: d["id"] == "early")
    assert seen["hub_id"] == other.hub_id
    resp.close()
