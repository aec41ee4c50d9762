"""The reconnect-storm workload: a hub dies, its agents move to the surviving hub.

``python -m benchmarks.run --only storm [--quick] [--storm-agents N] [--max-handshakes N]``

Processes (all real, all on loopback):

- a private ``redis-server`` (pinned with the load generators);
- hubs A and B: ``python -m dispatcher serve --redis URL`` with an admin port,
  ``HubConfig`` defaults (logs at warning level), pinned to the server CPU;
- storm load generators (``storm_agents.py``): ``agent_client.Agent`` instances,
  2,500 per process, URL list ``[A, B]``, the library's default backoff; they
  run at a lower priority (nice 10) on the client CPU, where they stand in for
  thousands of machines: without it their own reconnect burst would starve
  redis-server and the driver, which share that CPU, and the storm would
  measure the test rig instead of the hub;
- the driver (``storm_driver.py``): an embedded ``Dispatcher`` (a third hub with
  no agents, as an application runs it) and ~20 calm agents on hub B, to
  which it sends commands on a fixed schedule and times every round trip.

Sequence: every agent connects to hub A; calm traffic runs for a baseline
window; hub A gets SIGKILL; this process samples Redis (``P:hub:B:agents``,
the agents registered on B: each one a completed handshake) every 100 ms and
hub B's ``/metrics`` every second until all agents are registered on B, then waits until the
surviving hubs have reaped A (its alive key lapsed, ``hub_ttl``), and checks
in Redis that every agent is registered on B. Every wait is bounded; every
process is stopped (or killed) at the end whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from dispatcher.config import HubConfig

from . import profile as profiling
from .common import agent_id, now, percentile
from .procs import BenchError, Child, free_port

if TYPE_CHECKING:
    from .run import Bench

__all__ = ["StormPlan", "storm"]

HUB_A, HUB_B, HUB_C = "storm-a", "storm-b", "storm-c"
SAMPLE_INTERVAL = 0.1
# Hub B's /metrics is scraped every 10th sample only: rendering it walks every session
# (the send-buffer gauge), and at 10 scrapes/s with 5,000 agents it took ~10% of hub B's
# CPU during the storm (py-spy). The 100 ms curve comes from Redis, which costs the hub
# nothing.
SCRAPE_EVERY = 10
LATENCY_GOAL_MS = 250.0
_METRIC_LINE = re.compile(r"^(dispatcher_connections_opened_total|dispatcher_agents_connected)"
                          r"(?:\{[^}]*\})? ([0-9.e+-]+)$", re.MULTILINE)


@dataclass
class StormPlan:
    agents: int = 5000
    per_proc: int = 2500
    calm: int = 20
    rate: float = 100.0  # calm commands per second, all calm agents together
    baseline: float = 5.0  # seconds of calm traffic before the kill
    after: float = 2.0  # at least this long after every agent is back
    timeout: float = 120.0  # for every agent to be registered again
    hub_ttl: float = 5.0  # HubConfig default
    max_handshakes: int | None = None  # None: HubConfig default
    backoff_initial: float = 0.5  # agent_client.Agent defaults
    backoff_max: float = 30.0
    profile_s: float = 15.0  # --profile: seconds of hub B sampled from the kill

    @classmethod
    def quick(cls) -> StormPlan:
        return cls(agents=200, per_proc=200, calm=4, rate=50.0, baseline=1.0, after=0.5,
                   timeout=20.0, hub_ttl=2.0)


class HubProc(Child):
    """``python -m dispatcher serve ...`` as a child: SIGTERM to stop, SIGKILL to kill."""

    async def stop(self, timeout: float = 15.0) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            if await self._wait_exit(timeout) is None:
                self.kill()
                await self._wait_exit(5)
        await super().stop()


@dataclass
class Sample:
    t: float  # wall time of the answers
    opened: float | None  # hub B: dispatcher_connections_opened_total
    connected: float | None  # hub B: dispatcher_agents_connected
    registered: int | None  # Redis: SCARD P:hub:B:agents
    a_listed: bool | None  # Redis: hub A still in P:hubs (not reaped yet)
    cpu_b: float  # hub B's CPU seconds so far
    wait_b: float  # seconds hub B's main thread waited for a CPU so far (Linux schedstat)


class Sampler:
    """The Redis registry every 100 ms and hub B's metrics every second, on a fixed
    schedule."""

    def __init__(self, admin_url: str, redis: Any, prefix: str, goal: int,
                 pid_b: int) -> None:
        self.admin_url = admin_url
        self.pid_b = pid_b
        self.redis = redis
        self.prefix = prefix
        self.goal = goal
        self.samples: list[Sample] = []
        self.all_registered = asyncio.Event()
        self.t_all: float | None = None
        self.reaped = asyncio.Event()
        self.watch_reap = False
        self._task: asyncio.Task[None] | None = None
        self._http: Any = None

    async def start(self) -> None:
        import aiohttp  # noqa: PLC0415

        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        self._task = asyncio.get_running_loop().create_task(self._run(), name="storm-sampler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _metrics(self) -> tuple[float | None, float | None]:
        try:
            async with self._http.get(f"{self.admin_url}/metrics") as resp:
                text = await resp.text()
        except Exception:  # a slow or busy hub, any failure: a missing sample
            return None, None
        found = dict(_METRIC_LINE.findall(text))
        opened = found.get("dispatcher_connections_opened_total")
        connected = found.get("dispatcher_agents_connected")
        return (float(opened) if opened is not None else None,
                float(connected) if connected is not None else None)

    async def _registry(self) -> tuple[int | None, bool | None]:
        try:
            async with asyncio.timeout(2):
                pipe = self.redis.pipeline(transaction=False)
                pipe.scard(f"{self.prefix}:hub:{HUB_B}:agents")
                pipe.sismember(f"{self.prefix}:hubs", HUB_A)
                registered, listed = await pipe.execute()
        except Exception:  # a missing sample
            return None, None
        return int(registered), bool(listed)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        k = n = 0
        while True:
            n += 1
            if n % SCRAPE_EVERY == 1:
                (opened, connected), (registered, listed) = await asyncio.gather(
                    self._metrics(), self._registry())
            else:
                opened = connected = None
                registered, listed = await self._registry()
            s = Sample(now(), opened, connected, registered, listed, _cpu(self.pid_b),
                       _runqueue_wait(self.pid_b))
            self.samples.append(s)
            if registered is not None and registered >= self.goal and self.t_all is None \
                    and self.watch_reap:
                self.t_all = s.t
                self.all_registered.set()
            if self.watch_reap and listed is False:
                self.reaped.set()
            # The next tick on the schedule (ticks a slow answer overran are skipped).
            k = max(k + 1, math.ceil((loop.time() - t0) / SAMPLE_INTERVAL))
            await asyncio.sleep(max(0.0, t0 + k * SAMPLE_INTERVAL - loop.time()))


async def _wait_healthy(hubs: list[HubProc], ports: list[int], timeout: float) -> None:
    """Until each hub answers ``/healthz`` on its agents' port (bounded)."""
    import aiohttp  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
        for hub, port in zip(hubs, ports, strict=True):
            while True:
                if hub.proc is not None and hub.proc.returncode is not None:
                    raise BenchError(f"{hub.name} exited (rc={hub.proc.returncode}); "
                                     f"{hub.tail()}")
                with contextlib.suppress(OSError, TimeoutError, aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        if resp.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise BenchError(f"{hub.name} not listening within {timeout:g} s; "
                                     f"{hub.tail()}")
                # A process that is starting has no readiness signal but its answer.
                await asyncio.sleep(0.05)


def listen_overflows() -> int | None:
    """The machine's TCP listen-queue overflows so far (Linux ``TcpExt: ListenOverflows``):
    connections the kernel dropped because a server's accept backlog was full."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        names = head.split()
        if names and names[0] == "TcpExt:":
            with contextlib.suppress(ValueError, IndexError):
                return int(values.split()[names.index("ListenOverflows")])
    return None


def _runqueue_wait(pid: int) -> float:
    """Seconds the process's main thread spent runnable but waiting for a CPU (other
    processes on its CPU): what tells a hub that was busy from one that was starved."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _busy() -> float:
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def _cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


