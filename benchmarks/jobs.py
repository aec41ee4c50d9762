"""The jobs workload: one command on 1,000 agents as a job, against 1,000 separate commands.

``python -m benchmarks.jobs [--agents 1000] [--rounds 7] [--engines memory,redis] [--quick]``

Processes: this one embeds the hub (``Dispatcher``, ``HubConfig`` defaults except
``max_frame_rate=0``, as ``servers/ours.py`` runs it) and drives it as an
application does; the agents are ``loadgen.py --proto ws`` processes (500 each),
answering every ``cmd`` with its payload at once. On the Redis engine a private
``redis-server`` runs.

Each round times, on the same connected agents and one after the other (in
alternating order from round to round):

- ``job``: ``hub.execute_on_agents(ids, key)`` (the ids listed, no batch), from the
  call to ``await handle`` (every part ended and recorded in the job);
- ``job-glob``: the same with the target ``"*"`` (resolved against the agents
  registered in the store);
- ``separate``: ``execute_on_agent`` for each id, the handles gathered.

Figures are medians over the rounds: elapsed ms, commands/s and this process's
CPU per command (the hub's work: it embeds the hub); ``ratio`` and ``cpu_ratio``
are job / separate (the budget is 1.2 for both). Writes ``benchmarks/results/jobs.json`` and
``jobs.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import COMMAND_KEY, agent_id, install_uvloop
from .procs import Child, RedisServer, kill_all

ROOT = Path(__file__).resolve().parents[1]
PER_PROCESS = 500
BUDGET = 1.2


async def _connect(hub: Any, n: int, log_dir: Path) -> list[Child]:
    url = f"ws://127.0.0.1:{hub.port}/ws"
    gens = []
    for first in range(0, n, PER_PROCESS):
        count = min(PER_PROCESS, n - first)
        gens.append(Child(f"jobs-loadgen-{first}", "benchmarks.loadgen",
                          ["--proto", "ws", "--url", url, "--first", str(first),
                           "--count", str(count)], log_dir))
    await asyncio.gather(*(g.start() for g in gens))
    await asyncio.gather(*(g.expect("ready", 30) for g in gens))
    await asyncio.gather(*(g.send({"op": "go"}) for g in gens))
    await asyncio.gather(*(g.expect("connected", 60) for g in gens))
    deadline = time.monotonic() + 30
    while hub.connected_count < n or len(await hub.list_connected_agents()) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {hub.connected_count} of {n} agents connected")
        await asyncio.sleep(0.05)  # another process's agents: nothing to wait on here
    return gens


async def _one(hub: Any, way: str, ids: list[str], payload: Any) -> tuple[float, float]:
    """Wall seconds and this process's (the hub's) CPU seconds of one run."""
    cpu = time.process_time()
    start = time.perf_counter()
    if way == "separate":
        await asyncio.gather(*(hub.execute_on_agent(i, COMMAND_KEY, payload) for i in ids))
    else:
        target: Any = ids if way == "job" else "*"
        job = await hub.execute_on_agents(target, COMMAND_KEY, payload)
        if job.counts["ok"] != len(ids):
            raise RuntimeError(f"{way}: {job.counts}")
    return time.perf_counter() - start, time.process_time() - cpu


async def run_engine(engine: str, n: int, rounds: int, log_dir: Path) -> dict[str, Any]:
    from dispatcher import Dispatcher, HubConfig  # noqa: PLC0415

    redis = None
    if engine == "redis":
        redis = RedisServer()
        redis.start()
    hub = Dispatcher(HubConfig(host="127.0.0.1", port=0, admin_port=None, max_frame_rate=0,
                               redis_url=redis.url if redis else None, prefix="benchjobs"))
    await hub.listen()
    # As `dispatcher serve` does once it listens (and benchmarks/servers/ours.py).
    from dispatcher.runtime import tune_gc  # noqa: PLC0415

    tune_gc()
    gens: list[Child] = []
    try:
        gens = await _connect(hub, n, log_dir)
        ids = [agent_id(i) for i in range(n)]
        payload = {"n": 1}
        ways = ["job", "job-glob", "separate"]
        for way in ways:  # warm-up: one of each, not measured
            await _one(hub, way, ids, payload)
        times: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
        for r in range(rounds):
            for way in ways if r % 2 == 0 else list(reversed(ways)):
                times[way].append(await _one(hub, way, ids, payload))
        out: dict[str, Any] = {}
        for way, values in times.items():
            med = statistics.median(v[0] for v in values)
            cpu = statistics.median(v[1] for v in values)
            out[way] = {"ms": round(med * 1000, 1), "commands_per_s": round(n / med),
                        "hub_cpu_us_per_command": round(cpu / n * 1e6, 1),
                        "all_ms": [round(v[0] * 1000, 1) for v in values]}
        sep = out["separate"]
        out["ratio"] = round(out["job"]["ms"] / sep["ms"], 3)
        out["ratio_glob"] = round(out["job-glob"]["ms"] / sep["ms"], 3)
        out["cpu_ratio"] = round(out["job"]["hub_cpu_us_per_command"]
                                 / sep["hub_cpu_us_per_command"], 3)
        return out
    finally:
        for g in gens:
            await g.stop()
        await hub.close()
        if redis is not None:
            redis.stop()


def _markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"# Jobs: one command on {meta['agents']} agents",
        "",
        f"`python -m benchmarks.jobs` ({meta['when']}, {meta['rounds']} rounds, medians; "
        f"loop {meta['loop']}, {meta['cpus']} CPUs, shared machine).",
        "",
        "| engine | path | ms to the last result | commands/s | vs separate | "
        "hub CPU µs/command | vs separate |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for engine, row in results.items():
        sep = row["separate"]
        for way in ("separate", "job", "job-glob"):
            r = row[way]
            lines.append(f"| {engine} | {way} | {r['ms']:,.1f} | {r['commands_per_s']:,} | "
                         f"{r['ms'] / sep['ms']:.2f}x | {r['hub_cpu_us_per_command']:.1f} | "
                         f"{r['hub_cpu_us_per_command'] / sep['hub_cpu_us_per_command']:.2f}x |")
    lines += ["", f"Budget: a job costs at most {BUDGET}x the separate commands "
              "(`job` row, the ids listed), in time to the last result and in hub CPU."]
    return "\n".join(lines) + "\n"


def _write(out_dir: Path, meta: dict[str, Any], results: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "jobs.json").write_text(json.dumps({"meta": meta, "results": results},
                                                  indent=2) + "\n")
    (out_dir / "jobs.md").write_text(_markdown(results, meta))


async def main_async(args: argparse.Namespace, loop_name: str) -> int:
    out_dir = Path(args.out)
    log_dir = Path(tempfile.mkdtemp(prefix="dispatcher-bench-jobs-"))  # the agents' logs
    results: dict[str, Any] = {}
    try:
        for engine in args.engines.split(","):
            results[engine] = await run_engine(engine, args.agents, args.rounds, log_dir)
            print(json.dumps({engine: results[engine]}), flush=True)
    finally:
        kill_all()
    import os  # noqa: PLC0415

    meta = {"agents": args.agents, "rounds": args.rounds, "loop": loop_name,
            "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if not args.quick:
        _write(out_dir, meta, results)
    over = [e for e, r in results.items() if max(r["ratio"], r["cpu_ratio"]) > BUDGET]
    if over and not args.quick:  # a smoke run's few rounds say nothing about the budget
        print(f"over budget ({BUDGET}x): {', '.join(over)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.jobs", description=__doc__)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--engines", default="memory,redis")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--quick", action="store_true",
                        help="100 agents, 2 rounds, nothing written (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.agents, args.rounds = 100, 2
    import logging  # noqa: PLC0415

    import structlog  # noqa: PLC0415

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                        cache_logger_on_first_use=True)  # as serve configures it
    loop_name = install_uvloop()  # before the loop exists, as every bench process does
    return asyncio.run(main_async(args, loop_name))


if __name__ == "__main__":
    sys.exit(main())
