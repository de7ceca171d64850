"""The agent as a real process on a real run directory, delivering to a real HTTP backend.

Each test writes files the way the orchestrator does and synchronises on what the backend
receives (``Backend.wait_for``) or on the agent's log (``wait_log``). Counts that must stay at
one are taken after a clean stop, which drains the outbox, so a late duplicate would be seen.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from agent import __version__
from tests.harness import AdwWriter, AgentProcess, Backend

ADW = "55b761f6"
STATE: dict[str, Any] = {
    "adw_id": ADW,
    "issue_number": "1",
    "branch_name": None,
    "plan_file": None,
    "issue_class": "/feature",
}

StartAgent = Callable[..., AgentProcess]
Events = list[dict[str, Any]]


def of(kind: str, events: Events, source: str | None = None) -> Events:
    return [e for e in events if e["type"] == kind and source in (None, e["source"])]


def has(kind: str, n: int = 1, **data: Any) -> Callable[[Events], bool]:
    """Predicate: at least ``n`` accepted events of ``kind`` whose data contains ``data``."""

    def check(events: Events) -> bool:
        hits = [e for e in of(kind, events) if data.items() <= e["data"].items()]
        return len(hits) >= n

    return check


def started(backend: Backend, start_agent: StartAgent, **sections: Any) -> AgentProcess:
    agent = start_agent(**sections)
    backend.wait_for(has("agent_status", state="starting"))
    return agent


def requests_of(backend: Backend, kind: str) -> Events:
    return [r.event for r in backend.requests if r.event["type"] == kind]


# -- adw_state.json ---------------------------------------------------------------------------


def test_state_written_in_halves_gives_one_complete_update(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    agent = started(backend, start_agent)
    writer.state(STATE, halves=True, pause=0.3)
    backend.wait_for(has("workflow_update"))
    assert agent.stop() == 0
    [update] = of("workflow_update", backend.events())
    assert update["source"] == "event"
    assert update["data"] == {**STATE, "changed": sorted(STATE)}
    assert len(requests_of(backend, "workflow_update")) == 1


def test_identical_rewrite_gives_nothing(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    agent = started(backend, start_agent, watch={"parse_retry_ms": 1})
    writer.state(STATE)
    backend.wait_for(has("workflow_update"))
    for _ in range(3):
        writer.state(STATE)  # in place, byte for byte the same
    # A phase change is never coalesced, so nothing can hide an update queued before it.
    writer.phases([], "plan")
    backend.wait_for(has("phase_update"))
    assert agent.stop() == 0
    assert len(requests_of(backend, "workflow_update")) == 1


def test_changed_names_the_key_that_appeared(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    agent = started(backend, start_agent)
    writer.state(STATE)
    backend.wait_for(has("workflow_update"))
    writer.state({**STATE, "branch_name": "feature-issue-1-adw-55b761f6"})
    backend.wait_for(has("workflow_update", 2))
    assert agent.stop() == 0
    first, second = of("workflow_update", backend.events())
    assert first["data"]["changed"] == sorted(STATE)
    assert second["data"]["changed"] == ["branch_name"]
    assert second["data"]["branch_name"] == "feature-issue-1-adw-55b761f6"
    assert first["seq"] < second["seq"]


def test_invalid_json_warns_once_with_the_path_and_keeps_the_last_good_state(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    agent = started(backend, start_agent, watch={"parse_retries": 3, "parse_retry_ms": 20})
    writer.state(STATE)
    backend.wait_for(has("workflow_update"))
    path = writer.run_dir / "adw_state.json"
    path.write_text('{"adw_id": "55b761f6", "issue_number": ')

    def unreadable(entry: dict[str, Any]) -> bool:
        return entry.get("level") == "warning" and "unreadable" in entry.get("message", "")

    warning = agent.wait_log(unreadable)
    assert warning["path"] == str(path)
    assert "is not valid JSON" in warning["message"]
    assert agent.running()
    writer.state({**STATE, "plan_file": "specs/plan.md"})
    backend.wait_for(has("workflow_update", 2))
    assert agent.stop() == 0
    updates = of("workflow_update", backend.events())
    assert len(updates) == 2
    assert updates[1]["data"]["changed"] == ["plan_file"]  # compared with the last good state
    assert len([e for e in agent.logs() if unreadable(e)]) == 1


# -- failures ---------------------------------------------------------------------------------


def test_error_log_created_and_grown_then_failed_status_is_not_a_third_failure(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    agent = started(backend, start_agent, limits={"error_excerpt_bytes": 256})
    writer.state({**STATE, "current_phase": "build"})
    backend.wait_for(has("workflow_update"))
    noise = "".join(f"DEBUG step {i}\n" for i in range(500))
    writer.error_log(noise + "Traceback (most recent call last):\nValueError: first\n")
    backend.wait_for(has("workflow_failed", reason="error.log appeared"))
    writer.error_log("RuntimeError: second\n")
    backend.wait_for(has("workflow_failed", reason="error.log grew"))
    writer.state({**STATE, "current_phase": "build", "status": "failed"})
    backend.wait_for(has("workflow_update", status="failed"))
    assert agent.stop() == 0

    first, second = of("workflow_failed", backend.events())
    for failure in (first, second):
        excerpt = failure["data"]["error_excerpt"]
        assert 0 < len(excerpt.encode()) <= 256
        assert not excerpt.startswith("EBUG")  # cut to whole lines
        assert failure["data"]["current_phase"] == "build"
    assert first["data"]["error_excerpt"].endswith("ValueError: first")
    assert second["data"]["error_excerpt"].endswith("RuntimeError: second")


def test_failed_status_alone_gives_one_failure(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    agent = started(backend, start_agent)
    writer.state(STATE)
    backend.wait_for(has("workflow_update"))
    writer.state({**STATE, "status": "failed"})
    backend.wait_for(has("workflow_failed"))
    writer.state({**STATE, "status": "failed", "end_time": "2026-01-01T00:00:00"})
    backend.wait_for(has("workflow_update", 3))
    assert agent.stop() == 0
    [failure] = of("workflow_failed", backend.events())
    assert failure["data"]["reason"] == "state status is 'failed'"
    assert len(requests_of(backend, "workflow_failed")) == 1


# -- completed_phases.json --------------------------------------------------------------------


def test_each_phase_change_gives_a_phase_update(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    agent = started(backend, start_agent)
    steps: list[tuple[list[str], str | None]] = [
        ([], "plan"),
        (["plan"], "build"),
        (["plan", "build"], "test"),
        (["plan", "build", "test"], None),
    ]
    for n, (completed, current) in enumerate(steps, 1):
        writer.phases(completed, current)
        backend.wait_for(has("phase_update", n))
    assert agent.stop() == 0
    got = [
        (e["data"]["current_phase"], e["data"]["status"], e["data"]["completed_phases"])
        for e in of("phase_update", backend.events())
    ]
    assert got == [
        ("plan", "running", []),
        ("build", "running", ["plan"]),
        ("test", "running", ["plan", "build"]),
        (None, "completed", ["plan", "build", "test"]),
    ]


# -- lifecycle --------------------------------------------------------------------------------


def test_start_sends_status_and_a_sync_snapshot_and_a_clean_stop_says_so(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    writer.state(STATE)
    writer.phases(["plan"], "build")
    agent = start_agent()
    backend.wait_for(lambda evs: has("workflow_update")(evs) and has("phase_update")(evs))
    assert agent.stop() == 0
    events = backend.events()

    starting, stopping = of("agent_status", events)
    assert events[0] == starting
    assert starting["source"] == "event"
    for status, state in ((starting, "starting"), (stopping, "stopping")):
        data = status["data"]
        assert data["state"] == state
        assert data["version"] == __version__
        assert data["adw_id"] == ADW
        assert isinstance(data["outbox_depth"], int)
        assert "oldest_undelivered_age" in data
        assert data["last_delivery_error"] is None
    assert events[-1] == stopping

    [update] = of("workflow_update", events)
    assert update["source"] == "sync"
    assert update["data"] == {**STATE, "changed": sorted(STATE)}
    assert of("phase_update", events, "sync")
    sync = of("phase_update", events, "sync")[-1]["data"]
    assert (sync["current_phase"], sync["status"], sync["completed_phases"]) == (
        "build",
        "running",
        ["plan"],
    )
    assert of("cost_update", events, "sync")


def test_logs_are_json_lines_with_level_message_and_adw_id(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    agent = started(backend, start_agent)
    writer.state(STATE)
    backend.wait_for(has("workflow_update"))
    assert agent.stop() == 0
    lines = agent.log.read_text().splitlines()
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert entry["level"] in {"debug", "info", "warning", "error"}
        assert isinstance(entry["message"], str)
        assert entry["adw_id"] == ADW
        stamp = datetime.fromisoformat(entry["ts"].replace("Z", "+00:00"))
        assert stamp.utcoffset() == UTC.utcoffset(None)
    messages = [json.loads(line)["message"] for line in lines]
    assert "agent started" in messages
    assert "shutting down" in messages
