"""The driver every peer server shares: readiness, agent counting, and the workload loops.

A peer module implements :class:`Peer` (start/close, one round trip, one fan-out)
and calls :func:`main`. The process then prints ``{"event": "ready", ...}`` and
runs one operation per JSON command read from stdin, answering each with one
JSON line. The loops are identical for every peer, so only the peer differs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

from ..common import PAYLOAD, event_data, install_uvloop, now, percentile, print_json, stdin_lines

__all__ = ["Peer", "main"]


class Peer(ABC):
    """One server under test, seen from the driver."""

    name = "peer"

    def __init__(self) -> None:
        self.connected = 0
        self._changed = asyncio.Event()

    # -- to implement ----------------------------------------------------------
    @abstractmethod
    async def start(self) -> int:
        """Start serving agents on loopback; returns the port."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def call(self, index: int, payload: Any) -> Awaitable[Any]:
        """One command round trip to agent ``index``; resolves with the agent's answer."""

    @abstractmethod
    async def fanout(self, data: Any) -> None:
        """One event to every connected agent, without receipts."""

    def counters(self) -> dict[str, int]:
        """Store counters (Redis round trips and operations) when the peer has a store."""
        return {}

    def info(self) -> dict[str, Any]:
        return {}

    # -- called by the peer on (dis)connections -------------------------------
    def agent_connected(self) -> None:
        self.connected += 1
        self._changed.set()

    def agent_disconnected(self) -> None:
        self.connected -= 1
        self._changed.set()

    async def wait_agents(self, n: int) -> None:
        while self.connected < n:
            self._changed.clear()
            await self._changed.wait()


class FanoutControl:
    """Loopback TCP where load generators report the fan-out rounds they fully received.

    Each load-generator process sends one line ``SEQ`` when all of its agents have
    event ``SEQ``; a round is delivered when every reporter has reported it. This
    is the pacing signal for every peer alike (events themselves carry no receipt).
    """

    def __init__(self) -> None:
        self.reports: dict[int, int] = {}
        self.changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._next = 0
        self.port = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        key = self._next
        self._next += 1
        self.reports[key] = 0
        self.changed.set()
        try:
            while line := await reader.readline():
                self.reports[key] = int(line)
                self.changed.set()
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    def delivered(self, reporters: int) -> int:
        if len(self.reports) < reporters:
            return 0
        return min(self.reports.values())

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)


def _cpu() -> float:
    return time.process_time()


def _rss() -> int:
    """This process's resident memory (bytes)."""
    import psutil  # noqa: PLC0415 - the bench extra; only the drivers need it

    return int(psutil.Process().memory_info().rss)


