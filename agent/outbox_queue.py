"""The outbox as the sender sees it: the oldest queued events, their acknowledgement, failed
attempts, dead letters and requeueing, and the delivery totals.

Part of the store (:mod:`agent.outbox`), which owns the connection and the transactions and
hands its :class:`Queue` out as :attr:`agent.outbox.Store.queue`. What the sender has picked up
is remembered here (:attr:`Queue.sent_floor`): coalescing never alters such an event.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import StorageError
from agent.outbox_schema import DELIVERED, DUPLICATES, put_meta, storage_error

#: Opens a transaction of the store (:meth:`agent.outbox.Store.group`).
Transact = Callable[[], contextlib.AbstractContextManager[None]]


@dataclass(frozen=True, slots=True)
class Queued:
    """One event waiting in the outbox."""

    seq: int
    event_id: str
    type: str
    created: float
    attempts: int
    body: bytes


class Queue:
    """The events waiting for the backend, in seq order. Not thread-safe, like the store."""

    def __init__(
        self, db: sqlite3.Connection, path: Path, synchronous: str, transact: Transact, floor: int
    ) -> None:
        self._db = db
        self._path = path
        self._synchronous = synchronous
        self._transact = transact
        #: Events with seq <= sent_floor may have reached the backend: never alter them.
        self.sent_floor = floor

    def head(self) -> Queued | None:
        """The oldest queued event, or None."""
        try:
            row = self._db.execute(
                "SELECT seq, event_id, type, created, attempts, body FROM outbox "
                "ORDER BY seq LIMIT 1"
            ).fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the outbox in {self._path}: {exc}") from None
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
            rows = self._db.execute(
                "SELECT seq, length(body) FROM outbox ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
            for seq, length in rows:
                if out and max_bytes is not None and size + length > max_bytes:
                    break
                row = self._db.execute(
                    "SELECT seq, event_id, type, created, attempts, body FROM outbox WHERE seq = ?",
                    (seq,),
                ).fetchone()
                if row is None:
                    break  # dead-lettered or acknowledged meanwhile by another connection
                size += length
                out.append(Queued(row[0], row[1], row[2], row[3], row[4], bytes(row[5])))
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the outbox in {self._path}: {exc}") from None
        if out:
            self.sent_floor = max(self.sent_floor, out[-1].seq)
        return out

    def ack_many(self, seqs: list[int], duplicates: int = 0) -> None:
        """The backend accepted these events: they leave the outbox in one transaction. It
        said ``duplicates`` of them it already had; both are added to the delivery totals.

        This transaction alone commits without waiting for the disk (``synchronous = NORMAL``):
        a power cut can only undo it, and then the events are sent again under the same
        event_ids, which the backend deduplicates. It cannot be reordered before an earlier
        commit, and every transaction that queues an event still waits for the disk. The wait
        for the disk was most of the time one delivery took (see BENCHMARKS.md).
        """
        if not seqs:
            return
        relax = self._synchronous == "FULL"
        try:
            if relax:
                self._db.execute("PRAGMA synchronous = NORMAL")
            try:
                with self._transact():
                    gone = self._db.executemany(
                        "DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in seqs]
                    ).rowcount
                    count_delivered(self._db, gone, duplicates)
                    put_meta(
                        self._db,
                        "last_delivery",
                        {"at": time.time(), "result": "ok", "seq": max(seqs)},
                    )
            finally:
                if relax:
                    self._db.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            raise storage_error(exc) from None

    def depth(self, adw_id: str | None = None) -> int:
        """How many events are queued (of one ADW, or in all). Unlike :meth:`head`, this
        changes nothing."""
        try:
            if adw_id is None:
                row = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            else:
                row = self._db.execute(
                    "SELECT COUNT(*) FROM outbox WHERE adw_id = ?", (adw_id,)
                ).fetchone()
            return int(row[0])
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the outbox in {self._path}: {exc}") from None

    def ack(self, seq: int, duplicates: int = 0) -> None:
        """The backend accepted one event (see :meth:`ack_many`); ``duplicates`` is 1 when it
        said it already had it."""
        self.ack_many([seq], duplicates)

    def record_failure(self, seq: int, error: str) -> None:
        """Remember a failed attempt (for status); the event stays queued."""
        with self._transact():
            self._db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?",
                (error, seq),
            )
            put_meta(self._db, "last_delivery", {"at": time.time(), "result": error, "seq": seq})

    def dead_letter(self, event: Queued, status: int | None, response: str) -> None:
        """Move a rejected event out of the outbox, keeping the backend's answer."""
        with self._transact():
            self._db.execute(
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
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (event.seq,))
            put_meta(
                self._db,
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
        with self._transact():
            rows = self._db.execute(
                f"SELECT seq, event_id, type, created, body, adw_id FROM dead_letters {where} "  # noqa: S608
                "ORDER BY seq",
                args,
            ).fetchall()
            for row in rows:
                try:
                    self._db.execute(
                        "INSERT INTO outbox (seq, event_id, type, created, body, adw_id) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        row,
                    )
                except sqlite3.IntegrityError:
                    raise StorageError(
                        f"dead letter seq {row[0]} (event_id {row[1]}) is already in the "
                        "outbox; nothing was requeued"
                    ) from None
                self._db.execute("DELETE FROM dead_letters WHERE seq = ?", (row[0],))
        return len(rows)

    def stats(self) -> dict[str, Any]:
        return outbox_stats(self._db)


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


def count_delivered(db: sqlite3.Connection, delivered: int, duplicates: int) -> None:
    """Add to the delivery totals (inside the acknowledging transaction). Duplicates are
    events that left the outbox too: never more of them than of those."""
    duplicates = max(0, min(duplicates, delivered))
    for key, add in ((DELIVERED, delivered), (DUPLICATES, duplicates)):
        if add:
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
                (key, add),
            )
