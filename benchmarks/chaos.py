"""Fault injection with exact accounting: real hubs, a real Redis, agents, kills and cuts.

    python -m benchmarks.chaos [--duration S] [--hubs N] [--agents N] [--seed N]
                               [--rate R] [--faults KIND,...] [--out DIR]

A private ``redis-server`` (append-only file, fsync per write), N ``dispatcher
serve`` processes, agents in their own processes (``benchmarks/chaos_agent.py``)
that reach the hubs only through TCP proxies (``benchmarks/chaos_proxy.py``),
and a caller: a ``Dispatcher`` embedded here as one more hub of the cluster
(no agent connects to it) that submits ``work`` commands at a steady rate.
Faults are drawn from a seeded RNG (:data:`FAULTS`). At the end the faults
stop, everything settles (bounded), and every submitted command is accounted
for (:meth:`Run.account`): one terminal outcome in the store, the caller saw the
same outcome within 2 s, no command ran twice or after its deadline, the
agent registry matches the agents' own view. The report (``chaos.json``,
``chaos.md``) counts outcomes, faults and violations by kind, with examples.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from agent_client.logs import configure_logging
from dispatcher import (
    CommandCancelled,
    CommandFailed,
    CommandHandle,
    CommandTimeout,
    Dispatcher,
    DispatcherError,
    HubConfig,
    StoreUnavailable,
)
from dispatcher.models import AgentInfo, CommandInfo

from .chaos_proxy import FaultProxy
from .procs import BenchError, Child, RedisServer, kill_all

__all__ = ["FAULTS", "LONG_FAULTS", "SAFE_FAULTS", "ChaosConfig", "Report", "emergency_stop",
           "main", "run_chaos"]

# Every fault kind, and the issue-13 defect it is known to trigger today (None: holds).
FAULTS: dict[str, int | None] = {
    "hub_kill": None,         # SIGKILL a hub, restart it (same id or a new one) after a moment
    "hub_freeze": None,       # SIGSTOP a hub for less than half its hub_ttl, then SIGCONT
    "cut": None,              # close every connection of one proxy, refuse new ones a while
    "blackhole": None,        # one proxy forwards nothing (and passes no close) a while
    "hub_freeze_long": 4,     # SIGSTOP a hub for longer than hub_ttl (its agents stay connected)
    "ghost": 5,               # SIGKILL a hub and its only agent, restart the hub with the same id
    "overdue": 6,             # a gone hub's batch passes its deadlines while the agent is away
    "redis_kill": 7,          # SIGKILL redis-server, restart it on the same port and AOF
    "redis_outage": 4,        # the same, down for longer than hub_ttl
    "cross_wait": 3,          # (not a fault) a second waiter on another hub, same command id
}
SAFE_FAULTS = ("hub_kill", "hub_freeze", "cut", "blackhole")
LONG_FAULTS = (*SAFE_FAULTS, "hub_freeze_long", "ghost", "overdue", "redis_kill",
               "redis_outage")

# Slack of the clock comparisons: an agent may start a command that was sent
# just before its deadline a little after it (one hop and a scheduling delay).
LATE_MS = 250
# A caller learns a command's outcome within this of it being stored (the bound).
HANDLE_BOUND_MS = 2000
# A hub thawed from a long freeze delivers what waited for its agents within this.
FREEZE_DELIVERY_MS = 1000


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class ChaosConfig:
    """One run. Times are seconds; the defaults are the short run of the test suite."""

    duration: float = 40.0
    hubs: int = 3
    agents: int = 5
    seed: int = 1
    rate: float = 20.0  # commands per second from the caller
    timeout: float = 15.0  # commands' deadline
    work_ms: tuple[int, int] = (5, 80)  # what a command does: sleep this long
    faults: tuple[str, ...] = SAFE_FAULTS
    fault_gap: tuple[float, float] = (1.0, 3.0)  # quiet time between two faults
    heartbeat: float = 1.0  # the hubs' ping interval
    hub_ttl: float = 3.0
    sweep_interval: float = 0.5
    agent_heartbeat: float = 8.0  # longer than any freeze: agents stay connected through one
    settle: float = 20.0  # bound on the settling after the last fault (beyond the deadlines)
    overdue_batch: int = 400  # commands of one "overdue" fault
    cross_wait_every: int = 4  # with "cross_wait": every Nth command gets a second waiter
    out: Path | None = None  # report (and logs) here; None: a temp dir, removed
    keep_logs: bool = False


@dataclass
class Submitted:
    """One command the harness submitted, and what its caller saw."""

    id: str
    agent: str
    submitted: int
    kind: str = "load"  # load | overdue | online
    expect: str = "ok"  # the outcome a correct cluster gives it
    handle_expected: bool = True  # its handle must see the outcome (the caller stayed up)
    rejected: str | None = None  # the submit failed (not stored): the error's type
    seen: str | None = None  # outcome the handle saw, or "raised:Type"
    seen_at: int | None = None
    waiter: str | None = None  # the second waiter's outcome (cross_wait)
    waiter_at: int | None = None


@dataclass
class Report:
    config: dict[str, Any]
    started: str
    wall_s: float = 0.0
    submitted: int = 0
    rejected: int = 0
    in_doubt: int = 0  # the submit raised StoreUnavailable, yet the command was stored
    outcomes: dict[str, int] = field(default_factory=dict)
    executions: int = 0
    stall_drop_max_s: float = 0.0  # slowest drop of a stalled connection by its hub
    faults: dict[str, int] = field(default_factory=dict)
    violations: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def violate(self, kind: str, example: str) -> None:
        self.violations[kind] = self.violations.get(kind, 0) + 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < 5:
            shown.append(example)

    def to_markdown(self) -> str:
        lines = [f"# Fault-injection run ({self.started})", "",
                 f"{self.wall_s:.0f} s wall, seed {self.config['seed']}, "
                 f"{self.config['hubs']} hubs, {self.config['agents']} agents, "
                 f"{self.config['rate']:g} commands/s, deadline {self.config['timeout']:g} s.", "",
                 "| | count |", "|---|---:|",
                 f"| commands submitted | {self.submitted} |",
                 f"| refused at submit (store down) | {self.rejected} |",
                 f"| submit in doubt (raised, yet stored) | {self.in_doubt} |"]
        lines += [f"| outcome `{k}` | {v} |" for k, v in sorted(self.outcomes.items())]
        lines += [f"| executions logged by agents | {self.executions} |"]
        if self.stall_drop_max_s:
            lines += [f"| slowest drop of a stalled connection (s) | {self.stall_drop_max_s} |"]
        lines += [f"| fault `{k}` | {v} |" for k, v in sorted(self.faults.items())]
        lines += ["", "| violation | count | example |", "|---|---:|---|"]
        if not self.violations:
            lines.append("| none | 0 | |")
        for kind, n in sorted(self.violations.items()):
            example = (self.examples.get(kind) or [""])[0].replace("|", "/")
            lines.append(f"| `{kind}` | {n} | {example} |")
        lines += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"


class HubProc:
    """One ``dispatcher serve`` process, restartable on the same ports."""

    def __init__(self, index: int, cluster: Cluster) -> None:
        self.index = index
        self.cluster = cluster
        self.hub_id = f"hub{index}"
        self.generation = 0
        self.port = _fixed_port()
        self.admin_port = _fixed_port()
        self.child: Child | None = None
        self.frozen = False

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.proc is not None \
            and self.child.proc.returncode is None

    async def start(self, new_id: bool = False) -> None:
        cfg = self.cluster.cfg
        if new_id:
            self.generation += 1
            self.hub_id = f"hub{self.index}-{self.generation}"
        args = ["serve", "--redis", self.cluster.redis.url, "--hub-id", self.hub_id,
                "--port", str(self.port), "--admin-port", str(self.admin_port),
                "--heartbeat", str(cfg.heartbeat), "--hello-timeout", "5",
                "--command-timeout", str(cfg.timeout), "--log-format", "json",
                "--log-level", "info"]
        env = {"DISPATCHER_PREFIX": self.cluster.prefix,
               "DISPATCHER_HUB_TTL": str(cfg.hub_ttl),
               "DISPATCHER_SWEEP_INTERVAL": str(cfg.sweep_interval),
               "DISPATCHER_DRAIN_TIMEOUT": "3"}
        self.child = Child(f"hub{self.index}", "dispatcher", args, self.cluster.logs, env=env)
        await self.child.start()
        self.cluster.timeline[self.hub_id].append([now_ms(), None])
        await self.cluster.wait_healthy(self)

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            assert self.child is not None and self.child.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.child.proc.send_signal(sig)

    async def kill(self) -> None:
        self.signal(signal.SIGKILL)
        await self._reaped()

    async def stop(self) -> None:
        if self.frozen:
            self.signal(signal.SIGCONT)
            self.frozen = False
        self.signal(signal.SIGTERM)
        await self._reaped(drain=5.0)

    async def _reaped(self, drain: float = 0.0) -> None:
        child = self.child
        if child is None:
            return
        if drain and await child._wait_exit(drain) is None:
            child.kill()
        await child._wait_exit(10)
        await child.stop(timeout=1)
        spans = self.cluster.timeline[self.hub_id]
        if spans and spans[-1][1] is None:
            spans[-1][1] = now_ms()
        self.child = None
        self.frozen = False


class Cluster:
    """Everything one run starts; :meth:`close` ends all of it, whatever happened."""

    def __init__(self, cfg: ChaosConfig, workdir: Path) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.prefix = f"chaos{cfg.seed}"
        self.redis = RedisServer(persist=True, port=_fixed_port())  # restarts on it
        self.hubs = [HubProc(i, self) for i in range(cfg.hubs)]
        self.proxies: list[FaultProxy] = []
        self.agents: dict[str, Child] = {}
        self.agent_urls: dict[str, list[str]] = {}
        self.caller: Dispatcher | None = None
        self.http: aiohttp.ClientSession | None = None
        # hub id -> [[started_ms, ended_ms | None], ...]: when a process ran under that id
        self.timeline: dict[str, list[list[int | None]]] = defaultdict(list)
        self.freezes: list[tuple[str, int, int]] = []  # (hub id, from, to) of long freezes
        self.reaps: list[tuple[int, str, str]] = []  # (when, agent, hub) from the caller

    def hub_config(self, hub_id: str) -> HubConfig:
        cfg = self.cfg
        return HubConfig(redis_url=self.redis.url, prefix=self.prefix, hub_id=hub_id, port=0,
                         admin_port=None, heartbeat=cfg.heartbeat, hub_ttl=cfg.hub_ttl,
                         sweep_interval=cfg.sweep_interval, command_timeout=cfg.timeout,
                         drain_timeout=3.0)

    async def start(self) -> None:
        self.redis.start()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        await asyncio.gather(*(hub.start() for hub in self.hubs))
        self.proxies = [await FaultProxy(hub.port).start() for hub in self.hubs]
        self.caller = Dispatcher(self.hub_config("caller"))
        self.caller.on("agent-disconnected", self._on_left)
        await self.caller.listen()

    def _on_left(self, info: AgentInfo, reason: str) -> None:
        if reason == "hub_dead":
            self.reaps.append((now_ms(), info.id, info.hub_id))

    async def wait_healthy(self, hub: HubProc, timeout: float = 20.0) -> None:
        """Until the hub's /healthz says 200 (its store reachable), bounded."""
        assert self.http is not None
        url = f"http://127.0.0.1:{hub.admin_port}/healthz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not hub.running:
                assert hub.child is not None
                raise BenchError(f"{hub.hub_id} exited; {hub.child.tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.http.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)  # a child process: no readiness signal but its answer
        raise BenchError(f"{hub.hub_id} not healthy within {timeout:g} s")

    async def start_agent(self, agent_id: str, urls: list[str]) -> Child:
        self.agent_urls[agent_id] = urls
        args = ["--id", agent_id, "--log", str(self.logs / f"{agent_id}.jsonl"),
                "--heartbeat", str(self.cfg.agent_heartbeat)]
        for url in urls:
            args += ["--url", url]
        child = Child(agent_id, "benchmarks.chaos_agent", args, self.logs)
        await child.start()
        await child.expect("ready", 20)
        self.agents[agent_id] = child
        return child

    async def stop_agent(self, agent_id: str, kill: bool = False) -> None:
        child = self.agents.pop(agent_id, None)
        if child is None:
            return
        if kill:
            child.kill()
        await child.stop(timeout=10)

    async def agent_state(self, agent_id: str) -> dict[str, Any]:
        child = self.agents[agent_id]
        await child.send({"op": "state"})
        return await child.expect("state", 10)

    async def registry(self) -> dict[str, AgentInfo]:
        assert self.caller is not None
        return {a.id: a for a in await self.caller.list_connected_agents()}

    async def registry_matches(self) -> list[str]:
        """What is wrong with the registry now ([] if nothing): every running agent is
        listed on the hub it is connected to, and nothing else is listed."""
        try:
            listed = await self.registry()
        except StoreUnavailable as exc:
            return [f"store unavailable: {exc}"]
        wrong = []
        for agent_id in sorted(self.agents):
            state = await self.agent_state(agent_id)
            entry = listed.get(agent_id)
            if not state["connected"]:
                wrong.append(f"{agent_id} is not connected")
            elif entry is None:
                wrong.append(f"{agent_id} (connected to {state['hub']}) is not in the registry")
            elif entry.hub_id != state["hub"]:
                wrong.append(f"{agent_id} is connected to {state['hub']}, "
                             f"the registry says {entry.hub_id}")
        wrong += [f"{a} is listed on {info.hub_id} but not running"
                  for a, info in sorted(listed.items()) if a not in self.agents]
        return wrong

    async def wait_registry(self, bound: float) -> list[str]:
        """Poll (bounded) until the registry matches; what is still wrong after ``bound``."""
        deadline = time.monotonic() + bound
        while True:
            wrong = await self.registry_matches()
            if not wrong or time.monotonic() > deadline:
                return wrong
            await asyncio.sleep(0.2)  # state in other processes: a bounded poll

    def hub_logs(self) -> list[dict[str, Any]]:
        events = []
        for path in sorted(self.logs.glob("hub*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        events.append(json.loads(line))
        return events

    async def close(self) -> None:
        """End everything this run started (bounded), even after a failure."""
        with contextlib.suppress(Exception):
            if self.caller is not None:
                await asyncio.wait_for(self.caller.close(), 10)
        for agent_id in list(self.agents):
            with contextlib.suppress(Exception):
                await self.stop_agent(agent_id)
        for hub in self.hubs:
            with contextlib.suppress(Exception):
                await hub.stop()
        for proxy in self.proxies:
            with contextlib.suppress(Exception):
                await proxy.close()
        if self.http is not None:
            await self.http.close()
        kill_all()
        self.redis.stop()


class Run:
    """The load, the faults and the accounting of one run."""

    def __init__(self, cfg: ChaosConfig, cluster: Cluster) -> None:
        self.cfg = cfg
        self.cluster = cluster
        # Two generators: the fault schedule (kinds, targets, durations) depends on
        # the seed alone, not on how many commands went out meanwhile.
        self.rng = random.Random(cfg.seed)
        self.load_rng = random.Random(f"load-{cfg.seed}")
        self.subs: dict[str, Submitted] = {}
        self.handles: dict[str, CommandHandle] = {}
        self.load_agents = [f"agent-{i}" for i in range(cfg.agents)]
        self.faults: Counter[str] = Counter()
        self.report = Report(config=_jsonable(asdict(cfg)),
                             started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ghosts = 0

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- load -----------------------------------------------------------------------
    def submit(self, hub: Dispatcher, cmd_id: str, agent: str, sub: Submitted,
               timeout: float, *, require_online: bool = False) -> CommandHandle | None:
        self.subs[cmd_id] = sub
        payload = {"ms": self.load_rng.randint(*self.cfg.work_ms)}
        try:
            handle = hub.execute_on_agent(agent, "work", payload, timeout=timeout,
                                          command_id=cmd_id, require_online=require_online)
        except DispatcherError as exc:
            sub.rejected = type(exc).__name__
            return None
        self.handles[cmd_id] = handle

        def done(fut: asyncio.Future[Any]) -> None:
            sub.seen_at = now_ms()
            sub.seen = _outcome_of(fut)

        handle.add_done_callback(done)
        return handle

    async def load(self, stop: asyncio.Event) -> None:
        assert self.cluster.caller is not None
        loop = asyncio.get_running_loop()
        step = 1.0 / self.cfg.rate
        t = loop.time()
        n = 0
        while not stop.is_set():
            agent = self.load_agents[n % len(self.load_agents)]
            cmd_id = f"s{self.cfg.seed}-{n}"
            sub = Submitted(cmd_id, agent, now_ms())
            handle = self.submit(self.cluster.caller, cmd_id, agent, sub, self.cfg.timeout)
            if handle is not None and "cross_wait" in self.cfg.faults \
                    and n % self.cfg.cross_wait_every == 0:
                self._spawn(self.cross_wait(handle, sub))
            n += 1
            t += step
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, t - loop.time()))

    async def cross_wait(self, handle: CommandHandle, sub: Submitted) -> None:
        """The same command (same id) submitted again, waiting, on another hub's admin API."""
        try:
            await asyncio.wait_for(handle.submitted(), 10)
        except (DispatcherError, TimeoutError):
            return
        hubs = [h for h in self.cluster.hubs if h.running]
        if not hubs or self.cluster.http is None:
            return
        hub = self.load_rng.choice(hubs)
        url = f"http://127.0.0.1:{hub.admin_port}/agents/{sub.agent}/commands"
        body = {"key": "work", "payload": {"ms": 0}, "command_id": sub.id,
                "timeout": self.cfg.timeout, "wait": True}
        try:
            async with self.cluster.http.post(
                    url, json=body, timeout=aiohttp.ClientTimeout(total=self.cfg.timeout + 10)
            ) as resp:
                answer = await resp.json()
                sub.waiter_at = now_ms()
                if resp.status == 200:
                    sub.waiter = str(answer.get("outcome"))
                elif resp.status == 504:
                    sub.waiter = "timeout"
                else:
                    sub.waiter = f"http:{resp.status}"
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            sub.waiter = f"lost:{type(exc).__name__}"

    # -- faults -----------------------------------------------------------------------
    async def faults_loop(self, stop_at: float) -> None:
        kinds = [k for k in self.cfg.faults if k != "cross_wait"]
        deck: list[str] = []
        loop = asyncio.get_running_loop()
        while kinds and loop.time() < stop_at:
            await asyncio.sleep(self.rng.uniform(*self.cfg.fault_gap))  # the schedule itself
            if loop.time() >= stop_at:
                break
            if not deck:  # every kind once per round, in a seeded order
                deck = self.rng.sample(kinds, len(kinds))
            kind = deck.pop()
            await getattr(self, f"fault_{kind}")()
            self.faults[kind] += 1

    def _pick_hub(self) -> HubProc:
        return self.rng.choice([h for h in self.cluster.hubs if h.running])

    async def fault_hub_kill(self) -> None:
        hub = self._pick_hub()
        await hub.kill()
        await asyncio.sleep(self.rng.uniform(0.2, 2.0))  # how long the hub stays down
        await hub.start(new_id=self.rng.random() < 0.5)

    async def fault_hub_freeze(self) -> None:
        hub = self._pick_hub()
        hub.signal(signal.SIGSTOP)
        hub.frozen = True
        await asyncio.sleep(self.rng.uniform(0.2, 0.4) * self.cfg.hub_ttl)
        hub.signal(signal.SIGCONT)
        hub.frozen = False

    async def fault_hub_freeze_long(self) -> None:
        hub = self._pick_hub()
        hub.signal(signal.SIGSTOP)
        hub.frozen = True
        start = now_ms()
        await asyncio.sleep(self.cfg.hub_ttl + self.rng.uniform(2.0, 3.0))
        hub.signal(signal.SIGCONT)
        hub.frozen = False
        self.cluster.freezes.append((hub.hub_id, start, now_ms()))

    async def fault_cut(self) -> None:
        proxy = self.rng.choice(self.cluster.proxies)
        proxy.cut()
        await asyncio.sleep(self.rng.uniform(0.1, 1.5))
        proxy.restore()

    async def fault_blackhole(self) -> None:
        proxy = self.rng.choice(self.cluster.proxies)
        held = proxy.live
        proxy.blackhole()
        stall = self.rng.uniform(1.0, 5.0)
        await asyncio.sleep(stall)
        drops = list(proxy.stall_drops)
        proxy.restore()
        # The hub drops a silent connection within two heartbeats (docs/protocol.md,
        # Transport); 1 s of slack for a loaded machine.
        bound = 2 * self.cfg.heartbeat + 1.0
        if drops:
            self.report.stall_drop_max_s = round(max(self.report.stall_drop_max_s, *drops), 2)
        if stall > bound:
            late = held - sum(1 for d in drops if d <= bound)
            if late > 0:
                self.report.violate("stall_not_dropped", f"{late} of {held} stalled "
                                    f"connections still open {bound:g} s into a black hole "
                                    f"(drops after {[round(d, 1) for d in drops]} s)")

    async def fault_redis_kill(self) -> None:
        self.cluster.redis.kill()
        await asyncio.sleep(self.rng.uniform(0.3, 2.0))
        self.cluster.redis.start()

    async def fault_redis_outage(self) -> None:
        self.cluster.redis.kill()
        start = now_ms()
        await asyncio.sleep(self.cfg.hub_ttl + self.rng.uniform(1.0, 2.0))
        self.cluster.redis.start()
        # Every hub's alive key lapsed meanwhile: for the reaping rule, as a long freeze.
        self.cluster.freezes.extend((h.hub_id, start, now_ms()) for h in self.cluster.hubs)

    async def fault_ghost(self) -> None:
        """Defect 5: a hub restarted with the same id must not list its dead life's agents."""
        cluster = self.cluster
        hub = cluster.hubs[0]
        if not hub.running:
            return
        ghost = f"ghost-{self._ghosts}"
        self._ghosts += 1
        await cluster.start_agent(ghost, [cluster.proxies[0].url])
        await _until(lambda: self._listed_on(ghost, hub.hub_id), 10, f"{ghost} registered")
        # Both die at once (the hub first), as on a machine that loses power:
        # the hub must not see the agent leave, or it would unregister it.
        hub.signal(signal.SIGKILL)
        cluster.agents[ghost].kill()
        await hub.kill()
        await cluster.stop_agent(ghost, kill=True)
        await hub.start(new_id=False)
        # Within a heartbeat or two, the registry must forget it ...
        if await self._listed_on(ghost, hub.hub_id, within=2 * self.cfg.heartbeat + 2):
            self.report.violate("registry_ghost", f"{ghost} still listed on {hub.hub_id} "
                                f"{2 * self.cfg.heartbeat + 2:g} s after its hub restarted")
        # ... and a command that requires it online must say so at once.
        assert cluster.caller is not None
        cmd_id = f"online-{ghost}"
        sub = Submitted(cmd_id, ghost, now_ms(), kind="online", expect="AgentOffline")
        handle = self.submit(cluster.caller, cmd_id, ghost, sub, 3.0, require_online=True)
        if handle is not None:
            with contextlib.suppress(DispatcherError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(_settled(handle)), 5)

    async def _listed_on(self, agent: str, hub_id: str, within: float = 0.0) -> bool:
        """Whether the registry lists ``agent`` on ``hub_id`` (still, after ``within`` s)."""
        deadline = time.monotonic() + within
        while True:
            try:
                entry = (await self.cluster.registry()).get(agent)
            except StoreUnavailable:
                entry = None
            listed = entry is not None and entry.hub_id == hub_id
            if not within:
                return listed
            if not listed or time.monotonic() > deadline:
                return listed
            await asyncio.sleep(0.1)  # state in other processes: a bounded poll

    async def fault_overdue(self) -> None:
        """Defect 6: a batch whose hub is gone passes its deadlines while its agent is away."""
        cluster = self.cluster
        agent = "late-0"
        if agent not in cluster.agents:
            await cluster.start_agent(agent, [p.url for p in cluster.proxies])
        await cluster.stop_agent(agent)
        await _until(lambda: self._absent(agent), 10, f"{agent} gone from the registry")
        submitter = Dispatcher(cluster.hub_config(f"submitter-{self.faults['overdue']}"))
        await submitter.listen()
        timeout = 1.5
        try:
            handles = []
            for i in range(self.cfg.overdue_batch):
                cmd_id = f"late{self.faults['overdue']}-{i}"
                sub = Submitted(cmd_id, agent, now_ms(), kind="overdue", expect="timeout",
                                handle_expected=False)
                handle = self.submit(submitter, cmd_id, agent, sub, timeout)
                if handle is not None:
                    handles.append(handle)
            await asyncio.wait_for(asyncio.gather(*(h.submitted() for h in handles),
                                                  return_exceptions=True), 20)
        finally:
            await asyncio.wait_for(submitter.close(), 10)
        latest = max((s.submitted for s in self.subs.values() if s.kind == "overdue"),
                     default=now_ms())
        await asyncio.sleep(max(0.0, (latest + timeout * 1000 + 200 - now_ms()) / 1000))
        await cluster.start_agent(agent, [p.url for p in cluster.proxies])

    async def _absent(self, agent: str) -> bool:
        try:
            return agent not in await self.cluster.registry()
        except StoreUnavailable:
            return False

    # -- the run --------------------------------------------------------------------------
    async def run(self) -> Report:
        cfg = self.cfg
        cluster = self.cluster
        t0 = time.monotonic()
        await cluster.start()
        n = len(cluster.proxies)
        await asyncio.gather(*(
            cluster.start_agent(a, [cluster.proxies[(i + k) % n].url for k in range(n)])
            for i, a in enumerate(self.load_agents)))
        wrong = await cluster.wait_registry(15)
        if wrong:
            raise BenchError(f"the cluster did not come up: {wrong}")
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        load = asyncio.ensure_future(self.load(stop))
        try:
            await self.faults_loop(loop.time() + cfg.duration)
            await asyncio.sleep(max(0.0, t0 + cfg.duration - time.monotonic()))
        finally:
            stop.set()
            await load
        await self.settle()
        await self.account()
        self.report.wall_s = time.monotonic() - t0
        self.report.faults = dict(self.faults)
        return self.report

    async def settle(self) -> None:
        """Faults are over: every hub up and thawed, every proxy open; then wait (bounded)
        for every handle to resolve and every handle-less command to complete."""
        cluster = self.cluster
        for proxy in cluster.proxies:
            proxy.restore()
        for hub in cluster.hubs:
            if hub.frozen:
                hub.signal(signal.SIGCONT)
                hub.frozen = False
            if not hub.running:
                await hub.start()
        if cluster.redis.proc is None:
            cluster.redis.start()
        bound = self.cfg.timeout + self.cfg.settle
        pending = [h for h in self.handles.values() if not h.done()]
        if pending:
            await asyncio.wait([asyncio.ensure_future(_settled(h)) for h in pending],
                               timeout=bound)
        orphans = [s.id for s in self.subs.values()
                   if not s.handle_expected and s.rejected is None]
        with contextlib.suppress(BenchError):  # what is still not COMPLETE is a violation
            await _until(lambda: self._all_complete(orphans), bound, "orphans complete")
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=bound)
            for task in self._tasks:
                task.cancel()

    async def _all_complete(self, ids: list[str]) -> bool:
        assert self.cluster.caller is not None
        for cmd_id in ids:
            try:
                info = await self.cluster.caller.get_command(cmd_id)
            except StoreUnavailable:
                return False
            if info is None or info.status != "COMPLETE":
                return False
        return True

    async def account(self) -> None:
        """The exact accounting of the run (see the module docstring)."""
        cluster = self.cluster
        report = self.report
        assert cluster.caller is not None
        # 1. The registry against the agents' own view (they are all still running).
        for problem in await cluster.wait_registry(2 * self.cfg.heartbeat + 2):
            report.violate("registry_wrong", problem)
        # 2. Every command's stored state.
        caller = cluster.caller
        stored: dict[str, CommandInfo | None] = {}
        for cmd_id, sub in self.subs.items():
            if sub.rejected is None:
                stored[cmd_id] = await _retry(functools.partial(caller.get_command, cmd_id))
        # 3. The agents' executions (after they stopped: cancelled ones are logged too).
        for agent_id in list(cluster.agents):
            await cluster.stop_agent(agent_id)
        runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for path in cluster.logs.glob("*.jsonl"):
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    runs[rec["id"]].append(rec)
        report.executions = sum(len(v) for v in runs.values())
        outcomes: Counter[str] = Counter()
        for cmd_id, sub in self.subs.items():
            report.submitted += 1
            if sub.rejected is not None:
                self._check_rejected(sub, stored.get(cmd_id))
                continue
            info = stored[cmd_id]
            if sub.kind == "online":
                self._check_online(sub, info)
                continue
            if sub.seen == "raised:StoreUnavailable":
                if info is None:
                    report.rejected += 1  # refused by a store that was down: never stored
                    continue
                # Redis died after applying it, before answering: documented as in
                # doubt (docs/redis.md); the command is checked, not the handle.
                report.in_doubt += 1
                sub.handle_expected = False
            outcomes[info.outcome or info.status if info else "missing"] += 1
            self._check_command(sub, info, runs.get(cmd_id, []))
        report.outcomes = dict(outcomes)
        # 4. Reaps of hubs that were neither dead nor frozen past their hub_ttl.
        self._check_reaps()

    def _check_rejected(self, sub: Submitted, info: CommandInfo | None) -> None:
        report = self.report
        if sub.kind == "online" and sub.rejected == "AgentOffline":
            return  # what it should do
        if sub.rejected == "StoreUnavailable":
            report.rejected += 1
            return
        report.violate("submit_refused", f"{sub.id}: {sub.rejected}")

    def _check_online(self, sub: Submitted, info: CommandInfo | None) -> None:
        """A ``require_online`` command for an agent that is gone: AgentOffline at once."""
        if sub.seen == "raised:AgentOffline" and info is None:
            return
        stored = f"stored {info.outcome or info.status}" if info else "not stored"
        waited = (sub.seen_at - sub.submitted) if sub.seen_at else None
        self.report.violate("online_not_refused", f"{sub.id}: the handle saw {sub.seen} "
                            f"after {waited} ms ({stored}), expected AgentOffline")

    def _check_command(self, sub: Submitted, info: CommandInfo | None,
                       runs: list[dict[str, Any]]) -> None:
        report = self.report
        if info is None:
            report.violate("missing", f"{sub.id} (agent {sub.agent}) is not in the store")
            return
        if info.status != "COMPLETE":
            report.violate("not_complete", f"{sub.id} is {info.status} after the settling")
            return
        if info.outcome != sub.expect and not self._timeout_of_a_freeze(sub, info):
            kind = {"load": "not_ok", "overdue": "overdue_not_timeout"}[sub.kind]
            report.violate(kind, f"{sub.id} ({sub.kind}, agent {sub.agent}) ended "
                           f"{info.outcome}, expected {sub.expect}")
        deadline = info.deadline or 0
        if info.outcome == "ok" and deadline and info.updated > deadline:
            report.violate("ok_after_deadline", f"{sub.id} stored ok at +"
                           f"{info.updated - deadline} ms past its deadline")
        if sub.handle_expected:
            if sub.seen is None:
                report.violate("handle_unresolved", f"{sub.id} ({info.outcome}) never "
                               "resolved its handle")
            elif sub.seen != info.outcome:
                report.violate("handle_mismatch", f"{sub.id}: handle saw {sub.seen}, store "
                               f"says {info.outcome}")
            elif sub.seen_at is not None and sub.seen_at - info.updated > HANDLE_BOUND_MS:
                report.violate("handle_late", f"{sub.id} ({info.outcome}): handle resolved "
                               f"{sub.seen_at - info.updated} ms after the store")
        if sub.waiter is not None and not sub.waiter.startswith("lost:"):
            if sub.waiter != info.outcome:
                report.violate("waiter_mismatch", f"{sub.id}: the waiter on another hub got "
                               f"{sub.waiter}, the store says {info.outcome}")
            elif sub.waiter_at is not None and sub.waiter_at - info.updated > HANDLE_BOUND_MS:
                report.violate("waiter_late", f"{sub.id} ({info.outcome}): the waiter on "
                               f"another hub learnt it {sub.waiter_at - info.updated} ms late")
        if len(runs) > 1:
            report.violate("ran_twice", f"{sub.id} ran {len(runs)} times: "
                           + ", ".join(f"{r['agent']}@{r['start']}" for r in runs))
        for r in runs:
            if deadline and r["start"] > deadline + LATE_MS:
                report.violate("ran_after_deadline", f"{sub.id} started "
                               f"{r['start'] - deadline} ms after its deadline")

    def _check_reaps(self) -> None:
        cluster = self.cluster
        reaps = list(cluster.reaps)
        for event in cluster.hub_logs():
            if event.get("event") == "agent_reaped":
                reaps.append((_iso_ms(event.get("timestamp")), str(event.get("agent_id")),
                              str(event.get("hub_id"))))
        seen: set[tuple[str, str, int]] = set()
        for when, agent, hub_id in sorted(reaps):
            key = (agent, hub_id, when // 1000)
            if key in seen:
                continue
            seen.add(key)
            if self._hub_alive_at(hub_id, when) and not self._frozen_long(hub_id, when):
                self.report.violate("reaped_alive", f"{agent} reaped from {hub_id}, which "
                                    "was running and not frozen past its hub_ttl")

    def _hub_alive_at(self, hub_id: str, when: int) -> bool:
        """Whether a process ran as ``hub_id`` from a second before ``when`` to ``when``."""
        return any(start is not None and start <= when - 1000
                   and (end is None or end >= when)
                   for start, end in self.cluster.timeline.get(hub_id, []))

    def _timeout_of_a_freeze(self, sub: Submitted, info: CommandInfo) -> bool:
        """A load command that timed out while a hub was frozen past its hub_ttl, or
        within a second after it thawed: its agent may have been connected to that
        hub (it stays connected through the freeze), which could deliver nothing
        meanwhile. Timing out is then the right outcome, not a violation."""
        deadline = info.deadline or 0
        if sub.kind != "load" or info.outcome != "timeout" or not deadline:
            return False
        explained = any(start <= deadline <= end + FREEZE_DELIVERY_MS
                        for _, start, end in self.cluster.freezes)
        if explained:
            self.report.notes.append(f"{sub.id} timed out during a long freeze (expected)")
        return explained

    def _frozen_long(self, hub_id: str, when: int) -> bool:
        slack = int((self.cfg.hub_ttl + 2) * 1000)
        return any(h == hub_id and start <= when <= end + slack
                   for h, start, end in self.cluster.freezes)


# -- helpers ----------------------------------------------------------------------------
def _fixed_port() -> int:
    """A free port below the kernel's ephemeral range: a hub restarts on its port, and
    one from that range could meanwhile become the source port of any connection."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    picker = random.SystemRandom()
    for _ in range(100):
        port = picker.randrange(max(1025, low - 12000), low)
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    raise BenchError("no free port below the ephemeral range")


def _outcome_of(fut: asyncio.Future[Any]) -> str:
    if fut.cancelled():
        return "raised:CancelledError"
    exc = fut.exception()
    if exc is None:
        return "ok"
    for cls, name in ((CommandTimeout, "timeout"), (CommandCancelled, "cancelled"),
                      (CommandFailed, "error")):
        if isinstance(exc, cls):
            return name
    return f"raised:{type(exc).__name__}"


async def _settled(handle: CommandHandle) -> None:
    with contextlib.suppress(Exception):
        await handle


async def _until(predicate: Callable[[], Awaitable[bool]], bound: float, what: str) -> None:
    """Poll an async predicate (state in other processes) until true; bounded."""
    deadline = time.monotonic() + bound
    while not await predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def _retry(call: Callable[[], Awaitable[Any]], bound: float = 20.0) -> Any:
    deadline = time.monotonic() + bound
    while True:
        try:
            return await call()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def _iso_ms(stamp: Any) -> int:
    from datetime import datetime  # noqa: PLC0415

    try:
        return int(datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return 0


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# Runs not finished yet -> whether their work dir is removed at the end.
_live: dict[Cluster, bool] = {}


def emergency_stop() -> None:
    """Synchronously end every process and temp dir of runs that never reached their
    ``finally`` (the event loop was interrupted, e.g. by a test timeout)."""
    kill_all()
    for cluster, remove in list(_live.items()):
        with contextlib.suppress(Exception):
            cluster.redis.stop()
        if remove:
            shutil.rmtree(cluster.workdir, ignore_errors=True)
    _live.clear()


async def run_chaos(cfg: ChaosConfig) -> Report:
    """One run: start everything, inject faults, account; everything ends in any case."""
    keep = cfg.out is not None
    workdir = cfg.out if cfg.out is not None else Path(tempfile.mkdtemp(prefix="dispatcher-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(cfg, workdir)
    _live[cluster] = not keep and not cfg.keep_logs
    try:
        report = await Run(cfg, cluster).run()
    finally:
        await cluster.close()
        if _live.pop(cluster, False):
            shutil.rmtree(workdir, ignore_errors=True)
    if keep:
        (workdir / "chaos.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
        (workdir / "chaos.md").write_text(report.to_markdown())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--hubs", type=int, default=3)
    parser.add_argument("--agents", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=25.0)
    parser.add_argument("--faults", default=",".join(LONG_FAULTS),
                        help=f"kinds among {', '.join(FAULTS)}")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/chaos"))
    args = parser.parse_args(argv)
    faults = tuple(f for f in args.faults.split(",") if f)
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        parser.error(f"unknown fault kinds {unknown}; known: {', '.join(FAULTS)}")
    configure_logging("warning")  # the embedded caller's own log: only what goes wrong
    cfg = ChaosConfig(duration=args.duration, hubs=args.hubs, agents=args.agents,
                      seed=args.seed, rate=args.rate, faults=faults, out=args.out)
    try:
        report = asyncio.run(run_chaos(cfg))
    except KeyboardInterrupt:
        kill_all()
        return 130
    print(report.to_markdown())
    print(f"report: {args.out / 'chaos.json'}, {args.out / 'chaos.md'}", file=sys.stderr)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
