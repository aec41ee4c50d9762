"""Screenshots of the dashboard for the README, from a real hub and real agents.

``python scripts/screenshot.py`` (from the repository, with the dev extra
installed and Chromium + chromedriver present: scripts/ensure-browser) starts a
hub with demo agents, runs a job and emits a few events, opens the page in
headless Chromium (the browser the tests use) and writes
``docs/dashboard.png`` (agents) and ``docs/dashboard-run.png`` (a run).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from agent_client import Agent, CommandError
from dispatcher import Dispatcher, HubConfig

T = TypeVar("T")
DOCS = Path(__file__).resolve().parents[1] / "docs"
DEMO = [("demo-1", "web", "eu-west"), ("demo-2", "web", "eu-west"), ("demo-3", "web", "us-east"),
        ("demo-4", "db", "eu-west"), ("demo-5", "db", "us-east"), ("demo-6", "cache", "eu-west")]


async def resize(payload: Any, ctx: Any) -> Any:
    await ctx.progress({"done": 0.5})
    await asyncio.sleep(0.2)
    return {"resized": payload}


def deploy_on(agent_id: str) -> Any:
    async def deploy(payload: Any, ctx: Any) -> Any:
        await asyncio.sleep(0.3)
        if isinstance(payload, dict) and payload.get("fail_on") == agent_id:
            raise CommandError("disk_full", "no space left on /var")
        return {"deployed": payload.get("version", "?") if isinstance(payload, dict) else "?"}

    return deploy


async def backup(payload: Any, ctx: Any) -> Any:
    await ctx.progress({"copied": "40%"})
    await asyncio.sleep(30)  # still running when the screenshot is taken
    return {"backed_up": True}


async def start(hub_holder: list[Dispatcher], agents: list[Agent]) -> None:
    hub = Dispatcher(HubConfig(host="127.0.0.1", port=0, admin_port=0, heartbeat=5))
    await hub.listen()
    hub_holder.append(hub)
    for index, (agent_id, role, region) in enumerate(DEMO):
        agent = Agent([f"ws://127.0.0.1:{hub.port}/ws"], agent_id,
                      meta={"role": role, "region": region, "version": f"1.{4 + index % 2}"})
        agent.add_command("resize", resize)
        agent.add_command("deploy", deploy_on(agent_id))
        agent.add_command("backup", backup)
        await agent.start()
        await agent.wait_connected(5)
        agents.append(agent)
    done = hub.execute_on_agents("role=db", "resize", {"size": 3})
    await done
    for agent_id in ("demo-4", "demo-4", "demo-5"):
        await hub.execute_on_agent(agent_id, "backup", {"to": "s3://backups"}).submitted()


async def stop(hub: Dispatcher, agents: list[Agent]) -> None:
    for agent in agents:
        await agent.stop()
    await hub.close()


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)


def main() -> int:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        print("screenshot: needs chromium and chromedriver (scripts/ensure-browser)",
              file=sys.stderr)
        return 2
    runner = LoopThread()
    holder: list[Dispatcher] = []
    agents: list[Agent] = []
    runner.run(start(holder, agents))
    hub = holder[0]
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1280,720", "--hide-scrollbars", "--force-color-profile=srgb"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    waiting = WebDriverWait(driver, 10, poll_frequency=0.05)
    try:
        driver.get(f"http://127.0.0.1:{hub.admin_port}/")
        waiting.until(lambda d: d.execute_script(
            "return document.querySelector('[data-agent-id=\"demo-4\"] td:last-child')"
            "?.textContent") == "2")
        runner.run(agents[0].emit("disk.usage", {"mount": "/var", "percent": 91}))
        driver.save_screenshot(str(DOCS / "dashboard.png"))

        driver.find_element(By.CSS_SELECTOR, '#tabs button[data-view="run"]').click()
        fields = {"target": "role=web", "key": "deploy",
                  "payload": json.dumps({"version": "1.5", "fail_on": "demo-3"}), "batch": "2"}
        for name, value in fields.items():
            driver.find_element(By.CSS_SELECTOR, f'form#run [name="{name}"]').send_keys(value)
        driver.find_element(By.CSS_SELECTOR, "form#run button[type=submit]").click()
        waiting.until(lambda d: len(d.find_elements(
            By.CSS_SELECTOR, "[data-result-agent]:not([data-outcome=pending])"
            ":not([data-outcome=active])")) == 3)
        driver.save_screenshot(str(DOCS / "dashboard-run.png"))
    finally:
        driver.quit()
        runner.run(stop(hub, agents))
    print(f"screenshot: wrote {DOCS / 'dashboard.png'} and {DOCS / 'dashboard-run.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
