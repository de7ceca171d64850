"""From filesystem events to batches of changed files: the step between watch and read.

The shape is watchfiles' ``awatch``: changes are collected as they come, and handed out as one
batch once they pause for the quiet window (``watch.debounce_ms``), or after twenty windows at
most, so that a file is read once its write is complete and a steady stream of writes is still
read regularly. A file whose writer has closed it (inotify's IN_CLOSE_WRITE) is complete
already: when every pending file is, the batch is handed out at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from agent.layout import Change

#: The longest a batch waits for writes to pause, in quiet windows.
_MAX_WINDOWS = 20


class ChangeBatcher:
    """Collects the changes of one run directory and says when they make a batch.

    Runs on the event loop; :meth:`notice` is the entry for other threads. Several batchers
    may share one ``changed`` event, so that one main loop waits for all of them.
    """

    def __init__(
        self,
        *,
        quiet: float,
        classify: Callable[[str], Change | None],
        changed: asyncio.Event | None = None,
    ) -> None:
        self.quiet = quiet
        self._classify = classify
        self._pending: set[Change] = set()
        # Pending changes whose last event was their writer closing the file.
        self._closed: set[Change] = set()
        #: Set when there may be something to do: changes noted, or a wake-up (a reload).
        self.changed = changed if changed is not None else asyncio.Event()
        self._first_change = 0.0
        self._last_change = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop that filesystem events from other threads are handed to."""
        self._loop = loop

    def notice(self, path: str, closed: bool = False) -> None:
        """Called on the watcher's thread for every relevant event; ``closed`` when the writer
        of the file has just closed it."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.note, path, closed)

    def note(self, path: str, closed: bool = False) -> None:
        change = self._classify(path)
        if change is None:
            return
        now = time.monotonic()
        if not self._pending:
            self._first_change = now
        self._pending.add(change)
        if closed:
            self._closed.add(change)
        else:
            self._closed.discard(change)
        self._last_change = now
        self.changed.set()

    def add(self, changes: Iterable[Change], *, wake: bool) -> None:
        """Changes taken before that could not be finished, for a later batch: a backlog
        (``wake``: read on at once), or a store that failed (read when it is tried again; waking
        now would only fail again). They wait for no quiet window."""
        if not self._pending:
            self._first_change = time.monotonic()
        self._pending.update(changes)
        self._closed.update(changes)
        if wake:
            self.changed.set()

    def wake(self) -> None:
        """Let the main loop run now, with or without changes."""
        self.changed.set()

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def holds(self, change: Change) -> bool:
        """Whether ``change`` is pending (its batch is still to come)."""
        return change in self._pending

    def ready_at(self) -> float:
        """When the pending changes make a batch (monotonic clock): once writes paused for the
        quiet window, at most twenty windows after the first change, and at once when every
        pending file was closed by its writer."""
        if self.quiet <= 0 or self._pending <= self._closed:
            return 0.0
        return min(self._last_change + self.quiet, self._first_change + self.quiet * _MAX_WINDOWS)

    def take(self) -> set[Change]:
        """Every pending change; the batcher starts empty again."""
        changes, self._pending = self._pending, set()
        self._closed.clear()
        return changes
