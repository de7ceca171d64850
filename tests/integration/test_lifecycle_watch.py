"""Polling with symbolic links in the run directory: loops and a link to / neither keep the
agent from starting nor make it walk the filesystem, and nothing outside is read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.faults import reap_agents, stored_file  # noqa: F401  (reap_agents: autouse fixture)
from tests.harness import AdwWriter, AgentProcess, Backend, fixture_lines

ADW = "55b761f6"
PLANNER = "tac7iso_raw_output_55b761f6_sdlc_planner_cli2022.jsonl"


def test_poll_mode_does_not_follow_symbolic_links(
    tmp_path: Path,
    backend: Backend,
    writer: AdwWriter,
    run_dir: Path,
    start_agent: Callable[..., AgentProcess],
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "raw_output.jsonl").write_bytes(b"".join(fixture_lines(PLANNER)))
    (run_dir / "loop").symlink_to(".")
    (run_dir / "loop2").symlink_to(".")
    (run_dir / "root").symlink_to("/")
    (run_dir / "sdlc_planner").symlink_to(outside)
    writer.state({"adw_id": ADW, "issue_number": "1", "issue_class": None})

    # Far apart rescans: the change below can only arrive through the poller.
    agent = start_agent(watch={"mode": "poll", "poll_interval": 0.1, "rescan_interval": 3600.0})
    agent.wait_started()
    backend.wait_for(lambda evs: any(e["type"] == "workflow_update" for e in evs))
    writer.state({"adw_id": ADW, "issue_number": "1", "issue_class": "/feature"})
    backend.wait_for(lambda evs: any(e["data"].get("issue_class") == "/feature" for e in evs))

    # The transcript behind the link was never read.
    assert stored_file(tmp_path / "storage", "transcript:sdlc_planner") is None
    for event in backend.events("cost_update"):
        assert event["data"]["current_cost"] == 0
        assert "sdlc_planner" not in event["data"]["breakdown"]["by_agent"]
    assert agent.stop() == 0
