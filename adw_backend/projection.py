"""One workflow's state, folded from its events: pure functions, no I/O.

Events of one ADW are ordered by ``(epoch, seq)``: a larger epoch is newer whatever its seq
(the agent's store was reset), and seq 0 stands outside the order (an ``agent_status`` sent
while the agent could not queue it). The rules, so that a late, repeated or reordered event
never makes the picture older:

- Snapshot types (``workflow_update``, ``cost_update``, ``agent_status``) replace their part
  only when newer than the last one applied of that type.
- ``phase_update`` always records the phase it completes and that phase's cost; it moves the
  current phase only when newer than the last ``phase_update`` applied.
- ``workflow_failed`` always applies; the newest failure's phase and excerpt are kept.
- A failed workflow stays failed: ``workflow_completed`` never turns it back. Only deleting
  the workflow clears it.
- Seq 0 never advances a counter: it applies when its timestamp is not older than the part
  it would replace, and leaves the marks as they were.

A workflow's picture is bounded whatever the agent sends: at most :data:`MAX_PHASES`
completed phases are kept (the earliest recorded; a phase beyond them is ignored, with its
cost), and phase names are cut to :data:`MAX_PHASE_NAME` characters wherever the projection
keeps them (current, completed, failed phase, cost points). tac-webbuilder has eight phases
with short names.

``revision`` counts the events folded into the projection (+1 for each newly applied event,
whatever it changed). The projection of one workflow is written under a row lock, so each
revision names exactly one projection and a larger one is always newer: a client that receives
messages out of order (one replica's own commits and another replica's notices reach it by
different paths) keeps the projection with the largest revision and drops older ones. A
projection stored before revisions existed reads as revision 0 (:func:`upgrade`).

``cost_points`` keeps one point per ``cost_update`` (late ones included, in time order) and is
bounded: when full, every second point of the older half is dropped, so old history gets
coarser while recent history stays exact.
"""

from __future__ import annotations

import bisect
from typing import Any, Literal, NotRequired, TypedDict

#: Completed phases kept per workflow, and the longest phase name kept.
MAX_PHASES = 100
MAX_PHASE_NAME = 200

Status = Literal["running", "completed", "failed"]
Key = tuple[int, int]


class CostPoint(TypedDict):
    t: str
    cost: float
    phase: str | None


class CostView(TypedDict):
    current_cost: float | None
    settled_cost: float | None
    final: bool
    estimated_share: float | None
    estimate_complete: bool | None
    tokens: dict[str, int]
    breakdown: dict[str, dict[str, float]]


class AgentView(TypedDict):
    state: str | None
    version: str | None
    last_heartbeat: str | None
    outbox_depth: int | None
    oldest_undelivered_age: float | None
    last_delivery_error: str | None
    storage_error: str | None
    dead_letters: int | None


class Projection(TypedDict):
    adw_id: str
    revision: int
    status: Status
    state: dict[str, Any]
    current_phase: str | None
    completed_phases: list[str]
    phase_costs: dict[str, float | None]
    failed_phase: str | None
    last_error: str | None
    cost: CostView
    cost_points: list[CostPoint]
    agent: AgentView
    created_at: str | None
    updated_at: str | None
    ended_at: str | None


class Marks(TypedDict):
    """What the projection was built from; stored beside it, never shown.

    ``types`` holds the newest (epoch, seq) applied per type; ``phases`` the earliest event
    that listed each completed phase (its position orders ``completed_phases``);
    ``phase_cost_keys`` the event whose ``phase_cost`` is shown per phase.
    """

    types: dict[str, list[int]]
    phases: dict[str, list[int]]
    phase_cost_keys: dict[str, list[int]]


class EventView(TypedDict):
    """The parts of a validated envelope the projection reads (``data`` already checked)."""

    type: str
    event_id: str
    adw_id: str
    epoch: int
    seq: int
    timestamp: str
    data: dict[str, Any]
    #: ``data`` as JSON, when the intake already wrote it (the store then writes it as is).
    data_json: NotRequired[str]