def _latency(samples: Iterable[list[Any]]) -> dict[str, Any]:
    rows = list(samples)
    ok = sorted(float(s[1]) for s in rows if s[1] is not None)
    errors = [s[2] for s in rows if s[2] is not None]
    return {"n": len(rows), "ok": len(ok), "errors": len(errors), "error_samples": errors[:3],
            "unanswered": sum(1 for s in rows if s[1] is None and s[2] is None),
            "p50_ms": percentile(ok, 50), "p99_ms": percentile(ok, 99),
            "max_ms": ok[-1] if ok else None}


def _peak_rate(points: list[tuple[float, float]], span: float) -> float | None:
    """The highest rate of a counter over any ``span`` seconds (from consecutive samples)."""
    best: float | None = None
    j = 0
    for i in range(1, len(points)):
        t_i, v_i = points[i]
        while j < i - 1 and points[j + 1][0] <= t_i - span:
            j += 1
        t_j, v_j = points[j]
        if t_i - t_j >= span * 0.5:
            rate = (v_i - v_j) / (t_i - t_j)
            best = rate if best is None else max(best, rate)
    return best


def _refusals(log_path: Path, t0: float) -> dict[str, Any]:
    """Hub B's refused connections (HTTP 503: handshakes or agents over the limit) from its
    JSON log: the hub counts only refused hellos in ``/metrics``."""
    times: list[float] = []
    kinds: dict[str, int] = {}
    errors = 0
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        event = rec.get("event")
        if rec.get("level") in ("error", "critical"):
            errors += 1
        if event in ("agent_refused_handshakes", "agent_refused_hub_full"):
            kinds[event] = kinds.get(event, 0) + 1
            with contextlib.suppress(KeyError, ValueError, TypeError):
                times.append(datetime.fromisoformat(rec["timestamp"]).timestamp())
    after = sorted(t for t in times if t >= t0)
    bins: dict[int, int] = {}
    for t in after:
        b = int((t - t0) / SAMPLE_INTERVAL)
        bins[b] = bins.get(b, 0) + 1
    return {"refused": len(after), "by_event": kinds,
            "peak_refused_per_s": max(bins.values()) / SAMPLE_INTERVAL if bins else 0.0,
            "hub_b_error_lines": errors}


