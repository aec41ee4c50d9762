"""Fixtures: real hubs on port 0, real agents, a private redis-server per test session."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from agent_client import Agent
from dispatcher import Dispatcher

from .support import FAST_PATH, RedisProcess, external_redis_url, hub_config, redis_fast_path

HubFactory = Callable[..., Awaitable[Dispatcher]]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--engines", default="memory,redis",
                     help="store engines to run the engine-parametrized tests on")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "engine" in metafunc.fixturenames:
        engines = metafunc.config.getoption("--engines").split(",")
        metafunc.parametrize("engine", engines)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis for the whole session: DISPATCHER_TEST_REDIS_URL, else a private server."""
    external = external_redis_url()
    if external:
        yield external
        return
    proc = RedisProcess()
    proc.start()
    try:
        yield proc.url
    finally:
        proc.cleanup()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so tests never see each other's keys."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def engine() -> str:  # overridden by pytest_generate_tests when requested
    return "memory"


@pytest.fixture
async def make_hub(
    request: pytest.FixtureRequest, engine: str, prefix: str
) -> AsyncIterator[HubFactory]:
    """Start hubs on port 0 with the test's engine; all are closed at the end."""
    hubs: list[Dispatcher] = []

    async def factory(**overrides: Any) -> Dispatcher:
        options: dict[str, Any] = {"port": 0, "admin_port": 0, "heartbeat": 5.0,
                                   "hello_timeout": 5.0, "prefix": prefix}
        if engine == "redis" and "redis_url" not in overrides:
            options["redis_url"] = request.getfixturevalue("redis_url")
        options.update(overrides)
        hub = Dispatcher(hub_config(**options))
        await hub.listen()
        hubs.append(hub)
        return hub

    yield factory
    for hub in hubs:
        await hub.close()


@pytest.fixture
async def hub(make_hub: HubFactory) -> Dispatcher:
    return await make_hub()


def ws_url(hub: Dispatcher) -> str:
    return f"ws://127.0.0.1:{hub.port}/ws"


@pytest.fixture
async def make_agent() -> AsyncIterator[Callable[..., Agent]]:
    """Build ``agent_client.Agent``s with fast reconnects; all are stopped at the end."""
    agents: list[Agent] = []

    def factory(urls: str | list[str], agent_id: str, **kwargs: Any) -> Agent:
        kwargs.setdefault("backoff_initial", 0.05)
        kwargs.setdefault("backoff_max", 0.2)
        kwargs.setdefault("heartbeat", 5.0)
        agent = Agent(urls, agent_id, **kwargs)
        agents.append(agent)
        return agent

    yield factory
    for agent in agents:
        await agent.stop()


def pytest_report_header(config: pytest.Config) -> str:
    return (f"websockets fast path: {'on' if FAST_PATH else 'off'} "
            f"(DISPATCHER_TEST_WS_FAST_PATH); redis fast path: "
            f"{'on' if redis_fast_path() else 'off'} (DISPATCHER_TEST_REDIS_FAST_PATH)")


def pytest_configure(config: pytest.Config) -> None:
    # Hubs built from the environment (the CLI, subprocesses) follow the switches too.
    if not FAST_PATH:
        os.environ["DISPATCHER_WS_FAST_PATH"] = "0"
    if not redis_fast_path():
        os.environ["DISPATCHER_REDIS_FAST_PATH"] = "0"
    # Library code logs through structlog's defaults; keep test output at info.
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