def new_projection(adw_id: str) -> Projection:
    return {
        "adw_id": adw_id,
        "revision": 0,
        "status": "running",
        "state": {},
        "current_phase": None,
        "completed_phases": [],
        "phase_costs": {},
        "failed_phase": None,
        "last_error": None,
        "cost": {
            "current_cost": None,
            "settled_cost": None,
            "final": False,
            "estimated_share": None,
            "estimate_complete": None,
            "tokens": {},
            "breakdown": {},
        },
        "cost_points": [],
        "agent": {
            "state": None,
            "version": None,
            "last_heartbeat": None,
            "outbox_depth": None,
            "oldest_undelivered_age": None,
            "last_delivery_error": None,
            "storage_error": None,
            "dead_letters": None,
        },
        "created_at": None,
        "updated_at": None,
        "ended_at": None,
    }


def upgrade(projection: Projection) -> Projection:
    """A stored projection as this version shows it: one written before revisions existed
    reads as revision 0 (changed in place; it was just decoded)."""
    if "revision" not in projection:
        projection["revision"] = 0
    return projection


def new_marks() -> Marks:
    return {"types": {}, "phases": {}, "phase_cost_keys": {}}


def _newer(marks: Marks, kind: str, key: Key) -> bool:
    last = marks["types"].get(kind)
    return last is None or key > (last[0], last[1])


def _advance(marks: Marks, kind: str, event: EventView) -> Marks:
    """Record ``event`` as the newest of its kind; seq 0 never moves a mark."""
    if event["seq"] == 0:
        return marks
    return {**marks, "types": {**marks["types"], kind: [event["epoch"], event["seq"]]}}


def _fresh(event: EventView, marks: Marks, kind: str, shown_at: str | None) -> bool:
    """Whether a snapshot replaces what is shown: newer (epoch, seq), or for seq 0, a
    timestamp that is not older than the one shown."""
    if event["seq"] == 0:
        return shown_at is None or event["timestamp"] >= shown_at
    return _newer(marks, kind, (event["epoch"], event["seq"]))


def _name(phase: Any) -> str | None:
    """A phase name as the projection keeps it (bounded), or None."""
    return phase[:MAX_PHASE_NAME] if isinstance(phase, str) else None


def thin(points: list[CostPoint], limit: int) -> list[CostPoint]:
    """Bound ``points``: drop every second point of the older half until it fits."""
    while len(points) > limit:
        half = len(points) // 2
        older = [p for i, p in enumerate(points[:half]) if i % 2 == 0]
        points = older + points[half:]
    return points


def apply(
    projection: Projection, marks: Marks, event: EventView, *, cost_points: int = 500
) -> tuple[Projection, Marks]:
    """The projection and marks after ``event``; the arguments are left unchanged."""
    kind = event["type"]
    data = event["data"]
    key: Key = (event["epoch"], event["seq"])
    out: Projection = {**projection}
    out["revision"] = projection.get("revision", 0) + 1
    stamp = event["timestamp"]
    if out["created_at"] is None or stamp < out["created_at"]:
        out["created_at"] = stamp
    if out["updated_at"] is None or stamp > out["updated_at"]:
        out["updated_at"] = stamp

    if kind == "workflow_update":
        if _fresh(event, marks, kind, None):
            # The agent sends the whole state file each time: the newest one is the state.
            out["state"] = {k: v for k, v in data.items() if k != "changed"}
            marks = _advance(marks, kind, event)
    elif kind == "cost_update":
        out["cost_points"] = _add_point(projection["cost_points"], event, cost_points)
        if _fresh(event, marks, kind, None):
            out["cost"] = {
                "current_cost": data["current_cost"],
                "settled_cost": data.get("settled_cost"),
                "final": data["final"],
                "estimated_share": data.get("estimated_share"),
                "estimate_complete": data.get("estimate_complete"),
                "tokens": dict(data["tokens"]),
                "breakdown": {k: dict(v) for k, v in data["breakdown"].items()},
            }
            marks = _advance(marks, kind, event)
    elif kind == "agent_status":
        if _fresh(event, marks, kind, projection["agent"]["last_heartbeat"]):
            out["agent"] = {
                "state": data["state"],
                "version": data["version"],
                "last_heartbeat": stamp,
                "outbox_depth": data["outbox_depth"],
                "oldest_undelivered_age": data["oldest_undelivered_age"],
                "last_delivery_error": data["last_delivery_error"],
                "storage_error": data.get("storage_error"),
                "dead_letters": data.get("dead_letters"),
            }
            marks = _advance(marks, kind, event)
    elif kind == "phase_update":
        out, marks = _phase(out, marks, event, key)
    elif kind == "workflow_failed":
        out["status"] = "failed"
        if _newer(marks, kind, key):
            out["failed_phase"] = _name(data.get("current_phase"))
            out["last_error"] = data.get("error_excerpt") or data.get("reason")
            out["ended_at"] = stamp
            marks = _advance(marks, kind, event)
    elif kind == "workflow_completed":
        out, marks = _completed(out, marks, event, key)
    return out, marks


