"""Tests for agent.events: the envelope and the typed data of every event type."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from pydantic import ValidationError

from agent.events import COALESCIBLE, DATA_MODELS, Event, EventType, check_data, envelope


def an_event(**over: Any) -> dict[str, Any]:
    return {
        "type": "workflow_failed",
        "event_id": "0b0f4c1e-3f0e-4d55-a2b3-0f5f3f6d9e01",
        "adw_id": "55b761f6",
        "seq": 1,
        "timestamp": "2026-01-01T00:00:00.000Z",
        "source": "event",
        "data": {},
        **over,
    }


def test_every_event_type_has_a_data_model() -> None:
    assert set(DATA_MODELS) == set(typing.get_args(EventType))


def test_only_snapshots_coalesce() -> None:
    assert COALESCIBLE == {"workflow_update", "cost_update", "agent_status"}


def test_envelope_accepts_a_well_formed_event() -> None:
    event = Event.model_validate(an_event())
    assert event.seq == 1
    assert event.source == "event"
    assert event.epoch == 0, "an agent that predates epochs is epoch 0"
    assert Event.model_validate(an_event(epoch=1767225600000)).epoch == 1767225600000


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("type", "something_else"),
        ("source", "poll"),
        ("seq", -1),
        ("epoch", -1),
        ("event_id", None),
    ],
)
def test_envelope_rejects(field: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        Event.model_validate(an_event(**{field: value}))


def test_envelope_rejects_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="extra"):
        Event.model_validate(an_event(token="x"))


def test_workflow_update_keeps_every_state_key_and_needs_changed() -> None:
    data = {"adw_id": "x", "custom_field": [1, 2], "changed": ["custom_field"]}
    assert check_data("workflow_update", data) == data
    with pytest.raises(ValidationError, match="changed"):
        check_data("workflow_update", {"adw_id": "x"})


def test_phase_update() -> None:
    data = {"current_phase": "build", "status": "running", "completed_phases": ["plan"]}
    assert check_data("phase_update", data) == {
        **data,
        "phase_cost": None,
        "completed_phase": None,
    }
    with pytest.raises(ValidationError, match="status"):
        check_data("phase_update", {**data, "status": "failed"})
    with pytest.raises(ValidationError, match="extra"):
        check_data("phase_update", {**data, "surprise": 1})


def test_workflow_failed_requires_its_fields() -> None:
    data = {"reason": "error.log appeared", "error_excerpt": "boom", "current_phase": None}
    assert check_data("workflow_failed", data) == data
    with pytest.raises(ValidationError, match="error_excerpt"):
        check_data("workflow_failed", {"reason": "x", "current_phase": None})


def test_workflow_completed_carries_the_final_figures() -> None:
    data = {
        "final_cost": 0.92175,
        "completed_phases": ["Plan", "Build"],
        "duration_s": 61.5,
        "end_time": "2026-01-01T00:01:01",
    }
    assert check_data("workflow_completed", data) == data
    with pytest.raises(ValidationError, match="final_cost"):
        check_data("workflow_completed", {"completed_phases": []})


def test_cost_update_is_strictly_shaped() -> None:
    data = {
        "current_cost": 0.5,
        "cost_delta": -0.1,
        "final": True,
        "settled_cost": 0.25,
        "estimated_share": 0.5,
        "current_phase": None,
        "estimate_complete": False,
        "breakdown": {"by_agent": {"a": 0.5}, "by_model": {}, "by_phase": {}},
        "tokens": {"input": 1, "output": 2, "cache_creation": 3, "cache_read": 4},
    }
    assert check_data("cost_update", data) == data
    with pytest.raises(ValidationError, match="estimated_share"):
        check_data("cost_update", {**data, "estimated_share": 1.5})
    with pytest.raises(ValidationError, match="breakdown"):
        check_data("cost_update", {**data, "breakdown": {"by_agent": {}}})


def test_agent_status_defaults() -> None:
    data = {
        "state": "starting",
        "version": "0.1.0",
        "adw_id": "x",
        "outbox_depth": 0,
        "oldest_undelivered_age": None,
        "last_delivery_error": None,
    }
    assert check_data("agent_status", data) == {**data, "storage_error": None, "dead_letters": 0}
    with pytest.raises(ValidationError, match="state"):
        check_data("agent_status", {**data, "state": "crashed"})


def test_envelope_builds_a_valid_event_with_a_fresh_id() -> None:
    failure = {"reason": "r", "error_excerpt": "", "current_phase": None}
    data = check_data("workflow_failed", failure)
    first = envelope("workflow_failed", "55b761f6", 7, "sync", data)
    second = envelope("workflow_failed", "55b761f6", 7, "sync", data)
    event = Event.model_validate(first)
    assert (event.type, event.adw_id, event.seq, event.source) == (
        "workflow_failed",
        "55b761f6",
        7,
        "sync",
    )
    assert event.data == data
    assert event.timestamp.endswith("Z")
    assert first["event_id"] != second["event_id"]
