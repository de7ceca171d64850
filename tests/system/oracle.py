"""What must hold once the faults stop, read from the parts' own records, never from a process's
word about itself.

- **Exactly once.** Each agent's store keeps, per ADW stream, the last seq it gave and how many
  of its seqs were superseded before sending (an unsent snapshot replaced by a newer one) or
  dead-lettered. Every other seq must be in PostgreSQL's event table exactly once, under that
  stream's epoch: a missing seq is a lost event, a seq held twice (under two ids) is a doubled
  one.
- **Truth.** Each run's projection in PostgreSQL equals what the writer wrote
  (:class:`~tests.system.workload.Truth`): state, phases, status, failed phase, and the cost
  to 1e-9.
- **The screen.** The viewer's last picture equals the database's projections.
"""

from __future__ import annotations

import math
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psycopg

from agent.outbox import DeliveryTotals, StoreView
from tests.faults import DB_NAME, store_db
from tests.system.workload import Truth

COST_TOLERANCE = 1e-9


def consumed_offset(storage: Path, adw_id: str, agent: str) -> int:
    """How far the agent has durably read one transcript of a run (-1: not yet)."""
    if not (storage / DB_NAME).exists():
        return -1
    try:
        with store_db(storage) as db:
            row = db.execute(
                "SELECT value FROM files WHERE adw_id = ? AND key = ?",
                (adw_id, f"transcript:{agent}"),
            ).fetchone()
    except sqlite3.Error:
        return -1
    return -1 if row is None else int(orjson.loads(row[0])["position"]["offset"])


#: What a count reads as while the store cannot be read (an agent starting, a full disk):
#: never "done".
UNREADABLE = 1 << 62


def queued_since(storage: Path, before: float) -> int:
    """Events queued at or before ``before`` (wall clock) and not yet acknowledged."""
    if not (storage / DB_NAME).exists():
        return 0
    try:
        with store_db(storage) as db:
            row = db.execute("SELECT COUNT(*) FROM outbox WHERE created <= ?", (before,)).fetchone()
    except sqlite3.Error:
        return UNREADABLE
    return int(row[0])


def depth(storage: Path) -> tuple[int, int]:
    """(events queued, dead letters)."""
    try:
        with store_db(storage) as db:
            queued = int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
            dead = int(db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])
    except sqlite3.Error:
        return UNREADABLE, UNREADABLE
    return queued, dead


def revisions_unlike_events(conn: psycopg.Connection[Any]) -> list[str]:
    """Workflows whose ``revision`` (+1 for every event folded into it) differs from the events
    stored for them: an event folded twice, or stored and never folded."""
    rows = conn.execute(
        "SELECT w.adw_id, w.projection, (SELECT COUNT(*) FROM adw_events e "
        "WHERE e.adw_id = w.adw_id) FROM adw_workflows w"
    ).fetchall()
    wrong = []
    for adw_id, projection, stored in rows:
        shown = projection if isinstance(projection, dict) else orjson.loads(projection)
        if shown.get("revision") != stored:
            wrong.append(f"{adw_id}: revision {shown.get('revision')!r}, {stored} events stored")
    return wrong


@dataclass(frozen=True)
class Stream:
    """One ADW stream as its agent's store accounts for it (``adw-agent status`` shows the
    same): the backend must hold ``owed`` of its events, seqs ``counted_from + 1`` to
    ``last_seq`` less the superseded and dead-lettered ones."""

    adw_id: str
    epoch: int
    last_seq: int
    counted_from: int
    owed: int
    queued: int


def delivery(storage: Path, host_status: str) -> tuple[list[Stream], DeliveryTotals]:
    """The store's own delivery counts, read as ``adw-agent status`` reads them."""
    with StoreView(storage, host_status) as view:
        counts = view.delivery_counts()
    found = [
        Stream(adw_id, s["epoch"], s["seq"], s["counted_from"], s["expected"], s["queued"])
        for adw_id, s in counts["streams"].items()
        if s["epoch"] is not None
    ]
    return found, counts["totals"]


# -- PostgreSQL ---------------------------------------------------------------------------------


