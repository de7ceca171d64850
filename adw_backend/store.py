"""The only owner of SQL: tables, transactions, and the translation of database errors.

SQLAlchemy Core, one code path for SQLite (the embedded default) and PostgreSQL. Each
request is one transaction: the events are inserted with ``ON CONFLICT DO NOTHING`` (the
``event_id`` primary key is the deduplication, across restarts and replicas), and only the
ones actually inserted are folded into their workflows' projections, each workflow row locked
(``SELECT … FOR UPDATE`` on PostgreSQL; SQLite has one writer, serialised here) so that two
replicas never lose each other's update; so each applied event adds exactly one to its
workflow's ``revision``, whichever replica folds it. On PostgreSQL the same transaction sends a
``NOTIFY`` so the other replicas broadcast what this one applied.

On SQLite this process is the one writer, so it keeps the projections it last committed in
memory (bounded, least recently used out first) instead of reading them back and decoding
them for every request. The cache is filled only after a commit and emptied of a workflow as it
is deleted, both while this process holds its write turn; a restart starts empty and reads the
file. PostgreSQL, where other replicas write too, always reads the rows it locks.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from adw_backend.errors import CommitUnknown, DatabaseUnavailable, InvalidEvent, NotFound
from adw_backend.projection import (
    EventView,
    Marks,
    Projection,
    Status,
    apply,
    new_marks,
    new_projection,
    upgrade,
)

log = logging.getLogger(__name__)

#: Projections kept in memory on SQLite: at most this many workflows, and this many bytes of
#: their JSON (a workflow whose JSON is over an eighth of it is never kept).
CACHE_WORKFLOWS = 2000
CACHE_BYTES = 32 * 1024 * 1024

#: libpq options of every PostgreSQL connection: a database that does not answer is an error
#: within seconds (never a hang), and a connection whose server vanished without closing it
#: (a host gone, a network cut) is found dead by TCP keepalives instead of waited on forever.
#: The server settings are enforced by PostgreSQL itself, whatever state a replica is in: a
#: request waits at most ``lock_timeout`` for a workflow another transaction holds (then 503,
#: and the agent sends again), and the transaction of a replica that stopped answering in the
#: middle of it (frozen, or its host cut off, so that its connection never closes) is rolled
#: back after ``idle_in_transaction_session_timeout``, releasing its workflows.
CONNECT_ARGS: dict[str, str | int] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "options": "-c lock_timeout=10s -c idle_in_transaction_session_timeout=30s",
}


def pg_connect_args(given_options: str | None) -> dict[str, str | int]:
    """:data:`CONNECT_ARGS`, keeping the ``options`` the database URL gives (after ours, so
    that a setting it spells out wins)."""
    args = dict(CONNECT_ARGS)
    if given_options:
        args["options"] = f"{args['options']} {given_options}"
    return args


#: Seconds a request waits for a pooled connection before it is answered 503.
POOL_TIMEOUT = 5.0

#: Ids looked up per statement: under SQLite's smallest limit on bound parameters (999).
_SQLITE_CHUNK = 900

metadata = sa.MetaData()

events = sa.Table(
    "adw_events",
    metadata,
    sa.Column("event_id", sa.String(200), primary_key=True),
    sa.Column("adw_id", sa.String(200), nullable=False),
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("type", sa.String(40), nullable=False),
    sa.Column("timestamp", sa.String(64), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("adw_events_order", "adw_id", "epoch", "seq"),
)

workflows = sa.Table(
    "adw_workflows",
    metadata,
    sa.Column("adw_id", sa.String(200), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("projection", sa.JSON, nullable=False),
    sa.Column("marks", sa.JSON, nullable=False),
    sa.Column("updated_at", sa.String(64), nullable=True),
    sa.Index("adw_workflows_status", "status", "updated_at"),
)


@dataclass(frozen=True, slots=True)
class Applied:
    """One newly stored event and its workflow's projection right after it."""

    event: EventView
    source: str
    projection: Projection


@dataclass(frozen=True, slots=True)
class Outcome:
    applied: list[Applied]
    duplicates: int


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


class _Projections:
    """The projections last committed by this process (SQLite only), least recently used
    first out; bounded in workflows and in bytes of JSON."""

    def __init__(self, max_items: int = CACHE_WORKFLOWS, max_bytes: int = CACHE_BYTES) -> None:
        self._items: OrderedDict[str, tuple[Projection, Marks, int]] = OrderedDict()
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, adw_id: str) -> tuple[Projection, Marks] | None:
        found = self._items.get(adw_id)
        if found is None:
            return None
        self._items.move_to_end(adw_id)
        return found[0], found[1]

    def put(self, adw_id: str, projection: Projection, marks: Marks, size: int) -> None:
        self.discard(adw_id)
        if size > self._max_bytes // 8:
            return
        self._items[adw_id] = (projection, marks, size)
        self._bytes += size
        while len(self._items) > self._max_items or self._bytes > self._max_bytes:
            _, (_, _, gone) = self._items.popitem(last=False)
            self._bytes -= gone

    def discard(self, adw_id: str) -> None:
        found = self._items.pop(adw_id, None)
        if found is not None:
            self._bytes -= found[2]


