"""The benchmark command: every workload on every target in one run, side by side.

    python -m benchmarks.run [--quick] [--only roundtrip,fanout,idle,redis]
                             [--targets ours-memory,ours-redis,raw-websockets,socketio]
                             [--duration S] [--repeat N] [--out DIR]
    python -m benchmarks.run --only storm [--quick] [--storm-agents N]   (storm.py)

Each target runs as its own server process (``benchmarks/servers/``); agents
live in separate load-generator processes (``benchmarks/loadgen.py``); a private
redis-server is started when the Redis engine is measured. Every step waits for
a line from a child and is bounded by a timeout; stragglers are killed.
Results: ``results.json``, ``results.md`` and ``results.png`` in ``--out``
(a run of the storm workload alone: ``storm.json`` and ``storm.md``, so that it
does not replace the comparison's results).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from . import profile as profiling
from . import report
from .common import install_uvloop
from .procs import ROOT, BenchError, Child, RedisServer, kill_all, pin, placement
from .storm import StormPlan, storm

TARGETS = ("ours-memory", "ours-redis", "raw-websockets", "socketio")
WORKLOADS = ("roundtrip", "fanout", "idle", "redis")
# Opt-in (``--only storm``): our hub only, two hubs on Redis, a different shape.
EXTRA_WORKLOADS = ("storm",)
SERVER_MODULE = {
    "ours-memory": "benchmarks.servers.ours",
    "ours-redis": "benchmarks.servers.ours",
    "raw-websockets": "benchmarks.servers.raw_ws",
    "socketio": "benchmarks.servers.sio",
}


@dataclass
class Plan:
    """Sizes and times of one run (``--quick`` scales everything down)."""

    duration: float = 5.0
    warmup: float = 1.0
    repeat: int = 1
    # round trips: scenario id -> (agents, in flight per agent)
    scenarios: dict[str, tuple[int, int]] = field(default_factory=lambda: {
        "1x1": (1, 1), "1x100": (1, 100), "100x10": (100, 10)})
    fanout_agents: int = 1000
    fanout_procs: int = 1
    fanout_window: int = 4
    idle_stages: tuple[int, ...] = (5000, 10000)
    idle_per_proc: int = 2500
    lifecycle: dict[str, tuple[int, int, int]] = field(default_factory=lambda: {
        "1x1": (1, 1, 1000), "100x10": (100, 10, 20000)})  # agents, in flight, commands
    storm: StormPlan = field(default_factory=StormPlan)
    quick: bool = False
    fresh: bool = True  # a fresh server per round-trip scenario (not with --quick)

    @classmethod
    def quick_plan(cls) -> Plan:
        return cls(duration=0.3, warmup=0.1, scenarios={"1x1": (1, 1), "1x100": (1, 10),
                                                         "100x10": (10, 2)},
                   fanout_agents=50, idle_stages=(50, 100), idle_per_proc=50,
                   lifecycle={"1x1": (1, 1, 50), "100x10": (10, 2, 200)}, quick=True,
                   fresh=False, storm=StormPlan.quick())


class Bench:
    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args = args
        self.plan = plan
        self.out = Path(args.out)
        self.log_dir = self.out / "logs"
        self.redis: RedisServer | None = None
        self.runs = 0
        self.raw: dict[str, Any] = {w: {} for w in (*WORKLOADS, *EXTRA_WORKLOADS)}
        self.profiles: dict[str, Any] = {}
        # Waiting for a quiet machine is bounded per window and over the whole run.
        self.settle_budget = 12 * args.settle
        self.retry_budget = args.retry_budget
        self.server_cpus, self.client_cpus, self.redis_cpus = placement(not args.no_pin)

    # -- helpers -----------------------------------------------------------------------
    def _name(self, what: str) -> str:
        self.runs += 1
        return f"{self.runs:03d}-{what}"

    async def _server(self, target: str, tag: str) -> tuple[Child, dict[str, Any]]:
        args: list[str] = []
        if target == "ours-redis":
            assert self.redis is not None
            self.redis.flush()
            args = ["--redis-url", self.redis.url, "--prefix", f"bench{self.runs}"]
        if target in ("ours-memory", "ours-redis"):
            for setting in self.args.hub_set:
                args += ["--set", setting]
        child = await Child(self._name(f"{tag}-{target}"), SERVER_MODULE[target], args,
                            self.log_dir).start(self.server_cpus)
        ready = await child.expect("ready", 30)
        return child, ready

    @staticmethod
    def _url(target: str, port: int) -> tuple[str, str]:
        if target == "socketio":
            return "sio", f"http://127.0.0.1:{port}"
        return "ws", f"ws://127.0.0.1:{port}/ws"

    async def _loadgens(self, target: str, ready: dict[str, Any], first: int, total: int,
                        per_proc: int, control: bool = False) -> list[Child]:
        proto, url = self._url(target, ready["port"])
        procs = max(1, math.ceil(total / per_proc))
        gens: list[Child] = []
        for i in range(procs):
            lo = first + i * total // procs
            hi = first + (i + 1) * total // procs
            args = ["--proto", proto, "--url", url, "--first", str(lo), "--count", str(hi - lo)]
            if control:
                args += ["--control-port", str(ready["control_port"])]
            gens.append(Child(self._name(f"loadgen-{target}"), "benchmarks.loadgen", args,
                              self.log_dir))
        await asyncio.gather(*(g.start(self.client_cpus) for g in gens))
        await asyncio.gather(*(g.expect("ready", 30) for g in gens))
        return gens

    async def _connect(self, server: Child, gens: list[Child], n: int,
                       timeout: float) -> dict[str, Any]:
        """Start the agents of ``gens`` at once; returns the server's count and timings."""
        await server.send({"op": "wait_agents", "n": n, "timeout": timeout})
        await asyncio.gather(*(g.send({"op": "go"}) for g in gens))
        lg = await asyncio.gather(*(g.expect("connected", timeout + 10) for g in gens))
        at = await server.expect("agents", timeout + 20)
        errors = sum(x["error_count"] for x in lg)
        if not at["ok"]:
            samples = [e for x in lg for e in x["errors"]][:3]
            raise BenchError(f"{server.name}: {at['n']} of {n} agents connected "
                             f"({errors} connect errors: {samples})")
        return {"n": at["n"], "t_all": at["t"], "t_start": min(x["t_start"] for x in lg),
                "server_cpu_s": at["cpu_s"], "connect_errors": errors}

    async def _settle(self) -> float:
        """Wait (bounded by ``--settle``) until the machine is quiet before a measured window.

        Other work on the machine steals the cores the hub and the load generators
        need; this samples the machine's busy time (there is no event to wait on)
        until it is under a quarter of a core. Returns the seconds waited.
        """
        limit = min(self.args.settle, self.settle_budget)
        if limit <= 0:
            return 0.0
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            busy0 = _busy()
            await asyncio.sleep(0.5)
            if (_busy() - busy0) / 0.5 < 0.25:
                break
        waited = time.monotonic() - t0
        self.settle_budget -= waited
        return waited

    def _redis_cpu(self) -> float:
        if self.redis is None or self.redis.proc is None:
            return 0.0
        try:
            t = psutil.Process(self.redis.proc.pid).cpu_times()
        except psutil.Error:
            return 0.0
        return float(t.user + t.system)

    async def _result(self, server: Child, op: dict[str, Any], timeout: float,
                      gens: list[Child], profile: str | None = None) -> dict[str, Any]:
        """Run one op on the server; also measures the load generators' CPU, Redis's, and
        the CPU every other process of the machine took meanwhile (noise). With
        ``--profile`` and a ``profile`` name, py-spy samples the server's window."""
        waited = await self._settle()
        lg0, srv0, rd0, busy0 = (sum(g.cpu_s() for g in gens), server.cpu_s(), self._redis_cpu(),
                                 _busy())
        t0 = time.monotonic()
        await server.send(op)
        spy = None
        raw_path = self.out / "profiles" / f"{profile}.collapsed.txt"
        if profile and self.args.profile:
            # The window starts after the warm-up: sample exactly the measured seconds.
            await asyncio.sleep(float(op["warmup"]))
            spy = await profiling.record(server.pid, float(op["duration"]), raw_path,
                                         native=self.args.profile == "native")
        res = await server.expect("result", timeout)
        wall = time.monotonic() - t0
        if spy is not None:
            await profiling.finish(spy)
            if raw_path.exists():
                summary = profiling.summarize(raw_path, res.get("hub_cpu_us_per_op"))
                raw_path.with_name(f"{profile}.summary.txt").write_text(
                    profiling.text(summary, f"{profile} ({server.name})"))
                self.profiles[profile] = summary
        lg = sum(g.cpu_s() for g in gens) - lg0
        srv, rd = server.cpu_s() - srv0, self._redis_cpu() - rd0
        if wall > 0:
            res["loadgen_cpu_util"] = lg / wall
            if self.redis is not None and server.name.endswith("ours-redis"):
                res["redis_cpu_util"] = rd / wall
            res["other_cpu_util"] = max(0.0, (_busy() - busy0 - lg - srv - rd) / wall)
        res["settle_wait_s"] = waited
        if "error" in res:
            raise BenchError(f"{server.name}: {res['error']}")
        return res

    @staticmethod
    async def _stop(*children: Child) -> None:
        await asyncio.gather(*(c.stop() for c in children), return_exceptions=True)

    def _record(self, workload: str, scenario: str, target: str, value: dict[str, Any]) -> None:
        self.raw[workload].setdefault(scenario, {}).setdefault(target, []).append(value)

    def _record_error(self, workload: str, scenarios: list[str], target: str,
                      exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}" if not isinstance(exc, BenchError) else str(exc)
        print(f"  ! {workload}/{target}: {msg}", file=sys.stderr)
        for sc in scenarios:
            if not self.raw[workload].get(sc, {}).get(target):
                self._record(workload, sc, target, {"error": msg})

    async def _quietest(self, workload: str, sc: str, target: str,
                        window: Callable[[], Coroutine[Any, Any, dict[str, Any]]]) -> None:
        """Run a measured window; while other processes took more than ``--max-noise`` cores
        during it, run it again (bounded by ``--retries`` and the run's retry budget) and keep
        the quietest attempt."""
        best: dict[str, Any] | None = None
        attempts = 1 + max(0, self.args.retries)
        for attempt in range(attempts):
            t0 = time.monotonic()
            res = await window()
            res["attempts"] = attempt + 1
            if best is None or res.get("other_cpu_util", 0) < best.get("other_cpu_util", 0):
                best = res
            self.retry_budget -= time.monotonic() - t0 if attempt else 0.0
            if best.get("other_cpu_util", 0) <= self.args.max_noise or self.retry_budget <= 0 \
                    or attempt == attempts - 1:
                break
            print(f"  (noisy window: other processes took {res['other_cpu_util']:.0%} of a core; "
                  "again)", file=sys.stderr)
        assert best is not None
        best["attempts"] = res["attempts"]
        self._record(workload, sc, target, best)

    async def _guard(self, workload: str, scenarios: list[str], target: str,
                     body: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await body()
        except Exception as exc:
            self._record_error(workload, scenarios, target, exc)

    # -- workloads ---------------------------------------------------------------------
    async def roundtrip(self, target: str, sc: str) -> dict[str, Any]:
        """One scenario on a fresh server and load generator, so that no scenario inherits
        another's state (the in-memory engine keeps COMPLETE commands for ``retention``)."""
        plan = self.plan
        agents, inflight = plan.scenarios[sc]
        server, ready = await self._server(target, f"roundtrip-{sc}")
        gens: list[Child] = []
        try:
            gens = await self._loadgens(target, ready, 0, agents, agents)
            await self._connect(server, gens, agents, 60)
            res = await self._result(server, {
                "op": "roundtrip", "agents": agents, "inflight": inflight,
                "duration": plan.duration, "warmup": plan.warmup,
            }, plan.duration + plan.warmup + 60, gens,
                profile=f"roundtrip-{sc}-{target}" if target.startswith("ours") else None)
            print(f"  roundtrip {sc:>6} {target:<15} {res['per_s']:>10.0f}/s  "
                  f"p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms  "
                  f"hub cpu {res['hub_cpu_util']:.0%} ({res['hub_cpu_us_per_op']:.1f} us/cmd)  "
                  f"gc {res['gc_util']:.0%}  other {res.get('other_cpu_util', 0):.0%}",
                  file=sys.stderr)
            return res
        finally:
            await self._stop(server, *gens)

    async def roundtrip_shared(self, target: str) -> None:
        """Every scenario on one server and load generator (``--quick``: fewer processes)."""
        plan = self.plan
        n_agents = max(a for a, _ in plan.scenarios.values())
        server, ready = await self._server(target, "roundtrip")
        gens: list[Child] = []
        try:
            gens = await self._loadgens(target, ready, 0, n_agents, n_agents)
            await self._connect(server, gens, n_agents, 60)
            for sc, (agents, inflight) in plan.scenarios.items():
                res = await self._result(server, {
                    "op": "roundtrip", "agents": agents, "inflight": inflight,
                    "duration": plan.duration, "warmup": plan.warmup,
                }, plan.duration + plan.warmup + 60, gens)
                self._record("roundtrip", sc, target, res)
        finally:
            await self._stop(server, *gens)

    async def fanout(self, target: str) -> dict[str, Any]:
        plan = self.plan
        server, ready = await self._server(target, "fanout")
        gens: list[Child] = []
        try:
            per = math.ceil(plan.fanout_agents / plan.fanout_procs)
            gens = await self._loadgens(target, ready, 0, plan.fanout_agents, per, control=True)
            await self._connect(server, gens, plan.fanout_agents, 90)
            res = await self._result(server, {
                "op": "fanout", "agents": plan.fanout_agents, "duration": plan.duration,
                "warmup": plan.warmup, "window": plan.fanout_window, "reporters": len(gens),
            }, plan.duration + plan.warmup + 60, gens,
                profile=f"fanout-{target}" if target.startswith("ours") else None)
            print(f"  fanout {plan.fanout_agents} {target:<15} {res['per_s']:>10.0f} "
                  f"deliveries/s  hub cpu {res['hub_cpu_util']:.0%} "
                  f"({res['hub_cpu_us_per_op']:.2f} us/delivery)  gc {res['gc_util']:.0%}  "
                  f"other {res.get('other_cpu_util', 0):.0%}", file=sys.stderr)
            return res
        finally:
            await self._stop(server, *gens)

    async def idle(self, target: str) -> None:
        plan = self.plan
        server, ready = await self._server(target, "idle")
        gens: list[Child] = []
        try:
            await server.send({"op": "gc"})
            gc0 = await server.expect("gc", 30)
            rss0 = server.rss()
            connected = 0
            for stage in plan.idle_stages:
                sc = str(stage)
                try:
                    new = await self._loadgens(target, ready, connected, stage - connected,
                                               plan.idle_per_proc)
                    gens += new
                    cpu_before = gc0["cpu_s"]
                    await self._settle()
                    conn = await self._connect(server, new, stage, 240)
                    await server.send({"op": "gc"})
                    gc0 = await server.expect("gc", 60)
                    rss = server.rss()
                except BenchError as exc:
                    self._record_error("idle", [sc], target, exc)
                    break
                res = {
                    "agents": conn["n"], "new_agents": stage - connected,
                    "connect_s": conn["t_all"] - conn["t_start"],
                    "connects_per_s": (stage - connected) / max(1e-9,
                                                                conn["t_all"] - conn["t_start"]),
                    "hub_cpu_ms_per_connect": 1000 * (conn["server_cpu_s"] - cpu_before)
                    / max(1, stage - connected),
                    "rss_before_mib": rss0 / 2**20, "rss_mib": rss / 2**20,
                    "kib_per_agent": (rss - rss0) / 1024 / stage,
                    "loadgen_procs": len(gens), "connect_errors": conn["connect_errors"],
                }
                connected = stage
                self._record("idle", sc, target, res)
                print(f"  idle {stage:>6} {target:<15} {res['kib_per_agent']:.1f} KiB/agent  "
                      f"connect {res['connect_s']:.2f} s", file=sys.stderr)
        finally:
            await self._stop(server, *gens)

    async def redis_lifecycle(self, target: str) -> None:
        plan = self.plan
        server, ready = await self._server(target, "redis")
        gens: list[Child] = []
        try:
            n_agents = max(a for a, _, _ in plan.lifecycle.values())
            gens = await self._loadgens(target, ready, 0, n_agents, n_agents)
            await self._connect(server, gens, n_agents, 60)
            for sc, (agents, inflight, commands) in plan.lifecycle.items():
                res = await self._result(server, {
                    "op": "lifecycle", "agents": agents, "inflight": inflight,
                    "commands": commands, "timeout": 120,
                }, 150, gens)
                self._record("redis", sc, target, res)
                print(f"  redis {sc:>6} {target:<15} "
                      f"{res.get('store_round_trips_per_command', 0):.3f} round trips/cmd  "
                      f"{res.get('store_operations_per_command', 0):.3f} ops/cmd", file=sys.stderr)
        finally:
            await self._stop(server, *gens)

    async def reconnect_storm(self) -> None:
        res = await storm(self)
        self._record("storm", str(self.plan.storm.agents), "ours-redis", res)
        calm = res["calm"]

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f} ms"

        rec = res["reconnect_s"]
        print(f"  storm {res['agents']} agents: "
              f"{'NOT all' if rec is None else f'all back in {rec:.2f} s'}"
              f" (registered {res['registered_on_b_end']} on B at the end), peak "
              f"{res['peak_handshakes_per_s_100ms'] or 0:.0f} handshakes/s (100 ms), "
              f"{res['refused']} refused; calm p50/p99 before {ms(calm['before']['p50_ms'])}"
              f"/{ms(calm['before']['p99_ms'])}, during {ms(calm['storm']['p50_ms'])}/"
              f"{ms(calm['storm']['p99_ms'])}; hub B cpu {res['hub_b_cpu_util']:.0%}, "
              f"other {res['other_cpu_util']:.0%}", file=sys.stderr)

    # -- the run ---------------------------------------------------------------------
    async def run(self, workloads: list[str], targets: list[str]) -> dict[str, Any]:
        t_begin = time.monotonic()
        if "ours-redis" in targets or "storm" in workloads:
            self.redis = RedisServer()
            self.redis.start()
            if self.redis.proc is not None:
                pin(psutil.Process(self.redis.proc.pid), self.redis_cpus)
        try:
            for workload in workloads:
                print(f"== {workload}", file=sys.stderr)
                if workload == "roundtrip" and not self.plan.fresh:
                    for t in targets:
                        await self._guard(workload, list(self.plan.scenarios), t,
                                          lambda t=t: self.roundtrip_shared(t))
                elif workload == "roundtrip":
                    # Targets alternate within each scenario: side by side in time.
                    for sc in self.plan.scenarios:
                        for _ in range(self.plan.repeat):
                            for t in targets:
                                await self._guard(workload, [sc], t, lambda t=t, sc=sc: (
                                    self._quietest("roundtrip", sc, t,
                                                   lambda: self.roundtrip(t, sc))))
                elif workload == "fanout":
                    for _ in range(self.plan.repeat):
                        for t in targets:
                            await self._guard(workload, ["fanout"], t, lambda t=t: (
                                self._quietest("fanout", "fanout", t, lambda: self.fanout(t))))
                elif workload == "idle":
                    for t in targets:
                        await self._guard(workload, [str(s) for s in self.plan.idle_stages], t,
                                          lambda t=t: self.idle(t))
                elif workload == "redis":
                    for t in targets:
                        if t == "ours-redis":
                            await self._guard(workload, list(self.plan.lifecycle), t,
                                              lambda t=t: self.redis_lifecycle(t))
                        else:
                            why = ("the in-memory engine makes no Redis round trips"
                                   if t == "ours-memory" else "no store: not applicable")
                            for sc in self.plan.lifecycle:
                                self._record("redis", sc, t, {"skipped": why})
                elif workload == "storm":
                    await self._guard(workload, [str(self.plan.storm.agents)], "ours-redis",
                                      self.reconnect_storm)
        finally:
            redis_version = self.redis.version() if self.redis else None
            if self.redis is not None:
                self.redis.stop()
        meta = self._meta(workloads, targets, time.monotonic() - t_begin, redis_version)
        results = report.build(meta, self.raw, workloads, targets)
        if self.profiles:
            results["profiles"] = self.profiles
        return results

    def _meta(self, workloads: list[str], targets: list[str], wall: float,
              redis_version: str | None) -> dict[str, Any]:
        import msgpack  # noqa: PLC0415
        import socketio  # noqa: PLC0415
        import websockets  # noqa: PLC0415

        plan = self.plan
        versions = {"python": platform.python_version(), "websockets": websockets.__version__,
                    "python-socketio": socketio.__version__ if hasattr(socketio, "__version__")
                    else _dist_version("python-socketio"),
                    "msgpack": ".".join(map(str, msgpack.version)),
                    "redis-py": _dist_version("redis"), "uvloop": _dist_version("uvloop"),
                    "redis-server": redis_version}
        return {
            "command": ("python -m benchmarks.run " + shlex.join(sys.argv[1:])).strip(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "git": _git_state(),
            "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(),
                        "platform": platform.platform()},
            "versions": versions, "loop": self.args.loop_name,
            "workloads": workloads, "targets": targets, "wall_s": wall,
            "plan": {"quick": plan.quick, "duration_s": plan.duration, "warmup_s": plan.warmup,
                     "repeat": plan.repeat, "scenarios": plan.scenarios,
                     "fanout_agents": plan.fanout_agents, "fanout_procs": plan.fanout_procs,
                     "fanout_window": plan.fanout_window, "idle_stages": plan.idle_stages,
                     "idle_per_proc": plan.idle_per_proc, "lifecycle": plan.lifecycle,
                     "storm": dataclasses.asdict(plan.storm),
                     "settle_s": self.args.settle, "max_noise": self.args.max_noise,
                     "retries": self.args.retries,
                     "cpus": {"server": self.server_cpus, "clients": self.client_cpus,
                              "redis": self.redis_cpus}},
        }


