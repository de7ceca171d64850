"""A real agent delivering to a real ``serve``: files written in the run directory show up in
the backend's projection and on the WebSocket."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.adw_backend.conftest import ServeProcess
from tests.harness import AdwWriter, AgentProcess, fixture_lines, write_config

PLANNER = "tac7iso_raw_output_55b761f6_sdlc_planner_cli2022.jsonl"
ADW = "55b761f6"


def wait_until(
    client: httpx.Client, check: Callable[[dict[str, Any]], bool], timeout: float = 60.0
) -> dict[str, Any]:
    """Poll the projection until ``check`` holds (a condition, never a fixed wait)."""
    ticker = threading.Event()
    last: dict[str, Any] = {}
    waited = 0.0
    while waited < timeout:
        response = client.get(f"/api/v1/workflows/{ADW}")
        if response.status_code == 200:
            last = response.json()
            if check(last):
                return last
        ticker.wait(0.05)
        waited += 0.05
    raise AssertionError(f"the projection never matched; last: {json.dumps(last)[:2000]}")


def test_agent_files_reach_the_projection(
    start_serve: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("e2e-token\n")
    server = start_serve(
        f"sqlite:///{tmp_path / 'b.db'}", ["--token-file", str(tmp_path / "token")]
    )
    run_dir = tmp_path / "repo" / "agents" / ADW
    writer = AdwWriter(run_dir)
    config = write_config(
        tmp_path / "agent.toml",
        run_dir,
        tmp_path / "storage",
        server.url,
        backend={"token_file": str(tmp_path / "token")},
    )
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    try:
        lines = fixture_lines(PLANNER)
        results = [json.loads(x) for x in lines if b'"type":"result"' in x.replace(b" ", b"")]
        expected = float(results[-1]["total_cost_usd"])
        with server.client("e2e-token") as client:
            writer.state({"adw_id": ADW, "issue_number": "42", "branch_name": "feat-issue-42"})
            writer.phases([], "Plan")
            writer.start_attempt("sdlc_planner")
            for line in lines:
                writer.append("sdlc_planner", line)
            workflow = wait_until(
                client,
                lambda w: (
                    w["state"].get("branch_name") == "feat-issue-42"
                    and w["cost"]["final"] is True
                    and math.isclose(w["cost"]["current_cost"] or 0.0, expected, abs_tol=1e-9)
                ),
            )
            assert workflow["state"]["issue_number"] == "42"
            assert workflow["current_phase"] == "Plan"
            assert workflow["cost_points"]
            assert workflow["agent"]["version"]

            # A state change in place, in two halves, as the orchestrator writes it.
            writer.state(
                {"adw_id": ADW, "issue_number": "42", "branch_name": "feat-issue-42-v2"},
                halves=True,
            )
            writer.phases(["Plan"], "Build")
            workflow = wait_until(
                client,
                lambda w: (
                    w["state"].get("branch_name") == "feat-issue-42-v2"
                    and w["current_phase"] == "Build"
                ),
            )
            assert workflow["completed_phases"] == ["Plan"]
            assert "Plan" in workflow["phase_costs"]
    finally:
        agent.stop()
    assert "e2e-token" not in server.stderr()
