"""The agents view with 5,000 connected agents and a job running on all of them,
measured in the browser (Performance API): the first full render, long tasks
while the job's updates stream in, and a filter keystroke. docs/dashboard.md
publishes the figures; ``-m heavy`` selects this test alone.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.remote.webdriver import WebDriver

from dispatcher.jobs import JobHandle
from dispatcher.models import JobInfo

from .conftest import Cluster
from .test_dashboard import open_page, wait

# serial: a timing measurement, run alone after the parallel run (like the latency tests).
pytestmark = [pytest.mark.browser, pytest.mark.heavy, pytest.mark.serial]

AGENTS = 5000
ROOT = Path(__file__).resolve().parents[2]


def test_agents_view_with_5000_agents_and_a_job_on_all(cluster: Cluster, browser: WebDriver
                                                       ) -> None:
    hub = cluster.hub()
    farm = subprocess.Popen(
        [sys.executable, "-m", "tests.browser.agent_farm", f"ws://127.0.0.1:{hub.port}/ws",
         str(AGENTS), "--delay", "4"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert farm.stdout is not None
        started = time.perf_counter()
        assert farm.stdout.readline().strip() == f"connected {AGENTS}"
        connect_s = time.perf_counter() - started
        async def submit() -> JobHandle:
            handle = hub.execute_on_agents("farm-*", "work", {"n": 1})
            assert len(await handle.resolved()) == AGENTS
            return handle

        handle = cluster.runner.run(submit())

        open_page(browser, hub)
        first = wait(browser, lambda b: b.execute_script(
            "const m = window.dashboardMetrics.firstFullRender;"
            f"return m && m.agents >= {AGENTS} ? m : null"), timeout=20, what="first render")
        # The job's updates keep arriving while it runs: the page must keep up.
        job = cluster.runner.run(wait_job(handle), timeout=30)
        assert job.counts["ok"] == AGENTS
        keystroke = browser.execute_script(
            "const f = document.getElementById('agent-filter'); f.value = 'region=eu-west';"
            "const t0 = performance.now(); f.dispatchEvent(new Event('input'));"
            "return performance.now() - t0;")
        metrics: dict[str, Any] = browser.execute_script("return window.dashboardMetrics")
        shown = browser.execute_script("return document.getElementById('agent-shown').textContent")
    finally:
        browser.get("about:blank")
        if farm.stdin is not None:
            farm.stdin.close()
        farm.wait(30)
    longest = max(metrics["longTasks"], default=0.0)
    report = {"connect_s": round(connect_s, 1), "first_render_ms": round(first["ms"], 1),
              "page_ready_ms": round(first["at"], 1), "rows": first["rows"],
              "renders": len(metrics["agentsRender"]),
              "max_render_ms": round(max(metrics["agentsRender"]), 1),
              "long_tasks": len(metrics["longTasks"]), "longest_task_ms": round(longest, 1),
              "filter_keystroke_ms": round(keystroke, 1),
              "stream_items": metrics["streamItems"], "stream_opens": metrics["streamOpens"]}
    print("dashboard_speed", report)
    assert shown == f"{AGENTS // 4} of {AGENTS} agents match"
    assert first["rows"] == 200  # one page of rows, whatever the number of agents
    # The page read the job's updates (at least each part's COMPLETE) on one stream that
    # was never dropped for falling behind.
    assert metrics["streamItems"] >= AGENTS and metrics["streamOpens"] == 1, report
    assert first["at"] < 1000, report  # navigation start -> 5,000 agents listed
    assert longest < 200, report
    assert keystroke < 100, report


async def wait_job(handle: JobHandle) -> JobInfo:
    return await handle
