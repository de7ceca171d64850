"""The durable store: outbox, dead letters and everything the readers have consumed.

One SQLite database per agent under ``storage.dir``. An event is inserted in the same transaction
that records what was read to produce it (file snapshots, transcript offsets, cost ledgers), so a
``kill -9`` at any instant leaves either both or neither: the change is then read again, and it is
never queued twice under two ids. An event leaves the outbox only when the backend answered 2xx.

Coalescing: an unsent snapshot (``events.COALESCIBLE``) is replaced by a newer one of the same
type. "Unsent" means newer than anything the sender has picked up in this process; at startup
every queued event counts as possibly sent, because the backend may hold it under its id.

The store is three modules, and no SQL lives outside them: this one (the connection, its
transactions, streams and epochs, the pipeline's records, meta, and the read-only
:class:`StoreView`), :mod:`agent.outbox_queue` (the outbox as the sender sees it) and
:mod:`agent.outbox_schema` (the tables and the migrations of earlier stores).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypedDict

import orjson

from agent.errors import ConfigError, StorageError
from agent.events import COALESCIBLE, EventType, Source, check_data, envelope
from agent.layout import FileKey
from agent.outbox_queue import Queue, dead_letter_rows, outbox_stats
from agent.outbox_schema import (
    COUNTED_SINCE,
    DELIVERED,
    DUPLICATES,
    HOST_OWNER,
    SCHEMA,
    check_intact,
    migrate,
    owner_name,
    put_meta,
    read_meta,
    storage_error,
    table_columns,
)

#: What the store keeps per run besides the outbox: what was read of each file, and the cost
#: reported so far, whether a failure was reported, how the run ended and when it was first
#: seen (the pipeline's own records).
Record = FileKey | Literal["cost", "failure_reported", "ended", "first_seen"]

DB_NAME = "agent.sqlite3"
LOCK_NAME = "agent.lock"
#: Seconds between attempts to use a store that could not be written (disk full, locked).
STORAGE_RETRY = 1.0


class StreamCounts(TypedDict):
    """What the store knows of one ADW's stream, for an auditor of exactly-once delivery.

    Once ``queued`` is 0, the backend must hold ``expected`` events of this stream (this
    ``epoch``, seqs ``counted_from + 1`` to ``seq``), each once: every seq given was either
    delivered, superseded by coalescing (never to be delivered) or dead-lettered.
    """

    #: The stream's epoch; None for an ADW with events but no stream (it was replaced).
    epoch: int | None
    #: The last seq given in the stream.
    seq: int
    #: The seqs up to this one were given before the store counted superseded events (a store
    #: of an earlier version); 0 when every seq is counted.
    counted_from: int
    #: Seqs whose event was coalesced into a later one before it was sent.
    superseded: int
    #: Events of this ADW in the dead letters now (rejected by the backend).
    dead_letters: int
    #: Events of this ADW still in the outbox.
    queued: int
    #: ``seq - counted_from - superseded - dead_letters``.
    expected: int


class DeliveryTotals(TypedDict):
    """Counted over the whole store, in the same transaction as each acknowledgement."""

    #: Events the backend acknowledged (they left the outbox).
    delivered: int
    #: Of those, how many the backend said it already had (a re-sent event), summed from its
    #: answers; an answer that does not say counts none.
    duplicates: int
    #: When counting started, for a store of an earlier version that had already queued
    #: events; None when the store counted from its creation.
    since: float | None


class DeliveryCounts(TypedDict):
    """:meth:`StoreView.delivery_counts`: per ADW stream, and in total."""

    streams: dict[str, StreamCounts]
    totals: DeliveryTotals


class Transaction:
    """Reads and writes inside one SQLite transaction; see :meth:`Store.transaction`."""

    def __init__(self, store: Store, adw_id: str | None) -> None:
        self._store = store
        self._db = store.db
        #: The ADW whose records and stream this transaction reads and writes.
        self.adw_id = adw_id
        self.emitted: list[int] = []

    def _adw(self) -> str:
        if self.adw_id is None:
            raise RuntimeError("a transaction for no ADW has no records and no stream")
        return self.adw_id

    def get(self, key: Record) -> bytes | None:
        row = self._db.execute(
            "SELECT value FROM files WHERE adw_id = ? AND key = ?", (self._adw(), str(key))
        ).fetchone()
        return None if row is None else bytes(row[0])

    def get_json(self, key: Record) -> Any:
        raw = self.get(key)
        return None if raw is None else orjson.loads(raw)

    def put(self, key: Record, value: bytes) -> None:
        self._db.execute(
            "INSERT INTO files (adw_id, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT (adw_id, key) DO UPDATE SET value = excluded.value",
            (self._adw(), str(key), value),
        )

    def put_json(self, key: Record, value: Any) -> None:
        self.put(key, orjson.dumps(value))

    def delete(self, key: Record) -> None:
        self._db.execute("DELETE FROM files WHERE adw_id = ? AND key = ?", (self._adw(), str(key)))

    def transcripts(self) -> list[FileKey]:
        """Every transcript the store holds a record of for this ADW, in name order."""
        return _transcript_keys(self._db, self._adw())

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """Undo only what happens inside when it raises; the transaction goes on.

        A failure of the store itself is not undone here: it becomes a
        :class:`~agent.errors.StorageError`, and the whole transaction rolls back.
        """
        self._db.execute("SAVEPOINT isolated")
        try:
            yield
        except sqlite3.Error as exc:
            raise storage_error(exc) from None
        except StorageError:
            raise
        except BaseException:
            self._db.execute("ROLLBACK TO isolated")
            self._db.execute("RELEASE isolated")
            raise
        self._db.execute("RELEASE isolated")

    def emit(self, event_type: EventType, data: dict[str, Any], source: Source = "event") -> int:
        """Queue an event; returns its seq. ``data`` is validated against its model."""
        adw_id = self._adw()
        data = check_data(event_type, data)
        if event_type in COALESCIBLE:
            data = self._coalesce(event_type, data)
        epoch, seq = self._store._next_in_stream(adw_id)
        position = self._next_position()
        event = envelope(event_type, adw_id, seq, source, data, epoch=epoch)
        self._db.execute(
            "INSERT INTO outbox (seq, event_id, type, created, body, adw_id) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (position, event["event_id"], event_type, time.time(), orjson.dumps(event), adw_id),
        )
        self.emitted.append(position)
        return seq

    def set_meta(self, key: str, value: Any) -> None:
        """Set a meta value (JSON) as part of this transaction."""
        put_meta(self._db, key, value)

    def _next_position(self) -> int:
        """The event's place in the outbox, across every ADW (the outbox's own ``seq``; with one
        ADW per store it equals the event's seq)."""
        seq = int(read_meta(self._db, "seq") or 0) + 1
        # Stored as JSON like every other meta value, so that read_meta() can show it.
        put_meta(self._db, "seq", seq)
        return seq

    def _coalesce(self, event_type: EventType, data: dict[str, Any]) -> dict[str, Any]:
        row = self._db.execute(
            "SELECT seq, body FROM outbox WHERE type = ? AND seq > ? AND adw_id IS ? "
            "ORDER BY seq DESC LIMIT 1",
            (event_type, self._store.queue.sent_floor, self.adw_id),
        ).fetchone()
        if row is None:
            return data
        replaced = orjson.loads(row[1])
        old = replaced["data"]
        if event_type == "workflow_update":
            changed = list(old.get("changed", []))
            changed += [k for k in data.get("changed", []) if k not in changed]
            data = {**data, "changed": changed}
        elif event_type == "cost_update":
            data = {**data, "cost_delta": old["cost_delta"] + data["cost_delta"]}
        self._db.execute("DELETE FROM outbox WHERE seq = ?", (row[0],))
        # Its seq is never to be delivered: counted for an auditor. Not when the stream it
        # belongs to was replaced since (that stream's counts went with it).
        self._db.execute(
            "UPDATE streams SET superseded = superseded + 1 WHERE adw_id = ? AND epoch = ?",
            (self.adw_id, replaced.get("epoch", 0)),
        )
        return data


