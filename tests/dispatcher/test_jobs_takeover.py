"""A job outlives the hub that runs it (Redis engine): kill -9 that hub mid-rollout and
another hub carries the rollout on; every agent runs its part exactly once."""

from __future__ import annotations

import asyncio
import itertools
import signal
from collections import Counter
from typing import Any

import aiohttp

from agent_client import Agent

from ..support import WAIT, wait_for
from .test_cluster import HubProcess, cluster, hub_processes, url

__all__ = ["cluster", "hub_processes"]  # fixtures, shared


async def test_a_killed_hubs_rollout_is_carried_on_by_another_hub(
        cluster: Any, hub_processes: list[HubProcess], redis_url: str, prefix: str) -> None:
    (h1,) = await cluster(1)
    h2 = HubProcess(redis_url, prefix, "hub-jobs-proc")
    hub_processes.append(h2)
    await h2.ready()
    runs: Counter[str] = Counter()
    started: asyncio.Queue[str] = asyncio.Queue()
    gate = asyncio.Event()
    agents = []
    for i in range(4):
        agent = Agent(url(h1), f"t-{i}", backoff_initial=0.05, backoff_max=0.2)

        async def work(payload: Any, ctx: Any, agent_id: str = f"t-{i}") -> Any:
            runs[agent_id] += 1
            started.put_nowait(agent_id)
            await asyncio.wait_for(gate.wait(), WAIT * 2)
            return agent_id

        agent.command("work")(work)
        await agent.start()
        agents.append(agent)
    try:
        for agent in agents:
            await agent.wait_connected(WAIT)
        async with aiohttp.ClientSession() as http, http.post(
                f"http://127.0.0.1:{h2.admin_port}/jobs",
                json={"target": "t-*", "key": "work", "batch": 1, "job_id": "rollout"}) as resp:
            assert resp.status == 202, await resp.text()
            assert (await resp.json())["origin"] == "hub-jobs-proc"
        assert await asyncio.wait_for(started.get(), WAIT) == "t-0"
        h2.proc.send_signal(signal.SIGKILL)  # kill -9 while the first part runs
        h2.proc.wait(10)
        gate.set()
        handle = await h1.follow_job("rollout")
        assert handle is not None
        job = await asyncio.wait_for(handle, WAIT * 3)
        assert job.status == "COMPLETE" and job.origin == h1.hub_id
        assert job.counts["ok"] == 4
        assert runs == Counter({f"t-{i}": 1 for i in range(4)})  # each part exactly once
        cmds = await h1.list_job_commands("rollout")
        assert [(c.agent_id, c.outcome, c.result) for c in cmds] == [
            (f"t-{i}", "ok", f"t-{i}") for i in range(4)]
        # Batch 1 held across the takeover: the parts ran one after another.
        for before, after in itertools.pairwise(cmds):
            assert before.updated <= after.ts
    finally:
        for agent in agents:
            await agent.stop()


async def test_a_job_on_another_hub_is_followed_from_the_store(cluster: Any) -> None:
    h0, h1 = await cluster(2)
    agent = Agent(url(h1), "f-1", backoff_initial=0.05, backoff_max=0.2)
    agent.command("work")(lambda payload, ctx: "done")
    await agent.start()
    try:
        await agent.wait_connected(WAIT)
        await wait_for(h0.list_connected_agents, what="the agent to be listed")
        handle = h0.execute_on_agents("f-*", "work", job_id="elsewhere")
        job = await asyncio.wait_for(handle, WAIT)
        followed = await h1.follow_job("elsewhere")
        assert followed is not None
        assert (await asyncio.wait_for(followed, WAIT)).counts == job.counts
        assert [r.outcome async for r in followed.results()] == ["ok"]
        assert await h1.follow_job("nope") is None
    finally:
        await agent.stop()
