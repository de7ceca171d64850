"""The only owner of SQL: the store the service, the router and the broadcast use.

:class:`Store` puts together the parts, each in its own module, and is what the rest of the
backend calls:

- :mod:`adw_backend.store_schema`: the tables, the engine and its dialect's settings, and the
  transactions, where a database error is translated (the one boundary);
- :mod:`adw_backend.store_ingest`: the write path (insert once, fold into the projections,
  row locks and ``NOTIFY`` on PostgreSQL) and deletes;
- :mod:`adw_backend.store_cache`: the projections last committed, kept in memory on SQLite;
- :mod:`adw_backend.store_reads`: the reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from adw_backend.projection import EventView, Projection, Status
from adw_backend.store_cache import ProjectionCache
from adw_backend.store_ingest import Outcome, Writer
from adw_backend.store_reads import Reader
from adw_backend.store_schema import CONNECT_ARGS, Applied, Database, pg_connect_args

__all__ = ["CONNECT_ARGS", "Applied", "Outcome", "Store", "pg_connect_args"]


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
        self._db = Database(url, sqlite_synchronous=sqlite_synchronous)
        self.is_postgres = self._db.is_postgres
        self.engine = self._db.engine
        # Names this process in its notices, so that it does not broadcast its own twice.
        self.origin = origin
        cache = ProjectionCache() if not self.is_postgres else None
        self._writer = Writer(
            self._db, cache, cost_points=cost_points, notify_channel=notify_channel, origin=origin
        )
        self._reader = Reader(self._db)

    def setup(self) -> None:
        """Create the tables if needed (also done lazily by the first request)."""
        self._db.setup()

    def close(self) -> None:
        self._db.close()

    def ping(self) -> None:
        self._db.ping()

    def ingest(
        self,
        batch: Sequence[tuple[EventView, str]],
        committed: Callable[[list[Applied]], None] | None = None,
    ) -> Outcome:
        """Store ``batch`` and fold the new events, atomically (see
        :meth:`~adw_backend.store_ingest.Writer.ingest`)."""
        return self._writer.ingest(batch, committed)

    def delete(self, adw_id: str) -> None:
        """Forget a workflow and its events (an operator's decision, e.g. a failed run)."""
        self._writer.delete(adw_id)

    def workflows(self, status: Status | None = None, limit: int = 1000) -> list[Projection]:
        """The ``limit`` most recently updated workflows (or those with ``status``)."""
        return self._reader.workflows(status, limit)

    def workflow(self, adw_id: str) -> Projection:
        return self._reader.workflow(adw_id)

    def events(
        self, adw_id: str, *, after_seq: int = -1, after_epoch: int | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Stored events of ``adw_id`` in (epoch, seq) order, as the agent sent them."""
        return self._reader.events(
            adw_id, after_seq=after_seq, after_epoch=after_epoch, limit=limit
        )

    def event_messages(self, event_ids: list[str]) -> list[Applied]:
        """Stored events with their workflows' current projections (for another replica's
        broadcast)."""
        return self._reader.event_messages(event_ids)
