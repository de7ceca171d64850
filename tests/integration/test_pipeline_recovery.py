"""The pipeline on hostile or unusual run directories, through a running agent.

Each case was once fatal or wrong end to end: counts that overflow 64-bit integers, a damaged
saved transcript state at start-up, a phase that ends while the agent is down, and a plain
subdirectory taken for an agent. The agent is a real process delivering to a real backend; the
tests synchronise on what the backend receives and on the agent's log.
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

StartAgent = Callable[..., AgentProcess]
Events = list[dict[str, Any]]


def result_cost(lines: list[bytes]) -> float:
    """The transcript's true cost, read independently of the agent: its last result line."""
    results = [json.loads(line) for line in lines if b'"type":"result"' in line.replace(b" ", b"")]
    return float(results[-1]["total_cost_usd"])


def last_cost(events: Events) -> dict[str, Any]:
    costs = [e for e in events if e["type"] == "cost_update"]
    return dict(costs[-1]["data"]) if costs else {}


def cost_is(usd: float, final: bool, source: str | None = None) -> Callable[[Events], bool]:
    def check(events: Events) -> bool:
        costs = [e for e in events if e["type"] == "cost_update"]
        if source is not None:
            costs = [e for e in costs if e["source"] == source]
        data = costs[-1]["data"] if costs else None
        return (
            data is not None
            and math.isclose(data["current_cost"], usd, abs_tol=1e-9)
            and data["final"] is final
        )

    return check


def state_is(expected: dict[str, Any]) -> Callable[[Events], bool]:
    def check(events: Events) -> bool:
        updates = [e["data"] for e in events if e["type"] == "workflow_update"]
        return bool(updates) and {k: v for k, v in updates[-1].items() if k != "changed"} == (
            expected
        )

    return check


def warned(agent: AgentProcess, path: Path, text: str) -> dict[str, Any]:
    return agent.wait_log(
        lambda e: (
            e.get("level") == "warning" and e.get("path") == str(path) and text in e["message"]
        )
    )


def no_tracebacks(agent: AgentProcess) -> None:
    for entry in agent.logs():
        assert "Traceback" not in json.dumps(entry), entry


def test_counts_that_overflow_64_bits_are_bad_lines_and_the_other_files_go_on(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    agent = start_agent().wait_started()
    hostile = [
        {
            "type": "assistant",
            "message": {
                "id": f"msg_{i}",
                "model": "claude-sonnet-4-5",
                "usage": {"input_tokens": 2**63 - 1, "output_tokens": 2**63 - 1},
            },
        }
        for i in range(3)
    ]
    planner = fixture_lines(PLANNER)
    # One batch for all three: before, the overflow rolled the whole batch back and was raised.
    writer.append("hostile", *hostile)
    writer.append("sdlc_planner", *planner)
    writer.state(STATE)
    warned(agent, writer.transcript("hostile"), "malformed usage")
    backend.wait_for(state_is(STATE))
    events = backend.wait_for(cost_is(result_cost(planner), final=False))
    assert last_cost(events)["breakdown"]["by_agent"]["hostile"] == 0.0
    # The reader went past the bad lines: a result line after them makes the run final.
    writer.append("hostile", {"type": "result", "total_cost_usd": 0.5})
    backend.wait_for(cost_is(result_cost(planner) + 0.5, final=True))
    assert agent.running()
    no_tracebacks(agent)
    assert agent.stop() == 0


def test_a_damaged_saved_transcript_state_is_warned_and_the_agent_starts(
    tmp_path: Path, backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    planner = fixture_lines(PLANNER)
    agent = start_agent().wait_started()
    writer.append("sdlc_planner", *planner)
    backend.wait_for(cost_is(result_cost(planner), final=True))
    assert agent.stop() == 0
    # As a newer version of the agent might have left it.
    db = sqlite3.connect(tmp_path / "storage" / "agent.sqlite3")
    with db:
        row = db.execute("SELECT value FROM files WHERE key = 'transcript:sdlc_planner'")
        saved = json.loads(row.fetchone()[0])
        saved["ledger"]["v"] = 99
        db.execute(
            "UPDATE files SET value = ? WHERE key = 'transcript:sdlc_planner'",
            (json.dumps(saved).encode(),),
        )
    db.close()
    before = len(backend.events())

    agent = start_agent().wait_started()  # exited 1 with a traceback before
    warned(agent, writer.transcript("sdlc_planner"), "does not load")
    # The cost reported for it stays; as it is no longer followed, it is not final.
    events = backend.wait_for(
        lambda evs: cost_is(result_cost(planner), final=False, source="sync")(evs[before:])
    )
    assert last_cost(events)["estimate_complete"] is False
    writer.state(STATE)
    backend.wait_for(state_is(STATE))
    no_tracebacks(agent)
    assert agent.stop() == 0


def test_catch_up_charges_the_cost_to_the_phase_that_ended_while_the_agent_was_down(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    planner = fixture_lines(PLANNER)
    agent = start_agent().wait_started()
    writer.phases([], "Plan")
    backend.wait_for(lambda evs: any(e["data"].get("current_phase") == "Plan" for e in evs))
    assert agent.stop() == 0
    # While the agent is down the planner runs to its end and the phase completes.
    writer.append("sdlc_planner", *planner)
    writer.phases(["Plan"], "Build")

    agent = start_agent()
    events = backend.wait_for(
        lambda evs: any(e["data"].get("completed_phase") == "Plan" for e in evs)
    )
    [done] = [e["data"] for e in events if e["data"].get("completed_phase") == "Plan"]
    assert math.isclose(done["phase_cost"], result_cost(planner), abs_tol=1e-9)
    events = backend.wait_for(cost_is(result_cost(planner), final=True))
    by_phase = last_cost(events)["breakdown"]["by_phase"]
    assert by_phase.keys() == {"Plan"}
    assert math.isclose(by_phase["Plan"], result_cost(planner), abs_tol=1e-9)
    assert agent.stop() == 0


def test_a_plain_subdirectory_is_not_an_agent(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    planner = fixture_lines(PLANNER)
    agent = start_agent().wait_started()
    (writer.run_dir / "screenshots").mkdir()
    (writer.run_dir / "screenshots" / "home.png").write_bytes(b"\x89PNG\r\n")
    (writer.run_dir / "reviewer" / "review_img").mkdir(parents=True)
    writer.append("sdlc_planner", *planner)
    events = backend.wait_for(cost_is(result_cost(planner), final=True))
    assert last_cost(events)["breakdown"]["by_agent"].keys() == {"sdlc_planner"}
    assert agent.stop() == 0
    # The same picture after a restart.
    before = len(backend.events())
    agent = start_agent()
    events = backend.wait_for(
        lambda evs: cost_is(result_cost(planner), final=True, source="sync")(evs[before:])
    )
    assert last_cost(events)["breakdown"]["by_agent"].keys() == {"sdlc_planner"}
    assert agent.stop() == 0