class GcMeter:
    """Time the server spends in the cyclic garbage collector, per generation."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self._t0 = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            gen = info["generation"]
            self.seconds[gen] += time.perf_counter() - self._t0
            self.collections[gen] += 1

    def snapshot(self) -> tuple[list[float], list[int]]:
        return list(self.seconds), list(self.collections)

    @staticmethod
    def delta(a: tuple[list[float], list[int]], b: tuple[list[float], list[int]],
              elapsed: float) -> dict[str, Any]:
        per_gen = [y - x for x, y in zip(a[0], b[0], strict=True)]
        total = sum(per_gen)
        return {"gc_s": total, "gc_util": total / elapsed if elapsed else 0.0,
                "gc_s_by_generation": per_gen,
                "gc_collections": [y - x for x, y in zip(a[1], b[1], strict=True)]}


GC = GcMeter()


async def run_roundtrip(peer: Peer, cmd: dict[str, Any]) -> dict[str, Any]:
    """``agents`` x ``inflight`` closed loops of round trips; throughput and latency."""
    agents, inflight = int(cmd["agents"]), int(cmd["inflight"])
    duration, warmup = float(cmd["duration"]), float(cmd["warmup"])
    latencies: list[float] = []
    state = {"measure": False, "stop": False}
    errors: list[str] = []
    perf = time.perf_counter
    call = peer.call

    async def worker(index: int) -> None:
        payload = PAYLOAD
        record = latencies.append
        while not state["stop"]:
            t0 = perf()
            try:
                await call(index, payload)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            if state["measure"]:
                record(perf() - t0)

    tasks = [asyncio.ensure_future(worker(i)) for i in range(agents) for _ in range(inflight)]
    try:
        await asyncio.sleep(warmup)
        c0, cpu0, gc0, rss0 = peer.counters(), _cpu(), GC.snapshot(), _rss()
        state["measure"] = True
        t0 = perf()
        await asyncio.sleep(duration)
        state["measure"] = False
        elapsed = perf() - t0
        cpu = _cpu() - cpu0
        c1, gc1, rss1 = peer.counters(), GC.snapshot(), _rss()
        done = len(latencies)
        state["stop"] = True
        # Let the calls in flight finish (bounded), so the next scenario starts clean.
        _, pending = await asyncio.wait(tasks, timeout=30)
    finally:
        state["stop"] = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    latencies.sort()
    out: dict[str, Any] = {
        "agents": agents, "inflight": inflight, "elapsed_s": elapsed, "commands": done,
        "per_s": done / elapsed if elapsed else 0.0,
        "p50_ms": _ms(percentile(latencies, 50)), "p99_ms": _ms(percentile(latencies, 99)),
        "hub_cpu_s": cpu, "hub_cpu_util": cpu / elapsed if elapsed else 0.0,
        "hub_cpu_us_per_op": 1e6 * cpu / done if done else None,
        "stuck_calls": len(pending), "errors": errors[:5], "error_count": len(errors),
        "rss_growth_bytes_per_op": (rss1 - rss0) / done if done else None,
        "rss_end_mib": rss1 / 2**20,
    }
    out.update(_counter_delta(c0, c1, done))
    out.update(GcMeter.delta(gc0, gc1, elapsed))
    return out


async def run_lifecycle(peer: Peer, cmd: dict[str, Any]) -> dict[str, Any]:
    """Exactly ``commands`` round trips at ``agents`` x ``inflight``; store counters per command."""
    total, agents, inflight = int(cmd["commands"]), int(cmd["agents"]), int(cmd["inflight"])
    left = [total]
    perf = time.perf_counter

    async def worker(index: int) -> None:
        while left[0] > 0:
            left[0] -= 1
            await peer.call(index, PAYLOAD)

    c0, cpu0, t0 = peer.counters(), _cpu(), perf()
    await asyncio.wait_for(
        asyncio.gather(*(worker(i) for i in range(agents) for _ in range(inflight))),
        timeout=float(cmd.get("timeout", 120)),
    )
    elapsed, cpu, c1 = perf() - t0, _cpu() - cpu0, peer.counters()
    out: dict[str, Any] = {
        "agents": agents, "inflight": inflight, "commands": total, "elapsed_s": elapsed,
        "per_s": total / elapsed, "hub_cpu_us_per_op": 1e6 * cpu / total,
    }
    out.update(_counter_delta(c0, c1, total))
    return out


async def run_fanout(peer: Peer, control: FanoutControl, cmd: dict[str, Any]) -> dict[str, Any]:
    """Events to every agent as fast as they are received, ``window`` rounds ahead at most."""
    duration, warmup = float(cmd["duration"]), float(cmd["warmup"])
    window, reporters, agents = int(cmd["window"]), int(cmd["reporters"]), int(cmd["agents"])
    stall = float(cmd.get("stall_timeout", 10))
    perf = time.perf_counter
    sent = 0
    marks: dict[str, tuple[float, int, float]] = {}
    loop_start = perf()
    while True:
        t = perf()
        delivered = control.delivered(reporters)
        if "start" not in marks and t - loop_start >= warmup:
            marks["start"] = (t, delivered, _cpu())
            gc0 = GC.snapshot()
        if "start" in marks and t - marks["start"][0] >= duration:
            marks["end"] = (t, delivered, _cpu())
            gc1 = GC.snapshot()
            break
        if sent - delivered < window:
            sent += 1
            await peer.fanout(event_data(sent))
            continue
        control.changed.clear()
        try:
            await asyncio.wait_for(control.changed.wait(), stall)
        except TimeoutError:
            return {"error": f"no fan-out progress for {stall:g} s (sent {sent}, "
                             f"delivered {delivered}, reporters {len(control.reports)})"}
    (t0, d0, cpu0), (t1, d1, cpu1) = marks["start"], marks["end"]
    rounds = d1 - d0
    elapsed = t1 - t0
    deliveries = rounds * agents
    return {
        "agents": agents, "rounds": rounds, "elapsed_s": elapsed, "deliveries": deliveries,
        "per_s": deliveries / elapsed if elapsed else 0.0,
        "rounds_per_s": rounds / elapsed if elapsed else 0.0,
        "hub_cpu_s": cpu1 - cpu0, "hub_cpu_util": (cpu1 - cpu0) / elapsed if elapsed else 0.0,
        "hub_cpu_us_per_op": 1e6 * (cpu1 - cpu0) / deliveries if deliveries else None,
        "window": window, **GcMeter.delta(gc0, gc1, elapsed),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _counter_delta(c0: dict[str, int], c1: dict[str, int], done: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in c1.items():
        delta = value - c0.get(name, 0)
        out[f"store_{name}"] = delta
        out[f"store_{name}_per_command"] = delta / done if done else None
    return out


async def _serve(peer: Peer, loop_name: str) -> None:
    control = FanoutControl()
    port = await peer.start()
    control_port = await control.start()
    print_json({"event": "ready", "peer": peer.name, "port": port, "control_port": control_port,
                "pid": os.getpid(), "loop": loop_name, **peer.info()})
    try:
        async for cmd in stdin_lines():
            op = cmd.get("op")
            if op == "quit":
                break
            try:
                if op == "wait_agents":
                    n = int(cmd["n"])
                    try:
                        await asyncio.wait_for(peer.wait_agents(n), float(cmd.get("timeout", 60)))
                        ok = True
                    except TimeoutError:
                        ok = False
                    print_json({"event": "agents", "n": peer.connected, "ok": ok, "t": now(),
                                "cpu_s": _cpu()})
                elif op == "gc":
                    gc.collect()
                    print_json({"event": "gc", "cpu_s": _cpu()})
                elif op == "roundtrip":
                    print_json({"event": "result", **await run_roundtrip(peer, cmd)})
                elif op == "lifecycle":
                    print_json({"event": "result", **await run_lifecycle(peer, cmd)})
                elif op == "fanout":
                    print_json({"event": "result", **await run_fanout(peer, control, cmd)})
                else:
                    print_json({"event": "result", "error": f"unknown op {op!r}"})
            except Exception as exc:
                print_json({"event": "result", "error": f"{type(exc).__name__}: {exc}"})
    finally:
        await control.close()
        await asyncio.wait_for(peer.close(), 15)
        print_json({"event": "closed"})


def main(make_peer: Callable[[argparse.Namespace], Peer],
         add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--gc-threshold", default=None, metavar="G0[,G1[,G2]]",
                        help="gc.set_threshold(...) before starting, for experiments")
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args()
    loop_name = "asyncio" if args.no_uvloop else install_uvloop()
    if args.gc_threshold:
        gc.set_threshold(*(int(x) for x in args.gc_threshold.split(",")))

    async def run() -> None:
        await _serve(make_peer(args), loop_name)

    asyncio.run(run())
