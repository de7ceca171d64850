"""How a run ends, decided from what the run directory says; no I/O here.

tac-webbuilder writes ``end_time`` into ``adw_state.json`` once a run is over, and that is the
only end marker it writes. What the run was doing at that moment tells success from failure:

- the orchestrator writes ``end_time`` after the last phase has completed, so no phase is
  current in ``completed_phases.json``: the run **completed**;
- the failure clean-up writes ``end_time`` while the failing phase is still ``current``: the run
  **failed** in that phase.

``current: null`` alone is no end: it is also what the file says between two phases. Older
lineages that write ``status: "failed"`` or ``error.log`` are handled by the pipeline as before.

An ending is reported once per run. The ``end_time`` it was reported for is remembered (see
:class:`Reported`): a run resumed and ended again writes a new ``end_time``, and that is a new
ending; the same ``end_time`` seen again (a restart, a rescan, a rewrite of the state) is not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, TypedDict

EndKind = Literal["failed", "completed"]


class Reported(TypedDict):
    """What the store keeps about the ending already reported."""

    end_time: str
    kind: EndKind


@dataclass(frozen=True, slots=True)
class Ending:
    """A run that ended: how, in which phase, and when."""

    kind: EndKind
    end_time: str
    current_phase: str | None
    completed_phases: tuple[str, ...]

    @property
    def reason(self) -> str:
        if self.kind == "failed":
            if self.current_phase is None:
                return "the run ended with status 'failed'"
            return f"the run ended while phase {self.current_phase!r} was current"
        return "the run ended after its last phase completed"


def end_time_of(state: Mapping[str, object] | None) -> str | None:
    """``end_time`` from the state, when it says the run is over (a non-empty string)."""
    value = None if state is None else state.get("end_time")
    return value if isinstance(value, str) and value.strip() else None


def decide(
    state: Mapping[str, object] | None,
    completed: Sequence[str],
    current: str | None,
    reported: Mapping[str, object] | None,
) -> Ending | None:
    """The ending to report now, or None.

    ``completed`` and ``current`` must come from a read of completed_phases.json made *after*
    the state was read: the orchestrator completes the last phase before it writes
    ``end_time``, so an older read could still show that phase current and mistake a success
    for a failure.
    """
    end_time = end_time_of(state)
    if end_time is None:
        return None
    if isinstance(reported, Mapping) and reported.get("end_time") == end_time:
        return None
    # An older lineage's failed status is a failure whatever the phases say.
    failed = bool(current) or (state is not None and state.get("status") == "failed")
    kind: EndKind = "failed" if failed else "completed"
    return Ending(kind, end_time, current or None, tuple(completed))


def parse_time(value: object) -> datetime | None:
    """An ISO 8601 time as written by the state (naive times are taken as UTC), or None."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def duration_s(start: object, end: object) -> float | None:
    """Seconds from ``start`` to ``end`` (ISO 8601 strings); None when either is missing,
    unparseable, or the end is before the start."""
    begun, ended = parse_time(start), parse_time(end)
    if begun is None or ended is None:
        return None
    seconds = (ended - begun).total_seconds()
    return round(seconds, 3) if seconds >= 0 else None


def completed_data(ending: Ending, final_cost: float, started: object) -> dict[str, object]:
    """The data of a ``workflow_completed``."""
    return {
        "final_cost": round(final_cost, 10),
        "completed_phases": list(ending.completed_phases),
        "duration_s": duration_s(started, ending.end_time),
        "end_time": ending.end_time,
    }


def failed_data(ending: Ending, excerpt: str) -> dict[str, object]:
    """The data of a ``workflow_failed`` for an ending in a phase."""
    return {
        "reason": ending.reason,
        "error_excerpt": excerpt,
        "current_phase": ending.current_phase,
    }
