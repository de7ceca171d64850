"""The oracle can fail: a lost seq, a doubled one, a wrong cost, a stale picture are found."""

from __future__ import annotations

from collections import Counter
from typing import Any

from tests.system.oracle import Stream, audit, truth_mismatches, view_mismatches
from tests.system.workload import Truth


def stream(owed: int = 3, last: int = 4, queued: int = 0) -> Stream:
    # Seqs 1-4 given, one of them superseded: three owed.
    return Stream("abc12345", 7, last, 0, owed, queued)


def test_every_owed_seq_once_is_clean() -> None:
    result = audit({"h1": [stream()]}, {("abc12345", 7): Counter({1: 1, 2: 1, 4: 1})})
    assert (result.events_checked, result.lost, result.doubled, result.problems) == (3, 0, 0, [])


def test_a_missing_seq_is_lost() -> None:
    result = audit({"h1": [stream()]}, {("abc12345", 7): Counter({1: 1, 4: 1})})
    assert result.lost == 1
    assert result.problems


def test_a_seq_held_twice_is_doubled() -> None:
    result = audit({"h1": [stream()]}, {("abc12345", 7): Counter({1: 1, 2: 2, 4: 1})})
    assert result.doubled == 1
    assert result.problems


def test_events_of_no_stream_or_past_its_end_or_still_queued_are_problems() -> None:
    applied = {("abc12345", 7): Counter({1: 1, 2: 1, 9: 1}), ("other", 1): Counter({1: 1})}
    result = audit({"h1": [stream()]}, applied)
    assert result.strays == 1
    assert len(result.problems) == 2
    assert audit(
        {"h1": [stream(queued=1)]}, {("abc12345", 7): Counter({1: 1, 2: 1, 4: 1})}
    ).problems


def projection(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "status": "failed",
        "state": {"adw_id": "abc12345", "end_time": "x"},
        "completed_phases": ["Plan"],
        "current_phase": "Build",
        "failed_phase": "Build",
        "cost": {"current_cost": 0.92175},
    }
    return {**base, **changes}


def test_a_projection_is_compared_with_the_truth_to_the_last_nano_dollar() -> None:
    truth = Truth("abc12345", 1, "failed", {"adw_id": "abc12345", "end_time": "x"}, ["Plan"],
                  "Build", "Build", 0.92175)  # fmt: skip
    assert truth_mismatches(truth, projection()) == []
    assert truth_mismatches(truth, projection(cost={"current_cost": 0.92175 + 2e-9}))
    assert truth_mismatches(truth, projection(status="completed"))
    assert truth_mismatches(truth, projection(completed_phases=[]))
    assert truth_mismatches(truth, projection(state={"adw_id": "abc12345"}))
    assert truth_mismatches(truth, None) == ["no projection"]


def test_the_picture_must_equal_the_database() -> None:
    assert view_mismatches({"a": projection()}, {"a": projection()}) == []
    assert view_mismatches({"a": projection()}, {"a": projection(current_phase="Plan")}) == [
        "a: differs in ['current_phase']"
    ]
    assert view_mismatches({}, {"a": projection()}) == ["a: only in the database"]
