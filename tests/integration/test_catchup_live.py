"""Catching up on a large transcript backlog, through a running agent.

A transcript written while the agent was down is read in bounded steps, each committed with its
offset. State changes do not wait for the catch-up, a SIGTERM during it is honoured, and a
restart continues from the last committed step. The agent is a real process delivering to a
real backend; the tests synchronise on what the backend receives, never on timing.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness import AdwWriter, AgentProcess, Backend, fixture_lines

PLANNER = "tac7iso_raw_output_55b761f6_sdlc_planner_cli2022.jsonl"
STATE = {"adw_id": "55b761f6", "issue_number": "1", "issue_class": "/feature"}
#: Well over the agent's bounded read per step, so catch-up takes many steps.
BACKLOG = 80 << 20

StartAgent = Callable[..., AgentProcess]
Events = list[dict[str, Any]]


def write_backlog(writer: AdwWriter) -> tuple[Path, float]:
    """The planner's real lines, its messages repeated to ``BACKLOG`` bytes, then its result
    line: one attempt whose true cost is that result's total. Returns the path and the cost."""
    lines = fixture_lines(PLANNER)
    results = [line for line in lines if b'"type":"result"' in line.replace(b" ", b"")]
    body = [line for line in lines[1:] if line not in results]
    block = b"".join(body)
    path = writer.transcript("sdlc_planner")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(lines[0])
        for _ in range(BACKLOG // len(block) + 1):
            f.write(block)
        f.write(results[-1])
    return path, float(json.loads(results[-1])["total_cost_usd"])


def is_final(usd: float) -> Callable[[dict[str, Any]], bool]:
    def check(event: dict[str, Any]) -> bool:
        data = event["data"]
        return (
            event["type"] == "cost_update"
            and data["final"] is True
            and math.isclose(data["current_cost"], usd, abs_tol=1e-9)
        )

    return check


def is_state(event: dict[str, Any]) -> bool:
    if event["type"] != "workflow_update":
        return False
    return {k: v for k, v in event["data"].items() if k != "changed"} == STATE


def saved_offset(storage: Path) -> int:
    db = sqlite3.connect(storage / "agent.sqlite3")
    try:
        row = db.execute("SELECT value FROM files WHERE key = 'transcript:sdlc_planner'").fetchone()
    finally:
        db.close()
    return int(json.loads(row[0])["position"]["offset"]) if row else 0


def test_a_state_change_is_sent_before_a_backlog_is_caught_up(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    _, usd = write_backlog(writer)
    agent = start_agent().wait_started()
    writer.state(STATE)
    events = backend.wait_for(lambda evs: any(map(is_final(usd), evs)), timeout=120)
    events = backend.wait_for(lambda evs: any(map(is_state, evs)), timeout=30)
    state_at = next(i for i, e in enumerate(events) if is_state(e))
    final_at = next(i for i, e in enumerate(events) if is_final(usd)(e))
    # Before, the state change waited for the whole backlog and came after its last cost.
    assert state_at < final_at
    assert agent.stop() == 0


def test_sigterm_during_catch_up_stops_the_agent_and_a_restart_continues(
    tmp_path: Path, backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    path, usd = write_backlog(writer)
    size = path.stat().st_size
    agent = start_agent(delivery={"drain_timeout": 1.0}).wait_started()
    assert agent.stop(timeout=60) == 0
    first = saved_offset(tmp_path / "storage")
    # Stopped mid-way (before, SIGTERM waited for the whole catch-up), with its steps committed.
    assert 0 < first < size
    agent = start_agent().wait_started()
    assert agent.stop(timeout=60) == 0
    # The restart went on from the committed offset rather than from the start.
    assert saved_offset(tmp_path / "storage") > first
    agent = start_agent().wait_started()
    backend.wait_for(lambda evs: any(map(is_final(usd), evs)), timeout=120)
    assert saved_offset(tmp_path / "storage") == size
    assert agent.stop() == 0


def test_a_sparse_transcript_without_newlines_saves_its_progress(
    tmp_path: Path, backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    path = writer.transcript("sdlc_planner")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        # Sparse: gigabytes of NUL bytes cost nothing on disk and hold no newline at all.
        f.truncate(4 << 30)
    agent = start_agent().wait_started()
    agent.wait_log(lambda e: "skipping a line over" in e.get("message", ""), timeout=60)
    writer.state(STATE)
    backend.wait_for(lambda evs: any(map(is_state, evs)), timeout=60)
    assert agent.stop(timeout=60) == 0
    # Before, the offset stayed at the start of the endless line, so every start read it all.
    first = saved_offset(tmp_path / "storage")
    assert first > 0
    agent = start_agent().wait_started()
    assert agent.stop(timeout=60) == 0
    assert saved_offset(tmp_path / "storage") > first
