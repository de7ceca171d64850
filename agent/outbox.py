"""The durable store: outbox, dead letters and everything the readers have consumed.

One SQLite database per agent under ``storage.dir``. An event is inserted in the same transaction
that records what was read to produce it (file snapshots, transcript offsets, cost ledgers), so a
``kill -9`` at any instant leaves either both or neither: the change is then read again, and it is
never queued twice under two ids. An event leaves the outbox only when the backend answered 2xx.

Coalescing: an unsent snapshot (``events.COALESCIBLE``) is replaced by a newer one of the same
type. "Unsent" means newer than anything the sender has picked up in this process; at startup
every queued event counts as possibly sent, because the backend may hold it under its id.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import orjson

from agent.errors import ConfigError, DamagedStore, StorageError
from agent.events import COALESCIBLE, EventType, Source, check_data, envelope
from agent.layout import FileKey

#: What the store keeps per run besides the outbox: what was read of each file, and the cost
#: reported so far, whether a failure was reported, how the run ended and when it was first
#: seen (the pipeline's own records).
Record = FileKey | Literal["cost", "failure_reported", "ended", "first_seen"]

DB_NAME = "agent.sqlite3"
LOCK_NAME = "agent.lock"
#: Seconds between attempts to use a store that could not be written (disk full, locked).
STORAGE_RETRY = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS streams (
    adw_id TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    superseded INTEGER NOT NULL DEFAULT 0,
    counted_from INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    type TEXT NOT NULL,
    created REAL NOT NULL,
    failed_at REAL NOT NULL,
    status INTEGER,
    response TEXT NOT NULL,
    body BLOB NOT NULL
);
"""


# What was read of each file, per ADW. Stores of earlier versions kept one ADW's rows in a
# table keyed by file alone: they are moved under that ADW when first opened.
_FILES = """
CREATE TABLE IF NOT EXISTS files (
    adw_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (adw_id, key)
) WITHOUT ROWID;
"""
#: The owner recorded by a store that holds every ADW under a root (host mode).
HOST_OWNER = "*"

# The delivery totals, kept in meta as bare SQLite integers (which read_meta() reads as they
# are): one statement adds to each, without reading it first.
_DELIVERED = "delivered"
_DUPLICATES = "duplicates"
#: When a store of an earlier version, which had already queued events, started counting.
_COUNTED_SINCE = "counted_since"


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


@dataclass(frozen=True, slots=True)
class Queued:
    """One event waiting in the outbox."""

    seq: int
    event_id: str
    type: str
    created: float
    attempts: int
    body: bytes


