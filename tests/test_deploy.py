"""The deployment kit in deploy/: each piece checked the way a machine would read it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from dispatcher.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def check_config(toml_text: str, tmp_path: Path, secrets_dir: str) -> None:
    """`dispatcher config --check` on this text, its secret files made real under tmp_path."""
    for name in ("agent-secret", "admin-token"):
        (tmp_path / name).write_text(f"{name}-value\n")
    toml = tmp_path / "hub.toml"
    toml.write_text(toml_text.replace(secrets_dir, f"{tmp_path}/"))
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("DISPATCHER_")}
    result = CliRunner().invoke(main, ["config", "--config", str(toml), "--check"], env=env)
    assert result.exit_code == 0, result.output
    shown = CliRunner().invoke(main, ["config", "--config", str(toml)], env=env).stdout
    assert "agent-secret-value" not in shown and "admin_token" in shown


def test_example_hub_toml_is_accepted(tmp_path: Path) -> None:
    check_config((DEPLOY / "hub.toml").read_text(), tmp_path, "/etc/dispatcher/")


def manifests() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "dispatcher.yaml")
                                               .read_text()) if doc]


def test_kubernetes_probes_use_livez_and_readyz_on_the_admin_port(tmp_path: Path) -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in manifests()}
    assert {("Deployment", "dispatcher-hub"), ("Deployment", "dispatcher-redis"),
            ("Service", "dispatcher"), ("Service", "dispatcher-redis"),
            ("ConfigMap", "dispatcher-config")} <= set(docs)
    pod = docs["Deployment", "dispatcher-hub"]["spec"]["template"]["spec"]
    (hub,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in hub["ports"]}
    config_text = docs["ConfigMap", "dispatcher-config"]["data"]["hub.toml"]
    assert ports == {"agents": 8080, "admin": 8081}
    assert "port = 8080" in config_text and "admin_port = 8081" in config_text
    assert hub["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "admin"}
    assert hub["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    # The grace period covers the drain; the hub's Redis is the manifest's Service.
    drain = float(re.search(r"drain_timeout = ([\d.]+)", config_text)[1])  # type: ignore[index]
    assert pod["terminationGracePeriodSeconds"] > drain
    assert "redis://dispatcher-redis:6379/" in config_text
    # Secrets come from a Secret volume through *_file keys, never from env values.
    assert not any("SECRET" in e["name"] or "TOKEN" in e["name"] for e in hub.get("env", []))
    check_config(config_text, tmp_path, "/run/secrets/dispatcher/")


def test_dockerfile_installs_with_the_readme_command() -> None:
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines()
                   if line.startswith("python3 -m venv .venv && .venv/bin/pip install -q . "))
    install = " && ".join(command.split(" && ")[:2])  # without running the demo
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    runs = [line.removeprefix("RUN ").strip() for line in dockerfile.splitlines()
            if line.startswith("RUN ")]
    assert runs == [install]
    copied = {line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")}
    assert {"pyproject.toml", "dispatcher", "agent_client"} <= copied
    assert 'ENTRYPOINT ["dispatcher"]' in dockerfile


@pytest.mark.parametrize("unit", ["dispatcher-hub@.service", "dispatcher-agent.service"])
def test_systemd_units_verify(unit: str, tmp_path: Path) -> None:
    text = (DEPLOY / "systemd" / unit).read_text()
    assert "--agent-secret" not in text and "--admin-token" not in text and "--token " not in text
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the units were not verified")
    # The units name /opt/dispatcher/.venv; verify checks that ExecStart exists.
    name = unit.replace("@.", "@1.")
    (tmp_path / name).write_text(text.replace("/opt/dispatcher/.venv/bin/", f"{BIN}/"))
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)],
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0 and "Failed to " in done.stderr and "bus" in done.stderr.lower():
        pytest.skip(f"systemd-analyze cannot run here: {done.stderr.strip()}")
    assert done.returncode == 0 and done.stderr == "", done.stderr