def lock_storage(directory: Path) -> int:
    """Claim ``storage.dir`` for this process; returns the descriptor holding the claim.

    An exclusive ``flock`` on ``agent.lock``: a second agent on the same directory would keep
    its own idea of what was sent and coalesce (delete) an event the first one is sending.
    The kernel releases the lock when the process ends, however it ends. Read-only tools and
    requeueing dead letters (which only inserts rows) do not take it.
    """
    path = directory / LOCK_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot open the lock file {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if isinstance(exc, BlockingIOError):
            raise ConfigError(
                f"storage.dir: {directory} is in use by another running agent (it holds the "
                f"lock on {path}); give each agent its own storage.dir"
            ) from None
        raise StorageError(f"cannot lock {path}: {exc.strerror}") from None
    return fd


class Store:
    """The SQLite database of one agent. Not thread-safe: use it from the event loop only."""

    def __init__(
        self, directory: Path, adw_id: str | None, synchronous: Literal["full", "normal"]
    ) -> None:
        """Open (or create) the store. ``adw_id`` is the one ADW it holds, or None for a store
        that holds every ADW under a root (host mode)."""
        self.path = directory / DB_NAME
        self.adw_id = adw_id
        self._synchronous = synchronous.upper()
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.db = sqlite3.connect(self.path, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open the store at {self.path}: {exc}") from None
        try:
            check_intact(self.db, self.path)
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            self.db.execute("PRAGMA busy_timeout = 5000")
            self.db.executescript(SCHEMA)
            wanted = HOST_OWNER if adw_id is None else adw_id
            owner = self.meta("adw_id")
            if owner is None:
                self.set_meta("adw_id", wanted)
            elif owner != wanted:
                raise ConfigError(
                    f"storage.dir: {directory} holds the state of {owner_name(owner)}, not "
                    f"{owner_name(wanted).removeprefix('ADW ')}; "
                    "give each agent its own storage.dir"
                )
            migrate(self.db, wanted)
            row = self.db.execute("SELECT MAX(seq) FROM outbox").fetchone()
        except (sqlite3.Error, OSError) as exc:
            self.close()
            raise StorageError(f"cannot open the store at {self.path}: {exc}") from None
        except BaseException:
            self.close()
            raise
        #: The outbox as the sender sees it: what it takes, acknowledges and dead-letters.
        self.queue = Queue(self.db, self.path, self._synchronous, self.group, int(row[0] or 0))

    @classmethod
    def inspect(cls, directory: Path) -> sqlite3.Connection:
        """A connection for status tools that never changes what a running agent sees."""
        path = directory / DB_NAME
        if not path.is_file():
            raise StorageError(f"no agent store at {path}: the agent has not run yet")
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        db.execute("PRAGMA busy_timeout = 5000")
        return db

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.db.close()

    def transcripts(self, adw_id: str | None = None) -> list[FileKey]:
        """Every transcript the store holds a record of for an ADW, in name order."""
        try:
            return _transcript_keys(self.db, adw_id or self.adw_id or "")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the store at {self.path}: {exc}") from None

    def _next_in_stream(self, adw_id: str) -> tuple[int, int]:
        """The epoch of the ADW's stream and the next seq in it (inside a transaction).

        A stream is created with the first event of its ADW in this store. Its epoch is the
        time in milliseconds, and larger than any epoch this store gave before, so that a
        receiver can tell a new stream (a lost or reset store) from an old one.
        """
        row = self.db.execute(
            "SELECT epoch, seq FROM streams WHERE adw_id = ?", (adw_id,)
        ).fetchone()
        if row is None:
            epoch = max(time.time_ns() // 1_000_000, int(self.meta("epoch_floor") or 0) + 1)
            put_meta(self.db, "epoch_floor", epoch)
            self.db.execute(
                "INSERT INTO streams (adw_id, epoch, seq) VALUES (?, ?, 1)", (adw_id, epoch)
            )
            return epoch, 1
        epoch, seq = int(row[0]), int(row[1]) + 1
        self.db.execute("UPDATE streams SET seq = ? WHERE adw_id = ?", (seq, adw_id))
        return epoch, seq

    def stream_replaced(self, adw_id: str, reported: int, found: int | None) -> None:
        """The ADW's events were reported under epoch ``reported``, which this store does not
        hold (it holds ``found``, or none): start its stream again, with a larger epoch than
        ``reported``, and keep a note of it for ``status``."""
        try:
            with self.transaction():
                floor = int(self.meta("epoch_floor") or 0)
                put_meta(self.db, "epoch_floor", max(floor, reported))
                self.db.execute("DELETE FROM streams WHERE adw_id = ?", (adw_id,))
                put_meta(
                    self.db,
                    f"replaced:{adw_id}",
                    {"at": time.time(), "reported_epoch": reported, "store_epoch": found},
                )
        except sqlite3.Error as exc:
            raise storage_error(exc) from None

    def epoch(self, adw_id: str | None = None) -> int | None:
        """The epoch of an ADW's stream, or None before its first event."""
        try:
            return stream_epoch(self.db, adw_id or self.adw_id or "")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the store at {self.path}: {exc}") from None

    @property
    def in_transaction(self) -> bool:
        """Inside a transaction (a group of batches, see :meth:`group`)."""
        return self.db.in_transaction

    @property
    def total_changes(self) -> int:
        """Rows changed through this connection so far: whether a batch wrote anything."""
        return self.db.total_changes

    @contextlib.contextmanager
    def transaction(self, adw_id: str | None = None) -> Iterator[Transaction]:
        """All reads and writes inside commit together or not at all. The records and events
        are those of ``adw_id`` (by default the store's one ADW).

        Inside a :meth:`group`, it is a savepoint of the group's transaction: undone alone if
        it fails, and committed with the group.
        """
        tx = Transaction(self, adw_id or self.adw_id)
        if self.db.in_transaction:
            try:
                self.db.execute("SAVEPOINT grouped")
            except sqlite3.Error as exc:
                raise storage_error(exc) from None
            try:
                yield tx
                self.db.execute("RELEASE grouped")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK TO grouped")
                    self.db.execute("RELEASE grouped")
                if isinstance(exc, sqlite3.Error):
                    raise storage_error(exc) from None
                raise
            return
        with self.group():
            yield tx

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """One transaction for several batches (of one or many ADWs): one commit, and one
        wait for the disk, for all of them. Inside another group, a savepoint of it."""
        if self.db.in_transaction:
            with self.transaction():
                yield
            return
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise storage_error(exc) from None
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise storage_error(exc) from None
            raise

    def meta(self, key: str) -> Any:
        return read_meta(self.db, key)

    def set_meta(self, key: str, value: Any) -> None:
        """Set a meta value (JSON) in a transaction of its own."""
        try:
            put_meta(self.db, key, value)
        except sqlite3.Error as exc:
            raise storage_error(exc) from None

    def record(self, adw_id: str, key: Record) -> Any:
        """A record of one ADW (JSON), outside any transaction; None if there is none."""
        try:
            row = self.db.execute(
                "SELECT value FROM files WHERE adw_id = ? AND key = ?", (adw_id, str(key))
            ).fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the store at {self.path}: {exc}") from None
        return None if row is None else orjson.loads(row[0])


class StoreView:
    """A read-only look at a store, for the operator commands: it never changes what a running
    agent sees. Every SQLite failure becomes a :class:`~agent.errors.StorageError`."""

    def __init__(self, directory: Path, adw_id: str) -> None:
        self.directory = directory
        self.adw_id = adw_id
        try:
            self._db = Store.inspect(directory)
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def _error(self, exc: sqlite3.Error) -> StorageError:
        return StorageError(f"cannot read the agent store in {self.directory}: {exc}")

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    def __enter__(self) -> StoreView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        try:
            return outbox_stats(self._db)
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def meta(self, key: str) -> Any:
        try:
            return read_meta(self._db, key)
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def dead_letters(self) -> list[dict[str, Any]]:
        try:
            return dead_letter_rows(self._db)
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def record(self, key: Record, *, adw_id: str | None = None) -> bytes | None:
        try:
            row = self._db.execute(
                "SELECT value FROM files WHERE adw_id = ? AND key = ?",
                (adw_id or self.adw_id, str(key)),
            ).fetchone()
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        return None if row is None else bytes(row[0])

    def runs(self) -> dict[str, dict[str, Any]]:
        """Per ADW: its stream (epoch, last seq), queued events, the age of the oldest, and
        dead letters. Every ADW with a stream, queued events or dead letters is listed."""
        now = time.time()
        try:
            streams = self._db.execute("SELECT adw_id, epoch, seq FROM streams").fetchall()
            queued = self._db.execute(
                "SELECT adw_id, COUNT(*), MIN(created) FROM outbox GROUP BY adw_id"
            ).fetchall()
            dead = self._db.execute(
                "SELECT adw_id, COUNT(*) FROM dead_letters GROUP BY adw_id"
            ).fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        runs: dict[str, dict[str, Any]] = {}

        def run(adw_id: str | None) -> dict[str, Any]:
            return runs.setdefault(
                str(adw_id),
                {
                    "epoch": None,
                    "seq": 0,
                    "outbox_depth": 0,
                    "oldest_undelivered_age": None,
                    "dead_letters": 0,
                },
            )

        for adw_id, epoch, seq in streams:
            run(adw_id).update(epoch=int(epoch), seq=int(seq))
        for adw_id, count, oldest in queued:
            run(adw_id).update(
                outbox_depth=int(count), oldest_undelivered_age=round(now - float(oldest), 3)
            )
        for adw_id, count in dead:
            run(adw_id)["dead_letters"] = int(count)
        return dict(sorted(runs.items()))

    def delivery_counts(self) -> DeliveryCounts:
        """What an auditor of exactly-once delivery needs, per ADW stream and in total (see
        :class:`StreamCounts` and :class:`DeliveryTotals`). Every ADW with a stream, queued
        events or dead letters is listed."""
        try:
            # A store that no agent of this version has opened yet counted nothing.
            counted = "superseded" in table_columns(self._db, "streams")
            columns = "superseded, counted_from" if counted else "0, seq"
            streams = self._db.execute(
                f"SELECT adw_id, epoch, seq, {columns} FROM streams"  # noqa: S608
            ).fetchall()
            queued = self._db.execute(
                "SELECT adw_id, COUNT(*) FROM outbox GROUP BY adw_id"
            ).fetchall()
            dead = self._db.execute(
                "SELECT adw_id, COUNT(*) FROM dead_letters GROUP BY adw_id"
            ).fetchall()
            delivered = read_meta(self._db, DELIVERED)
            duplicates = read_meta(self._db, DUPLICATES)
            since = read_meta(self._db, COUNTED_SINCE)
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        out: dict[str, StreamCounts] = {}

        def stream(adw_id: object) -> StreamCounts:
            empty = StreamCounts(
                epoch=None,
                seq=0,
                counted_from=0,
                superseded=0,
                dead_letters=0,
                queued=0,
                expected=0,
            )
            return out.setdefault(str(adw_id), empty)

        for adw_id, epoch, seq, superseded, counted_from in streams:
            counts = stream(adw_id)
            counts["epoch"] = int(epoch)
            counts["seq"] = int(seq)
            counts["superseded"] = int(superseded)
            counts["counted_from"] = int(counted_from)
        for adw_id, count in queued:
            stream(adw_id)["queued"] = int(count)
        for adw_id, count in dead:
            stream(adw_id)["dead_letters"] = int(count)
        for counts in out.values():
            counts["expected"] = (
                counts["seq"]
                - counts["counted_from"]
                - counts["superseded"]
                - counts["dead_letters"]
            )
        totals = DeliveryTotals(
            delivered=int(delivered or 0),
            duplicates=int(duplicates or 0),
            since=float(since) if since is not None else (None if counted else time.time()),
        )
        return DeliveryCounts(streams=dict(sorted(out.items())), totals=totals)

    def stream(self) -> dict[str, int] | None:
        """The ADW's stream: its epoch and last seq; None before its first event."""
        try:
            row = self._db.execute(
                "SELECT epoch, seq FROM streams WHERE adw_id = ?", (self.adw_id,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        return None if row is None else {"epoch": int(row[0]), "seq": int(row[1])}

    def transcript_records(self) -> list[tuple[FileKey, bytes]]:
        """Every transcript's saved record, in name order."""
        try:
            keys = _transcript_keys(self._db, self.adw_id)
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        out: list[tuple[FileKey, bytes]] = []
        for key in keys:
            value = self.record(key)
            if value is not None:
                out.append((key, value))
        return out


def recover_store(directory: Path) -> Path | None:
    """Move a damaged store aside, with its WAL, so that the next start begins a new store.

    Refused while an agent holds ``storage.dir``. Returns where the store went, or None if
    there was none. The new store starts new streams with larger epochs, and the agent says
    so when it finds the directory's events were reported under an earlier one.
    """
    fd = lock_storage(directory)
    try:
        path = directory / DB_NAME
        if not path.exists():
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = directory / f"{DB_NAME}.damaged-{stamp}"
        for suffix in ("-wal", "-shm", ""):
            source = Path(f"{path}{suffix}")
            if source.exists():
                source.rename(Path(f"{target}{suffix}"))
        return target
    finally:
        os.close(fd)


def _transcript_keys(db: sqlite3.Connection, adw_id: str) -> list[FileKey]:
    rows = db.execute(
        "SELECT key FROM files WHERE adw_id = ? AND key LIKE 'transcript:%' ORDER BY key",
        (adw_id,),
    ).fetchall()
    return [FileKey.parse(str(row[0])) for row in rows]


def stream_epoch(db: sqlite3.Connection, adw_id: str) -> int | None:
    row = db.execute("SELECT epoch FROM streams WHERE adw_id = ?", (adw_id,)).fetchone()
    return None if row is None else int(row[0])
