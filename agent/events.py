"""The events the agent sends: one envelope, one typed ``data`` model per event type.

Every event is POSTed as JSON to ``{backend.url}{backend.event_path}`` with ``{type}`` filled in.
``event_id`` never changes across retries and is sent as the ``Idempotency-Key`` header, so a
backend that deduplicates by it sees each event once. ``seq`` strictly increases per ADW and
survives restarts; a gap means a coalesced snapshot was replaced by a later one.

The one exception is ``seq`` 0: an ``agent_status`` sent while the store cannot be written (disk
full), which therefore could not be queued. It is sent once, best effort, outside the sequence,
so it never reorders or stands in for a queued event.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

EventType = Literal[
    "workflow_update",
    "phase_update",
    "workflow_failed",
    "workflow_completed",
    "cost_update",
    "agent_status",
]
Source = Literal["event", "sync"]

#: Snapshots carry the whole current picture, so an unsent one can be replaced by a later one.
#: Failures and phase transitions are facts that happened once: they are never coalesced.
COALESCIBLE: frozenset[str] = frozenset({"workflow_update", "cost_update", "agent_status"})


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkflowUpdate(BaseModel):
    """Every field of ``adw_state.json`` that is present, flat, plus ``changed``."""

    model_config = ConfigDict(extra="allow")

    changed: list[str] = Field(
        description="Keys that differ from the last state the agent emitted (all keys at first)."
    )


class PhaseUpdate(_Data):
    current_phase: str | None
    status: Literal["running", "completed"]
    completed_phases: list[str]
    phase_cost: float | None = Field(
        default=None,
        description="Cost accrued while the phase that just completed was current.",
    )
    completed_phase: str | None = Field(
        default=None, description="The phase this update completes, if any."
    )


class WorkflowFailed(_Data):
    reason: str
    error_excerpt: str = Field(
        description="The bounded tail of the log written last (error.log, a script folder's "
        "execution.log or subprocess.log)."
    )
    current_phase: str | None


class WorkflowCompleted(_Data):
    """The run ended normally: ``end_time`` was written after its last phase completed."""

    final_cost: float = Field(description="The ADW's cost when the run ended, in USD.")
    completed_phases: list[str]
    duration_s: float | None = Field(
        default=None, description="Seconds from the run's first observed state to end_time."
    )
    end_time: str | None = Field(default=None, description="end_time as the state file has it.")


class Breakdown(_Data):
    by_agent: dict[str, float]
    by_model: dict[str, float]
    by_phase: dict[str, float]


class TokenCounts(_Data):
    input: int
    output: int
    cache_creation: int
    cache_read: int


class CostUpdate(_Data):
    current_cost: float = Field(description="Cumulative USD for the ADW.")
    cost_delta: float = Field(
        description="Change since the previous cost_update; negative only when a result line "
        "corrects an estimate."
    )
    final: bool = Field(description="Every transcript's latest attempt has a result line.")
    settled_cost: float | None = Field(
        default=None,
        description="USD from result lines only; current_cost minus this is the estimate.",
    )
    estimated_share: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Share of current_cost that is estimated rather than settled (0..1).",
    )
    current_phase: str | None
    estimate_complete: bool
    breakdown: Breakdown
    tokens: TokenCounts


class AgentStatus(_Data):
    state: Literal["starting", "running", "stopping"]
    version: str
    adw_id: str
    outbox_depth: int
    oldest_undelivered_age: float | None = Field(description="Seconds, or null when empty.")
    last_delivery_error: str | None
    storage_error: str | None = None
    dead_letters: int = 0


DATA_MODELS: dict[str, type[BaseModel]] = {
    "workflow_update": WorkflowUpdate,
    "phase_update": PhaseUpdate,
    "workflow_failed": WorkflowFailed,
    "workflow_completed": WorkflowCompleted,
    "cost_update": CostUpdate,
    "agent_status": AgentStatus,
}


class Event(BaseModel):
    """The envelope. ``data`` is one of the models above, by ``type``."""

    model_config = ConfigDict(extra="forbid")

    type: EventType
    event_id: str
    adw_id: str
    seq: int = Field(
        ge=0,
        description="Strictly increasing per ADW; 0 only on an agent_status sent outside the "
        "outbox because the store could not be written.",
    )
    epoch: int = Field(
        default=0,
        ge=0,
        description="The stream seq belongs to: fixed when the agent's store for this ADW is "
        "created (milliseconds since the Unix epoch). A store that was lost or reset starts a "
        "larger epoch, so (epoch, seq) orders every event of an ADW; 0 from agents that predate "
        "epochs.",
    )
    timestamp: str = Field(description="ISO 8601, UTC, when the agent observed the change.")
    source: Source
    data: dict[str, Any]


def check_data(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    """Validate ``data`` against its model and return it as plain JSON data."""
    return DATA_MODELS[event_type].model_validate(data).model_dump(mode="json")


def utc_now() -> str:
    """Now as the envelope's ``timestamp``: ISO 8601, UTC, milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def envelope(
    event_type: str,
    adw_id: str,
    seq: int,
    source: Source,
    data: dict[str, Any],
    *,
    epoch: int = 0,
) -> dict[str, Any]:
    """A new event: the :class:`Event` envelope around ``data`` (already checked with
    :func:`check_data`), with a fresh ``event_id`` and the current time. ``epoch`` names the
    stream ``seq`` belongs to (0 outside any stream: a status sent directly)."""
    return {
        "type": event_type,
        "event_id": str(uuid.uuid4()),
        "adw_id": adw_id,
        "seq": seq,
        "epoch": epoch,
        "timestamp": utc_now(),
        "source": source,
        "data": data,
    }
