"""History at scale: ``list_commands`` on a Redis store holding a million retained commands.

    python -m benchmarks.history [--commands 1000000] [--calls 30] [--out DIR]

A private redis-server is filled, fast, by a Lua loop writing what the store's
CREATE and COMPLETE scripts leave behind for a COMPLETE command: the
``P:cmd:ID`` hash (with its expiry) and the history indexes (``P:history``
with its msgpack cards, ``P:history:agent:A``, ``P:history:key:K``,
``P:history:outcome:O``). 1,000 agents, 50 keys, outcomes 90% ok, 5% error,
3% timeout, 2% cancelled (spread independently of agent and key), one command
per millisecond. Then the real
``RedisStore`` is timed answering pages (limit 100) of typical filters; each
figure is the median and the worst of ``--calls`` calls, in milliseconds,
from the call to its answer (the round trip included).

Writes ``history.json`` and ``history.md`` in ``--out``
(default ``benchmarks/results/history``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from dispatcher.history import decode_cursor, encode_cursor
from dispatcher.store.base import HistoryFilter
from dispatcher.store.redis import RedisStore

from .procs import RedisServer

PREFIX = "bench"
AGENTS = 1000
KEYS = 50
CHUNK = 20_000  # commands per fill script call (each call blocks Redis ~0.1 s)

# ARGV: 1 prefix, 2 first index, 3 count, 4 base ts, 5 agents, 6 keys, 7 retention ms.
FILL = """
local prefix, first, count = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local base, agents, keys, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local function str(s) return string.char(0xa0 + #s) .. s end  -- msgpack fixstr
for i = first, first + count - 1 do
  local id = string.format('bench-%010d', i)
  local agent = 'agent-' .. (i % agents)
  local key = 'key-' .. (i % keys)
  local r = (i * 2654435761) % 4294967296 % 100  -- outcome independent of agent and key
  local outcome = r < 90 and 'ok' or (r < 95 and 'error' or (r < 98 and 'timeout' or 'cancelled'))
  local ts = base + i
  local k = prefix .. ':cmd:' .. id
  redis.call('HSET', k, 'id', id, 'agent', agent, 'key', key, 'status', 'COMPLETE',
             'outcome', outcome, 'group', '', 'ts', ts, 'updated', ts + 5,
             'deadline', ts + 60000, 'origin', 'hub-bench', 'payload', '\\129\\161n\\1',
             'result', outcome == 'ok' and '\\129\\162ok\\195' or '\\192',
             'error', outcome == 'ok' and '' or '\\130\\164code\\161x\\167message\\161m',
             'job', '')
  redis.call('PEXPIRE', k, ttl)
  local card = '\\148' .. str(id) .. str(agent) .. str(key) .. '\\192'  -- [id, agent, key, nil]
  redis.call('ZADD', prefix .. ':history', ts, card)
  redis.call('ZADD', prefix .. ':history:agent:' .. agent, ts, id)
  redis.call('ZADD', prefix .. ':history:key:' .. key, ts, id)
  redis.call('ZADD', prefix .. ':history:outcome:' .. outcome, ts, id)
end
return count
"""

CASES: list[tuple[str, dict[str, str]]] = [
    ("newest, no filter", {}),
    ("agent", {"agent_id": "agent-7"}),
    ("key + outcome", {"key": "key-3", "outcome": "error"}),
    ("agent + outcome", {"agent_id": "agent-7", "outcome": "error"}),
    ("outcome (2%)", {"outcome": "cancelled"}),
    ("status PENDING (none: a full walk of 2,000 entries)", {"status": "PENDING"}),
]


async def fill(url: str, commands: int, base: int) -> tuple[float, int]:
    """Seconds to fill, and Redis's used memory before and after (bytes)."""
    import redis.asyncio as aioredis  # noqa: PLC0415 - the benchmark's own client

    client = aioredis.from_url(url)
    start = time.perf_counter()
    try:
        empty = int((await client.info("memory"))["used_memory"])
        sha = await client.script_load(FILL)
        for first in range(0, commands, CHUNK):
            await client.evalsha(sha, 0, PREFIX, first, min(CHUNK, commands - first), base,
                                 AGENTS, KEYS, 3_600_000)
        seconds = time.perf_counter() - start
        full = int((await client.info("memory"))["used_memory"])
    finally:
        await client.aclose()
    return seconds, full - empty


async def timed(store: RedisStore, where: HistoryFilter, calls: int,
                before: tuple[int, str] | None = None) -> dict[str, Any]:
    times: list[float] = []
    found = 0
    for _ in range(calls):
        t0 = time.perf_counter()
        page = await store.list_commands(where, limit=100, before=before,
                                         now=int(time.time() * 1000))
        times.append((time.perf_counter() - t0) * 1000)
        found = len(page.commands)
    return {"median_ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2),
            "found": found}


async def lifecycle_cost(n: int = 20_000) -> float:
    """Redis CPU (µs) per command lifecycle (create + complete, through the store's own
    scripts, 500 at a time), from ``INFO commandstats``: what the indexes add to Redis's
    work per command. Run it on another commit of the hub to compare."""
    import redis.asyncio as aioredis  # noqa: PLC0415

    from dispatcher.models import CommandInfo  # noqa: PLC0415

    server = RedisServer()
    server.start()
    store = RedisStore(server.url, prefix="cost", retention=3600.0)
    client = aioredis.from_url(server.url)
    try:
        await store.start()
        now = int(time.time() * 1000)
        for rnd in range(2):  # the first round warms up; the second is measured
            if rnd == 1:
                await client.config_resetstat()
            for first in range(0, n, 500):
                await asyncio.gather(*(store.create_command(CommandInfo(
                    id=f"c{rnd}-{i}", agent_id=f"agent-{i % 100}", key=f"key-{i % 10}",
                    ts=now + i, updated=now + i, deadline=now + i + 60_000, origin="h",
                    payload={"n": i}), locate=False) for i in range(first, first + 500)))
            for first in range(0, n, 500):
                await asyncio.gather(*(store.complete(f"c{rnd}-{i}", "ok", now=now + i + 5,
                                                      result={"ok": True})
                                       for i in range(first, first + 500)))
        stats = await client.info("commandstats")
        return float(stats["cmdstat_evalsha"]["usec"]) / n
    finally:
        await client.aclose()
        await store.close()
        server.stop()


async def run(commands: int, calls: int) -> dict[str, Any]:
    cost = min([await lifecycle_cost() for _ in range(3)])
    print(f"Redis CPU per command lifecycle (create + complete): {cost:.1f} µs "
          "(best of 3)", flush=True)
    server = RedisServer()
    server.start()
    store = RedisStore(server.url, prefix=PREFIX, retention=3600.0)
    try:
        await store.start()
        base = int(time.time() * 1000) - commands - 60_000
        fill_s, used = await fill(server.url, commands, base)
        print(f"filled {commands:,} commands in {fill_s:.1f} s; Redis memory "
              f"{used / commands:.0f} bytes per command, indexes included", flush=True)
        rows: list[dict[str, Any]] = []
        for name, where in CASES:
            res = await timed(store, HistoryFilter(**where), calls)
            rows.append({"case": name, **res})
            print(f"  {name:<48} {res['median_ms']:>7.2f} ms median, "
                  f"{res['max_ms']:>7.2f} max ({res['found']} found)", flush=True)
        # A page deep in the history: after the 500,000th newest command.
        mid = (base + commands // 2, f"bench-{commands // 2:010d}")
        assert decode_cursor(encode_cursor(mid)) == mid
        res = await timed(store, HistoryFilter(), calls, before=mid)
        rows.append({"case": "no filter, a page from the middle (cursor)", **res})
        print(f"  {'no filter, from the middle':<48} {res['median_ms']:>7.2f} ms median, "
              f"{res['max_ms']:>7.2f} max", flush=True)
        return {"commands": commands, "calls": calls, "fill_seconds": round(fill_s, 1),
                "bytes_per_command": round(used / commands),
                "lifecycle_redis_us": round(cost, 1),
                "redis": server.version(), "limit": 100, "rows": rows}
    finally:
        await store.close()
        server.stop()


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# list_commands on {result['commands']:,} retained commands (Redis "
             f"{result['redis']})", "",
             f"Pages of {result['limit']}; median and worst of {result['calls']} calls, "
             "from the call to its answer.", "",
             "| filter | median ms | worst ms | found |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['median_ms']} | {r['max_ms']} | {r['found']} |"
              for r in result["rows"]]
    lines += ["", f"Filled in {result['fill_seconds']} s; Redis used "
              f"{result['bytes_per_command']} bytes per retained command (hash, expiry and "
              "the history indexes). Redis CPU per command lifecycle (create + complete "
              f"scripts, best of 3 runs of 20,000): {result['lifecycle_redis_us']} µs."]
    (out / "history.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "history")
    args = parser.parse_args()
    result = asyncio.run(run(args.commands, args.calls))
    write(result, args.out)


if __name__ == "__main__":
    main()
