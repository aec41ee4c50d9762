"""``--profile``: sample the hub with py-spy during a measured window and say where its CPU goes.

py-spy (``pip install py-spy``) records collapsed stacks (``--format raw``: one
``frame;frame;... count`` line per distinct stack, readable by speedscope and
flamegraph.pl) for the window only; the summary splits the hub's CPU time per
command into leaf functions and into layers (dispatcher core, store, transport,
msgpack, event loop), from the same samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["py_spy", "record", "summarize"]

# Layer of a leaf frame, by the file it runs in (first match wins). Native frames
# (``--profile native``) name C files: those are mapped to their library.
LAYERS = (
    ("dispatcher/store", "hub: store (dispatcher/store)"),
    ("dispatcher/", "hub: core (dispatcher/*)"),
    ("agent_client/", "hub: protocol (agent_client/protocol.py)"),
    ("redis/", "redis-py"),
    ("hiredis", "redis-py"),
    ("websockets/", "websockets (transport)"),
    ("speedups.c", "websockets (transport)"),
    ("msgpack", "msgpack"),
    ("pack.h", "msgpack"),
    ("unpack", "msgpack"),
    ("structlog/", "metrics and logging"),
    ("prometheus_client/", "metrics and logging"),
    ("asyncio/", "asyncio (stdlib)"),
    ("_asynciomodule", "asyncio (stdlib)"),
    ("uvloop", "uvloop / libuv"),
    ("loop.c", "uvloop / libuv"),
    ("libuv", "uvloop / libuv"),
    ("libc.so", "system calls (libc: read, write, epoll)"),
    ("[vdso]", "system calls (libc: read, write, epoll)"),
    ("benchmarks/", "benchmark driver"),
)
_LIBUV_FILES = {"core.c", "uv-common.c", "timer.c", "heap-inl.h", "queue.h", "stream.c",
                "epoll.c", "linux.c", "tcp.c", "async.c", "poll.c"}
_CPYTHON = ("libpython", "object.h", "listobject", "dictobject", "abstract", "ceval",
            "obmalloc", "typeobject", "unicodeobject", "longobject", "tupleobject",
            "floatobject", "call.c", "frameobject", "genobject", "methodobject",
            "descrobject", "bytesobject", "pystate", "<string>", "_weakrefset", "enum.py",
            "dataclasses", "weakref", "funcobject", "cellobject", "context.c", "hamt.c")
GC_LAYER = "garbage collector (CPython gc)"
# Inclusive times are listed for the hub's own code and the libraries it drives.
_OWN = ("dispatcher/", "agent_client/", "websockets/", "redis/")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).exists() else None


async def record(pid: int, seconds: float, out: Path,
                 native: bool = False) -> asyncio.subprocess.Process | None:
    """Sample ``pid`` for ``seconds`` into ``out`` (collapsed stacks); None without py-spy.

    ``native`` adds C frames (CPython, uvloop, msgpack, libc): slower sampling,
    but it shows the garbage collector and system calls as what they are.
    """
    exe = py_spy()
    if exe is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return await asyncio.create_subprocess_exec(
        exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
        "--rate", "100" if native else "250", "--format", "raw", "--function",
        *(["--native"] if native else []), "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )


async def finish(proc: asyncio.subprocess.Process | None, timeout: float = 30) -> None:
    if proc is None:
        return
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _parse(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    return m["func"], m["file"]


def _layer(file: str, func: str) -> str:
    for needle, name in LAYERS:
        if needle in file:
            return name
    if file in _LIBUV_FILES:
        return "uvloop / libuv"
    if any(needle in file for needle in _CPYTHON):
        return "CPython runtime (objects, calls, allocation)"
    if not file:
        return "native / other"
    return f"other ({file.split('/', 1)[0]})"


def summarize(raw: Path, us_per_op: float | None, top: int = 25) -> dict[str, Any]:
    """Self time by leaf function and by layer; inclusive time by function; µs per op each."""
    leaves: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [_parse(f) for f in stack.split(";") if f]
        if not frames:
            continue
        func, file = frames[-1]
        leaves[f"{func} ({file})"] += count
        # Time inside the cyclic collector is charged to whatever allocated when it
        # ran; with native frames it is seen as such and counted apart.
        in_gc = any(fn.startswith(("gc_collect", "_PyGC_", "collect_with_callback"))
                    for fn, _ in frames)
        layers[GC_LAYER if in_gc else _layer(file, func)] += count
        for name in {f"{fn} ({fl})" for fn, fl in frames if fl.startswith(_OWN)}:
            inclusive[name] += count
    if not total:
        return {"samples": 0}

    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"name": name, "share": n / total,
                 "us_per_op": None if us_per_op is None else us_per_op * n / total}
                for name, n in counter.most_common(top)]

    return {"samples": total, "us_per_op": us_per_op, "layers": rows(layers),
            "self": rows(leaves), "inclusive": rows(inclusive), "raw": str(raw)}


def text(summary: dict[str, Any], title: str) -> str:
    """The summary as plain text (written beside the raw stacks)."""
    if not summary.get("samples"):
        return f"{title}: no samples\n"
    per = summary["us_per_op"]
    lines = [f"{title}: {summary['samples']} samples; hub CPU "
             + (f"{per:.1f} us per operation" if per else "n/a"), ""]
    sections = (("layers", "self time by layer"), ("self", "self time by function"),
                ("inclusive", "inclusive time by function (hub code, websockets, redis-py)"))
    for section, label in sections:
        lines.append(f"-- {label}")
        for row in summary[section]:
            us = f"{row['us_per_op']:7.2f} us" if row["us_per_op"] is not None else ""
            lines.append(f"{100 * row['share']:6.1f}%  {us}  {row['name']}")
        lines.append("")
    return "\n".join(lines)
