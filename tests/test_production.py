"""Running it in production: signals, exit codes and log lines of the real processes.

`dispatcher serve` and `dispatcher-agent` run as subprocesses; the other side
is in-process (an `agent_client.Agent` whose handler waits on an event the test
controls, or a `Dispatcher`), so every step waits on something, never on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from agent_client import Agent, AgentRefused
from dispatcher import Dispatcher, agent_token

from .conftest import HubFactory, ws_url
from .support import free_port, wait_for

BOOT = 20.0
SECRET = "prod-secret-never-logged"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DISPATCHER_") or k == "DISPATCHER_WS_FAST_PATH"}
    env.update(extra)
    return env


class Process:
    """A `dispatcher` or `dispatcher-agent` process logging JSON lines on stderr."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []

    @classmethod
    async def start(cls, exe: str, *args: str, env: dict[str, str]) -> Process:
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / exe), *args, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    async def until(self, event: str, **fields: Any) -> dict[str, Any]:
        """Read log lines until one with this event (and fields) comes."""
        for line in self.lines:
            if line["event"] == event and all(line.get(k) == v for k, v in fields.items()):
                return line
        assert self.proc.stderr is not None
        async with asyncio.timeout(BOOT):
            while True:
                raw = (await self.proc.stderr.readline()).decode()
                assert raw, f"exited before {event}: {self.raw}"
                self.raw.append(raw)
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                self.lines.append(line)
                if line["event"] == event and all(line.get(k) == v for k, v in fields.items()):
                    return line

    async def exit_code(self) -> int:
        assert self.proc.stderr is not None
        async with asyncio.timeout(BOOT):
            rest = (await self.proc.stderr.read()).decode()
            code = await self.proc.wait()
        self.raw.extend(rest.splitlines(keepends=True))
        for raw in rest.splitlines():
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(raw))
        return code

    def events(self) -> list[str]:
        return [line["event"] for line in self.lines]

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


@pytest.fixture
async def processes() -> AsyncIterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in started:
        if p.proc.returncode is None:
            p.kill()
            await p.proc.wait()


async def serve(processes: list[Process], *args: str, **env: str) -> tuple[Process, str]:
    port, admin = free_port(), free_port()
    hub = await Process.start("dispatcher", "serve", "--port", str(port), "--admin-port",
                              str(admin), "--log-format", "json", *args, env=_env(**env))
    processes.append(hub)
    await hub.until("hub_listening")
    return hub, f"127.0.0.1:{port}:{admin}"


def urls(where: str) -> tuple[str, str]:
    host, port, admin = where.split(":")
    return f"ws://{host}:{port}/ws", f"http://{host}:{admin}"


def held_agent(make_agent: Any, url: str, agent_id: str) -> tuple[Agent, asyncio.Event,
                                                                    asyncio.Event]:
    """An agent whose `hold` command runs until `release` is set (`started` when it runs)."""
    agent = make_agent(url, agent_id)
    started, release = asyncio.Event(), asyncio.Event()

    @agent.command("hold")
    async def hold(payload: Any, ctx: Any) -> Any:
        started.set()
        await release.wait()
        return {"held": payload}

    return agent, started, release