def _busy() -> float:
    """CPU seconds the whole machine has spent busy (all processes, all cores)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git_state() -> dict[str, Any]:
    """The commit measured, and a digest of uncommitted changes to the hub's code if any."""
    import hashlib  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, timeout=10,
                                  check=False).stdout.decode(errors="replace")
        except (OSError, subprocess.SubprocessError):
            return ""

    diff = git("diff", "HEAD", "--", "dispatcher", "agent_client")
    untracked = git("ls-files", "--others", "--exclude-standard", "dispatcher", "agent_client")
    dirty = bool(diff or untracked.strip())
    digest = hashlib.sha1((diff + untracked).encode()).hexdigest()[:10] if dirty else None
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None,
            "hub_code_dirty": dirty, "hub_diff_digest": digest}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _list(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {', '.join(allowed)}")
    return [v for v in allowed if v in items]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke run (small sizes, short windows), well under 30 s")
    parser.add_argument("--only", default=",".join(WORKLOADS),
                        type=lambda v: _list(v, (*WORKLOADS, *EXTRA_WORKLOADS), "workload"),
                        help=f"workloads to run (default all of {','.join(WORKLOADS)}; "
                        "'storm', the reconnect storm, only when named)")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        type=lambda v: _list(v, TARGETS, "target"),
                        help=f"targets to run (default all: {','.join(TARGETS)})")
    parser.add_argument("--duration", type=float, default=None,
                        help="measured seconds per scenario (default 5; 0.3 with --quick)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="unmeasured seconds before each window (default 1)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of the round-trip and fan-out workloads; figures are medians")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                        help="directory for results.json/.md/.png, logs/ and profiles/ "
                        "(default benchmarks/results)")
    parser.add_argument("--settle", type=float, default=None,
                        help="before each measured window wait up to S seconds (12 S in all) for "
                        "the machine to be quiet (other processes under 1/4 core); default 10, "
                        "0 with --quick")
    parser.add_argument("--max-noise", type=float, default=0.5,
                        help="a round-trip or fan-out window during which other processes took "
                        "more than this many cores is run again (default 0.5)")
    parser.add_argument("--retries", type=int, default=None,
                        help="extra attempts for a noisy window (default 2, 0 with --quick)")
    parser.add_argument("--retry-budget", type=float, default=120.0,
                        help="seconds the whole run may spend on extra attempts (default 120)")
    parser.add_argument("--storm-agents", type=int, default=None,
                        help="storm: agents on the hub that is killed (default 5000; 200 with "
                        "--quick)")
    parser.add_argument("--max-handshakes", type=int, default=None,
                        help="storm: the hubs' max_handshakes (default: HubConfig's)")
    parser.add_argument("--backoff", default=None, metavar="INITIAL,MAX",
                        help="storm: the agents' backoff_initial,backoff_max in seconds "
                        "(default: agent_client.Agent's, 0.5,30)")
    parser.add_argument("--hub-set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a HubConfig setting for our hub, e.g. ws_fast_path=false "
                        "redis_fast_path=false (the fast paths off); repeatable")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the server to CPU 0 and the clients to the other CPUs")
    parser.add_argument("--profile", nargs="?", const="python", choices=("python", "native"),
                        help="sample our hub with py-spy in every measured window of the "
                        "round-trip and fan-out workloads, and hub B in the storm (stacks and "
                        "summaries in "
                        "OUT/profiles/); 'native' adds C frames (GC, uvloop, system calls)")
    args = parser.parse_args(argv)
    plan = Plan.quick_plan() if args.quick else Plan()
    if args.duration is not None:
        plan.duration = args.duration
    if args.warmup is not None:
        plan.warmup = args.warmup
    plan.repeat = max(1, args.repeat)
    if args.storm_agents is not None:
        plan.storm.agents = args.storm_agents
    if args.max_handshakes is not None:
        plan.storm.max_handshakes = args.max_handshakes
    if args.backoff is not None:
        try:
            initial, maximum = (float(x) for x in args.backoff.split(","))
        except ValueError:
            parser.error("--backoff takes INITIAL,MAX (seconds)")
        plan.storm.backoff_initial, plan.storm.backoff_max = initial, maximum
    if args.settle is None:
        args.settle = 0.0 if args.quick else 10.0
    if args.retries is None:
        args.retries = 0 if args.quick else 2
    if args.profile and profiling.py_spy() is None:
        parser.error("--profile needs py-spy (pip install py-spy)")
    args.loop_name = install_uvloop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, plan)
    try:
        results = asyncio.run(bench.run(args.only, args.targets))
    finally:
        kill_all()
    # The storm alone does not replace the comparison's results.
    stem = "storm" if args.only == ["storm"] else "results"
    written = [out / f"{stem}.json", out / f"{stem}.md"]
    written[0].write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    written[1].write_text(report.markdown(results))
    if stem == "results":
        written.append(out / "results.png")
        report.chart(results, written[-1])
    print(report.markdown(results))
    print(f"wrote {', '.join(map(str, written))} in {results['meta']['wall_s']:.0f} s",
          file=sys.stderr)
    return 0


def _json_default(obj: Any) -> Any:
    if isinstance(obj, tuple | set):
        return list(obj)
    return str(obj)


if __name__ == "__main__":
    raise SystemExit(main())
