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
