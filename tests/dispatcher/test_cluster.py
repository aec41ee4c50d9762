"""Several hubs on one Redis: routing, the cluster view, dead hubs, drain, bus resilience.

In-process hubs share the test's event loop but nothing else: they talk only
through Redis, as hubs on different machines would. The crash and drain tests
run hubs as real ``dispatcher serve`` processes and kill them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from agent_client import Agent
from dispatcher import AgentOffline, Dispatcher, StoreUnavailable

from ..support import (
    WAIT,
    RawAgent,
    RedisProcess,
    TcpProxy,
    external_redis_url,
    free_port,
    hub_config,
    wait_for,
)

FAST = {"hub_ttl": 1.0, "sweep_interval": 0.2, "bus_probe_interval": 0.2,
        "bus_probe_timeout": 1.0, "heartbeat": 5.0}


def url(hub: Dispatcher) -> str:
    return f"ws://127.0.0.1:{hub.port}/ws"


@pytest.fixture
async def cluster(redis_url: str, prefix: str) -> AsyncIterator[Any]:
    """``await cluster(n)`` starts n in-process hubs on one Redis and prefix."""
    hubs: list[Dispatcher] = []

    async def start(n: int = 1, redis: str | None = None, **overrides: Any) -> list[Dispatcher]:
        started = []
        for _ in range(n):
            options: dict[str, Any] = {"port": 0, "admin_port": 0, "prefix": prefix,
                                       "redis_url": redis or redis_url, **FAST, **overrides}
            hub = Dispatcher(hub_config(**options))
            await hub.listen()
            hubs.append(hub)
            started.append(hub)
        return started

    yield start
    for hub in hubs:
        await hub.close()


async def connected(hub: Dispatcher, agent_id: str) -> None:
    """Wait until the agent is attached on ``hub`` (catch-up done)."""
    await wait_for(lambda: hub._connections.is_ready(agent_id), what=f"{agent_id} attached")


async def test_command_goes_to_the_agents_hub_and_back(cluster: Any) -> None:
    h0, h1, h2 = await cluster(3)
    agent, _ = await RawAgent.hello(url(h2), "far")
    await connected(h2, "far")
    handle = h0.execute_on_agent("far", "work", {"n": 1}, timeout=WAIT)
    cmd = await agent.recv_type("cmd")
    assert cmd["id"] == handle.id
    updates: list[Any] = []

    async def follow() -> None:
        async for update in handle.progress():
            updates.append(update)

    follower = asyncio.ensure_future(follow())
    await agent.send({"t": "ack", "id": cmd["id"]})
    await agent.send({"t": "progress", "id": cmd["id"], "data": 0.5})
    await agent.send({"t": "result", "id": cmd["id"], "data": {"done": True}})
    assert await asyncio.wait_for(handle.result(), WAIT) == {"done": True}
    await asyncio.wait_for(follower, WAIT)
    assert updates == [0.5]
    # Only hub 2 got the command; hub 1 saw no traffic for it.
    assert h1._cluster.received == 0
    info = await h1.get_command(handle.id)
    assert info is not None and info.outcome == "ok" and info.origin == h0.hub_id
    await agent.close()


async def test_agent_that_moves_while_its_command_is_stored_still_gets_it(
        cluster: Any, redis_url: str) -> None:
    """The submitting hub skips the Redis lookup of the agent's hub when the agent
    is connected to it; if the agent moves to another hub before the store write
    completes, delivery looks it up after all instead of leaving it PENDING."""
    if external_redis_url():
        pytest.skip("needs a proxy in front of its own Redis")
    port = int(redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    proxy = await TcpProxy(port).start()
    try:
        db = redis_url.rsplit("/", 1)[1]
        (origin,) = await cluster(1, redis=f"redis://127.0.0.1:{proxy.port}/{db}")
        (other,) = await cluster(1)
        agent, _ = await RawAgent.hello(url(origin), "mover")
        await connected(origin, "mover")
        proxy.pause()  # the origin's store write waits ...
        handle = origin.execute_on_agent("mover", "work", {"n": 1}, timeout=WAIT)
        await agent.close()  # ... while the agent moves to the other hub
        await wait_for(lambda: origin._connections.get("mover") is None, what="mover off origin")
        moved, _ = await RawAgent.hello(url(other), "mover")
        await connected(other, "mover")
        proxy.resume()
        cmd = await moved.recv_type("cmd")
        assert cmd["id"] == handle.id
        await moved.send({"t": "result", "id": cmd["id"], "data": "found"})
        assert await asyncio.wait_for(handle.result(), WAIT) == "found"
        await moved.close()
    finally:
        await proxy.close()


async def test_timeout_on_origin_cancels_on_the_agents_hub(cluster: Any) -> None:
    h0, h1 = await cluster(2)
    agent, _ = await RawAgent.hello(url(h1), "slow")
    await connected(h1, "slow")
    handle = h0.execute_on_agent("slow", "work", None, timeout=0.3)
    cmd = await agent.recv_type("cmd")
    cancel = await agent.recv_type("cancel")
    assert cancel["id"] == cmd["id"] == handle.id
    with pytest.raises(Exception, match="timed out"):
        await handle
    await agent.close()


async def test_a_resubmit_on_another_hub_resolves_when_the_command_does(cluster: Any) -> None:
    """Issue 13, defect 3: the same command_id submitted again on another hub, or
    waited for over HTTP there, resolves when the command completes (not at its
    deadline): that hub is told of the completion like the origin is."""
    h0, h1 = await cluster(2)
    first = h0.execute_on_agent("slow", "work", 1, command_id="job-1", timeout=30)
    async with asyncio.timeout(WAIT):
        await first.submitted()
    again = h1.execute_on_agent("slow", "work", 1, command_id="job-1", timeout=30)
    async with asyncio.timeout(WAIT):
        await again.submitted()
    async with aiohttp.ClientSession() as http:
        waiting = asyncio.ensure_future(http.post(
            f"http://127.0.0.1:{h1.admin_port}/agents/slow/commands",
            json={"key": "work", "payload": 1, "command_id": "job-1", "timeout": 30}))
        await wait_for(lambda: "job-1" in h1._commands.waiting_ids(), what="h1 to wait")
        agent, _ = await RawAgent.hello(url(h0), "slow")
        try:
            cmd = await agent.recv_type("cmd")
            assert cmd["id"] == "job-1"
            await agent.send({"t": "result", "id": "job-1", "data": "done"})
            async with asyncio.timeout(WAIT):  # well before the 30 s deadline
                assert await first == "done"
                assert await again == "done"
                response = await waiting
                body = await response.json()
            assert response.status == 200 and body["result"] == "done", body
        finally:
            await agent.close()


async def test_overdue_commands_of_a_gone_hub_are_never_delivered(cluster: Any) -> None:
    """Issue 13, defect 6: the submitting hub is gone and the deadlines pass while the
    agent is away; the agent that connects then gets none of them, and the other
    hub's sweeper times out the whole backlog at once (not 100 per sweep)."""
    origin, survivor = await cluster(2)
    handles = [origin.execute_on_agent("late", "work", i, timeout=0.5) for i in range(300)]
    async with asyncio.timeout(WAIT):
        await asyncio.gather(*(h.submitted() for h in handles))
    info = await survivor.get_command(handles[-1].id)
    assert info is not None and info.deadline is not None
    await origin.close()  # its local timers go with it
    # Waiting for the clock itself: the deadlines must be behind us.
    await asyncio.sleep(max(0.0, info.deadline / 1000 - time.time()) + 0.05)
    agent, _ = await RawAgent.hello(url(survivor), "late")
    got: list[dict[str, Any]] = []
    try:
        with contextlib.suppress(TimeoutError):
            while True:  # for 0.3 s: cancels from the sweeper are fine, no cmd is
                got.append(await agent.recv(timeout=0.3))
    finally:
        await agent.close()
    assert not [f for f in got if f["t"] == "cmd"], got[:3]

    async def all_timed_out() -> bool:
        infos = await asyncio.gather(*(survivor.get_command(h.id) for h in handles))
        return all(i is not None and i.outcome == "timeout" for i in infos)

    async with asyncio.timeout(WAIT):
        while not await all_timed_out():  # noqa: ASYNC110 - polling the store, bounded
            await asyncio.sleep(0.05)


