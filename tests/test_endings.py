"""How a run ends: decided from the state, a later read of completed_phases.json, and what was
already reported."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agent import endings
from agent.events import WorkflowCompleted, WorkflowFailed

END = "2026-11-30T12:34:56.000000"


def state(**fields: Any) -> dict[str, Any]:
    return {"adw_id": "55b761f6", "issue_number": "42", **fields}


def test_no_end_time_is_no_ending_even_between_phases() -> None:
    # current: null with completed phases is what the file says between two phases.
    assert endings.decide(state(), ["Plan"], None, None) is None
    assert endings.decide(state(end_time=None), ["Plan"], None, None) is None
    assert endings.decide(state(end_time="  "), ["Plan"], None, None) is None
    assert endings.decide(None, ["Plan"], None, None) is None


def test_end_time_with_a_phase_current_is_a_failure_in_that_phase() -> None:
    ending = endings.decide(state(end_time=END), ["Plan", "Validate"], "Build", None)
    assert ending is not None
    assert ending.kind == "failed"
    assert ending.current_phase == "Build"
    assert "'Build'" in ending.reason
    data = endings.failed_data(ending, "Build phase failed after all retries")
    WorkflowFailed.model_validate(data)
    assert data["current_phase"] == "Build"
    assert data["error_excerpt"] == "Build phase failed after all retries"


def test_end_time_after_the_last_phase_completed_is_a_success() -> None:
    phases = ["Plan", "Validate", "Build", "Lint", "Test", "Review", "Document", "Ship"]
    ending = endings.decide(state(end_time=END), phases, None, None)
    assert ending is not None
    assert ending.kind == "completed"
    data = endings.completed_data(ending, 0.92175, "2026-11-30T12:00:00.000000")
    WorkflowCompleted.model_validate(data)
    assert data == {
        "final_cost": 0.92175,
        "completed_phases": phases,
        "duration_s": 2096.0,
        "end_time": END,
    }


def test_an_ending_is_reported_once_per_end_time() -> None:
    reported = endings.Reported(end_time=END, kind="failed")
    assert endings.decide(state(end_time=END), [], "Build", reported) is None
    assert endings.decide(state(end_time=END), ["Build"], None, reported) is None
    # A resumed run that ends again writes a new end_time: a new ending.
    again = endings.decide(state(end_time="2026-11-30T13:00:00"), ["Build"], None, reported)
    assert again is not None
    assert again.kind == "completed"


def test_a_damaged_record_of_the_last_ending_does_not_raise() -> None:
    assert endings.decide(state(end_time=END), [], None, {"nonsense": 1}) is not None


def test_duration_needs_two_times_in_order() -> None:
    assert endings.duration_s("2026-11-30T12:00:00Z", "2026-11-30T12:00:01.5Z") == 1.5
    assert endings.duration_s(None, END) is None
    assert endings.duration_s("yesterday", END) is None
    assert endings.duration_s(END, "2026-11-30T12:00:00") is None
    # Naive and aware times mix: a naive one is UTC.
    assert endings.duration_s("2026-11-30T12:00:00+00:00", "2026-11-30T12:00:10") == 10.0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


@given(
    st.dictionaries(st.sampled_from(["end_time", "start_time", "status"]), json_values),
    st.lists(st.text(max_size=8), max_size=4),
    st.none() | st.text(max_size=8),
    json_values,
    st.floats(allow_nan=False, allow_infinity=False, min_value=0, max_value=1e6),
)
def test_any_input_gives_a_valid_event_or_none(
    state_data: dict[str, Any],
    completed: list[str],
    current: str | None,
    reported: Any,
    cost: float,
) -> None:
    ending = endings.decide(state_data, completed, current, reported)
    if ending is None:
        return
    if ending.kind == "failed":
        WorkflowFailed.model_validate(endings.failed_data(ending, ""))
    else:
        WorkflowCompleted.model_validate(
            endings.completed_data(ending, cost, state_data.get("start_time"))
        )


def test_an_older_lineages_failed_status_is_no_success() -> None:
    ending = endings.decide(state(end_time=END, status="failed"), ["Plan"], None, None)
    assert ending is not None
    assert ending.kind == "failed"
    assert ending.reason == "the run ended with status 'failed'"
