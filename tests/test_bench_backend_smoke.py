"""The backend benchmarks keep working: ``python -m bench.backend --smoke`` on SQLite.

Only what the scenarios observed is checked (every write reached the WebSocket client, every
event reached every client, every batch was accepted whole); timings are never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.harness import ROOT


def test_backend_bench_smoke_runs_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.backend", "--smoke", "--db", "sqlite", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["mode"] == "smoke"
    sqlite = results["sqlite"]

    latency = sqlite["latency"]["write_to_ws"]
    assert latency["missed"] == 0
    assert latency["n"] == sqlite["latency"]["count"]

    ingest = sqlite["ingest"]
    assert set(ingest) >= {"single_1conn", "single_8conn", "batch_100", "batch_1000"}
    for row in (ingest["batch_100"], ingest["batch_1000"]):
        assert row["request"]["missed"] == 0

    for key in ("plain", "with_stalled"):
        run = sqlite["fanout"][key]
        assert run["events_missing_somewhere"] == 0
        assert run["clients_closed"] == 0
    assert "state write -> WS message" in proc.stdout