async def test_cluster_view_and_replacement_across_hubs(cluster: Any) -> None:
    h0, h1, h2 = await cluster(3)
    first, _ = await RawAgent.hello(url(h0), "solo", meta={"v": 1})
    await connected(h0, "solo")
    gone = asyncio.get_running_loop().create_future()
    h0.on("agent-disconnected", lambda info, reason: gone.set_result(reason))
    second, _ = await RawAgent.hello(url(h1), "solo", meta={"v": 2})
    error = await first.recv_type("error")
    assert error["code"] == "replaced"
    assert (await first.closed())[0] == 4409
    assert await asyncio.wait_for(gone, WAIT) == "replaced"
    await connected(h1, "solo")
    agents = await h2.list_connected_agents()
    assert [(a.id, a.hub_id, a.meta) for a in agents] == [("solo", h1.hub_id, {"v": 2})]
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{h2.admin_port}/agents") as resp:
        assert resp.status == 200
        assert [a["id"] for a in await resp.json()] == ["solo"]
    await second.close()


async def test_events_and_calls_cross_hubs(cluster: Any) -> None:
    h0, h1 = await cluster(2)
    a, _ = await RawAgent.hello(url(h0), "a", subs=["job.*"])
    b, _ = await RawAgent.hello(url(h1), "b")
    await connected(h0, "a")
    await connected(h1, "b")
    # An agent's emit reaches a subscriber on another hub, with `from`.
    await b.send({"t": "emit", "key": "job.done", "data": {"n": 7}})
    event = await a.recv_type("event")
    assert (event["key"], event["data"], event["from"]) == ("job.done", {"n": 7}, "b")
    await b.expect_silence(0.1)  # never back to the sender
    # emit_to across hubs resolves on the remote agent's receipt.
    waiting = asyncio.ensure_future(h0.emit_to("b", "cfg", {"x": 1}, timeout=WAIT))
    event = await b.recv_type("event")
    assert event["key"] == "cfg" and "id" in event
    await asyncio.sleep(0)
    assert not waiting.done()
    await b.send({"t": "received", "id": event["id"]})
    await asyncio.wait_for(waiting, WAIT)
    # A routed call from a (hub 0) to b (hub 1) and its reply.
    await a.send({"t": "call", "id": "c1", "agent": "b", "key": "add", "payload": [1, 2],
                  "timeout": 5})
    cmd = await b.recv_type("cmd")
    assert cmd["key"] == "add" and cmd["payload"] == [1, 2]
    await b.send({"t": "result", "id": cmd["id"], "data": 3})
    reply = await a.recv_type("reply")
    assert reply == {"t": "reply", "id": "c1", "ok": True, "data": 3}
    # broadcast from hub 1 reaches the agent on hub 0.
    await h1.broadcast("all", 1)
    assert (await a.recv_type("event"))["key"] == "all"
    await a.close()
    await b.close()


