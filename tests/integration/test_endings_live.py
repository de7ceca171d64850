"""How tac-webbuilder runs really end, written as tac-webbuilder writes them, to a real agent
process and a real backend: ``end_time`` with a phase current is a failure in that phase;
``end_time`` after the last phase completed is a success; ``current: null`` between two phases
is neither. Each ending is sent once, also across a restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness import AdwWriter, AgentProcess, Backend

ADW = "55b761f6"
START = "2026-11-30T12:00:00.000000"
END = "2026-11-30T12:10:30.500000"
STATE: dict[str, Any] = {
    "adw_id": ADW,
    "issue_number": "42",
    "branch_name": "feature-issue-42-adw-55b761f6-dark-mode",
    "plan_file": "specs/issue-42-adw-55b761f6-dark-mode.md",
    "issue_class": "/feature",
    "worktree_path": "/srv/app/trees/55b761f6",
    "backend_port": 9106,
    "frontend_port": 9206,
    "model_set": "base",
    "all_adws": ["adw_plan_iso"],
    "start_time": START,
}
StartAgent = Callable[..., AgentProcess]
Events = list[dict[str, Any]]
ENDINGS = ("workflow_failed", "workflow_completed")


def of(kind: str, events: Events) -> Events:
    return [e for e in events if e["type"] == kind]


def has(kind: str, n: int = 1) -> Callable[[Events], bool]:
    return lambda events: len(of(kind, events)) >= n


def phase(completed: list[str], current: str | None) -> Callable[[Events], bool]:
    """Predicate: a phase_update saying exactly this was accepted."""
    want = {"completed_phases": completed, "current_phase": current}
    return lambda events: any(want.items() <= e["data"].items() for e in of("phase_update", events))


def cost(usd: float) -> Callable[[Events], bool]:
    return lambda events: any(e["data"]["current_cost"] == usd for e in of("cost_update", events))


def script_log(run_dir: Path, script: str, *lines: str) -> None:
    """A script's logger appends to its folder's execution.log."""
    folder = run_dir / script
    folder.mkdir(exist_ok=True)
    with (folder / "execution.log").open("a") as f:
        for line in lines:
            f.write(f"2026-11-30 12:05:00 - INFO - {line}\n")


def result_line(cost: float) -> dict[str, Any]:
    return {
        "type": "result",
        "subtype": "success",
        "is_error": False,
        "total_cost_usd": cost,
        "usage": {"input_tokens": 5, "output_tokens": 900},
        "modelUsage": {"claude-sonnet-4-5-20250929": {"costUSD": cost}},
    }


def plan_phase(writer: AdwWriter, backend: Backend) -> None:
    writer.state(STATE)
    writer.phases([], "Plan")
    script_log(writer.run_dir, "adw_plan_iso", "Starting planning", "Plan created")
    writer.start_attempt("sdlc_planner")
    writer.append("sdlc_planner", result_line(0.25))
    backend.wait_for(cost(0.25))
    backend.wait_for(phase([], "Plan"))
    # Between phases: no phase is current, and the run is not over.
    writer.phases(["Plan"], None)
    backend.wait_for(phase(["Plan"], None))
    writer.phases(["Plan"], "Build")
    backend.wait_for(phase(["Plan"], "Build"))


def sequence(events: Events) -> list[tuple[str, Any]]:
    """The run's facts in seq order: phases and endings (snapshots and statuses left out)."""
    out: list[tuple[str, Any]] = []
    for e in sorted(events, key=lambda e: e["seq"]):
        if e["source"] != "event":
            continue
        if e["type"] == "phase_update":
            out.append(("phase_update", e["data"]["current_phase"]))
        elif e["type"] in ENDINGS:
            out.append((e["type"], e["data"].get("current_phase")))
    return out


def test_end_time_while_a_phase_is_current_is_one_failure_in_that_phase(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    agent = start_agent()
    agent.wait_started()
    plan_phase(writer, backend)
    run_dir = writer.run_dir
    script_log(run_dir, "adw_build_iso", "Building", "ERROR - build failed: tests red")
    script_log(run_dir, "adw_sdlc_complete_iso", "ERROR - Build phase failed after all retries")
    assert not of("workflow_failed", backend.events())
    # cleanup_failed_workflow: end_time into the state, rewritten in place, while Build is
    # still current.
    writer.state({**STATE, "end_time": END}, halves=True)
    backend.wait_for(has("workflow_failed"))
    assert agent.stop() == 0

    # A restart reads the same end_time again: nothing new.
    agent = start_agent()
    agent.wait_started()
    assert agent.stop() == 0

    events = backend.events()
    [failure] = of("workflow_failed", events)
    assert failure["data"]["current_phase"] == "Build"
    assert "'Build'" in failure["data"]["reason"]
    assert failure["data"]["error_excerpt"].endswith("Build phase failed after all retries")
    assert not of("workflow_completed", events)
    assert sequence(events) == [
        ("phase_update", "Plan"),
        ("phase_update", None),
        ("phase_update", "Build"),
        ("workflow_failed", "Build"),
    ]
    assert len([r for r in backend.requests if r.event["type"] == "workflow_failed"]) == 1


def test_end_time_after_the_last_phase_is_one_completion(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    agent = start_agent()
    agent.wait_started()
    plan_phase(writer, backend)
    writer.start_attempt("sdlc_implementor")
    writer.append("sdlc_implementor", result_line(0.5))
    backend.wait_for(cost(0.75))
    script_log(writer.run_dir, "adw_sdlc_complete_iso", "All phases completed")
    # The orchestrator completes the last phase, then writes end_time.
    writer.phases(["Plan", "Build"], None)
    writer.state({**STATE, "end_time": END})
    backend.wait_for(has("workflow_completed"))
    assert agent.stop() == 0

    agent = start_agent()
    agent.wait_started()
    assert agent.stop() == 0

    events = backend.events()
    [done] = of("workflow_completed", events)
    assert done["data"] == {
        "final_cost": 0.75,
        "completed_phases": ["Plan", "Build"],
        "duration_s": 630.5,
        "end_time": END,
    }
    assert not of("workflow_failed", events)
    assert sequence(events) == [
        ("phase_update", "Plan"),
        ("phase_update", None),
        ("phase_update", "Build"),
        ("phase_update", None),
        ("workflow_completed", None),
    ]
