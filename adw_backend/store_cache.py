"""The projections this process last committed, kept in memory on SQLite.

On SQLite this process is the one writer, so it keeps the projections it last committed
(bounded, least recently used out first) instead of reading them back and decoding them for
every request. The cache is filled only after a commit and emptied of a workflow as it is
deleted, both while this process holds its write turn; a restart starts empty and reads the
file. PostgreSQL, where other replicas write too, has no cache: it always reads the rows it
locks.
"""

from __future__ import annotations

from collections import OrderedDict

from adw_backend.projection import Marks, Projection

#: Projections kept in memory on SQLite: at most this many workflows, and this many bytes of
#: their JSON (a workflow whose JSON is over an eighth of it is never kept).
CACHE_WORKFLOWS = 2000
CACHE_BYTES = 32 * 1024 * 1024


class ProjectionCache:
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