async def test_bus_survives_a_redis_restart(cluster: Any, prefix: str) -> None:
    if external_redis_url():
        pytest.skip("restarts its own redis-server")
    redis = RedisProcess()
    redis.start()
    try:
        h0, h1 = await cluster(2, redis=redis.url)
        agent, _ = await RawAgent.hello(url(h1), "w")
        await connected(h1, "w")

        async def round_trip(n: int) -> None:
            handle = h0.execute_on_agent("w", "echo", n, timeout=WAIT)
            cmd = await agent.recv_type("cmd")
            await agent.send({"t": "result", "id": cmd["id"], "data": n})
            assert await asyncio.wait_for(handle.result(), WAIT) == n

        await round_trip(1)
        redis.stop()
        await wait_for(lambda: not h0.store.healthy or not h0._cluster.bus.subscribed,  # type: ignore[union-attr]
                       what="the hubs to notice")
        redis.start()
        for hub in (h0, h1):
            await wait_for(lambda hub=hub: hub.store.healthy and hub._cluster.bus.subscribed,  # type: ignore[misc,union-attr]
                           timeout=15, what="store and bus back")
        # Redis came back empty: h1 registered its agent again, so routing works.
        async def located() -> bool:
            try:
                return await h0.get_agent("w") is not None
            except StoreUnavailable:
                return False  # a stale connection found after the restart: retried

        await wait_for(located, what="agent registered again")
        await round_trip(2)
        await agent.close()
    finally:
        redis.cleanup()


