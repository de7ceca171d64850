"""What one batch of the pipeline carries, and the run's records its steps read back.

A batch is one store transaction (see agent.pipeline); its steps (agent.pipeline_progress and
agent.pipeline_cost) share it, and each reads what the other recorded: cost is charged to the
phase current as recorded, and a completed phase reports the cost recorded for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from agent.events import Source
from agent.layout import PHASES, STATE, FileKey
from agent.outbox import Transaction

#: Bound on the run-wide breakdown by phase, whose keys come from files (see account.fold_key).
MAX_PHASES = 64
#: What one isolated step of a batch handles: one file, the run's cost, or how it ended.
Step = FileKey | Literal["cost", "ending"]


@dataclass
class Outcome:
    """What one batch did: events queued, and paths to look at again soon."""

    emitted: int = 0
    retry: set[FileKey] = field(default_factory=set)
    more: set[FileKey] = field(default_factory=set)


@dataclass
class Batch:
    tx: Transaction
    source: Source
    outcome: Outcome = field(default_factory=Outcome)
    cost_changed: bool = False
    #: Transcript bytes this batch may still read (None: no bound over the batch).
    budget: int | None = None


def current_phase(tx: Transaction) -> str | None:
    """The phase now current as last recorded: completed_phases.json, else the state's."""
    phases = tx.get_json(PHASES)
    if phases and phases.get("current"):
        return str(phases["current"])
    state = tx.get_json(STATE)
    phase = state.get("current_phase") if isinstance(state, dict) else None
    return phase if isinstance(phase, str) and phase else None


def saved_cost(tx: Transaction) -> dict[str, Any]:
    """The run's cost as last recorded (see agent.pipeline_cost)."""
    saved: dict[str, Any] = tx.get_json("cost") or {
        "reported": 0.0,
        "by_phase": {},
        "final": False,
        "tokens": None,
    }
    saved.setdefault("by_agent", {})  # absent from rows saved by earlier versions
    return saved