def _url_option(url: str, name: str) -> str | None:
    try:
        found = sa.engine.make_url(url).query.get(name)
    except sa.exc.ArgumentError:
        return None  # reported where the engine is created
    return found if isinstance(found, str) else None


def _now() -> datetime:
    return datetime.now(UTC)


class Store:
    """The database behind the backend; every method is blocking (run it in a thread)."""

    def __init__(
        self,
        url: str,
        *,
        cost_points: int = 500,
        notify_channel: str = "",
        origin: str = "",
        sqlite_synchronous: Literal["full", "normal"] = "full",
    ) -> None:
        self.is_postgres = url.startswith("postgres")
        options: dict[str, Any] = {"json_serializer": _json, "json_deserializer": orjson.loads}
        if self.is_postgres:
            # Pre-ping: a pooled connection from before a database restart is found dead and
            # replaced when it is taken, so the process recovers by itself.
            options |= {
                "pool_pre_ping": True,
                "pool_size": 10,
                "max_overflow": 20,
                "pool_timeout": POOL_TIMEOUT,
                "connect_args": pg_connect_args(_url_option(url, "options")),
            }
        else:
            options["connect_args"] = {"timeout": 10.0}
        try:
            self.engine: Engine = sa.create_engine(url, **options)
        except (sa.exc.ArgumentError, ImportError, ValueError) as exc:
            raise DatabaseUnavailable(f"database URL cannot be used: {exc}") from None
        if not self.is_postgres:
            synchronous = sqlite_synchronous.upper()

            def pragmas(dbapi_connection: Any, _record: Any) -> None:
                cursor = dbapi_connection.cursor()
                # WAL lets readers (GET, WebSocket snapshots) run while a write commits.
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute(f"PRAGMA synchronous={synchronous}")
                cursor.execute("PRAGMA busy_timeout=10000")
                cursor.close()

            sa.event.listen(self.engine, "connect", pragmas)
        self._cost_points = cost_points
        self._channel = notify_channel
        # Names this process in its notices, so that it does not broadcast its own twice.
        self.origin = origin
        # SQLite has a single writer: taking turns here avoids "database is locked" retries.
        # Reentrant: a write holds it from before its transaction until after its commit.
        self._write_lock = threading.RLock() if not self.is_postgres else None
        self._cache = _Projections() if not self.is_postgres else None
        self._ready = False
        self._setup_lock = threading.Lock()
        # received_at as SQLAlchemy itself would store it, so that it reads back the same.
        self._sqlite_time = events.c.received_at.type.bind_processor(self.engine.dialect) or str

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """This process's turn to write (SQLite), held across a transaction and what follows
        its commit; nothing to take on PostgreSQL."""
        if self._write_lock is None:
            yield
            return
        with self._write_lock:
            yield

    @contextmanager
    def _begin(self, write: bool) -> Iterator[Connection]:
        """One transaction; any driver error leaves as :class:`DatabaseUnavailable`, or as
        :class:`CommitUnknown` when it came from the commit itself."""
        lock = self._write_lock if write else None
        committing = False
        try:
            if lock is not None:
                lock.acquire()
            try:
                if not self._ready:
                    with self._setup_lock:
                        if not self._ready:
                            metadata.create_all(self.engine)
                            self._ready = True
                with self.engine.begin() as conn:
                    yield conn
                    # The work is done; what fails from here on fails in the commit.
                    committing = True
            finally:
                if lock is not None:
                    lock.release()
        except sa.exc.DataError:
            # A value the database refuses (checked input should never get here): the
            # request is at fault, not the database.
            raise InvalidEvent("the database refused a value in the request") from None
        except sa.exc.SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            log.warning("database error: %s", reason[0] if reason else type(exc).__name__)
            if committing:
                raise CommitUnknown("database unavailable") from None
            raise DatabaseUnavailable("database unavailable") from None

    def setup(self) -> None:
        """Create the tables if needed (also done lazily by the first request)."""
        with self._begin(write=True):
            pass

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self._begin(write=False) as conn:
            conn.execute(sa.text("SELECT 1"))

    # -- writes -----------------------------------------------------------------------------

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
        with self._turn():
            with self._begin(write=True) as conn:
                if self.is_postgres:
                    new = self._insert_pg(conn, batch)
                else:
                    new = self._insert_sqlite(conn, batch)
                applied, written = self._fold(conn, new)
            if self._cache is not None:
                for adw_id, (projection, marks, size) in written.items():
                    self._cache.put(adw_id, projection, marks, size)
            if committed is not None and applied:
                committed(applied)
        return Outcome(applied, len(batch) - len(applied))

    def _insert_pg(
        self, conn: Connection, batch: Sequence[tuple[EventView, str]]
    ) -> list[tuple[EventView, str]]:
        """Insert, and keep what was inserted: ``ON CONFLICT DO NOTHING RETURNING`` is exact
        even when another replica inserts the same event at the same moment."""
        received = _now()
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
        self, conn: Connection, batch: Sequence[tuple[EventView, str]]
    ) -> list[tuple[EventView, str]]:
        """Look up which events are known, insert the others with one plain ``executemany``.

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
            received = self._sqlite_time(_now())
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
                        ev.get("data_json") or _json(ev["data"]),
                        received,
                    )
                    for ev, source in new
                ],
            )
        return new

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
        if self.is_postgres and self._channel:
            self._notify(
                conn,
                [_json({"event_id": a.event["event_id"], "origin": self.origin}) for a in applied],
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
            text = _json(projection)
            rows.append(
                (projection["status"], text, _json(marks), projection["updated_at"], adw_id)
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
        if not (self.is_postgres and self._channel and payloads):
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
        insert = postgresql.insert(workflows) if self.is_postgres else sqlite.insert(workflows)
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
        if self.is_postgres:
            query = query.with_for_update()
        return {row.adw_id: (row.projection, row.marks) for row in conn.execute(query)}

    def delete(self, adw_id: str) -> None:
        """Forget a workflow and its events (an operator's decision, e.g. a failed run)."""
        with self._begin(write=True) as conn:
            if self._cache is not None:
                # Under the write turn: no write can put it back before the delete commits.
                self._cache.discard(adw_id)
            gone = conn.execute(workflows.delete().where(workflows.c.adw_id == adw_id)).rowcount
            conn.execute(events.delete().where(events.c.adw_id == adw_id))
            if not gone:
                raise NotFound(f"no workflow {adw_id!r}")
            self._notify(conn, [_json({"deleted": adw_id, "origin": self.origin})])

    # -- reads ------------------------------------------------------------------------------

    def workflows(self, status: Status | None = None, limit: int = 1000) -> list[Projection]:
        """The ``limit`` most recently updated workflows (or those with ``status``)."""
        query = (
            sa.select(workflows.c.projection)
            .order_by(workflows.c.updated_at.desc(), workflows.c.adw_id)
            .limit(limit)
        )
        if status is not None:
            query = query.where(workflows.c.status == status)
        with self._begin(write=False) as conn:
            return [upgrade(row.projection) for row in conn.execute(query)]

    def workflow(self, adw_id: str) -> Projection:
        with self._begin(write=False) as conn:
            row = conn.execute(
                sa.select(workflows.c.projection).where(workflows.c.adw_id == adw_id)
            ).first()
        if row is None:
            raise NotFound(f"no workflow {adw_id!r}")
        return upgrade(row.projection)

    def events(
        self, adw_id: str, *, after_seq: int = -1, after_epoch: int | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Stored events of ``adw_id`` in (epoch, seq) order, as the agent sent them.

        With ``after_epoch``, those after (after_epoch, after_seq); without, those whose seq
        is over ``after_seq`` in any epoch.
        """
        query = sa.select(
            events.c.type,
            events.c.event_id,
            events.c.adw_id,
            events.c.epoch,
            events.c.seq,
            events.c.timestamp,
            events.c.source,
            events.c.data,
        ).where(events.c.adw_id == adw_id)
        if after_epoch is None:
            query = query.where(events.c.seq > after_seq)
        else:
            query = query.where(
                sa.or_(
                    events.c.epoch > after_epoch,
                    sa.and_(events.c.epoch == after_epoch, events.c.seq > after_seq),
                )
            )
        query = query.order_by(events.c.epoch, events.c.seq).limit(limit)
        with self._begin(write=False) as conn:
            return [{str(k): v for k, v in row._mapping.items()} for row in conn.execute(query)]

    def event_messages(self, event_ids: list[str]) -> list[Applied]:
        """Stored events with their workflows' current projections (for another replica's
        broadcast), in (epoch, seq) order per ADW; events deleted meanwhile are left out."""
        if not event_ids:
            return []
        with self._begin(write=False) as conn:
            rows = list(
                conn.execute(
                    sa.select(events)
                    .where(events.c.event_id.in_(event_ids))
                    .order_by(events.c.adw_id, events.c.epoch, events.c.seq)
                )
            )
            ids = sorted({row.adw_id for row in rows})
            current = {
                wf.adw_id: upgrade(wf.projection)
                for wf in conn.execute(
                    sa.select(workflows.c.adw_id, workflows.c.projection).where(
                        workflows.c.adw_id.in_(ids)
                    )
                )
            }
        out: list[Applied] = []
        for row in rows:
            if row.adw_id not in current:
                continue
            view: EventView = {
                "type": row.type,
                "event_id": row.event_id,
                "adw_id": row.adw_id,
                "epoch": row.epoch,
                "seq": row.seq,
                "timestamp": row.timestamp,
                "data": row.data,
            }
            out.append(Applied(view, row.source, current[row.adw_id]))
        return out