async def test_commands_stored_right_after_a_redis_restart_are_delivered(
        cluster: Any) -> None:
    """Issue 13, defect 7: Redis comes back empty; commands stored at once, before the
    agent's hub re-registered it and re-subscribed, still reach the agent: that hub
    catches up (registry, then pending commands) and retries until it can."""
    if external_redis_url():
        pytest.skip("restarts its own redis-server")
    redis = RedisProcess()
    redis.start()
    try:
        h0, h1 = await cluster(2, redis=redis.url)
        agent, _ = await RawAgent.hello(url(h1), "w")
        await connected(h1, "w")
        redis.stop()
        await wait_for(lambda: not h0.store.healthy, what="h0 to notice")
        redis.start()
        await wait_for(lambda: h0.store.healthy, timeout=15, what="h0's store back")
        handles = []
        for n in range(20):  # as soon as h0 can store them, whatever h1's state
            handle = h0.execute_on_agent("w", "echo", n, timeout=20)
            try:
                async with asyncio.timeout(WAIT):
                    await handle.submitted()
            except StoreUnavailable:
                continue  # a stale connection found after the restart: not stored
            handles.append(handle)
        assert len(handles) >= 15
        wanted = {h.id for h in handles}
        seen: set[str] = set()
        async with asyncio.timeout(15):
            while not wanted <= seen:
                frame = await agent.recv(timeout=15)
                if frame["t"] == "cmd" and frame["id"] not in seen:
                    seen.add(frame["id"])
                    await agent.send({"t": "result", "id": frame["id"], "data": "ok"})
            for handle in handles:
                assert await handle == "ok"
        assert await h0.get_agent("w") is not None  # registered again
        await agent.close()
    finally:
        redis.cleanup()


async def test_a_hub_whose_alive_key_lapsed_registers_its_agents_again(
        cluster: Any, redis_url: str, prefix: str) -> None:
    """Issue 13, defect 4: a hub frozen or cut off longer than hub_ttl has its agents
    reaped by the others; once it can refresh its alive key it registers them again
    and delivers what was stored for them meanwhile."""
    import redis.asyncio as aioredis

    from dispatcher.store.scripts import SCRIPTS

    h0, h1 = await cluster(2)
    agent, _ = await RawAgent.hello(url(h1), "w")
    await connected(h1, "w")
    client = aioredis.from_url(redis_url)
    try:
        # What a freeze longer than hub_ttl leaves: h1's alive key lapsed and h0 reaped
        # its agents (both in one MULTI, so h1's own refresh cannot come in between).
        async with client.pipeline(transaction=True) as pipe:
            pipe.delete(f"{prefix}:hub:{h1.hub_id}:alive")
            pipe.eval(SCRIPTS["reap_dead_hubs"], 2, f"{prefix}:hubs", f"{prefix}:agents",
                      prefix, h0.hub_id)
            _, reaped = await pipe.execute()
        assert len(reaped) == 1  # "w"
    finally:
        await client.aclose()
    handle = h0.execute_on_agent("w", "echo", 1, timeout=20)
    cmd = await agent.recv_type("cmd", timeout=WAIT)
    assert cmd["id"] == handle.id
    await agent.send({"t": "result", "id": cmd["id"], "data": 1})
    async with asyncio.timeout(WAIT):
        assert await handle == 1
    info = await h0.get_agent("w")
    assert info is not None and info.hub_id == h1.hub_id
    await agent.close()


