"""The ``dispatcher`` command line: every client verb against a hub served in a subprocess.

The hub is ``dispatcher serve`` and the agent ``dispatcher-agent`` (real
processes on free ports); most verbs run in-process through click's runner
for speed, a few as real processes to check the entry point, exit codes and
that errors are one line, never a traceback. ``dispatcher demo`` runs too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from dispatcher.cli import main

from .support import free_port

TOKEN = "cli-t0ken"
AGENT = "cli-agent"
BOOT = 20.0  # bound on the hub and agent processes starting


def _exe(name: str) -> str:
    exe = Path(sys.executable).parent / name
    assert exe.exists(), f"{exe} is missing: pip install -e '.[dev]'"
    return str(exe)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DISPATCHER_") or k == "DISPATCHER_WS_FAST_PATH"}
    env.update(extra)
    return env


@dataclass
class Served:
    admin: str
    log: Path
    hub: subprocess.Popen[bytes]

    def env(self, **extra: str) -> dict[str, str]:
        return {"DISPATCHER_ADMIN_URL": self.admin, "DISPATCHER_ADMIN_TOKEN": TOKEN, **extra}


def _get(url: str, token: str | None = TOKEN) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=2) as resp:
        return json.loads(resp.read())


def _wait(what: str, probe: Any, procs: list[subprocess.Popen[bytes]]) -> None:
    """Poll another process's readiness (it has no signal to wait on), bounded."""
    deadline = time.monotonic() + BOOT
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}"
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port, admin_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("wb") as log_file:
        hub = subprocess.Popen(
            [_exe("dispatcher"), "serve", "--port", str(port), "--admin-port", str(admin_port),
             "--command-timeout", "5", "--log-level", "info"],
            stdout=subprocess.DEVNULL, stderr=log_file,
            env=_clean_env(DISPATCHER_ADMIN_TOKEN=TOKEN))
    agent = None
    try:
        admin = f"http://127.0.0.1:{admin_port}"
        _wait("the hub's /healthz", lambda: _get(f"{admin}/healthz", None)["status"] == "ok",
              [hub])
        agent = subprocess.Popen(
            [_exe("dispatcher-agent"), "--url", f"ws://127.0.0.1:{port}/ws", "--id", AGENT,
             "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_clean_env())
        _wait("the agent to connect",
              lambda: [a["id"] for a in _get(f"{admin}/agents")] == [AGENT], [hub, agent])
        yield Served(admin, log, hub)
    finally:
        for proc in (agent, hub):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (agent, hub):
            if proc is not None:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def cli(served: Served, *args: str, **env: str) -> Result:
    """Run a verb in-process with the admin URL and token from the environment."""
    return CliRunner().invoke(main, list(args), env=served.env(**env))


def one_line_error(result: Result) -> str:
    err = result.stderr.strip()
    assert "Traceback" not in result.output
    assert len(err.splitlines()) == 1, err
    assert err.startswith("dispatcher: ")
    return err


def run(served: Served | None, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``dispatcher`` executable."""
    full = _clean_env(**(served.env(**env) if served else env))
    return subprocess.run([_exe("dispatcher"), *args], capture_output=True, text=True,
                          timeout=60, env=full, check=False)


# -- help ---------------------------------------------------------------------------------

def test_help_names_every_verb_and_the_exit_codes() -> None:
    out = CliRunner().invoke(main, ["--help"])
    assert out.exit_code == 0
    for word in ("agents", "pending", "exec", "commands", "cancel", "emit", "broadcast",
                 "serve", "demo", "Exit codes", "DISPATCHER_ADMIN_URL"):
        assert word in out.stdout
    out = CliRunner().invoke(main, ["exec", "--help"])
    for word in ("--timeout", "--no-wait", "--queue", "--require-online", "--admin", "--token",
                 "--json", "DISPATCHER_ADMIN_TOKEN"):
        assert word in out.stdout


# -- agents and pending -----------------------------------------------------------------------

def test_agents_table_and_json(served: Served) -> None:
    out = cli(served, "agents")
    assert out.exit_code == 0, out.output
    header, row = out.stdout.splitlines()
    assert header.split()[:2] == ["AGENT", "HUB"]
    assert row.startswith(AGENT) and '"builtin": true' in row
    out = cli(served, "agents", "--json")
    assert out.exit_code == 0
    (agent,) = json.loads(out.stdout)
    assert agent["id"] == AGENT and agent["meta"]["builtin"] is True


def test_pending_lists_then_cancel_then_command(served: Served) -> None:
    out = cli(served, "exec", "later-agent", "echo", '{"n": 1}', "--no-wait")
    assert out.exit_code == 1  # not connected: said at once
    assert "later-agent" in one_line_error(out) and "--queue" in out.stderr
    out = cli(served, "exec", "later-agent", "echo", '{"n": 1}', "--no-wait", "--queue")
    assert out.exit_code == 0, out.output
    cmd_id = out.stdout.strip()
    assert cmd_id and " " not in cmd_id
    out = cli(served, "pending", "later-agent")
    assert out.exit_code == 0
    header, row = out.stdout.splitlines()
    assert header.split()[:3] == ["COMMAND", "KEY", "STATUS"]
    assert row.split()[:3] == [cmd_id, "echo", "PENDING"]
    out = cli(served, "pending", "later-agent", "--json")
    assert [c["id"] for c in json.loads(out.stdout)] == [cmd_id]

    out = cli(served, "cancel", cmd_id)
    assert (out.exit_code, out.stdout.strip()) == (0, f"cancelled {cmd_id}")
    out = cli(served, "cancel", cmd_id)
    assert out.exit_code == 1
    assert "already COMPLETE" in one_line_error(out)
    out = cli(served, "command", cmd_id)
    assert out.exit_code == 0
    fields = dict(line.split(":", 1) for line in out.stdout.splitlines())
    assert fields["status"].strip() == "COMPLETE" and fields["outcome"].strip() == "cancelled"
    assert fields["payload"].strip() == '{"n": 1}'
    out = cli(served, "command", cmd_id, "--json")
    assert json.loads(out.stdout)["outcome"] == "cancelled"
    assert cli(served, "pending", "later-agent").stdout.startswith("no pending commands")


def test_commands_lists_the_history_with_a_cursor(served: Served) -> None:
    ids = [cli(served, "exec", AGENT, "echo", str(i), "--json").stdout for i in range(3)]
    ids = [json.loads(out)["id"] for out in ids]
    out = cli(served, "commands", "--agent", AGENT, "--key", "echo", "--limit", "2")
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["COMMAND", "AGENT", "KEY", "STATUS", "OUTCOME", "SUBMITTED",
                                "JOB"]
    assert [line.split()[0] for line in lines[1:3]] == [ids[2], ids[1]]
    assert lines[1].split()[1:5] == [AGENT, "echo", "COMPLETE", "ok"]
    assert lines[3].startswith("next page: --cursor ")
    cursor = lines[3].split()[-1]
    out = cli(served, "commands", "--agent", AGENT, "--key", "echo", "--limit", "2",
              "--cursor", cursor, "--json")
    page = json.loads(out.stdout)
    assert page["commands"][0]["id"] == ids[0]
    out = cli(served, "commands", "--outcome", "fine")
    assert out.exit_code == 2
    out = cli(served, "commands", "--cursor", "made-up")
    assert out.exit_code == 2 and "cursor" in one_line_error(out)


def test_unknown_command_and_cancel_exit_3(served: Served) -> None:
    for verb in ("command", "cancel"):
        out = cli(served, verb, "no-such-command")
        assert out.exit_code == 3
        assert "no-such-command" in one_line_error(out)


# -- exec -------------------------------------------------------------------------------------------

def test_exec_prints_the_result(served: Served) -> None:
    out = cli(served, "exec", AGENT, "echo", '{"a": [1, "two"]}')
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout) == {"a": [1, "two"]}
    out = cli(served, "exec", AGENT, "echo", '"hi"', "--json", "--id", "cli-job-1")
    info = json.loads(out.stdout)
    assert out.exit_code == 0 and info["outcome"] == "ok" and info["result"] == "hi"
    assert info["id"] == "cli-job-1"


def test_exec_reads_the_payload_from_stdin(served: Served) -> None:
    out = CliRunner().invoke(main, ["exec", AGENT, "echo", "-"], input='{"from": "stdin"}',
                             env=served.env())
    assert out.exit_code == 0 and json.loads(out.stdout) == {"from": "stdin"}


def test_exec_of_a_failing_command_exits_1(served: Served) -> None:
    out = cli(served, "exec", AGENT, "sleep", '{"seconds": "soon"}')
    assert out.exit_code == 1
    assert "failed: bad_payload" in one_line_error(out)
    out = cli(served, "exec", AGENT, "no-such-key", "--json")
    assert out.exit_code == 1
    assert json.loads(out.stdout)["outcome"] == "error"


def test_exec_timeout_exits_1(served: Served) -> None:
    out = cli(served, "exec", AGENT, "sleep", '{"seconds": 5}', "--timeout", "0.3")
    assert out.exit_code == 1
    assert "timed out" in one_line_error(out)
    out = cli(served, "exec", AGENT, "sleep", '{"seconds": 5}', "--timeout", "0.3", "--json")
    assert out.exit_code == 1
    assert json.loads(out.stdout)["error"]["code"] == "timeout"


def test_usage_errors_exit_2(served: Served) -> None:
    out = cli(served, "exec", AGENT, "echo", "{not json")
    assert out.exit_code == 2 and "not valid JSON" in out.stderr
    out = cli(served, "exec", AGENT, "echo", "--timeout", "-1")
    assert out.exit_code == 2
    out = cli(served, "exec", "bad id", "echo")  # the hub answers 400
    assert out.exit_code == 2
    assert "agent id" in one_line_error(out)
    assert cli(served, "agents", "--admin", "not-a-url").exit_code == 2
    assert cli(served, "no-such-verb").exit_code == 2


# -- events --------------------------------------------------------------------------------------------

def test_emit_waits_for_receipts(served: Served) -> None:
    out = cli(served, "emit", AGENT, "config.reload", '{"v": 2}')
    assert (out.exit_code, out.stdout.strip()) == (0, f"{AGENT}: received")
    out = cli(served, "emit", f"{AGENT},ghost-agent", "hello", "--timeout", "0.3", "--json")
    assert out.exit_code == 1
    assert json.loads(out.stdout) == {"received": [AGENT], "pending": ["ghost-agent"]}
    out = cli(served, "emit", f"{AGENT},ghost-agent", "hello", "--timeout", "0.3")
    assert out.exit_code == 1
    assert out.stdout.splitlines() == [f"{AGENT}: received",
                                       "ghost-agent: not received in time (queued)"]


def test_broadcast(served: Served) -> None:
    out = cli(served, "broadcast", "news", '{"n": 1}')
    assert (out.exit_code, out.stdout.strip()) == (0, "sent to 1 agent(s)")
    out = cli(served, "broadcast", "news", "--json")
    assert json.loads(out.stdout) == {"agents": 1}


# -- reaching the hub ----------------------------------------------------------------------------------

def test_wrong_token_and_unreachable_hub_exit_4(served: Served) -> None:
    out = cli(served, "agents", DISPATCHER_ADMIN_TOKEN="wrong")
    assert out.exit_code == 4
    assert "admin token" in one_line_error(out)
    out = cli(served, "agents", "--admin", f"http://127.0.0.1:{free_port()}")
    assert out.exit_code == 4
    assert "cannot reach the hub" in one_line_error(out)


def test_the_real_executable(served: Served) -> None:
    done = run(served, "exec", AGENT, "echo", '{"real": true}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"real": True}
    done = run(served, "command", "nope")
    assert done.returncode == 3
    assert done.stderr.strip() == "dispatcher: no command 'nope'"
    done = run(None, "agents", "--admin", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 4 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_serve_logs_json_lines_with_ids_bound(served: Served) -> None:
    out = cli(served, "exec", AGENT, "echo", "1", "--json")
    cmd_id = json.loads(out.stdout)["id"]
    lines = [json.loads(line) for line in served.log.read_text().splitlines() if line]
    assert lines[0]["event"] == "hub_starting" and lines[0]["engine"] == "memory"
    assert "in-memory" in lines[0]["note"]
    submitted = [e for e in lines if e["event"] == "admin_command_submitted"
                 and e.get("command_id") == cmd_id]
    assert submitted and submitted[0]["agent_id"] == AGENT
    assert all({"event", "level", "timestamp"} <= set(e) for e in lines)


# -- demo ---------------------------------------------------------------------------------------------------

def test_demo_shows_commands_and_events() -> None:
    out = CliRunner().invoke(main, ["demo"])
    assert out.exit_code == 0, out.output
    text = out.stdout
    for words in ("agent demo-1 connected", "progress {'step': 4, 'of': 4}",
                  "CommandFailed code='disk_full'", "CommandTimeout", "stored and PENDING",
                  "demo-2 got event 'config.reload' from the hub",
                  "receipt: demo-2 answered 'received'",
                  "demo-3 got event 'job.done' from demo-1",
                  "the hub saw demo-1 emit job.done",
                  "demo-1 got demo-3's answer", "GET /agents -> 200",
                  "outcome ok", "demo-2: error demo-2 did not come back",
                  "demo-3: skipped", "job COMPLETE: {'skipped': 1, 'ok': 1, 'error': 1}",
                  "failed commands so far: [('demo-2', 'upgrade'), ('demo-1', 'deploy')]",
                  "done: the hub closed cleanly."):
        assert words in text, words


def test_dispatcher_agent_passes_help_to_the_agent() -> None:
    """`dispatcher agent -h` is the agent's own help (its options), not the wrapper's."""
    out = CliRunner().invoke(main, ["agent", "-h"])
    assert out.exit_code == 0, out.output
    assert "--stop-timeout" in out.output and "--concurrency" in out.output, out.output
