"""Envelopes shaped exactly as the agent sends them (checked against agent.events)."""

from __future__ import annotations

import uuid
from typing import Any

from adw_backend.projection import EventView
from agent.events import Event, check_data


def stamp(seq: int, epoch: int = 0) -> str:
    """A timestamp that grows with (epoch, seq), so time order matches event order."""
    minutes, seconds = divmod(seq, 60)
    hours, minutes = divmod(minutes, 60)
    return f"2026-11-{10 + epoch:02d}T{10 + hours:02d}:{minutes:02d}:{seconds:02d}.000Z"


def event(kind: str, adw: str, seq: int, data: dict[str, Any], epoch: int = 0) -> dict[str, Any]:
    envelope = {
        "type": kind,
        "event_id": str(uuid.uuid4()),
        "adw_id": adw,
        "seq": seq,
        "epoch": epoch,
        "timestamp": stamp(seq, epoch),
        "source": "event",
        "data": check_data(kind, data),
    }
    Event.model_validate(envelope)
    return envelope


def workflow_update(adw: str, seq: int, epoch: int = 0, **state: Any) -> dict[str, Any]:
    return event("workflow_update", adw, seq, {"changed": sorted(state), **state}, epoch)


def cost_update(
    adw: str, seq: int, cost: float, phase: str | None = "Plan", epoch: int = 0, final: bool = False
) -> dict[str, Any]:
    data = {
        "current_cost": cost,
        "cost_delta": cost,
        "final": final,
        "settled_cost": cost / 2,
        "estimated_share": 0.5,
        "current_phase": phase,
        "estimate_complete": True,
        "breakdown": {
            "by_agent": {"sdlc_planner": cost},
            "by_model": {"claude-sonnet-4-5": cost},
            "by_phase": {phase or "unknown": cost},
        },
        "tokens": {"input": seq, "output": 2 * seq, "cache_creation": 0, "cache_read": 0},
    }
    return event("cost_update", adw, seq, data, epoch)


def phase_update(
    adw: str,
    seq: int,
    current: str | None,
    completed: list[str],
    completed_phase: str | None = None,
    phase_cost: float | None = None,
    epoch: int = 0,
) -> dict[str, Any]:
    data = {
        "current_phase": current,
        "status": "running",
        "completed_phases": completed,
        "completed_phase": completed_phase,
        "phase_cost": phase_cost,
    }
    return event("phase_update", adw, seq, data, epoch)


def failed(adw: str, seq: int, phase: str | None = "Build", epoch: int = 0) -> dict[str, Any]:
    data = {
        "reason": "end_time written while a phase was current",
        "error_excerpt": f"Build phase failed after all retries (seq {seq})",
        "current_phase": phase,
    }
    return event("workflow_failed", adw, seq, data, epoch)


def completed(adw: str, seq: int, phases: list[str], epoch: int = 0) -> dict[str, Any]:
    data = {"final_cost": 1.0, "completed_phases": phases, "duration_s": 12.0, "end_time": "x"}
    return event("workflow_completed", adw, seq, data, epoch)


def agent_status(adw: str, seq: int, depth: int = 0, epoch: int = 0) -> dict[str, Any]:
    data = {
        "state": "running",
        "version": "0.1.0",
        "adw_id": adw,
        "outbox_depth": depth,
        "oldest_undelivered_age": 1.5 if depth else None,
        "last_delivery_error": None,
    }
    return event("agent_status", adw, seq, data, epoch)


def view(envelope: dict[str, Any]) -> EventView:
    """The parts of an envelope the projection reads."""
    return {
        "type": envelope["type"],
        "event_id": envelope["event_id"],
        "adw_id": envelope["adw_id"],
        "epoch": envelope["epoch"],
        "seq": envelope["seq"],
        "timestamp": envelope["timestamp"],
        "data": envelope["data"],
    }
