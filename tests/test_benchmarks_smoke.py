"""The benchmark command keeps working: a tiny ``--quick`` run of every workload and target.

Benchmarks are not tests (their figures are never asserted here); this only
checks that ``python -m benchmarks.run --quick`` completes and writes its three
files with an entry for every workload and every target.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("psutil")
pytest.importorskip("socketio")

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("roundtrip", "fanout", "idle", "redis")
TARGETS = ("ours-memory", "ours-redis", "raw-websockets", "socketio")


@pytest.mark.timeout(90)
def test_quick_benchmark_writes_every_workload_and_target(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=80, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["workloads"]) == set(WORKLOADS)
    for workload in WORKLOADS:
        scenarios = results["workloads"][workload]
        assert scenarios, workload
        for scenario, per_target in scenarios.items():
            assert set(per_target) == set(TARGETS), (workload, scenario)
            for target, entry in per_target.items():
                # Every target ran (or is marked not applicable), none failed.
                assert "error" not in entry, (workload, scenario, target, entry["error"])
    assert results["targets"], "the issue's targets are checked in every run"
    assert all(t["met"] is not None for t in results["targets"]), results["targets"]
    md = (tmp_path / "results.md").read_text()
    assert "raw-websockets" in md and "Targets" in md
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(45)
def test_quick_storm_moves_every_agent_to_the_surviving_hub(tmp_path: Path) -> None:
    """``--only storm --quick``: two real hubs, one SIGKILLed; its agents end up registered on
    the other, the calm agents answered throughout, and the run writes storm.json/storm.md
    (not the comparison's results files)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "storm",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=40, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "results.json").exists()
    results = json.loads((tmp_path / "storm.json").read_text())
    assert set(results["workloads"]) == {"storm"}
    (entry,) = (row["ours-redis"] for row in results["workloads"]["storm"].values())
    assert "error" not in entry, entry["error"]
    agents = entry["agents"]
    assert entry["reconnect_s"] is not None and entry["reconnect_s"] > 0
    assert entry["registered_on_b_end"] == agents
    assert entry["left_on_a_end"] == 0
    assert entry["peak_handshakes_per_s_100ms"] > 0
    for window in ("before", "storm"):
        calm = entry["calm"][window]
        assert calm["ok"] > 0 and calm["errors"] == 0, (window, calm)
    assert {t["id"] for t in results["targets"]} == {"storm-calm-p99", "storm-all-back"}
    assert next(t for t in results["targets"] if t["id"] == "storm-all-back")["met"]
    md = (tmp_path / "storm.md").read_text()
    assert "Reconnect storm" in md


@pytest.mark.timeout(60)
def test_quick_jobs_benchmark_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.jobs", "--quick", "--engines", "memory"],
        cwd=ROOT, capture_output=True, text=True, timeout=50, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    row = json.loads(line)["memory"]
    assert {"job", "job-glob", "separate", "ratio", "cpu_ratio"} <= set(row)
