"""The database itself: its tables, the engine and its dialect settings, and transactions.

SQLAlchemy Core, one code path for SQLite (the embedded default) and PostgreSQL. Every
transaction of the store goes through :meth:`Database.begin`, the one place where a driver's
error becomes :class:`DatabaseUnavailable`, :class:`CommitUnknown` or :class:`InvalidEvent`.
SQLite has a single writer, so this process takes turns at writing
(:meth:`Database.turn`) instead of retrying on "database is locked".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from adw_backend.errors import CommitUnknown, DatabaseUnavailable, InvalidEvent
from adw_backend.projection import EventView, Projection

log = logging.getLogger(__name__)

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


def to_json(value: Any) -> str:
    return orjson.dumps(value).decode()


def now() -> datetime:
    return datetime.now(UTC)


def _url_option(url: str, name: str) -> str | None:
    try:
        found = sa.engine.make_url(url).query.get(name)
    except sa.exc.ArgumentError:
        return None  # reported where the engine is created
    return found if isinstance(found, str) else None


class Database:
    """The engine, its dialect's settings, and the store's transactions."""

    def __init__(self, url: str, *, sqlite_synchronous: Literal["full", "normal"] = "full") -> None:
        self.is_postgres = url.startswith("postgres")
        options: dict[str, Any] = {"json_serializer": to_json, "json_deserializer": orjson.loads}
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
        # SQLite has a single writer: taking turns here avoids "database is locked" retries.
        # Reentrant: a write holds it from before its transaction until after its commit.
        self._write_lock = threading.RLock() if not self.is_postgres else None
        self._ready = False
        self._setup_lock = threading.Lock()
        # received_at as SQLAlchemy itself would store it, so that it reads back the same.
        self.sqlite_time = events.c.received_at.type.bind_processor(self.engine.dialect) or str

    @contextmanager
    def turn(self) -> Iterator[None]:
        """This process's turn to write (SQLite), held across a transaction and what follows
        its commit; nothing to take on PostgreSQL."""
        if self._write_lock is None:
            yield
            return
        with self._write_lock:
            yield

    @contextmanager
    def begin(self, write: bool) -> Iterator[Connection]:
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
        """Create the tables if needed (also done lazily by the first transaction)."""
        with self.begin(write=True):
            pass

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.begin(write=False) as conn:
            conn.execute(sa.text("SELECT 1"))