async def test_sigterm_drains_the_in_memory_hub(processes: list[Process], make_agent: Any,
                                                tmp_path: Path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text(SECRET + "\n")
    hub, where = await serve(processes, "--drain-timeout", "15",
                             DISPATCHER_ADMIN_TOKEN_FILE=str(token_file))
    ws, admin = urls(where)
    agent, started, release = held_agent(make_agent, ws, "drained-1")
    await agent.start()
    await agent.wait_connected(BOOT)
    auth = {"Authorization": f"Bearer {SECRET}"}
    async with aiohttp.ClientSession(headers=auth) as http:
        async with http.get(f"{admin}/readyz") as resp:
            assert resp.status == 200
        async with http.post(f"{admin}/agents/never-here/commands",
                             json={"key": "x", "wait": False}) as resp:
            assert resp.status == 202  # PENDING: lost when the process ends
        waiting = asyncio.ensure_future(_post(http, f"{admin}/agents/drained-1/commands",
                                              {"key": "hold", "payload": 7}))
        await asyncio.wait_for(started.wait(), BOOT)
        await wait_for(lambda: _any_active(http, admin, "drained-1"), what="ACTIVE")
        hub.proc.send_signal(signal.SIGTERM)
        await hub.until("hub_drain_waiting", active=1)
        async with http.get(f"{admin}/readyz") as resp:
            assert resp.status == 503 and (await resp.json())["status"] == "not_accepting"
        async with http.get(f"{admin}/livez") as resp:
            assert resp.status == 200
        async with http.post(f"{admin}/agents/drained-1/commands", json={"key": "hold"}) as resp:
            assert resp.status == 503 and (await resp.json())["error"]["code"] == "hub_closed"
        release.set()  # the command ends within the drain: its caller gets the result
        status, info = await asyncio.wait_for(waiting, BOOT)
        assert status == 200
    assert (info["status"], info["outcome"], info["result"]) == ("COMPLETE", "ok", {"held": 7})
    assert await hub.exit_code() == 0
    await wait_for(lambda: agent.last_close_code == 1001, what="close 1001")
    events = hub.events()
    order = [events.index(e) for e in ("hub_stopping", "hub_draining", "hub_drain_waiting",
                                       "hub_drained", "commands_lost", "hub_closed")]
    assert order == sorted(order), events
    assert next(ln for ln in hub.lines if ln["event"] == "commands_lost")["count"] == 1
    assert next(ln for ln in hub.lines if ln["event"] == "hub_drained")["still_active"] == 0
    assert any(ln["event"] == "agent_disconnected" and ln["reason"] == "going_away"
               for ln in hub.lines)
    assert SECRET not in "".join(hub.raw)


async def test_sigterm_on_redis_leaves_commands_for_another_hub(
        processes: list[Process], make_agent: Any, redis_url: str, prefix: str) -> None:
    hub, where = await serve(processes, "--redis", redis_url, "--prefix", prefix,
                             "--drain-timeout", "0.5")
    ws, admin = urls(where)
    agent, started, _ = held_agent(make_agent, ws, "stuck-1")
    await agent.start()
    await agent.wait_connected(BOOT)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{admin}/agents/stuck-1/commands",
                             json={"key": "hold", "wait": False}) as resp:
            active_id = (await resp.json())["id"]
        async with http.post(f"{admin}/agents/away-1/commands",
                             json={"key": "x", "wait": False}) as resp:
            pending_id = (await resp.json())["id"]
        await asyncio.wait_for(started.wait(), BOOT)
        await wait_for(lambda: _status(http, admin, active_id), what="ACTIVE")
    hub.proc.send_signal(signal.SIGTERM)
    assert await hub.exit_code() == 0  # the drain timed out: closes anyway
    drained = next(ln for ln in hub.lines if ln["event"] == "hub_drained")
    assert drained["still_active"] == 1 and drained["level"] == "warning"
    assert "commands_lost" not in hub.events()
    r = aioredis.from_url(redis_url)
    try:
        assert await r.hget(f"{prefix}:cmd:{active_id}", "status") == b"ACTIVE"
        assert await r.hget(f"{prefix}:cmd:{pending_id}", "status") == b"PENDING"
    finally:
        await r.aclose()


async def _post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def _any_active(http: aiohttp.ClientSession, admin: str, agent_id: str) -> bool:
    async with http.get(f"{admin}/agents/{agent_id}/commands") as resp:
        return any(c["status"] == "ACTIVE" for c in await resp.json())


async def _status(http: aiohttp.ClientSession, admin: str, cmd_id: str) -> bool:
    async with http.get(f"{admin}/commands/{cmd_id}") as resp:
        return bool((await resp.json())["status"] == "ACTIVE")


async def test_agent_process_sigterm_finishes_its_command(
        processes: list[Process], make_hub: HubFactory, tmp_path: Path) -> None:
    hub: Dispatcher = await make_hub(agent_secret=SECRET)
    closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    hub.on("agent-disconnected", lambda info, reason: closed.done() or closed.set_result(reason))
    token_file = tmp_path / "token"
    token_file.write_text(agent_token(SECRET, "proc-agent") + "\n")
    agent = await Process.start(
        "dispatcher-agent", "--log-format", "json", "--stop-timeout", "20",
        env=_env(DISPATCHER_AGENT_URL=f"ws://127.0.0.1:{free_port()}/ws,{ws_url(hub)}",
                 DISPATCHER_AGENT_ID="proc-agent",
                 DISPATCHER_AGENT_TOKEN_FILE=str(token_file)))
    processes.append(agent)
    await agent.until("agent_connected")
    handle = hub.execute_on_agent("proc-agent", "sleep", {"seconds": 0.6})
    async for _ in handle.progress():
        break  # it runs
    agent.proc.send_signal(signal.SIGTERM)
    assert await handle == {"slept": 0.6}
    assert await asyncio.wait_for(closed, BOOT) == "closed"  # close code 1000
    assert await agent.exit_code() == 0
    info = await hub.get_command(handle.id)
    assert info is not None and (info.status, info.outcome) == ("COMPLETE", "ok")
    events = agent.events()
    assert events.index("agent_stopping") < events.index("agent_draining") < \
        events.index("agent_stopped")


