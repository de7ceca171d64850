"""One run directory inside the agent: watch → batch → read → account → outbox for that run.

A :class:`RunUnit` holds what belongs to one run: its layout and pipeline (with the cost
ledgers), the batcher that collects its changes, and the retries of files that could not be
read yet. The watcher, the store, the sender and the store's health are the process's (see
:mod:`agent.runs` and :mod:`agent.app`); the unit tells the process through :class:`RunEvents`
when the store failed or recovered and when it queued events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol

from agent.account import WindowBudget
from agent.batch import ChangeBatcher
from agent.claims import Claim
from agent.config import Config
from agent.errors import StorageError
from agent.health import StoreHealth
from agent.layout import RESCAN, Change, FileKey, Fingerprint, fingerprint
from agent.outbox import Store
from agent.pipeline import Outcome, Pipeline

log = logging.getLogger("adw_agent.run")


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
    """The agent's part for one run directory: its pipeline, batches and retries."""

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        health: StoreHealth,
        events: RunEvents,
        changed: asyncio.Event,
        read_budget: int | None = None,
        window_budget: WindowBudget | None = None,
        claim: Claim | None = None,
    ) -> None:
        self.config = config
        self.adw_id = config.adw_id
        self.pipeline = Pipeline(
            config, store, read_budget=read_budget, window_budget=window_budget
        )
        self.batcher = ChangeBatcher(
            quiet=config.watch.debounce_ms / 1000,
            classify=self.pipeline.layout.classify,
            changed=changed,
        )
        self.retries: dict[FileKey, _Retry] = {}
        #: Whether the startup snapshot still has to be queued (the store could not be written).
        self.sync_pending = False
        self._store = store
        self._health = health
        self._events = events
        # Changes handled in the store's current group of batches, not yet committed.
        self._uncommitted: set[Change] = set()
        self._synced = False
        # The run directory as last read in full (see rescan); None: read it at the next one.
        self._fingerprint: Fingerprint | None = None
        #: This process's claim on the run directory, which also records its stream's epoch.
        self.claim = claim
        self._recorded = claim.recorded_epoch(self.adw_id) if claim is not None else None

    def check_stream(self) -> None:
        """Compare the store's stream with the one last reported for this directory.

        A store that has no stream for it, or an older one, was lost, reset or replaced: the
        backend already has events under the recorded epoch, so the stream starts again with a
        larger epoch, and the operator hears about it (loudly, and in ``status``).
        """
        recorded = self._recorded
        if recorded is None:
            return
        current = self._store.epoch(self.adw_id)
        if current is not None and current >= recorded:
            return
        log.error(
            "the store does not hold the event stream of this run directory (reported under "
            "epoch %d; the store's: %s): it was lost, reset or replaced. Events start again "
            "in a new stream with a larger epoch, and seq starts again",
            recorded,
            current,
            extra={"adw_id": self.adw_id, "path": str(self._store.path)},
        )
        self._store.stream_replaced(self.adw_id, recorded, current)

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded configuration (the run directory itself never changes)."""
        self.config = config
        self.pipeline.config = config
        self.batcher.quiet = config.watch.debounce_ms / 1000

    # -- batches ----------------------------------------------------------------------------

    def ready_at(self) -> float:
        """When this run has work: its batch, or a retry (inf when it has none)."""
        deadlines = [
            self._health.not_before(r.due)
            for key, r in self.retries.items()
            if not self.batcher.holds(key)
        ]
        if self.batcher.pending:
            deadlines.append(self._health.not_before(self.batcher.ready_at()))
        return min(deadlines, default=float("inf"))

    def step(self, now: float) -> None:
        """Handle the pending batch if it is ready, then the retries that are due."""
        if self.batcher.pending and self._health.not_before(self.batcher.ready_at()) <= now:
            self.process(self.batcher.take())
        # A file that is still being written is read with its batch, once the writes pause:
        # retrying it meanwhile would only use up its retries on a write in progress.
        due = {
            key
            for key, r in self.retries.items()
            if self._health.not_before(r.due) <= now and not self.batcher.holds(key)
        }
        if due:
            self.process(due)

    def flush(self) -> None:
        """Handle whatever is pending now, ready or not (the agent is stopping)."""
        if self.batcher.pending:
            self.process(self.batcher.take())

    @property
    def idle(self) -> bool:
        """Nothing pending and nothing to retry."""
        return not self.batcher.pending and not self.retries and not self.sync_pending

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
                extra={"keys": sorted(map(str, changes)), "adw_id": self.adw_id},
            )
            self.batcher.add(changes, wake=False)
            self._fingerprint = None
            self._events.store_failed(exc)
            return
        self._uncommitted |= changes
        self._handle(changes, outcome, wrote=self._store.total_changes > before)

    def rescan(self) -> None:
        """Read every file again, unless nothing was written since the last time: a rescan is
        for what the watcher missed, and an idle run must cost nothing."""
        seen = fingerprint(self.pipeline.layout, self.retries)
        if seen == self._fingerprint and not self.retries:
            return
        self._fingerprint = seen
        self.process({RESCAN})

    def committed(self) -> None:
        """The group of batches this run's changes were in is committed."""
        self._uncommitted.clear()
        self._synced = False
        self.pipeline.committed()
        self._record_epoch()

    def undo(self) -> None:
        """The group of batches was rolled back: read those changes again later."""
        self.pipeline.forget()
        self._fingerprint = None
        if self._uncommitted:
            self.batcher.add(self._uncommitted, wake=False)
        self.sync_pending |= self._synced
        self._uncommitted.clear()
        self._synced = False

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
        self._synced = True
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

    def _record_epoch(self) -> None:
        if self.claim is None:
            return
        epoch = self._store.epoch(self.adw_id)
        if epoch is not None and epoch != self._recorded:
            self.claim.record_epoch(self.adw_id, epoch)
            self._recorded = epoch
