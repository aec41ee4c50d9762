"""Closing the Redis engine cannot hang, even while the event loop shuts down (defect 12)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from dispatcher.errors import StoreUnavailable
from dispatcher.store.redis import RedisStore

from ..support import redis_fast_path

# A program whose task closes its hub in a ``finally`` that runs when asyncio.run
# cancels every task at exit, the store's writer and reader included.
_CLOSE_AT_EXIT = textwrap.dedent("""
    import asyncio, sys, time
    from dispatcher import Dispatcher, HubConfig, StoreUnavailable

    url, prefix, fast = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    tasks = []

    async def main():
        hub = Dispatcher(HubConfig(port=0, admin_port=0, redis_url=url, prefix=prefix,
                                   redis_fast_path=fast))
        await hub.listen()
        running = asyncio.Event()

        async def worker():
            try:
                running.set()
                await asyncio.Event().wait()
            finally:
                try:
                    await hub.store.get_command("late")
                except StoreUnavailable as exc:
                    print("op_failed", exc, flush=True)
                start = time.monotonic()
                await hub.close()
                print("closed", time.monotonic() - start, flush=True)

        tasks.append(asyncio.get_running_loop().create_task(worker()))
        await running.wait()

    asyncio.run(main())
    print("exited", flush=True)
""")


def test_hub_close_in_a_finally_at_asyncio_run_exit_returns(redis_url: str, prefix: str) -> None:
    """``await hub.close()`` in a ``finally`` of a task that ``asyncio.run`` cancels
    at exit returns promptly; an operation asked for meanwhile fails with
    StoreUnavailable instead of waiting for a writer that is gone. In a process of
    its own with a hard bound: before the fix it hung forever."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CLOSE_AT_EXIT, redis_url, prefix,
             "1" if redis_fast_path() else "0"],
            capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the program hung at exit; its output: {exc.stdout!r}")
    assert done.returncode == 0, done.stderr[-2000:]
    # The program's own lines (structlog's go to stdout too).
    lines = [line for line in done.stdout.splitlines()
             if line.split(" ", 1)[0] in ("op_failed", "closed", "exited")]
    assert len(lines) == 3, done.stdout
    assert lines[0].startswith("op_failed") and "task ended" in lines[0], lines
    assert lines[1].startswith("closed ") and float(lines[1].split()[1]) < 5.0, lines
    assert lines[2] == "exited"


async def test_store_whose_tasks_were_cancelled_fails_waiting_ops_and_closes(
        redis_url: str, prefix: str) -> None:
    """The writer and reader cancelled by someone else (the loop shutting down): what
    was queued fails with StoreUnavailable, later calls fail at once, close() returns."""
    store = RedisStore(redis_url, prefix=prefix, fast_path=redis_fast_path())
    await store.start()
    try:
        await store.ping()
        queued = asyncio.ensure_future(store.get_command("c1"))
        await asyncio.sleep(0)  # queued, the writer not run yet
        ours = [t for t in asyncio.all_tasks()
                if t.get_name() in ("redis-writer", "redis-reader")]
        assert len(ours) == 2
        for task in ours:
            task.cancel()
        done, _ = await asyncio.wait([queued], timeout=5)
        assert done, "the queued operation was left waiting"
        with pytest.raises(StoreUnavailable, match="task ended"):
            queued.result()
        async with asyncio.timeout(1):
            with pytest.raises(StoreUnavailable, match="task ended"):
                await store.ping()
    finally:
        async with asyncio.timeout(5):
            await store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.ping()
