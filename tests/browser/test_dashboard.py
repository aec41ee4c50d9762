"""The dashboard in a real headless Chromium, against a real hub and real agents.

Each test opens the page on its own hub (a new port, so a new origin: nothing
kept in session storage leaks between tests) and waits on the page's hooks
(docs/dashboard.md, the hooks: ``data-agent-id``, ``form#run``, ``data-result-agent``,
``data-job-id``, ``data-event-key``, ``form#login``) with bounded waits.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

import pytest
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from agent_client import CommandError
from dispatcher import Dispatcher
from dispatcher.handle import CommandHandle

from ..dispatcher.test_security import tls_files  # noqa: F401  (a fixture)
from .conftest import Cluster

pytestmark = pytest.mark.browser

WAIT = 6.0


def wait(browser: WebDriver, condition: Any, timeout: float = WAIT, what: str = "") -> Any:
    # A live page re-renders its rows: an element found a moment ago may be gone.
    return WebDriverWait(browser, timeout, poll_frequency=0.05,
                         ignored_exceptions=(NoSuchElementException,
                                             StaleElementReferenceException)
                         ).until(condition, what)


def found(css: str) -> Any:
    """A wait condition: the element matching ``css``, once there."""
    def check(browser: WebDriver) -> Any:
        elements = browser.find_elements(By.CSS_SELECTOR, css)
        return elements[0] if elements else False
    return check


def gone(css: str) -> Any:
    return lambda browser: not browser.find_elements(By.CSS_SELECTOR, css)


def text_of(browser: WebDriver, css: str) -> str:
    """The text of the element matching ``css``, read in one step (rows re-render)."""
    text = browser.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : null", css)
    if text is None:
        raise NoSuchElementException(css)
    return str(text)


def click(browser: WebDriver, css: str, what: str = "") -> None:
    """Click the element matching ``css`` once it is there (again, if it re-rendered)."""
    wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, css).click() or True,
         what=what or css)


def console_errors(browser: WebDriver, allow: tuple[str, ...] = ()) -> list[str]:
    """SEVERE console entries since the last call (reading the log drains it)."""
    return [entry["message"] for entry in browser.get_log("browser")
            if entry["level"] == "SEVERE" and not any(a in entry["message"] for a in allow)]


def open_page(browser: WebDriver, hub: Dispatcher) -> None:
    console_errors(browser)  # forget what earlier tests left
    browser.get(f"http://127.0.0.1:{hub.admin_port}/")


def tab(browser: WebDriver, view: str) -> None:
    browser.find_element(By.CSS_SELECTOR, f'#tabs button[data-view="{view}"]').click()


async def resize(payload: Any, ctx: Any) -> Any:
    await ctx.progress({"done": 0.5})
    return {"resized": payload}


async def refuse(payload: Any, ctx: Any) -> Any:
    raise CommandError("disk_full", "no space left")


def test_agents_appear_and_disappear_live_and_filter(
        cluster: Cluster, browser: WebDriver, engine_options: dict[str, Any]) -> None:
    hub = cluster.hub(**engine_options)
    first = cluster.agent(hub, "db-1", meta={"role": "db", "region": "eu-west"})
    open_page(browser, hub)
    row = '[data-agent-id="db-1"]'
    wait(browser, found(row), what="db-1 listed")
    assert "role=db" in text_of(browser, row)
    assert "region=eu-west" in text_of(browser, row)
    assert hub.hub_id in text_of(browser, row)

    # Ids copy with a click (or are selected for Ctrl+C where the clipboard is not allowed).
    click(browser, '[data-agent-id="db-1"] .copy')
    wait(browser, lambda b: b.execute_script(
        "return document.querySelector('[data-agent-id=\"db-1\"] .copy.copied') !== null"
        " || String(window.getSelection()) === 'db-1'"), what="the id copied")

    cluster.agent(hub, "web-1", meta={"role": "web"})
    wait(browser, found('[data-agent-id="web-1"]'), what="web-1 appears live")
    browser.find_element(By.ID, "agent-filter").send_keys("role=web")
    wait(browser, gone('[data-agent-id="db-1"]'), what="the filter hides db-1")
    assert browser.find_elements(By.CSS_SELECTOR, '[data-agent-id="web-1"]')
    browser.find_element(By.ID, "agent-filter").clear()
    browser.execute_script("document.getElementById('agent-filter')"
                           ".dispatchEvent(new Event('input'))")
    wait(browser, found('[data-agent-id="db-1"]'))

    cluster.stop_agent(first)
    wait(browser, gone('[data-agent-id="db-1"]'), what="db-1 disappears live")
    tab(browser, "activity")
    wait(browser, found('[data-activity="disconnected"]'), what="the disconnect in the activity")
    assert "db-1" in text_of(browser, '[data-activity="disconnected"]')
    assert "?" not in browser.current_url and "#" not in browser.current_url
    assert console_errors(browser) == []


def fill(browser: WebDriver, form: str, **fields: str) -> None:
    for name, value in fields.items():
        field = browser.find_element(By.CSS_SELECTOR, f'{form} [name="{name}"]')
        field.clear()
        field.send_keys(value)


def test_run_form_streams_each_agents_result_and_the_job_fills_in(
        cluster: Cluster, browser: WebDriver, engine_options: dict[str, Any]) -> None:
    hub = cluster.hub(**engine_options)
    cluster.agent(hub, "w-1", commands={"resize": resize})
    cluster.agent(hub, "w-2", commands={"resize": refuse})
    cluster.agent(hub, "other", commands={"resize": resize})
    open_page(browser, hub)
    wait(browser, found('[data-agent-id="w-2"]'))
    tab(browser, "run")

    # Not JSON: refused in the form, nothing sent.
    fill(browser, "form#run", target="w-*", key="resize", payload='{"size": 3,}')
    browser.find_element(By.CSS_SELECTOR, "form#run button[type=submit]").click()
    wait(browser, lambda b: "payload is not JSON" in text_of(b, "#run-error"))
    assert cluster.runner.run(hub.list_jobs()) == []

    fill(browser, "form#run", payload='{"size": 3}', batch="1")
    browser.find_element(By.CSS_SELECTOR, "form#run button[type=submit]").click()
    ok = wait(browser, found('[data-result-agent="w-1"][data-outcome="ok"]'), what="w-1 ok")
    assert '"resized":{"size":3}' in str(ok.get_attribute("textContent"))
    failed = wait(browser, found('[data-result-agent="w-2"][data-outcome="error"]'))
    assert "disk_full: no space left" in str(failed.get_attribute("textContent"))
    assert not browser.find_elements(By.CSS_SELECTOR, '[data-result-agent="other"]')
    wait(browser, lambda b: "ok 1" in text_of(b, "#run-counts")
         and "error 1" in text_of(b, "#run-counts"), what="the counts")
    [job] = cluster.runner.run(hub.list_jobs())
    assert job.batch == 1
    assert text_of(browser, "#run-job") == job.id

    tab(browser, "jobs")
    click(browser, f'[data-job-id="{job.id}"]', what="the job listed")
    wait(browser, found('#jd-parts [data-part-agent="w-1"][data-outcome="ok"]'))
    wait(browser, found('#jd-parts [data-part-agent="w-2"][data-outcome="error"]'))
    assert "ok 1" in text_of(browser, "#jd-counts")
    assert console_errors(browser) == []


def test_a_target_that_matches_nobody_is_said_in_the_form(cluster: Cluster,
                                                          browser: WebDriver) -> None:
    hub = cluster.hub()
    open_page(browser, hub)
    tab(browser, "run")
    fill(browser, "form#run", target="nobody-*", key="resize", batch="2x")
    browser.find_element(By.CSS_SELECTOR, "form#run button[type=submit]").click()
    wait(browser, lambda b: "batch must be a number" in text_of(b, "#run-error"))
    fill(browser, "form#run", batch="")
    browser.find_element(By.CSS_SELECTOR, "form#run button[type=submit]").click()
    wait(browser, lambda b: "nobody-*" in text_of(b, "#run-error"), what="no agents matched")
    assert console_errors(browser, allow=("/jobs - Failed to load resource",)) == []


def test_commands_view_detail_progress_and_cancel(
        cluster: Cluster, browser: WebDriver, engine_options: dict[str, Any]) -> None:
    hub = cluster.hub(**engine_options)
    step, release = asyncio.Event(), asyncio.Event()

    async def slow(payload: Any, ctx: Any) -> Any:
        await step.wait()
        await ctx.progress({"step": "halfway"})
        await release.wait()
        return "done"

    cluster.agent(hub, "c-1", commands={"slow": slow, "resize": resize})
    done = cluster.runner.run(_finished(hub, "c-1", "resize", {"size": 1}))

    async def submit() -> CommandHandle:
        handle = hub.execute_on_agent("c-1", "slow", {"nested": {"list": [1, 2]}}, timeout=30)
        await handle.submitted()
        return handle

    handle = cluster.runner.run(submit())
    open_page(browser, hub)
    in_flight = '[data-agent-id="c-1"] td:last-child'
    wait(browser, lambda b: text_of(b, in_flight) == "1", what="one command in flight")
    tab(browser, "commands")
    wait(browser, found(f'[data-command-id="{done}"]'), what="history lists the command")
    click(browser, f'[data-command-id="{handle.id}"]')
    wait(browser, lambda b: text_of(b, "#cd-id") == handle.id)
    assert json.loads(text_of(browser, "#cd-payload")) == {"nested": {"list": [1, 2]}}
    assert '\n  "nested"' in text_of(browser, "#cd-payload")  # formatted
    # The page follows the command's stream (after the cluster stream): progress shows live.
    wait(browser, lambda b: b.execute_script("return window.dashboardMetrics.streamOpens") >= 2)
    cluster.runner.loop.call_soon_threadsafe(step.set)
    wait(browser, lambda b: "halfway" in text_of(b, "#cd-progress"), what="progress")
    browser.find_element(By.ID, "cd-cancel").click()
    wait(browser, lambda b: "cancelled" in text_of(b, "#cd-fields"), what="cancelled")
    info = cluster.runner.run(hub.get_command(handle.id))
    assert info is not None and info.outcome == "cancelled"
    wait(browser, found(f'[data-command-id="{handle.id}"][data-outcome="cancelled"]'))
    tab(browser, "agents")
    wait(browser, lambda b: text_of(b, in_flight) == "0", what="nothing in flight")
    tab(browser, "commands")

    # Filters go to the store; the ok command alone matches outcome=ok.
    Select(browser.find_element(By.CSS_SELECTOR, '#command-filters [name="outcome"]')
           ).select_by_visible_text("ok")
    browser.find_element(By.CSS_SELECTOR, "#command-filters button[type=submit]").click()
    wait(browser, gone(f'[data-command-id="{handle.id}"]'))
    assert browser.find_elements(By.CSS_SELECTOR, f'[data-command-id="{done}"]')
    cluster.runner.loop.call_soon_threadsafe(release.set)
    assert console_errors(browser) == []


async def _finished(hub: Dispatcher, agent_id: str, key: str, payload: Any) -> str:
    handle = hub.execute_on_agent(agent_id, key, payload)
    await handle
    return handle.id


def test_agent_events_stream_into_the_activity_view(cluster: Cluster, browser: WebDriver
                                                    ) -> None:
    hub = cluster.hub()
    agent = cluster.agent(hub, "e-1")
    open_page(browser, hub)
    tab(browser, "activity")
    wait(browser, lambda b: b.execute_script("return window.dashboardMetrics.streamOpens") > 0)
    cluster.runner.run(agent.emit("disk.usage", {"percent": 97}))
    item = wait(browser, found('[data-event-key="disk.usage"]'), what="the event listed")
    assert "e-1" in str(item.get_attribute("textContent"))
    assert '"percent":97' in str(item.get_attribute("textContent"))
    assert console_errors(browser) == []


XSS = '<img src=x onerror="window.__xss=1">'


def test_agent_strings_are_rendered_as_text_never_html(cluster: Cluster, browser: WebDriver
                                                      ) -> None:
    hub = cluster.hub()
    agent = cluster.agent(hub, "x-1", meta={"note": XSS, XSS: "key too"},
                          commands={"resize": resize})
    open_page(browser, hub)
    wait(browser, found('[data-agent-id="x-1"]'))
    wait(browser, lambda b: b.execute_script("return window.dashboardMetrics.streamOpens") > 0)
    assert XSS in text_of(browser, '[data-agent-id="x-1"]')
    cluster.runner.run(agent.emit("note", {"html": XSS}))
    tab(browser, "run")
    fill(browser, "form#run", target="x-1", key="resize", payload=json.dumps(XSS))
    browser.find_element(By.CSS_SELECTOR, "form#run button[type=submit]").click()
    wait(browser, found('[data-result-agent="x-1"][data-outcome="ok"]'))
    tab(browser, "activity")
    wait(browser, found('[data-event-key="note"]'))
    assert XSS.replace('"', '\\"') in text_of(browser, '[data-event-key="note"]')
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0
    assert browser.execute_script("return window.__xss") is None
    assert console_errors(browser) == []


def test_token_flow(cluster: Cluster, browser: WebDriver) -> None:
    hub = cluster.hub(admin_token="s3cret-token")
    cluster.agent(hub, "t-1")
    open_page(browser, hub)
    form = wait(browser, found("form#login"), what="the login form")
    assert form.is_displayed()
    assert not browser.find_elements(By.CSS_SELECTOR, '[data-agent-id="t-1"]')

    fill(browser, "form#login", token="wrong")
    form.submit()
    wait(browser, lambda b: "refused" in text_of(b, "#login-message"), what="refused")
    assert browser.execute_script("return sessionStorage.length") == 0

    fill(browser, "form#login", token="s3cret-token")
    browser.find_element(By.CSS_SELECTOR, "form#login button").click()
    wait(browser, found('[data-agent-id="t-1"]'), what="signed in")
    assert not browser.find_element(By.ID, "login-view").is_displayed()
    assert "s3cret" not in browser.current_url
    # Kept for this tab: a reload stays signed in.
    browser.refresh()
    wait(browser, found('[data-agent-id="t-1"]'), what="still signed in")

    # The token changes (or expires) under the page: back to the form, with a message.
    browser.execute_script("sessionStorage.setItem('dispatcher.adminToken', 'expired')")
    browser.refresh()
    wait(browser, lambda b: b.find_element(By.ID, "login-view").is_displayed())
    assert "refused" in text_of(browser, "#login-message")
    logs = console_errors(browser, allow=("status of 401",))
    assert logs == []
    assert not any("s3cret" in entry["message"] for entry in browser.get_log("browser"))


def test_a_hub_going_away_shows_a_banner_and_the_page_reconnects(cluster: Cluster,
                                                                 browser: WebDriver) -> None:
    hub = cluster.hub()
    ports = {"port": hub.port, "admin_port": hub.admin_port}
    cluster.agent(hub, "r-1")
    open_page(browser, hub)
    wait(browser, found('[data-agent-id="r-1"]'))
    banner = browser.find_element(By.ID, "banner")
    assert not banner.is_displayed()

    cluster.runner.run(hub.close())
    wait(browser, lambda b: banner.is_displayed(), what="the banner")
    assert "reconnect" in str(banner.get_attribute("textContent")) or \
        "cannot be reached" in str(banner.get_attribute("textContent"))

    # The hub is back on the same ports; the agent reconnects, and so does the page.
    cluster.hub(**ports)
    wait(browser, lambda b: not banner.is_displayed(), timeout=10, what="the banner clears")
    wait(browser, found('[data-agent-id="r-1"]'), timeout=10, what="r-1 listed again")
    assert console_errors(browser, allow=("ERR_CONNECTION_REFUSED", "ERR_INCOMPLETE_CHUNKED",
                                          "ERR_EMPTY_RESPONSE", "net::")) == []


def test_over_tls(cluster: Cluster, browser: WebDriver,
                  tls_files: tuple[str, str]) -> None:  # noqa: F811  (the imported fixture)
    certfile, keyfile = tls_files
    hub = cluster.hub(certfile=certfile, keyfile=keyfile, admin_token="tls-token")
    console_errors(browser)
    browser.get(f"https://127.0.0.1:{hub.admin_port}/")
    fill(browser, "form#login", token="tls-token")
    browser.find_element(By.CSS_SELECTOR, "form#login button").click()
    wait(browser, lambda b: b.execute_script("return window.dashboardMetrics.streamOpens") > 0)
    # An agent connecting now appears live: the stream runs over TLS too.
    cluster.agent(hub, "tls-1", ssl=ssl.create_default_context(cafile=certfile),
                  url=f"wss://127.0.0.1:{hub.port}/ws")
    wait(browser, found('[data-agent-id="tls-1"]'), what="tls-1 over TLS")
    assert browser.execute_script("return location.protocol") == "https:"
    assert console_errors(browser) == []


def test_a_cluster_shows_as_one(cluster: Cluster, browser: WebDriver, redis_url: str) -> None:
    a = cluster.hub(redis_url=redis_url)
    b = cluster.hub(redis_url=redis_url)
    cluster.agent(a, "on-a")
    open_page(browser, a)
    wait(browser, found('[data-agent-id="on-a"]'))
    wait(browser, lambda b_: b_.execute_script("return window.dashboardMetrics.streamOpens") > 0)
    cluster.agent(b, "on-b", meta={"zone": "b"})
    wait(browser, found('[data-agent-id="on-b"]'), what="an agent of the other hub")
    assert b.hub_id in text_of(browser, '[data-agent-id="on-b"]')
    wait(browser, lambda b_: "cluster of 2 hubs" in text_of(b_, "#hub-info"))
    tab(browser, "run")
    fill(browser, "form#run", target="on-*", key="nothing-here", timeout="0.5")
    browser.find_element(By.CSS_SELECTOR, "form#run button[type=submit]").click()
    wait(browser, found('[data-result-agent="on-b"][data-outcome="error"]'), what="on-b's part")
    wait(browser, found('[data-result-agent="on-a"][data-outcome="error"]'))
    assert console_errors(browser) == []