def _add_point(points: list[CostPoint], event: EventView, limit: int) -> list[CostPoint]:
    data = event["data"]
    point: CostPoint = {
        "t": event["timestamp"],
        "cost": float(data["current_cost"]),
        "phase": _name(data.get("current_phase")),
    }
    if not points or points[-1]["t"] <= point["t"]:
        return thin([*points, point], limit)
    at = bisect.bisect_right(points, point["t"], key=lambda p: p["t"])
    return thin([*points[:at], point, *points[at:]], limit)


def _record_phases(
    projection: Projection, marks: Marks, phases: list[str], key: Key
) -> tuple[Projection, Marks]:
    """Add ``phases`` to the completed ones, each keyed by the earliest event listing it."""
    known = dict(marks["phases"])
    for index, phase in enumerate(phases):
        order = [key[0], key[1], index]
        if phase in known:
            known[phase] = min(known[phase], order)
        elif len(known) < MAX_PHASES:
            known[phase] = order
    completed = sorted(known, key=lambda p: (known[p], p))
    costs = dict(projection["phase_costs"])
    for phase in completed:
        costs.setdefault(phase, None)
    return (
        {**projection, "completed_phases": completed, "phase_costs": costs},
        {**marks, "phases": known},
    )


def _phase(
    projection: Projection, marks: Marks, event: EventView, key: Key
) -> tuple[Projection, Marks]:
    data = event["data"]
    done = _name(data.get("completed_phase"))
    listed = [_name(p) or "" for p in data.get("completed_phases") or []]
    if done and done not in listed:
        listed.append(done)
    projection, marks = _record_phases(projection, marks, listed, key)
    if done and done in marks["phases"]:
        last = marks["phase_cost_keys"].get(done)
        if last is None or list(key) > last:
            costs = dict(projection["phase_costs"])
            costs[done] = data.get("phase_cost")
            projection = {**projection, "phase_costs": costs}
            marks = {**marks, "phase_cost_keys": {**marks["phase_cost_keys"], done: list(key)}}
    if event["seq"] != 0 and _newer(marks, "phase_update", key):
        projection = {**projection, "current_phase": _name(data.get("current_phase"))}
        marks = _advance(marks, "phase_update", event)
    return projection, marks


def _completed(
    projection: Projection, marks: Marks, event: EventView, key: Key
) -> tuple[Projection, Marks]:
    data = event["data"]
    listed = [_name(p) or "" for p in data["completed_phases"]]
    projection, marks = _record_phases(projection, marks, listed, key)
    if projection["status"] == "failed" or not _newer(marks, "workflow_completed", key):
        return projection, marks
    marks = _advance(marks, "workflow_completed", event)
    return {**projection, "status": "completed", "ended_at": event["timestamp"]}, marks