def _storage_error(exc: sqlite3.Error) -> StorageError:
    return StorageError(f"storage write failed: {exc}")


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
            raise _storage_error(exc) from None
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
        _put_meta(self._db, key, value)

    def _next_position(self) -> int:
        """The event's place in the outbox, across every ADW (the outbox's own ``seq``; with one
        ADW per store it equals the event's seq)."""
        seq = int(read_meta(self._db, "seq") or 0) + 1
        # Stored as JSON like every other meta value, so that read_meta() can show it.
        _put_meta(self._db, "seq", seq)
        return seq

    def _coalesce(self, event_type: EventType, data: dict[str, Any]) -> dict[str, Any]:
        row = self._db.execute(
            "SELECT seq, body FROM outbox WHERE type = ? AND seq > ? AND adw_id IS ? "
            "ORDER BY seq DESC LIMIT 1",
            (event_type, self._store.sent_floor, self.adw_id),
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
            _check_intact(self.db, self.path)
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            self.db.execute("PRAGMA busy_timeout = 5000")
            self.db.executescript(_SCHEMA)
            wanted = HOST_OWNER if adw_id is None else adw_id
            owner = self.meta("adw_id")
            if owner is None:
                self.set_meta("adw_id", wanted)
            elif owner != wanted:
                raise ConfigError(
                    f"storage.dir: {directory} holds the state of {_owner(owner)}, not "
                    f"{_owner(wanted).removeprefix('ADW ')}; give each agent its own storage.dir"
                )
            _migrate(self.db, wanted)
            row = self.db.execute("SELECT MAX(seq) FROM outbox").fetchone()
        except (sqlite3.Error, OSError) as exc:
            self.close()
            raise StorageError(f"cannot open the store at {self.path}: {exc}") from None
        except BaseException:
            self.close()
            raise
        #: Events with seq <= sent_floor may have reached the backend: never alter them.
        self.sent_floor: int = int(row[0] or 0)

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
            _put_meta(self.db, "epoch_floor", epoch)
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
                _put_meta(self.db, "epoch_floor", max(floor, reported))
                self.db.execute("DELETE FROM streams WHERE adw_id = ?", (adw_id,))
                _put_meta(
                    self.db,
                    f"replaced:{adw_id}",
                    {"at": time.time(), "reported_epoch": reported, "store_epoch": found},
                )
        except sqlite3.Error as exc:
            raise _storage_error(exc) from None

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
                raise _storage_error(exc) from None
            try:
                yield tx
                self.db.execute("RELEASE grouped")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK TO grouped")
                    self.db.execute("RELEASE grouped")
                if isinstance(exc, sqlite3.Error):
                    raise _storage_error(exc) from None
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
            raise _storage_error(exc) from None
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _storage_error(exc) from None
            raise

    def meta(self, key: str) -> Any:
        return read_meta(self.db, key)

    def set_meta(self, key: str, value: Any) -> None:
        """Set a meta value (JSON) in a transaction of its own."""
        try:
            _put_meta(self.db, key, value)
        except sqlite3.Error as exc:
            raise _storage_error(exc) from None

    def head(self) -> Queued | None:
        """The oldest queued event, or None."""
        try:
            row = self.db.execute(
                "SELECT seq, event_id, type, created, attempts, body FROM outbox "
                "ORDER BY seq LIMIT 1"
            ).fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the outbox in {self.path}: {exc}") from None
        if row is None:
            return None
        self.sent_floor = max(self.sent_floor, row[0])
        return Queued(row[0], row[1], row[2], row[3], row[4], bytes(row[5]))

    def head_batch(self, limit: int, max_bytes: int | None = None) -> list[Queued]:
        """The oldest queued events, in seq order: at most ``limit`` of them, and no more than
        ``max_bytes`` of bodies in all, except that the oldest is always included. Empty when
        none are queued. Rows are read one at a time, so a large body past the limit is never
        loaded."""
        out: list[Queued] = []
        size = 0
        try:
            rows = self.db.execute(
                "SELECT seq, length(body) FROM outbox ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
            for seq, length in rows:
                if out and max_bytes is not None and size + length > max_bytes:
                    break
                row = self.db.execute(
                    "SELECT seq, event_id, type, created, attempts, body FROM outbox WHERE seq = ?",
                    (seq,),
                ).fetchone()
                if row is None:
                    break  # dead-lettered or acknowledged meanwhile by another connection
                size += length
                out.append(Queued(row[0], row[1], row[2], row[3], row[4], bytes(row[5])))
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the outbox in {self.path}: {exc}") from None
        if out:
            self.sent_floor = max(self.sent_floor, out[-1].seq)
        return out

    def ack_many(self, seqs: list[int], duplicates: int = 0) -> None:
        """The backend accepted these events: they leave the outbox in one transaction. It
        said ``duplicates`` of them it already had; both are added to the delivery totals.

        Committed without waiting for the disk, like :meth:`ack` and for the same reasons.
        """
        if not seqs:
            return
        relax = self._synchronous == "FULL"
        try:
            if relax:
                self.db.execute("PRAGMA synchronous = NORMAL")
            try:
                with self.transaction() as tx:
                    gone = self.db.executemany(
                        "DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in seqs]
                    ).rowcount
                    _count_delivered(self.db, gone, duplicates)
                    tx.set_meta(
                        "last_delivery", {"at": time.time(), "result": "ok", "seq": max(seqs)}
                    )
            finally:
                if relax:
                    self.db.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            raise _storage_error(exc) from None

    def depth(self, adw_id: str | None = None) -> int:
        """How many events are queued (of one ADW, or in all). Unlike :meth:`head`, this
        changes nothing."""
        try:
            if adw_id is None:
                row = self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            else:
                row = self.db.execute(
                    "SELECT COUNT(*) FROM outbox WHERE adw_id = ?", (adw_id,)
                ).fetchone()
            return int(row[0])
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the outbox in {self.path}: {exc}") from None

    def record(self, adw_id: str, key: Record) -> Any:
        """A record of one ADW (JSON), outside any transaction; None if there is none."""
        try:
            row = self.db.execute(
                "SELECT value FROM files WHERE adw_id = ? AND key = ?", (adw_id, str(key))
            ).fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the store at {self.path}: {exc}") from None
        return None if row is None else orjson.loads(row[0])

    def ack(self, seq: int, duplicates: int = 0) -> None:
        """The backend accepted the event: it leaves the outbox. ``duplicates`` is 1 when the
        backend said it already had it.

        This transaction alone commits without waiting for the disk (``synchronous = NORMAL``):
        a power cut can only undo it, and then the event is sent again under the same event_id,
        which the backend deduplicates. It cannot be reordered before an earlier commit, and
        every transaction that queues an event still waits for the disk. The wait for the disk
        was most of the time one delivery took (see BENCHMARKS.md).
        """
        relax = self._synchronous == "FULL"
        try:
            if relax:
                self.db.execute("PRAGMA synchronous = NORMAL")
            try:
                with self.transaction() as tx:
                    gone = self.db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount
                    _count_delivered(self.db, gone, duplicates)
                    tx.set_meta("last_delivery", {"at": time.time(), "result": "ok", "seq": seq})
            finally:
                if relax:
                    self.db.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            raise _storage_error(exc) from None

    def record_failure(self, seq: int, error: str) -> None:
        """Remember a failed attempt (for status); the event stays queued."""
        with self.transaction() as tx:
            self.db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?",
                (error, seq),
            )
            tx.set_meta("last_delivery", {"at": time.time(), "result": error, "seq": seq})

    def dead_letter(self, event: Queued, status: int | None, response: str) -> None:
        """Move a rejected event out of the outbox, keeping the backend's answer."""
        with self.transaction() as tx:
            self.db.execute(
                "INSERT OR REPLACE INTO dead_letters "
                "(seq, event_id, type, created, failed_at, status, response, body, adw_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, (SELECT adw_id FROM outbox WHERE seq = ?))",
                (
                    event.seq,
                    event.event_id,
                    event.type,
                    event.created,
                    time.time(),
                    status,
                    response,
                    event.body,
                    event.seq,
                ),
            )
            self.db.execute("DELETE FROM outbox WHERE seq = ?", (event.seq,))
            tx.set_meta(
                "last_delivery",
                {"at": time.time(), "result": f"dead-lettered ({status})", "seq": event.seq},
            )

    def requeue(self, seq: int | None = None) -> int:
        """Put dead letters (one, or all with ``seq=None``) back in the outbox, in seq order.

        They keep their event_id and seq, so the backend can still deduplicate them; their
        seq is lower than that of events queued since, so they go out before those. A dead
        letter whose seq or event_id is already queued is a conflict: nothing is requeued
        and nothing is deleted (:class:`StorageError`).
        """
        where, args = ("WHERE seq = ?", (seq,)) if seq is not None else ("", ())
        with self.transaction():
            rows = self.db.execute(
                f"SELECT seq, event_id, type, created, body, adw_id FROM dead_letters {where} "  # noqa: S608
                "ORDER BY seq",
                args,
            ).fetchall()
            for row in rows:
                try:
                    self.db.execute(
                        "INSERT INTO outbox (seq, event_id, type, created, body, adw_id) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        row,
                    )
                except sqlite3.IntegrityError:
                    raise StorageError(
                        f"dead letter seq {row[0]} (event_id {row[1]}) is already in the "
                        "outbox; nothing was requeued"
                    ) from None
                self.db.execute("DELETE FROM dead_letters WHERE seq = ?", (row[0],))
        return len(rows)

    def stats(self) -> dict[str, Any]:
        return outbox_stats(self.db)


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
            counted = "superseded" in _columns(self._db, "streams")
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
            delivered = read_meta(self._db, _DELIVERED)
            duplicates = read_meta(self._db, _DUPLICATES)
            since = read_meta(self._db, _COUNTED_SINCE)
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


# SQLite's answers for a file that is damaged, or not a database at all.
_DAMAGED = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}


