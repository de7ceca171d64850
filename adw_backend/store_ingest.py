"""The write path: events stored once, folded into their workflows' projections.

Each request is one transaction: the events are inserted with ``ON CONFLICT DO NOTHING`` (the
``event_id`` primary key is the deduplication, across restarts and replicas), and only the
ones actually inserted are folded into their workflows' projections, each workflow row locked
(``SELECT … FOR UPDATE`` on PostgreSQL; SQLite has one writer, serialised by
:meth:`~adw_backend.store_schema.Database.turn`) so that two replicas never lose each other's
update; so each applied event adds exactly one to its workflow's ``revision``, whichever
replica folds it. On PostgreSQL the same transaction sends a ``NOTIFY`` so the other replicas
broadcast what this one applied. On SQLite the projections just committed go to the
:class:`~adw_backend.store_cache.ProjectionCache`, and the next fold starts from there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from adw_backend.errors import NotFound
from adw_backend.projection import EventView, Marks, Projection, apply, new_marks, new_projection
from adw_backend.store_cache import ProjectionCache
from adw_backend.store_schema import Applied, Database, events, now, to_json, workflows

#: Ids looked up per statement: under SQLite's smallest limit on bound parameters (999).
_SQLITE_CHUNK = 900


def _insert_pg(
    conn: Connection, batch: Sequence[tuple[EventView, str]]
) -> list[tuple[EventView, str]]:
    """Insert, and keep what was inserted: ``ON CONFLICT DO NOTHING RETURNING`` is exact
    even when another replica inserts the same event at the same moment."""
    received = now()
    rows = [
        {
            "event_id": ev["event_id"],
            "adw_id": ev["adw_id"],
            "epoch": ev["epoch"],
            "seq": ev["seq"],
            "type": ev["type"],
            "timestamp": ev["timestamp"],
            "source": source,
            "data": ev["data"],
            "received_at": received,
        }
        for ev, source in batch
    ]
    statement = (
        postgresql.insert(events).on_conflict_do_nothing(index_elements=["event_id"])
    ).returning(events.c.event_id)
    inserted = {row[0] for row in conn.execute(statement, rows)}
    # A batch may hold the same event twice: the first one counts.
    new: list[tuple[EventView, str]] = []
    for item in batch:
        eid = item[0]["event_id"]
        if eid in inserted:
            inserted.discard(eid)
            new.append(item)
    return new


def _insert_sqlite(
    conn: Connection,
    batch: Sequence[tuple[EventView, str]],
    stamp: Callable[[datetime], object],
) -> list[tuple[EventView, str]]:
    """Look up which events are known, insert the others with one plain ``executemany``
    (``received_at`` as ``stamp`` encodes it).

    Exact because this process is SQLite's one writer and holds the write lock (a second
    ``serve`` on the same file is not supported). Going around SQLAlchemy's per-row
    parameter handling here is most of a batch's time saved.
    """
    ids = [ev["event_id"] for ev, _ in batch]
    known: set[str] = set()
    for start in range(0, len(ids), _SQLITE_CHUNK):
        chunk = ids[start : start + _SQLITE_CHUNK]
        marks = ",".join("?" * len(chunk))
        found = conn.exec_driver_sql(
            f"SELECT event_id FROM adw_events WHERE event_id IN ({marks})",  # noqa: S608
            tuple(chunk),
        )
        known.update(row[0] for row in found)
    new: list[tuple[EventView, str]] = []
    for item in batch:
        eid = item[0]["event_id"]
        if eid not in known:
            known.add(eid)  # a batch may hold the same event twice: the first one counts
            new.append(item)
    if new:
        received = stamp(now())
        conn.exec_driver_sql(
            "INSERT INTO adw_events (event_id, adw_id, epoch, seq, type, timestamp, source,"
            " data, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    ev["event_id"],
                    ev["adw_id"],
                    ev["epoch"],
                    ev["seq"],
                    ev["type"],
                    ev["timestamp"],
                    source,
                    ev.get("data_json") or to_json(ev["data"]),
                    received,
                )
                for ev, source in new
            ],
        )
    return new


@dataclass(frozen=True, slots=True)
class Outcome:
    applied: list[Applied]
    duplicates: int


class Writer:
    """Ingest and delete: every write of the store."""

    def __init__(
        self,
        db: Database,
        cache: ProjectionCache | None,
        *,
        cost_points: int,
        notify_channel: str,
        origin: str,
    ) -> None:
        self._db = db
        self._cache = cache
        self._cost_points = cost_points
        self._channel = notify_channel
        self._origin = origin

    def ingest(
        self,
        batch: Sequence[tuple[EventView, str]],
        committed: Callable[[list[Applied]], None] | None = None,
    ) -> Outcome:
        """Store ``batch`` (events and their sources) and fold the new ones, atomically.

        ``committed(applied)`` is called right after the commit, before the next write on
        SQLite begins, so that what it publishes is in commit order.
        """
        if not batch:
            return Outcome([], 0)
        with self._db.turn():
            with self._db.begin(write=True) as conn:
                if self._db.is_postgres:
                    new = _insert_pg(conn, batch)
                else:
                    new = _insert_sqlite(conn, batch, self._db.sqlite_time)
                applied, written = self._fold(conn, new)
            if self._cache is not None:
                for adw_id, (projection, marks, size) in written.items():
                    self._cache.put(adw_id, projection, marks, size)
            if committed is not None and applied:
                committed(applied)
        return Outcome(applied, len(batch) - len(applied))

    def _fold(
        self, conn: Connection, new: list[tuple[EventView, str]]
    ) -> tuple[list[Applied], dict[str, tuple[Projection, Marks, int]]]:
        """Fold ``new`` into their workflows and write them; what was written, with the size
        of each projection's JSON, is for the cache once the transaction commits."""
        if not new:
            return [], {}
        ids = sorted({ev["adw_id"] for ev, _ in new})
        current: dict[str, tuple[Projection, Marks]] = {}
        missing = ids
        if self._cache is not None:
            missing = []
            for adw_id in ids:
                hit = self._cache.get(adw_id)
                if hit is None:
                    missing.append(adw_id)
                else:
                    current[adw_id] = hit
        if missing:
            current.update(self._lock_workflows(conn, missing))
        applied: list[Applied] = []
        for ev, source in new:
            projection, marks = current[ev["adw_id"]]
            projection, marks = apply(projection, marks, ev, cost_points=self._cost_points)
            current[ev["adw_id"]] = (projection, marks)
            applied.append(Applied(ev, source, projection))
        if self._cache is not None:
            return applied, self._write_sqlite(conn, current)
        conn.execute(
            workflows.update()
            .where(workflows.c.adw_id == sa.bindparam("key"))
            .values(
                status=sa.bindparam("status"),
                projection=sa.bindparam("projection"),
                marks=sa.bindparam("marks"),
                updated_at=sa.bindparam("updated"),
            ),
            [
                {
                    "key": adw_id,
                    "status": projection["status"],
                    "projection": projection,
                    "marks": marks,
                    "updated": projection["updated_at"],
                }
                for adw_id, (projection, marks) in current.items()
            ],
        )
        if self._db.is_postgres and self._channel:
            self._notify(
                conn,
                [
                    to_json({"event_id": a.event["event_id"], "origin": self._origin})
                    for a in applied
                ],
            )
        return applied, {}

    def _write_sqlite(
        self, conn: Connection, current: dict[str, tuple[Projection, Marks]]
    ) -> dict[str, tuple[Projection, Marks, int]]:
        """The projections written with one plain ``executemany`` (the JSON encoded here, once,
        and its size kept for the cache's bound)."""
        written: dict[str, tuple[Projection, Marks, int]] = {}
        rows: list[tuple[str, str, str, str | None, str]] = []
        for adw_id, (projection, marks) in current.items():
            text = to_json(projection)
            rows.append(
                (projection["status"], text, to_json(marks), projection["updated_at"], adw_id)
            )
            written[adw_id] = (projection, marks, len(text))
        conn.exec_driver_sql(
            "UPDATE adw_workflows SET status = ?, projection = ?, marks = ?, updated_at = ?"
            " WHERE adw_id = ?",
            rows,
        )
        return written

    def _notify(self, conn: Connection, payloads: list[str]) -> None:
        """Queue one notice per payload, sent by PostgreSQL when the transaction commits;
        one statement for all of them (a round trip each would dominate a batch)."""
        if not (self._db.is_postgres and self._channel and payloads):
            return
        conn.execute(
            sa.text("SELECT pg_notify(:channel, p) FROM unnest(CAST(:payloads AS text[])) AS p"),
            {"channel": self._channel, "payloads": payloads},
        )

    def _lock_workflows(
        self, conn: Connection, ids: list[str]
    ) -> dict[str, tuple[Projection, Marks]]:
        """The workflows ``ids``, created if new and locked until the transaction ends.

        Rows are created and locked in sorted order so two replicas cannot deadlock.
        """
        insert = postgresql.insert(workflows) if self._db.is_postgres else sqlite.insert(workflows)
        conn.execute(
            insert.on_conflict_do_nothing(index_elements=["adw_id"]),
            [
                {
                    "adw_id": adw_id,
                    "status": "running",
                    "projection": new_projection(adw_id),
                    "marks": new_marks(),
                    "updated_at": None,
                }
                for adw_id in ids
            ],
        )
        query = (
            sa.select(workflows.c.adw_id, workflows.c.projection, workflows.c.marks)
            .where(workflows.c.adw_id.in_(ids))
            .order_by(workflows.c.adw_id)
        )
        if self._db.is_postgres:
            query = query.with_for_update()
        return {row.adw_id: (row.projection, row.marks) for row in conn.execute(query)}

    def delete(self, adw_id: str) -> None:
        """Forget a workflow and its events (an operator's decision, e.g. a failed run)."""
        with self._db.begin(write=True) as conn:
            if self._cache is not None:
                # Under the write turn: no write can put it back before the delete commits.
                self._cache.discard(adw_id)
            gone = conn.execute(workflows.delete().where(workflows.c.adw_id == adw_id)).rowcount
            conn.execute(events.delete().where(events.c.adw_id == adw_id))
            if not gone:
                raise NotFound(f"no workflow {adw_id!r}")
            self._notify(conn, [to_json({"deleted": adw_id, "origin": self._origin})])
