"""Live cost accounting: the agent as a process, transcripts written line by line."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from typing import Any

import pytest

from tests.harness import AdwWriter, AgentProcess, Backend, fixture_lines

PLANNER = "tac7iso_raw_output_55b761f6_sdlc_planner_cli2022.jsonl"
THREE_MODELS = "pricehawk_v2.0.55_planner_sonnet45_3models.jsonl"
NO_RESULT = "tac6_raw_output_b5b9b7d5_branch_generator_no_result_line.jsonl"

StartAgent = Callable[..., AgentProcess]


def result_cost(lines: list[bytes]) -> float:
    """The transcript's true cost, read independently of the agent: its last result line."""
    results = [json.loads(line) for line in lines if b'"type":"result"' in line.replace(b" ", b"")]
    assert results, "fixture has no result line"
    return float(results[-1]["total_cost_usd"])


def last_cost(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    costs = [e for e in events if e["type"] == "cost_update"]
    return costs[-1]["data"] if costs else None


def cost_reaches(expected: float, final: bool = True) -> Callable[[list[dict[str, Any]]], bool]:
    def check(events: list[dict[str, Any]]) -> bool:
        data = last_cost(events)
        return (
            data is not None
            and math.isclose(data["current_cost"], expected, abs_tol=1e-9)
            and data["final"] is final
        )

    return check


def test_lines_appended_one_by_one_end_at_the_result_cost(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    lines = fixture_lines(PLANNER)
    start_agent()
    backend.wait_for(lambda evs: any(e["type"] == "agent_status" for e in evs))
    writer.start_attempt("sdlc_planner")
    before_result = [line for line in lines if b'"type":"result"' not in line]
    for line in before_result:
        writer.append("sdlc_planner", line)
    # The live estimate arrives before the result line exists.
    backend.wait_for(
        lambda evs: any(
            e["type"] == "cost_update" and not e["data"]["final"] and e["data"]["current_cost"] > 0
            for e in evs
        )
    )
    writer.append("sdlc_planner", *lines[len(before_result) :])
    events = backend.wait_for(cost_reaches(result_cost(lines)))
    costs = [e["data"] for e in events if e["type"] == "cost_update"]
    assert costs[-1]["breakdown"]["by_agent"] == {"sdlc_planner": costs[-1]["current_cost"]}
    assert math.isclose(
        sum(c["cost_delta"] for c in costs), costs[-1]["current_cost"], abs_tol=1e-9
    )


def test_retry_attempt_truncating_the_file_keeps_the_first_attempts_cost(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    first, second = fixture_lines(THREE_MODELS), fixture_lines(PLANNER)
    start_agent()
    writer.start_attempt("sdlc_planner")
    writer.append("sdlc_planner", *first)
    backend.wait_for(cost_reaches(result_cost(first)))
    writer.start_attempt("sdlc_planner")  # reopened with "w": the file shrinks to 0
    writer.append("sdlc_planner", *second)
    events = backend.wait_for(cost_reaches(result_cost(first) + result_cost(second)))
    data = last_cost(events)
    assert data is not None
    assert data["breakdown"]["by_agent"]["sdlc_planner"] == data["current_cost"]


def test_kill_9_between_appends_neither_loses_nor_double_counts(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    lines = fixture_lines(PLANNER)
    writer.start_attempt("sdlc_planner")
    agent = start_agent()
    cut = len(lines) // 3
    for chunk in (lines[:cut], lines[cut : 2 * cut], lines[2 * cut :]):
        writer.append("sdlc_planner", *chunk)
        # Wait until the agent has taken these lines into account (a cost_update arrived after
        # the write), then kill it before it can do anything else.
        seen = len(backend.events("cost_update"))

        def another_update(evs: list[dict[str, Any]], seen: int = seen) -> bool:
            return len([e for e in evs if e["type"] == "cost_update"]) > seen

        backend.wait_for(another_update)
        agent.kill9()
        agent = start_agent().wait_started()
    data = last_cost(backend.wait_for(cost_reaches(result_cost(lines))))
    assert data is not None
    assert math.isclose(data["current_cost"], result_cost(lines), abs_tol=1e-9)
    assert agent.stop() == 0
    # Nothing arrived later that moved the figure.
    data = last_cost(backend.events())
    assert data is not None
    assert math.isclose(data["current_cost"], result_cost(lines), abs_tol=1e-9)


def test_phase_cost_is_what_accrued_while_the_phase_was_current(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    planner, builder = fixture_lines(PLANNER), fixture_lines(THREE_MODELS)
    start_agent()
    writer.phases([], "Plan")
    backend.wait_for(lambda evs: any(e["type"] == "phase_update" for e in evs))
    writer.start_attempt("sdlc_planner")
    writer.append("sdlc_planner", *planner)
    backend.wait_for(cost_reaches(result_cost(planner)))
    writer.phases(["Plan"], "Build")
    backend.wait_for(lambda evs: any(e["data"].get("completed_phase") == "Plan" for e in evs))
    writer.start_attempt("sdlc_implementor")
    writer.append("sdlc_implementor", *builder)
    backend.wait_for(cost_reaches(result_cost(planner) + result_cost(builder)))
    writer.phases(["Plan", "Build"], None)
    events = backend.wait_for(
        lambda evs: any(e["data"].get("completed_phase") == "Build" for e in evs)
    )
    done = {
        e["data"]["completed_phase"]: e["data"]
        for e in events
        if e["type"] == "phase_update" and e["data"].get("completed_phase")
    }
    assert math.isclose(done["Plan"]["phase_cost"], result_cost(planner), abs_tol=1e-9)
    assert math.isclose(done["Build"]["phase_cost"], result_cost(builder), abs_tol=1e-9)
    assert done["Build"]["status"] == "completed"
    by_phase = last_cost(events)["breakdown"]["by_phase"]  # type: ignore[index]
    assert math.isclose(by_phase["Plan"], result_cost(planner), abs_tol=1e-9)
    assert math.isclose(by_phase["Build"], result_cost(builder), abs_tol=1e-9)


def test_killed_run_without_result_reports_an_estimate_that_is_not_final(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    planner, killed = fixture_lines(PLANNER), fixture_lines(NO_RESULT)
    start_agent()
    writer.start_attempt("sdlc_planner")
    writer.append("sdlc_planner", *planner)
    backend.wait_for(cost_reaches(result_cost(planner)))
    writer.start_attempt("branch_generator")
    writer.append("branch_generator", *killed)
    # The init line alone costs nothing, but the run is no longer final.
    events = backend.wait_for(cost_reaches(result_cost(planner), final=False))
    assert set(last_cost(events)["breakdown"]["by_agent"]) == {"sdlc_planner", "branch_generator"}  # type: ignore[index]


def test_runs_appended_to_one_transcript_are_summed_settled_and_estimated(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    # A real loop log: four runs appended one after another, the last one unfinished.
    lines = fixture_lines("gymnastics_rundown_system_4runs.jsonl")
    totals = [
        float(json.loads(line)["total_cost_usd"])
        for line in lines
        if b'"type":"result"' in line.replace(b" ", b"")
    ]
    settled = math.fsum(totals)
    start_agent()
    writer.start_attempt("builder")
    for start in range(0, len(lines), 40):
        writer.append("builder", *lines[start : start + 40])

    def all_in(events: list[dict[str, Any]]) -> bool:
        data = last_cost(events)
        return (
            data is not None
            and data["settled_cost"] is not None
            and math.isclose(data["settled_cost"], settled, abs_tol=1e-9)
            and data["current_cost"] > settled
        )

    events = backend.wait_for(all_in)
    costs = [e["data"] for e in events if e["type"] == "cost_update"]
    last = costs[-1]
    assert last["final"] is False
    estimated = last["current_cost"] - settled
    assert last["estimated_share"] == pytest.approx(estimated / last["current_cost"], abs=1e-6)
    # The figure only falls in an update where a result line settled something.
    for before, after in itertools.pairwise(costs):
        if after["cost_delta"] < 0:
            assert after["settled_cost"] > before["settled_cost"]
    assert math.isclose(sum(c["cost_delta"] for c in costs), last["current_cost"], abs_tol=1e-9)


def test_an_agent_that_settled_calibrates_another_agents_estimate(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    def message(msg_id: str) -> dict[str, Any]:
        # 10,000 input tokens of Sonnet 4.5: $0.03 at list prices.
        return {
            "type": "assistant",
            "message": {
                "id": msg_id,
                "model": "claude-sonnet-4-5-20250929",
                "usage": {"input_tokens": 10_000, "output_tokens": 0},
            },
        }

    start_agent()
    writer.start_attempt("planner")
    writer.start_attempt("builder")
    # The planner's CLI charged twice the list price (helper calls, say): ratio 2.
    writer.append("planner", message("p1"), {"type": "result", "total_cost_usd": 0.06})
    writer.append("builder", message("b1"))

    def calibrated(events: list[dict[str, Any]]) -> bool:
        data = last_cost(events)
        return data is not None and math.isclose(data["current_cost"], 0.12, abs_tol=1e-9)

    data = last_cost(backend.wait_for(calibrated))
    assert data is not None
    assert data["settled_cost"] == pytest.approx(0.06, abs=1e-9)
    assert data["estimated_share"] == pytest.approx(0.5, abs=1e-6)
    assert data["breakdown"]["by_agent"] == {
        "planner": pytest.approx(0.06, abs=1e-9),
        "builder": pytest.approx(0.06, abs=1e-9),
    }
    assert data["final"] is False