async def test_a_hub_restarted_with_its_id_forgets_its_previous_lifes_agents(
        cluster: Any, prefix: str) -> None:
    """Issue 13, defect 5: what a killed hub left registered under its id is cleared
    when a hub starts with that id, so those agents are not listed as connected."""
    from dispatcher.models import AgentInfo

    (other,) = await cluster(1)
    ghost = AgentInfo(id="ghost", hub_id="hub-fixed", session="old", connected_at=1,
                      last_seen=1, meta={})
    await other.store.register_agent(ghost)  # what the killed life left behind
    assert await other.get_agent("ghost") is not None
    (restarted,) = await cluster(1, hub_id="hub-fixed")
    assert await other.get_agent("ghost") is None
    assert [a.id for a in await other.list_connected_agents()] == []
    with pytest.raises(AgentOffline):
        async with asyncio.timeout(WAIT):
            await other.execute_on_agent("ghost", "echo", require_online=True)
    assert restarted.hub_id == "hub-fixed"


async def test_deaf_bus_is_noticed_and_rebuilt(cluster: Any) -> None:
    if external_redis_url():
        pytest.skip("needs a proxy in front of its own Redis")
    redis = RedisProcess()
    redis.start()
    proxy = await TcpProxy(redis.port).start()
    try:
        (hub,) = await cluster(1, redis=f"redis://127.0.0.1:{proxy.port}/0")
        bus = hub._cluster.bus
        assert bus is not None and not bus.deaf
        proxy.pause()  # the subscriber's path goes silent: no error, no bytes
        await wait_for(lambda: bus.deaf, timeout=5, what="the bus to notice it is deaf")
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{hub.admin_port}/healthz") as resp:
            body = await resp.json()
            assert resp.status == 503 and body["bus"] == "deaf"
        # The rebuilt subscriber (a new connection) hears its probes again.
        await wait_for(lambda: not bus.deaf, timeout=10, what="the bus to hear again")
        assert bus.reconnects >= 1
    finally:
        proxy.resume()
        await proxy.close()
        redis.cleanup()


# -- real hub processes -----------------------------------------------------------

