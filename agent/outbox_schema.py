"""The store's schema and how a store of an earlier version is brought up to date.

Part of the store (:mod:`agent.outbox`): with :mod:`agent.outbox_queue` these are the only
modules that hold SQL. Also the helpers every store module shares: the ``meta`` table, the
delivery totals' keys, and how a failure of SQLite becomes a :class:`StorageError`.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson

from agent.errors import DamagedStore, StorageError

SCHEMA = """
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
DELIVERED = "delivered"
DUPLICATES = "duplicates"
#: When a store of an earlier version, which had already queued events, started counting.
COUNTED_SINCE = "counted_since"


def storage_error(exc: sqlite3.Error) -> StorageError:
    return StorageError(f"storage write failed: {exc}")


# SQLite's answers for a file that is damaged, or not a database at all.
_DAMAGED = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}


def check_intact(db: sqlite3.Connection, path: Path) -> None:
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


def owner_name(owner: str) -> str:
    return "every ADW under a root" if owner == HOST_OWNER else f"ADW {owner!r}"


def table_columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {str(row[1]) for row in db.execute(f"PRAGMA table_info({table})")}


def migrate(db: sqlite3.Connection, owner: str) -> None:
    """Bring a store written by an earlier version up to date, in one transaction.

    Earlier stores held one ADW: their records move under it, their events are its events,
    and its stream continues their seq (under a new epoch: the stream is new to this store).
    Stores that did not count superseded events and deliveries count them from now on: their
    streams say from which seq, and the store since when.
    """
    files = table_columns(db, "files")
    outbox = table_columns(db, "outbox")
    dead = table_columns(db, "dead_letters")
    grouped = bool(files) and "adw_id" in files and "adw_id" in outbox and "adw_id" in dead
    counted = "superseded" in table_columns(db, "streams")
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
            put_meta(db, COUNTED_SINCE, time.time())
        if not grouped:
            _group_by_adw(db, owner, files, outbox, dead)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _group_by_adw(
    db: sqlite3.Connection, owner: str, files: set[str], outbox: set[str], dead: set[str]
) -> None:
    """Move a one-ADW store's records and events under its ADW (inside :func:`migrate`)."""
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
        put_meta(db, "epoch_floor", epoch)


def put_meta(db: sqlite3.Connection, key: str, value: Any) -> None:
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
