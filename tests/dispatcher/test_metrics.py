"""``/metrics``: Prometheus text of each hub's own registry (dispatcher/metrics.py).

Counters are read back through the real endpoint and prometheus-client's own
parser, after real traffic from real agents.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_client import Agent, CommandError
from agent_client import protocol as P
from dispatcher import CommandTimeout, Dispatcher, HubConfig, agent_token
from dispatcher.metrics import Metrics

from ..conftest import HubFactory, ws_url
from ..support import WAIT, RawAgent, RedisProcess, hub_config, wait_for

DOCS_TEXT = [p.read_text() for p in (Path(__file__).resolve().parents[2] / "docs").glob("*.md")]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(hub: Dispatcher, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{hub.admin_port}/metrics", headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        return parse(await resp.text())


async def _worker(hub: Dispatcher, make_agent: Callable[..., Agent], agent_id: str = "w1",
                  **kwargs: Any) -> Agent:
    agent = make_agent(ws_url(hub), agent_id, **kwargs)

    @agent.command("echo")
    async def echo(payload: Any, ctx: Any) -> Any:
        await ctx.progress({"half": True})
        return payload

    @agent.command("fail")
    async def fail(payload: Any, ctx: Any) -> Any:
        raise CommandError("nope", "refused")

    @agent.command("slow")
    async def slow(payload: Any, ctx: Any) -> Any:
        await asyncio.sleep(30)

    await agent.start()
    await agent.wait_connected(WAIT)
    await wait_for(lambda: hub._connections.get(agent_id) is not None, what="attach")
    return agent


async def test_endpoint_needs_the_token_and_names_start_with_dispatcher(
        make_hub: HubFactory) -> None:
    """The hub's own names start with dispatcher_; the standard process and Python
    collectors ride along."""
    hub = await make_hub(admin_token="t0k")
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{hub.admin_port}/metrics") as resp:
        assert resp.status == 401
    samples = await scrape(hub, "t0k")
    assert samples and all(name.startswith(("dispatcher_", "process_", "python_"))
                           for name, _ in samples)
    names = {name for name, _ in samples}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info",
            "python_gc_objects_collected_total"} <= names
    assert value(samples, "dispatcher_hub_info", hub_id=hub.hub_id, engine=hub.engine) == 1
    assert value(samples, "dispatcher_store_up") == 1
    assert value(samples, "dispatcher_admin_requests_total", route="metrics", method="GET",
                 status="401") == 1


async def test_commands_by_outcome_latency_and_frames_by_type(
        make_hub: HubFactory, make_agent: Callable[..., Agent]) -> None:
    hub = await make_hub()
    await _worker(hub, make_agent)
    assert await hub.execute_on_agent("w1", "echo", 1) == 1
    with pytest.raises(Exception, match="refused"):
        await hub.execute_on_agent("w1", "fail")
    with pytest.raises(CommandTimeout):
        await hub.execute_on_agent("w1", "slow", timeout=0.2)
    later = hub.execute_on_agent("away", "echo")
    await later.submitted()
    assert await later.cancel()

    s = await scrape(hub)
    assert value(s, "dispatcher_agents_connected") == 1
    assert value(s, "dispatcher_connections_opened_total") == 1
    assert value(s, "dispatcher_commands_submitted_total") == 4
    for outcome in ("ok", "error", "timeout", "cancelled"):
        assert value(s, "dispatcher_commands_total", outcome=outcome) == 1, outcome
        assert value(s, "dispatcher_command_duration_seconds_count", outcome=outcome) == 1
    assert value(s, "dispatcher_commands_total", outcome="dropped") == 0
    assert value(s, "dispatcher_command_duration_seconds_sum", outcome="timeout") >= 0.19
    assert value(s, "dispatcher_command_duration_seconds_bucket", outcome="ok", le="+Inf") == 1
    assert value(s, "dispatcher_commands_waiting") == 0
    assert value(s, "dispatcher_frames_in_total", type="hello") == 1
    assert value(s, "dispatcher_frames_in_total", type="result") == 1
    assert value(s, "dispatcher_frames_in_total", type="fail") == 1
    assert value(s, "dispatcher_frames_in_total", type="progress") == 1
    assert value(s, "dispatcher_frames_out_total", type="welcome") == 1
    assert value(s, "dispatcher_frames_out_total", type="cmd") == 3
    assert value(s, "dispatcher_frames_out_total", type="cancel") == 1  # the timed-out one
    assert value(s, "dispatcher_frames_out_total", type="other") == 0


async def test_connections_closed_by_reason_and_refused_by_code(make_hub: HubFactory) -> None:
    hub = await make_hub(agent_secret="s")
    url = ws_url(hub)
    bad, _ = await RawAgent.connect(url), None
    await bad.send({"t": "hello", "v": 1, "agent": "x", "token": "wrong"})
    assert (await bad.closed())[0] == P.CloseCode.UNAUTHORIZED
    first, _ = await RawAgent.hello(url, "a", token=agent_token("s", "a"))
    second, _ = await RawAgent.hello(url, "a", token=agent_token("s", "a"))
    await first.closed()
    await second.close()
    await wait_for(lambda: hub.connected_count == 0, what="the agent to leave")
    s = await scrape(hub)
    assert value(s, "dispatcher_connections_refused_total", code="unauthorized") == 1
    assert value(s, "dispatcher_connections_opened_total") == 2
    assert value(s, "dispatcher_connections_closed_total", reason="replaced") == 1
    assert value(s, "dispatcher_connections_closed_total", reason="closed") == 1
    assert value(s, "dispatcher_agents_connected") == 0


async def test_invalid_frames_and_queue_depths(make_hub: HubFactory) -> None:
    hub = await make_hub()
    agent, _ = await RawAgent.hello(ws_url(hub), "raw")
    await agent.send_raw(b"\xc1 not msgpack")
    assert (await agent.recv_type("error"))["code"] == P.ErrorCode.BAD_FRAME
    waiting = hub.execute_on_agent("away", "echo", timeout=30)
    await waiting.submitted()
    emit = asyncio.ensure_future(hub.emit_to("away", "hello", timeout=30))
    await wait_for(lambda: len(hub._events._waiting) == 1, what="the event to wait")
    s = await scrape(hub)
    assert value(s, "dispatcher_frames_in_total", type="invalid") == 1
    assert value(s, "dispatcher_commands_waiting") == 1
    assert value(s, "dispatcher_events_awaiting_receipt") == 1
    assert ("dispatcher_send_buffer_bytes", ()) in s
    assert (("dispatcher_store_queue_depth", ()) in s) == (hub.engine == "redis")
    emit.cancel()
    await waiting.cancel()
    await agent.close()


async def test_redis_round_trips_latency_and_errors(prefix: str) -> None:
    redis = RedisProcess()
    redis.start()
    try:
        config = hub_config(port=0, admin_port=0, redis_url=redis.url, prefix=prefix)
        async with Dispatcher(config) as hub:
            handle = hub.execute_on_agent("away", "echo")
            await handle.submitted()
            s = await scrape(hub)
            assert value(s, "dispatcher_store_round_trips_total") >= 1
            assert value(s, "dispatcher_store_operations_total") >= \
                value(s, "dispatcher_store_round_trips_total")
            assert value(s, "dispatcher_store_round_trip_seconds_count") >= 1
            assert value(s, "dispatcher_store_errors_total") == 0
            redis.stop()
            with pytest.raises(Exception, match="unreachable"):
                await hub.execute_on_agent("away", "echo")
            await wait_for(lambda: not hub.store.healthy, what="the outage to be noticed")
            s = await scrape(hub)
            assert value(s, "dispatcher_store_up") == 0
            assert value(s, "dispatcher_store_errors_total") >= 1
            assert value(s, "dispatcher_store_outages_total") == 1
    finally:
        redis.cleanup()


async def test_each_hub_has_its_own_registry(make_hub: HubFactory,
                                             make_agent: Callable[..., Agent]) -> None:
    busy = await make_hub(prefix="busy")
    idle = await make_hub(prefix="idle")
    await _worker(busy, make_agent)
    assert await busy.execute_on_agent("w1", "echo", 2) == 2
    assert value(await scrape(busy), "dispatcher_commands_total", outcome="ok") == 1
    assert value(await scrape(idle), "dispatcher_commands_total", outcome="ok") == 0
    assert value(await scrape(idle), "dispatcher_agents_connected") == 0


async def test_cluster_messages_are_counted(redis_url: str, prefix: str) -> None:
    def config() -> HubConfig:
        return hub_config(port=0, admin_port=0, redis_url=redis_url, prefix=prefix)

    async with Dispatcher(config()) as origin, Dispatcher(config()) as home:
        agent, _ = await RawAgent.hello(ws_url(home), "far")
        await wait_for(lambda: home._connections.get("far") is not None, what="attach")
        handle = origin.execute_on_agent("far", "work", timeout=WAIT)
        cmd = await agent.recv_type("cmd")
        await agent.send({"t": "result", "id": cmd["id"], "data": 7})
        assert await handle == 7
        s_origin, s_home = await scrape(origin), await scrape(home)
        assert value(s_origin, "dispatcher_cluster_messages_total", direction="out") >= 1
        assert value(s_home, "dispatcher_cluster_messages_total", direction="in") >= 1
        assert value(s_home, "dispatcher_commands_total", outcome="ok") == 1  # where it ended
        assert value(s_origin, "dispatcher_commands_total", outcome="ok") == 0
        await agent.close()


def test_frame_out_reads_the_type_from_the_encoded_frame() -> None:
    metrics = Metrics()
    frames = [P.WelcomeFrame(v=1, hub="h", session="s", heartbeat=5),
              P.CmdFrame("i", "k", {"a": 1}, 1, 2), P.CancelFrame("i"),
              P.EventFrame("k", None, id="e"), P.ReplyFrame("c", ok=True, data=1),
              P.ErrorFrame("bad_frame", "m")]
    for frame in frames:
        metrics.frame_out(P.encode(frame))
    for junk in (b"", b"\x81", b"\x81\xa1t", P.pack([1, 2, 3]), P.pack({"t": "weird"})):
        metrics.frame_out(junk)
    s = parse(metrics.render().decode())
    for frame in frames:
        assert value(s, "dispatcher_frames_out_total", type=frame.TYPE) == 1, frame.TYPE
    assert value(s, "dispatcher_frames_out_total", type="other") == 5


async def test_every_metric_the_docs_name_exists(make_hub: HubFactory, redis_url: str) -> None:
    """A name in docs/ that /metrics does not have (on Redis, where every family shows)
    is a dashboard or alert that can never fire."""
    hub = await make_hub(redis_url=redis_url)
    names = set()
    for family in hub.metrics.registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        names.update(family.name + end for end in ("", *suffixes.get(family.type, ())))
        names.update(sample.name for sample in family.samples)
    named = {name for text in DOCS_TEXT
             for name in re.findall(r"\b(dispatcher_[a-z_]*[a-z])\b", text)}
    assert named and not named - names, sorted(named - names)
