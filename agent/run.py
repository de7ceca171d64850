"""One run directory inside the agent: watch → batch → read → account → outbox for that run.

A :class:`RunUnit` holds what belongs to one run: its layout and pipeline (with the cost
ledgers), the batcher its watcher feeds, the watcher, the retries of files that could not be
read yet, and when to look at the whole directory again. The store, the sender and the store's
health are the process's (see :mod:`agent.app`); the unit tells the process through
:class:`RunEvents` when the store failed or recovered and when it queued events.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol

from agent.batch import ChangeBatcher
from agent.config import Config
from agent.errors import StorageError
from agent.health import StoreHealth
from agent.layout import RESCAN, Change, FileKey
from agent.outbox import Store
from agent.pipeline import Outcome, Pipeline
from agent.watch import RunWatch

log = logging.getLogger("adw_agent.run")

#: How often a run directory that is gone (or cannot be watched) is looked for.
MISSING_DIR_POLL = 1.0


class RunEvents(Protocol):
    """What a run tells the process that holds the shared store and sender."""

    def store_failed(self, exc: StorageError) -> None: ...

    def store_ok(self) -> None: ...

    def queued(self) -> None: ...


@dataclass
class _Retry:
    due: float
    attempts: int = 0


class RunUnit:
    """The agent's part for one run directory."""

    def __init__(
        self, config: Config, store: Store, *, health: StoreHealth, events: RunEvents
    ) -> None:
        self.config = config
        self.pipeline = Pipeline(config, store)
        self.batcher = ChangeBatcher(
            quiet=config.watch.debounce_ms / 1000, classify=self.pipeline.layout.classify
        )
        self.watch = RunWatch(
            config, self.batcher.notice, functools.partial(self.batcher.notice, closed=True)
        )
        self.retries: dict[FileKey, _Retry] = {}
        #: Whether the startup snapshot still has to be queued (the store could not be written).
        self.sync_pending = False
        self.rescan_at = time.monotonic() + config.watch.rescan_interval
        self._store = store
        self._health = health
        self._events = events

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded configuration (the run directory itself never changes)."""
        if config.watch.rescan_interval != self.config.watch.rescan_interval:
            self.rescan_at = time.monotonic() + config.watch.rescan_interval
        self.config = config
        self.pipeline.config = config
        self.batcher.quiet = config.watch.debounce_ms / 1000

    def start_watching(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start watching. Before the first snapshot (:meth:`sync`), so that no change can
        slip between the two."""
        self.batcher.bind(loop)
        if not self.watch.start():
            self.rescan_at = time.monotonic() + MISSING_DIR_POLL

    # -- batches ----------------------------------------------------------------------------

    async def step(self, stop: asyncio.Event) -> None:
        """Handle the pending changes once their writes paused, if there are any."""
        if self.batcher.pending:
            await self.batcher.settle(stop)
            self.process(self.batcher.take())
        else:
            self.batcher.changed.clear()

    def retry_due(self, now: float) -> None:
        """Read again the files whose retry is due."""
        due = {key for key, r in self.retries.items() if self._health.not_before(r.due) <= now}
        if due:
            self.process(due)

    async def reconcile(self, now: float) -> None:
        """Look at the whole directory again: what inotify missed, and a watcher to heal."""
        self.rescan_at = now + self.config.watch.rescan_interval
        found = await self.watch.reconcile()
        if found != "watching":
            self.rescan_at = time.monotonic() + MISSING_DIR_POLL
        if found != "gone":
            self.process({RESCAN})

    def next_deadline(self) -> float:
        deadlines = [self.rescan_at]
        deadlines += [self._health.not_before(r.due) for r in self.retries.values()]
        return min(deadlines)

    def rescan_due(self, now: float) -> bool:
        # A watcher that stopped by itself (its directory was deleted) is healed at once.
        return now >= self.rescan_at or not self.watch.healthy()

    def process(self, changes: Iterable[Change]) -> None:
        changes = set(changes)
        if self._health.blocked():
            # It would fail again at once: read these when the store is tried next.
            self.batcher.add(changes, wake=False)
            return
        before = self._store.total_changes
        try:
            outcome = self.pipeline.process(changes)
        except StorageError as exc:
            log.debug(
                "batch not recorded: the store cannot be written",
                extra={"keys": sorted(map(str, changes))},
            )
            self.batcher.add(changes, wake=False)
            self._events.store_failed(exc)
            return
        self._handle(changes, outcome, wrote=self._store.total_changes > before)

    def sync(self) -> None:
        """Queue the full picture as ``sync`` events (at startup, and every intervals.resync)."""
        try:
            outcome = self.pipeline.snapshot()
        except StorageError as exc:
            self.sync_pending = True
            self.batcher.add({RESCAN}, wake=False)
            self._events.store_failed(exc)
            return
        self.sync_pending = False
        self._handle(self.pipeline.all_keys(), outcome, wrote=True)

    def _handle(self, changes: AbstractSet[Change], outcome: Outcome, *, wrote: bool) -> None:
        """Schedule parse retries and follow-up reads after a successful batch."""
        if wrote or self._health.error is None:
            # A batch that wrote nothing proves nothing about a failing store.
            self._events.store_ok()
        now = time.monotonic()
        # A rescan (or a new agent directory) stands for the files it read: those that read
        # fine need no retry any more.
        for key in self.pipeline.expand(changes):
            if key not in outcome.retry:
                self.retries.pop(key, None)
        for key in outcome.retry:
            entry = self.retries.setdefault(key, _Retry(now))
            entry.attempts += 1
            if entry.attempts > self.config.watch.parse_retries:
                self.pipeline.report_unreadable(key)
                self.retries.pop(key)
            else:
                entry.due = now + self.config.watch.parse_retry_ms / 1000
        if outcome.more:
            self.batcher.add(outcome.more, wake=True)
        if outcome.emitted:
            self._events.queued()