class HubProcess:
    def __init__(self, redis_url: str, prefix: str, hub_id: str) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        env = {**os.environ, "DISPATCHER_HUB_TTL": "1", "DISPATCHER_SWEEP_INTERVAL": "0.2",
               "DISPATCHER_DRAIN_TIMEOUT": "5"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "serve", "--port", str(self.port),
             "--admin-port", str(self.admin_port), "--redis", redis_url, "--prefix", prefix,
             "--hub-id", hub_id, "--log-format", "json"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def ready(self) -> None:
        async def up() -> bool:
            try:
                async with aiohttp.ClientSession() as http, http.get(
                        f"http://127.0.0.1:{self.admin_port}/healthz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                assert self.proc.poll() is None, self.proc.stderr.read()  # type: ignore[union-attr]
                return False

        await wait_for(up, timeout=15, what="hub process to serve")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def hub_processes() -> Iterator[list[HubProcess]]:
    procs: list[HubProcess] = []
    yield procs
    for p in procs:
        p.stop()


async def test_hub_killed_mid_command_completes_exactly_once(
        cluster: Any, hub_processes: list[HubProcess], redis_url: str, prefix: str) -> None:
    h0, h1 = await cluster(2)
    h2 = HubProcess(redis_url, prefix, "hub-2-proc")
    hub_processes.append(h2)
    await h2.ready()
    runs = 0
    started = asyncio.Event()
    release = asyncio.Event()
    agent = Agent([h2.url, url(h1)], "worker", backoff_initial=0.05, backoff_max=0.2)

    @agent.command("work")
    async def work(payload: Any, ctx: Any) -> Any:
        nonlocal runs
        runs += 1
        started.set()
        await asyncio.wait_for(release.wait(), WAIT * 2)
        return {"done": payload}

    await agent.start()
    try:
        await agent.wait_connected(WAIT)
        assert agent.hub_id == "hub-2-proc"
        handle = h0.execute_on_agent("worker", "work", 42, timeout=30)
        await asyncio.wait_for(started.wait(), WAIT)
        h2.proc.send_signal(signal.SIGKILL)  # kill -9 while the command runs
        await wait_for(lambda: agent.connected and agent.hub_id == h1.hub_id, timeout=10,
                       what="the agent to fail over to hub 1")
        release.set()
        assert await asyncio.wait_for(handle.result(), WAIT) == {"done": 42}
        assert runs == 1  # redelivered to the running agent, never run twice
        info = await h0.get_command(handle.id)
        assert info is not None and info.outcome == "ok" and info.status == "COMPLETE"

        # The dead hub's registry entries are reaped by the survivors.
        async def reaped() -> bool:
            return all(a.hub_id != "hub-2-proc" for a in await h0.list_connected_agents())

        await wait_for(reaped, timeout=10, what="hub 2's agents to be reaped")
    finally:
        await agent.stop()


async def test_a_completion_whose_hub_died_before_telling_is_learnt(
        cluster: Any, hub_processes: list[HubProcess], redis_url: str, prefix: str) -> None:
    """A hub killed between its store write of a completion and its message to the hub
    waiting on it: the waiting hub learns the outcome once the dead hub is reaped
    (GoneMsg), not at the command's deadline. The chaos run found it (1 in 3,110)."""
    from dispatcher.clock import now_ms

    (h0,) = await cluster(1)
    h2 = HubProcess(redis_url, prefix, "hub-dies-proc")
    hub_processes.append(h2)
    await h2.ready()
    started = asyncio.Event()
    agent = Agent([h2.url], "teller", backoff_initial=0.05, backoff_max=0.2)

    @agent.command("work")
    async def work(payload: Any, ctx: Any) -> Any:
        started.set()
        await asyncio.sleep(60)  # never answers: only the store write below completes it
        return None

    await agent.start()
    try:
        await agent.wait_connected(WAIT)
        handle = h0.execute_on_agent("teller", "work", timeout=60)
        await asyncio.wait_for(started.wait(), WAIT)
        # What hub 2 would have done with the agent's answer, up to its store write...
        done = await h0.store.complete(handle.id, "ok", now=now_ms(), result=7,
                                       agent_id="teller")
        assert done.command.status == "COMPLETE"
        # ... and it dies before its message to hub 0 goes out.
        h2.proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(handle.result(), WAIT) == 7  # not 60 s later
    finally:
        await agent.stop()


async def test_sigterm_drains_agents_to_another_hub(
        cluster: Any, hub_processes: list[HubProcess], redis_url: str, prefix: str) -> None:
    (h1,) = await cluster(1)
    h2 = HubProcess(redis_url, prefix, "hub-drain")
    hub_processes.append(h2)
    await h2.ready()
    closes: list[int | None] = []
    agent = Agent([h2.url, url(h1)], "mover", backoff_initial=0.05, backoff_max=0.2)

    @agent.command("echo")
    async def echo(payload: Any, ctx: Any) -> Any:
        return payload

    agent.on_disconnect = lambda: closes.append(agent.last_close_code)
    await agent.start()
    try:
        await agent.wait_connected(WAIT)
        assert agent.hub_id == "hub-drain"
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        h2.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(asyncio.to_thread(h2.proc.wait), 10)
        assert code == 0 and loop.time() - t0 < 6  # bounded drain, clean exit
        await wait_for(lambda: agent.connected and agent.hub_id == h1.hub_id, timeout=10,
                       what="the agent to move to hub 1")
        assert closes and closes[0] == 1001  # told "going away", not dropped
        assert await asyncio.wait_for(h1.execute_on_agent("mover", "echo", 5).result(), WAIT) == 5
    finally:
        await agent.stop()