async def storm(bench: Bench) -> dict[str, Any]:
    """One storm; returns its figures (``BenchError`` when a step fails)."""
    import redis.asyncio as aioredis  # noqa: PLC0415

    plan: StormPlan = bench.plan.storm
    assert bench.redis is not None
    bench.redis.flush()
    prefix = f"storm{bench.runs}"
    ports = {h: (free_port(), free_port()) for h in (HUB_A, HUB_B)}
    env = {"DISPATCHER_HUB_TTL": str(plan.hub_ttl)}
    if plan.max_handshakes is not None:
        env["DISPATCHER_MAX_HANDSHAKES"] = str(plan.max_handshakes)
    hubs: dict[str, HubProc] = {}
    for hid, (port, admin) in ports.items():
        hubs[hid] = HubProc(bench._name(f"storm-{hid}"), "dispatcher", [
            "serve", "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin),
            "--redis", bench.redis.url, "--prefix", prefix, "--hub-id", hid,
            "--log-level", "warning", "--log-format", "json"], bench.log_dir, env=env)
    url = {h: f"ws://127.0.0.1:{p}/ws" for h, (p, _) in ports.items()}
    goal = plan.agents + plan.calm
    procs = max(1, math.ceil(plan.agents / plan.per_proc))
    gens = [Child(bench._name("storm-agents"), "benchmarks.storm_agents", [
        "--urls", f"{url[HUB_A]},{url[HUB_B]}",
        "--first", str(i * plan.agents // procs),
        "--count", str((i + 1) * plan.agents // procs - i * plan.agents // procs),
        "--backoff-initial", str(plan.backoff_initial),
        "--backoff-max", str(plan.backoff_max)], bench.log_dir) for i in range(procs)]
    driver = Child(bench._name("storm-driver"), "benchmarks.storm_driver", [
        "--redis-url", bench.redis.url, "--prefix", prefix, "--hub-id", HUB_C,
        "--hub-ttl", str(plan.hub_ttl), "--url", url[HUB_B], "--first", str(plan.agents),
        "--count", str(plan.calm)], bench.log_dir)
    redis = aioredis.Redis.from_url(bench.redis.url)
    sampler: Sampler | None = None
    try:
        await asyncio.gather(*(h.start(bench.server_cpus) for h in hubs.values()))
        sampler = Sampler(f"http://127.0.0.1:{ports[HUB_B][1]}", redis, prefix, goal,
                          hubs[HUB_B].pid)
        await _wait_healthy(list(hubs.values()), [p for p, _ in ports.values()], 30)
        await asyncio.gather(driver.start(bench.client_cpus),
                             *(g.start(bench.client_cpus) for g in gens))
        for g in gens:
            with contextlib.suppress(psutil.Error, OSError):
                psutil.Process(g.pid).nice(10)
        await asyncio.gather(driver.expect("ready", 90), *(g.expect("ready", 60) for g in gens))
        # Every storm agent on hub A first.
        await asyncio.gather(*(g.send({"op": "go"}) for g in gens))
        conn = await asyncio.gather(*(g.expect("connected", plan.timeout + 60) for g in gens))
        on_a = sum(c["hubs"].get(HUB_A, 0) for c in conn)
        if on_a != plan.agents:
            hubs_seen: dict[str, int] = {}
            for c in conn:
                for k, v in c["hubs"].items():
                    hubs_seen[k] = hubs_seen.get(k, 0) + v
            raise BenchError(f"{on_a} of {plan.agents} agents on hub A before the kill "
                             f"({hubs_seen}; errors: {[c['errors'] for c in conn]})")
        connect_s = max(c["t_end"] for c in conn) - min(c["t_start"] for c in conn)
        await sampler.start()
        await driver.send({"op": "traffic", "rate": plan.rate})
        t_traffic = (await driver.expect("traffic", 10))["t"]
        await bench._settle()
        # The baseline window: calm traffic while every agent sits on hub A.
        await asyncio.sleep(plan.baseline)
        b_pid, r_pid = hubs[HUB_B].pid, bench.redis.proc.pid if bench.redis.proc else None
        me = psutil.Process()
        cpu0 = {"b": _cpu(b_pid), "redis": _cpu(r_pid), "gens": sum(g.cpu_s() for g in gens),
                "driver": driver.cpu_s(), "me": _cpu(me.pid), "busy": _busy()}
        sampler.watch_reap = True
        overflows0 = listen_overflows()
        wait0 = _runqueue_wait(b_pid)
        spy = None
        raw_path = bench.out / "profiles" / f"storm-{plan.agents}-hub-b.collapsed.txt"
        if bench.args.profile:
            # Hub B from the kill on, for a fixed window (py-spy's --duration).
            spy = await profiling.record(b_pid, plan.profile_s, raw_path,
                                         native=bench.args.profile == "native")
        t_kill = now()
        hubs[HUB_A].kill()  # SIGKILL: no goodbye, the agents see their connections drop
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sampler.all_registered.wait(), plan.timeout)
        t_all = sampler.t_all
        overflows1 = listen_overflows()
        cpu1 = {"b": _cpu(b_pid), "redis": _cpu(r_pid), "gens": sum(g.cpu_s() for g in gens),
                "driver": driver.cpu_s(), "me": _cpu(me.pid), "busy": _busy()}
        t_storm_end = t_all if t_all is not None else now()
        # After: until the surviving hubs reaped A, and at least ``after`` seconds.
        t_reaped: float | None = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sampler.reaped.wait(), plan.hub_ttl + 15)
            t_reaped = now()
        rest = t_storm_end + plan.after - now()
        if rest > 0:
            await asyncio.sleep(rest)
        t_end = now()
        if spy is not None:
            await profiling.finish(spy, plan.profile_s + 30)
            if raw_path.exists():
                summary = profiling.summarize(raw_path, None)
                raw_path.with_name(raw_path.name.replace(".collapsed.txt", ".summary.txt")
                                   ).write_text(profiling.text(summary, "storm: hub B"))
                bench.profiles[f"storm-{plan.agents}-hub-b"] = summary
        await driver.send({"op": "report"})
        drv = await driver.expect("result", 60)
        await asyncio.gather(*(g.send({"op": "report"}) for g in gens))
        reps = await asyncio.gather(*(g.expect("report", 30) for g in gens))
        await sampler.close()
        # The registry, after the reap: every agent on B, none left for A.
        pipe = redis.pipeline(transaction=False)
        for i in range(plan.agents):
            pipe.hget(f"{prefix}:agent:{agent_id(i)}", "hub")
        pipe.scard(f"{prefix}:hub:{HUB_A}:agents")
        pipe.scard(f"{prefix}:agents")
        *where, left_on_a, registry_size = await pipe.execute()
        on_b = sum(1 for w in where if w is not None and w.decode() == HUB_B)
    finally:
        if sampler is not None:
            await sampler.close()
        await redis.aclose()
        await asyncio.gather(driver.stop(), *(g.stop() for g in gens), return_exceptions=True)
        await asyncio.gather(*(h.stop() for h in hubs.values()), return_exceptions=True)

    storm_wall = max(1e-9, t_storm_end - t_kill)
    samples = drv["samples"]
    warm = min(1.0, plan.baseline / 4)
    before = _latency(s for s in samples if t_traffic + warm <= s[0] < t_kill)
    during = _latency(s for s in samples if t_kill <= s[0] <= t_storm_end)
    after = _latency(s for s in samples if t_storm_end < s[0] <= t_end)
    # Registrations on hub B (Redis, every 100 ms): each is one completed handshake.
    regs = [(s.t, float(s.registered)) for s in sampler.samples if s.registered is not None]
    points = [p for p in regs if p[0] >= t_kill]
    points = [p for p in regs if p[0] < t_kill][-1:] + points
    opened = [s.opened for s in sampler.samples if s.opened is not None]
    opened_before = [s.opened for s in sampler.samples if s.opened is not None and s.t < t_kill]
    agent_view = sorted(t - t_kill for r in reps for i, t in r["last_connect"].items()
                        if r["last_hub"].get(i) == HUB_B and t >= t_kill)
    dropped = sorted(t - t_kill for r in reps for t in r["disconnects"] if t >= t_kill)
    refusals = _refusals(hubs[HUB_B].log_path, t_kill)
    other = (cpu1["busy"] - cpu0["busy"] - sum(cpu1[k] - cpu0[k] for k in ("b", "redis", "gens",
                                                                              "driver", "me")))
    res: dict[str, Any] = {
        "agents": plan.agents, "loadgen_procs": procs, "calm_agents": plan.calm,
        "calm_rate_per_s": plan.rate, "baseline_s": plan.baseline, "hub_ttl_s": plan.hub_ttl,
        "max_handshakes": plan.max_handshakes or HubConfig().max_handshakes,
        "backoff": {"initial_s": plan.backoff_initial, "max_s": plan.backoff_max},
        "initial_connect_s": connect_s,
        "reconnect_s": None if t_all is None else t_all - t_kill,
        "registered_at_deadline": max((s.registered or 0) for s in sampler.samples
                                      if s.t >= t_kill) if sampler.samples else 0,
        "reconnect_agents_view": {
            "n": len(agent_view), "p50_s": percentile(agent_view, 50),
            "p99_s": percentile(agent_view, 99),
            "max_s": agent_view[-1] if agent_view else None,
            "disconnected_p50_s": percentile(dropped, 50),
            "disconnected_max_s": dropped[-1] if dropped else None},
        "listen_overflows": None if overflows0 is None or overflows1 is None
        else overflows1 - overflows0,
        "registered_on_b_end": on_b, "left_on_a_end": int(left_on_a),
        "registry_size_end": int(registry_size),
        "reap_s": None if t_reaped is None else t_reaped - t_kill,
        "handshakes_after_kill": (opened[-1] - opened_before[-1])
        if opened and opened_before else None,
        "peak_handshakes_per_s_100ms": _peak_rate(points, SAMPLE_INTERVAL),
        "peak_handshakes_per_s_1s": _peak_rate(points, 1.0),
        "mean_handshakes_per_s": None if t_all is None else plan.agents / storm_wall,
        **refusals,
        "agent_connects": sum(r["connects"] for r in reps),
        "hub_b_cpu_util": (cpu1["b"] - cpu0["b"]) / storm_wall,
        "redis_cpu_util": (cpu1["redis"] - cpu0["redis"]) / storm_wall,
        "loadgen_cpu_util": (cpu1["gens"] - cpu0["gens"]) / storm_wall,
        "driver_cpu_util": (cpu1["driver"] - cpu0["driver"]) / storm_wall,
        "orchestrator_cpu_util": (cpu1["me"] - cpu0["me"]) / storm_wall,
        "other_cpu_util": max(0.0, other / storm_wall),
        "calm": {"before": before, "storm": during, "after": after},
        "calm_unfinished": drv["unfinished"],
        "schedule_lag_max_ms": drv["schedule_lag_max_ms"],
        # [s since the kill, B's handshakes so far, B's agents gauge, registered on B,
        #  B's CPU seconds since the kill, B's seconds waiting for a CPU since the kill]
        "timeline": [[round(s.t - t_kill, 3), s.opened, s.connected, s.registered,
                      round(s.cpu_b - cpu0["b"], 3), round(s.wait_b - wait0, 3)]
                     for s in sampler.samples],
        "hub_b_runqueue_wait_s": (max((s.wait_b for s in sampler.samples), default=wait0)
                                  - wait0) if t_all is None else next(
            (s.wait_b for s in sampler.samples if s.t >= t_all), wait0) - wait0,
        # Every calm command from a second before the kill: [scheduled - kill s, ms or None].
        "calm_series": [[round(s[0] - t_kill, 3), None if s[1] is None else round(s[1], 2)]
                        for s in samples if s[0] >= t_kill - 1.0],
    }
    return res