def _check_intact(db: sqlite3.Connection, path: Path) -> None:
    """Raise :class:`DamagedStore` for a corrupt store: restarting cannot help, recovering can.

    ``quick_check`` reads every page once (milliseconds for a store of a few MB)."""
    try:
        rows = db.execute("PRAGMA quick_check(1)").fetchall()
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorcode", None) not in _DAMAGED:
            raise
        problem = str(exc)
    else:
        if rows == [("ok",)]:
            return
        problem = str(rows[0][0]) if rows else "quick_check found a problem"
    raise DamagedStore(
        f"storage.dir: the store {path} is damaged ({problem}); move it aside and start a new "
        "one with: adw-agent recover-store --config <this config>"
    )


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


def _owner(owner: str) -> str:
    return "every ADW under a root" if owner == HOST_OWNER else f"ADW {owner!r}"


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {str(row[1]) for row in db.execute(f"PRAGMA table_info({table})")}


def _migrate(db: sqlite3.Connection, owner: str) -> None:
    """Bring a store written by an earlier version up to date, in one transaction.

    Earlier stores held one ADW: their records move under it, their events are its events,
    and its stream continues their seq (under a new epoch: the stream is new to this store).
    Stores that did not count superseded events and deliveries count them from now on: their
    streams say from which seq, and the store since when.
    """
    files = _columns(db, "files")
    outbox = _columns(db, "outbox")
    dead = _columns(db, "dead_letters")
    grouped = bool(files) and "adw_id" in files and "adw_id" in outbox and "adw_id" in dead
    counted = "superseded" in _columns(db, "streams")
    if grouped and counted:
        return
    # A store of the first version: one ADW, no streams table until this version made one.
    first = bool(files) and "adw_id" not in files
    db.execute("BEGIN IMMEDIATE")
    try:
        if not counted:
            db.execute("ALTER TABLE streams ADD COLUMN superseded INTEGER NOT NULL DEFAULT 0")
            db.execute("ALTER TABLE streams ADD COLUMN counted_from INTEGER NOT NULL DEFAULT 0")
            db.execute("UPDATE streams SET counted_from = seq")
        if (first or not counted) and read_meta(db, "seq"):
            _put_meta(db, _COUNTED_SINCE, time.time())
        if not grouped:
            _group_by_adw(db, owner, files, outbox, dead)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _group_by_adw(
    db: sqlite3.Connection, owner: str, files: set[str], outbox: set[str], dead: set[str]
) -> None:
    """Move a one-ADW store's records and events under its ADW (inside :func:`_migrate`)."""
    if files and "adw_id" not in files:
        db.execute("ALTER TABLE files RENAME TO files_v1")
        db.execute(_FILES)
        db.execute("INSERT INTO files SELECT ?, key, value FROM files_v1", (owner,))
        db.execute("DROP TABLE files_v1")
        # How the one run ended and when it was first seen were kept as meta: they are
        # records of that run now.
        for key in ("ended", "first_seen"):
            value = read_meta(db, key)
            if value is not None and owner != HOST_OWNER:
                db.execute(
                    "INSERT OR REPLACE INTO files (adw_id, key, value) VALUES (?, ?, ?)",
                    (owner, key, orjson.dumps(value)),
                )
            db.execute("DELETE FROM meta WHERE key = ?", (key,))
    elif not files:
        db.execute(_FILES)
    for table, columns in (("outbox", outbox), ("dead_letters", dead)):
        if "adw_id" not in columns:
            db.execute(f"ALTER TABLE {table} ADD COLUMN adw_id TEXT")
            db.execute(f"UPDATE {table} SET adw_id = ?", (owner,))  # noqa: S608
    seq = read_meta(db, "seq")
    if seq and owner != HOST_OWNER:
        # Its seqs so far were given before superseded events were counted.
        epoch = time.time_ns() // 1_000_000
        db.execute(
            "INSERT OR IGNORE INTO streams (adw_id, epoch, seq, counted_from) VALUES (?, ?, ?, ?)",
            (owner, epoch, int(seq), int(seq)),
        )
        _put_meta(db, "epoch_floor", epoch)


