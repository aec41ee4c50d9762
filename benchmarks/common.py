"""Pieces every benchmark process shares: event loop setup, JSON-line I/O, the workload data.

Processes talk to the orchestrator with one JSON object per line: commands on
stdin, events and results on stdout (logs go to stderr). Nothing waits on a
sleep for another process: every step waits for a line, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

__all__ = [
    "COMMAND_KEY",
    "EVENT_KEY",
    "PAYLOAD",
    "agent_id",
    "event_data",
    "install_uvloop",
    "now",
    "percentile",
    "print_json",
    "stdin_lines",
]

# ~70 bytes of msgpack: with the command frame around it, ~130-byte frames each way
# (docs/benchmarks.md measured with ~100-byte frames).
PAYLOAD: dict[str, Any] = {"job": "bench", "n": 123456, "data": "x" * 48}
COMMAND_KEY = "echo"
EVENT_KEY = "tick"


def event_data(seq: int) -> dict[str, Any]:
    """The data of fan-out event number ``seq`` (the receivers count rounds by ``seq``)."""
    return {"seq": seq, "data": "y" * 40}


def agent_id(index: int) -> str:
    """Agent ids are positional so that a server can address agent ``i`` without a lookup."""
    return f"a{index:05d}"


def install_uvloop() -> str:
    """uvloop when installed (in every process alike, for fairness); returns the loop's name."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def print_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def stdin_lines() -> AsyncIterator[dict[str, Any]]:
    """JSON commands from the orchestrator, one per line; ends on EOF (the parent is gone)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        line = line.strip()
        if line:
            yield json.loads(line)


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted sequence (``q`` in 0..100)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def now() -> float:
    """Wall-clock seconds: comparable across the processes of one machine."""
    return time.time()
