"""Fixtures for the dashboard's browser tests: one headless Chromium per session,
and hubs and agents running in an event loop on a thread of their own.

Selenium's calls block, so the hub cannot share the test's event loop (the
page would wait on a hub that cannot answer): :class:`LoopThread` runs hubs and
agents on a loop of their own and the tests, plain functions, hand it coroutines.

Chromium and chromedriver come from Debian (``scripts/ensure-browser``). When
they are missing the tests are skipped with a message saying how to install
them, except in CI (``CI=true``), where a missing browser fails the run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from agent_client import Agent
from dispatcher import Dispatcher

from ..support import hub_config, wait_for

T = TypeVar("T")

INSTALL = ("the dashboard's browser tests need Chromium and chromedriver: run "
           "scripts/ensure-browser (as root it installs them: apt-get install chromium "
           "chromium-driver)")


def browser_binaries() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def missing_browser(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: browser tests are never skipped in CI)", pytrace=False)
    pytest.skip(reason)


class LoopThread:
    """An asyncio event loop on a daemon thread; ``run`` waits for a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hub-loop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 15.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless Chromium for the whole session, with its console log kept."""
    found = browser_binaries()
    if found is None:
        missing_browser(INSTALL)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing_browser("selenium is not installed: pip install -e '.[dev]'")
    assert found is not None
    chromium, chromedriver = found
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,900", "--disable-extensions",
                 "--disable-background-networking"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.accept_insecure_certs = True  # the TLS test's hub has a self-signed certificate
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    driver.set_page_load_timeout(15)
    driver.set_script_timeout(15)
    yield driver
    driver.quit()


class Cluster:
    """Hubs and agents of one test, on the loop thread; all closed at its end."""

    def __init__(self, runner: LoopThread, prefix: str) -> None:
        self.runner = runner
        self.prefix = prefix
        self.hubs: list[Dispatcher] = []
        self.agents: list[Agent] = []

    def hub(self, **overrides: Any) -> Dispatcher:
        options: dict[str, Any] = {"port": 0, "admin_port": 0, "heartbeat": 5.0,
                                   "hello_timeout": 5.0, "prefix": self.prefix,
                                   "host": "127.0.0.1"}
        options.update(overrides)

        async def start() -> Dispatcher:
            hub = Dispatcher(hub_config(**options))
            await hub.listen()
            return hub

        hub = self.runner.run(start())
        self.hubs.append(hub)
        return hub

    def agent(self, hub: Dispatcher, agent_id: str, *, url: str | None = None,
              commands: dict[str, Callable[..., Any]] | None = None, **kwargs: Any) -> Agent:
        """Start an agent and wait until the hub has it."""
        kwargs.setdefault("backoff_initial", 0.05)
        kwargs.setdefault("backoff_max", 0.2)

        async def start() -> Agent:
            agent = Agent([url or f"ws://127.0.0.1:{hub.port}/ws"], agent_id, **kwargs)
            for key, handler in (commands or {}).items():
                agent.add_command(key, handler)
            await agent.start()
            await agent.wait_connected(5)
            await wait_for(lambda: hub.get_agent(agent_id), what=f"{agent_id} registered")
            return agent

        agent = self.runner.run(start())
        self.agents.append(agent)
        return agent

    def stop_agent(self, agent: Agent) -> None:
        self.runner.run(agent.stop())

    def close(self) -> None:
        async def stop() -> None:
            for agent in self.agents:
                await agent.stop()
            for hub in self.hubs:
                await hub.close()

        self.runner.run(stop(), timeout=30)


@pytest.fixture
def cluster(loop_thread: LoopThread, prefix: str) -> Iterator[Cluster]:
    made = Cluster(loop_thread, prefix)
    yield made
    made.close()


@pytest.fixture
def engine_options(engine: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """Hub options for the test's engine (the suite's ``engine`` parametrization)."""
    return {"redis_url": request.getfixturevalue("redis_url")} if engine == "redis" else {}