def projections(conn: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
    rows = conn.execute("SELECT adw_id, projection FROM adw_workflows").fetchall()
    out: dict[str, dict[str, Any]] = {}
    for adw_id, projection in rows:
        out[str(adw_id)] = projection if isinstance(projection, dict) else orjson.loads(projection)
    return out


def applied_seqs(conn: psycopg.Connection[Any]) -> dict[tuple[str, int], Counter[int]]:
    """(adw_id, epoch) → how many rows hold each seq (seq 0, out of band, left out)."""
    out: dict[tuple[str, int], Counter[int]] = {}
    for adw_id, epoch, seq in conn.execute(
        "SELECT adw_id, epoch, seq FROM adw_events WHERE seq > 0"
    ).fetchall():
        out.setdefault((str(adw_id), int(epoch)), Counter())[int(seq)] += 1
    return out


# -- the checks ---------------------------------------------------------------------------------


def truth_mismatches(truth: Truth, shown: dict[str, Any] | None) -> list[str]:
    """How a projection differs from the run's truth (empty: equal)."""
    if shown is None:
        return ["no projection"]
    wrong = []
    if shown.get("status") != truth.outcome:
        wrong.append(f"status {shown.get('status')!r} != {truth.outcome!r}")
    if shown.get("state") != truth.state:
        wrong.append(f"state {shown.get('state')!r} != {truth.state!r}")
    if shown.get("completed_phases") != truth.completed_phases:
        wrong.append(f"completed {shown.get('completed_phases')} != {truth.completed_phases}")
    if shown.get("current_phase") != truth.current_phase:
        wrong.append(f"current {shown.get('current_phase')!r} != {truth.current_phase!r}")
    if truth.outcome == "failed" and shown.get("failed_phase") != truth.failed_phase:
        wrong.append(f"failed phase {shown.get('failed_phase')!r} != {truth.failed_phase!r}")
    cost = (shown.get("cost") or {}).get("current_cost")
    if not isinstance(cost, int | float) or not math.isclose(
        cost, truth.cost, rel_tol=0.0, abs_tol=COST_TOLERANCE
    ):
        wrong.append(f"cost {cost!r} != {truth.cost!r}")
    return wrong


@dataclass
class Audit:
    """The exactly-once audit of every agent's streams against the event table."""

    events_checked: int = 0
    lost: int = 0
    doubled: int = 0
    strays: int = 0
    problems: list[str] = field(default_factory=list)


def audit(
    agent_streams: dict[str, list[Stream]], applied: dict[tuple[str, int], Counter[int]]
) -> Audit:
    result = Audit()
    owned: set[tuple[str, int]] = set()
    for host, found in agent_streams.items():
        for stream in found:
            key = (stream.adw_id, stream.epoch)
            owned.add(key)
            seqs = applied.get(key, Counter())
            result.events_checked += sum(seqs.values())
            doubled = sum(n - 1 for n in seqs.values() if n > 1)
            outside = [s for s in seqs if not stream.counted_from < s <= stream.last_seq]
            missing = max(0, stream.owed - len(seqs))
            result.doubled += doubled
            result.lost += missing
            if stream.queued or doubled or missing or outside or len(seqs) > stream.owed:
                result.problems.append(
                    f"{host} {stream.adw_id} epoch {stream.epoch}: owed {stream.owed} "
                    f"(seqs {stream.counted_from + 1}-{stream.last_seq}), still queued "
                    f"{stream.queued}, applied {len(seqs)} distinct seqs, doubled {doubled}, "
                    f"outside the stream {outside[:5]}"
                )
    for key, seqs in applied.items():
        if key not in owned:
            result.strays += sum(seqs.values())
            result.problems.append(f"{key}: {sum(seqs.values())} events no agent's stream owns")
    return result


def view_mismatches(
    view: dict[str, dict[str, Any]], database: dict[str, dict[str, Any]]
) -> list[str]:
    wrong = []
    for adw_id in sorted(set(view) | set(database)):
        if view.get(adw_id) != database.get(adw_id):
            mine, theirs = view.get(adw_id), database.get(adw_id)
            if mine is None or theirs is None:
                wrong.append(f"{adw_id}: only in {'the database' if mine is None else 'the view'}")
                continue
            keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            wrong.append(f"{adw_id}: differs in {keys}")
    return wrong