async def test_agent_refused_exits_2_and_run_raises(
        processes: list[Process], make_hub: HubFactory, make_agent: Any) -> None:
    hub = await make_hub(agent_secret=SECRET)
    agent = await Process.start("dispatcher-agent", "--url", ws_url(hub), "--id", "wrong-1",
                                "--log-level", "error", env=_env(DISPATCHER_AGENT_TOKEN="nope"))
    processes.append(agent)
    assert await agent.exit_code() == 2
    err = "".join(agent.raw).strip().splitlines()
    assert err[-1].startswith("dispatcher-agent: the hub refused this agent (unauthorized)")
    assert "Traceback" not in "".join(agent.raw)
    library = make_agent(ws_url(hub), "wrong-2", token="nope")
    with pytest.raises(AgentRefused) as refused:
        await asyncio.wait_for(library.run(), BOOT)
    assert refused.value.code == "unauthorized"


def test_agent_command_line_help_version_and_bad_concurrency() -> None:
    from click.testing import CliRunner

    from agent_client.cli import ENV_VARIABLES, main

    runner = CliRunner()
    out = runner.invoke(main, ["-h"], terminal_width=200)
    assert out.exit_code == 0
    for name in (*ENV_VARIABLES, "DISPATCHER_LOG_LEVEL", "DISPATCHER_LOG_FORMAT", "--stop-timeout"):
        assert name in out.stdout, name
    out = runner.invoke(main, ["--version"])
    assert out.exit_code == 0 and out.stdout.startswith("dispatcher-agent, version ")
    out = runner.invoke(main, ["--concurrency", "0"])
    assert out.exit_code == 2 and "--concurrency" in out.stderr
    out = runner.invoke(main, [], env={"DISPATCHER_LOG_FORMAT": "xml"})
    assert out.exit_code == 2
    assert out.stderr == ("dispatcher-agent: configuration error: DISPATCHER_LOG_FORMAT=xml: "
                          "expected one of json, console\n")


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc (Linux)")
async def test_secrets_given_as_flags_do_not_show_in_the_process_list(
        processes: list[Process]) -> None:
    """`ps` (/proc/PID/cmdline) shows the hub's and the agent's secret flags masked."""
    hub, _ = await serve(processes, "--agent-secret", "s3cret-of-the-hub",
                             "--admin-token=t0ken-of-the-admin")
    line = _cmdline(hub.proc.pid)
    assert "s3cret-of-the-hub" not in line and "t0ken-of-the-admin" not in line, line
    assert "--agent-secret ***" in line and "--admin-token=***" in line, line
    await hub.until("secret_on_command_line")  # and it says why that is a bad idea
    # An agent that keeps retrying (nothing listens on that port): alive to be looked at.
    agent = await Process.start("dispatcher-agent", "--url", f"ws://127.0.0.1:{free_port()}/ws",
                                "--id", "masked", "--token", "t0ken-of-the-agent",
                                "--log-format", "json", env=_env())
    processes.append(agent)
    await wait_for(lambda: "--token ***" in _cmdline(agent.proc.pid),
                   what="the agent's process title masked")
    assert "t0ken-of-the-agent" not in _cmdline(agent.proc.pid)


def test_masked_argv_hides_values_and_url_passwords() -> None:
    from agent_client.proctitle import masked_argv

    assert masked_argv(["x", "serve", "--agent-secret", "a", "--redis",
                        "redis://:pw@h:6379/0", "--redis-url=rediss://u:pw2@h/1",
                        "--port", "1", "--token=b"]) == [
        "x", "serve", "--agent-secret", "***", "--redis", "redis://:***@h:6379/0",
        "--redis-url=rediss://u:***@h/1", "--port", "1", "--token=***"]
    assert masked_argv(["x", "--redis", "redis://h:6379/0"]) == ["x", "--redis",
                                                                  "redis://h:6379/0"]