def outbox_stats(db: sqlite3.Connection) -> dict[str, Any]:
    """Outbox depth per type, oldest age and dead-letter count, for status and heartbeats."""
    now = time.time()
    by_type = dict(db.execute("SELECT type, COUNT(*) FROM outbox GROUP BY type").fetchall())
    oldest = db.execute("SELECT MIN(created) FROM outbox").fetchone()[0]
    dead = db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
    return {
        "outbox_depth": sum(by_type.values()),
        "outbox_by_type": by_type,
        "oldest_undelivered_age": None if oldest is None else round(now - oldest, 3),
        "dead_letters": dead,
    }


def dead_letter_rows(db: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = db.execute(
        "SELECT seq, adw_id, event_id, type, failed_at, status, response FROM dead_letters "
        "ORDER BY seq"
    ).fetchall()
    keys = ("seq", "adw_id", "event_id", "type", "failed_at", "status", "response")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def _count_delivered(db: sqlite3.Connection, delivered: int, duplicates: int) -> None:
    """Add to the delivery totals (inside the acknowledging transaction). Duplicates are
    events that left the outbox too: never more of them than of those."""
    duplicates = max(0, min(duplicates, delivered))
    for key, add in ((_DELIVERED, delivered), (_DUPLICATES, duplicates)):
        if add:
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
                (key, add),
            )


def _put_meta(db: sqlite3.Connection, key: str, value: Any) -> None:
    db.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, orjson.dumps(value)),
    )


def read_meta(db: sqlite3.Connection, key: str) -> Any:
    """A meta value, or None."""
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    if row is None:
        return None
    # Earlier stores kept the seq counter as a bare SQLite integer.
    return row[0] if isinstance(row[0], int) else orjson.loads(row[0])
