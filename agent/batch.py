"""From filesystem events to batches of changed files: the step between watch and read.

The shape is watchfiles' ``awatch``: changes are collected as they come, and handed out as one
batch once they pause for the quiet window (``watch.debounce_ms``), or after twenty windows at
most, so that a file is read once its write is complete and a steady stream of writes is still
read regularly. A file whose writer has closed it (inotify's IN_CLOSE_WRITE) is complete
already: when every pending file is, the batch is handed out at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable

from agent.layout import Change

#: The longest a batch waits for writes to pause, in quiet windows.
_MAX_WINDOWS = 20


class ChangeBatcher:
    """Collects changes (from any thread) and hands them to the event loop in batches."""

    def __init__(self, *, quiet: float, classify: Callable[[str], Change | None]) -> None:
        self.quiet = quiet
        self._classify = classify
        self._pending: set[Change] = set()
        # Pending changes whose last event was their writer closing the file.
        self._closed: set[Change] = set()
        #: Set when there is something to do: pending changes, or a wake-up (a reload).
        self.changed = asyncio.Event()
        self._noted = asyncio.Event()
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
        self._pending.add(change)
        if closed:
            self._closed.add(change)
        else:
            self._closed.discard(change)
        self._last_change = time.monotonic()
        self.changed.set()
        self._noted.set()

    def add(self, changes: Iterable[Change], *, wake: bool) -> None:
        """Changes taken before that could not be finished, for a later batch: a backlog
        (``wake``: read on at once), or a store that failed (read when it is tried again; waking
        now would only fail again)."""
        self._pending.update(changes)
        if wake:
            self.changed.set()

    def wake(self) -> None:
        """Let the main loop run now, with or without changes."""
        self.changed.set()

    def interrupt(self) -> None:
        """End a wait for writes to pause at once (the agent is stopping)."""
        self._noted.set()

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    async def settle(self, stop: asyncio.Event) -> None:
        """Wait until changes pause for the quiet window (at most twenty windows), or until
        every pending file was closed by its writer, or ``stop`` is set."""
        if self.quiet <= 0:
            return
        give_up = time.monotonic() + self.quiet * _MAX_WINDOWS
        while not self._pending <= self._closed and not stop.is_set():
            quiet_at = self._last_change + self.quiet
            now = time.monotonic()
            if now >= quiet_at or now >= give_up:
                return
            self._noted.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._noted.wait(), min(quiet_at, give_up) - now)

    def take(self) -> set[Change]:
        """Every pending change; the batcher starts empty again."""
        changes, self._pending = self._pending, set()
        self._closed.clear()
        self.changed.clear()
        return changes
