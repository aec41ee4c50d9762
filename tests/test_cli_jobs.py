"""``dispatcher exec`` on several agents (a job), ``dispatcher jobs`` and ``dispatcher job``,
against a hub and an agent served in subprocesses (``test_cli``'s fixture)."""

from __future__ import annotations

import json

from .test_cli import AGENT, Served, cli, one_line_error, run, served

__all__ = ["served"]  # the module-scoped fixture, shared


def test_exec_on_a_glob_prints_a_line_per_agent_and_a_summary(served: Served) -> None:
    out = cli(served, "exec", "cli-*", "echo", '{"v": 1}', "--batch", "50%")
    assert out.exit_code == 0, out.output
    header, line, summary = out.stdout.splitlines()
    assert header.startswith("job ") and "echo on 1 agent(s), batch 1" in header
    assert line.split()[:2] == [AGENT, "ok"] and '{"v": 1}' in line
    assert "COMPLETE: 1 ok of 1 agent(s)" in summary


def test_exec_exit_codes_and_json(served: Served) -> None:
    # An offline id in a list waits PENDING until its timeout: not all ok, exit 1.
    out = cli(served, "exec", f"{AGENT},away-1", "echo", "--timeout", "0.3", "--json")
    assert out.exit_code == 1, out.output
    doc = json.loads(out.stdout)
    assert {r["agent_id"]: r["outcome"] for r in doc["results"]} == {AGENT: "ok",
                                                                     "away-1": "timeout"}
    assert doc["job"]["status"] == "COMPLETE" and doc["job"]["counts"]["timeout"] == 1
    out = cli(served, "exec", "nobody-*", "echo")
    assert out.exit_code == 3
    assert "no connected agent matches" in one_line_error(out)
    out = cli(served, "exec", "role=nothing", "echo")
    assert out.exit_code == 3
    out = cli(served, "exec", f"{AGENT},away-2", "echo", "--require-online")
    assert out.exit_code == 1 and "away-2" in one_line_error(out)
    out = cli(served, "exec", "cli-*", "echo", "--batch", "many")
    assert out.exit_code == 2 and "--batch" in out.stderr
    out = cli(served, "exec", "cli-*", "echo", "--batch", "0")
    assert out.exit_code == 2 and "batch must be at least 1" in one_line_error(out)


def test_no_wait_then_jobs_and_job(served: Served) -> None:
    out = cli(served, "exec", "id=cli-*", "echo", '"x"', "--no-wait", "--id", "cli-job-7")
    assert (out.exit_code, out.stdout.strip()) == (0, "cli-job-7")
    out = cli(served, "job", "cli-job-7", "--json")
    assert out.exit_code == 0 and json.loads(out.stdout)["agents"] == [AGENT]
    out = run(served, "exec", "id=cli-*", "echo", '"x"', "--id", "cli-job-7")  # idempotent
    assert out.returncode == 0, out.stderr
    out = cli(served, "job", "cli-job-7")
    assert out.exit_code == 0
    lines = out.stdout.splitlines()
    assert lines[0].startswith("job cli-job-7 COMPLETE: 1 ok of 1 agent(s)")
    assert lines[2].split()[:2] == [AGENT, "ok"] and "cli-job-7.0" in lines[2]
    out = cli(served, "jobs")
    assert out.exit_code == 0
    rows = out.stdout.splitlines()
    assert rows[0].split()[:3] == ["ID", "KEY", "STATUS"]
    assert any(r.split()[:3] == ["cli-job-7", "echo", "COMPLETE"] for r in rows[1:])
    out = cli(served, "jobs", "--json", "--limit", "1")
    assert out.exit_code == 0 and len(json.loads(out.stdout)) == 1
    out = cli(served, "job", "no-such-job")
    assert out.exit_code == 3 and "no-such-job" in one_line_error(out)
