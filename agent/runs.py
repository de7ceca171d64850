"""The runs one process reports on: one run directory, or every run directory under a root.

One watcher covers them all (one inotify instance, recursive on the watched directory); each
changed path goes to the batcher of its run. The runs are handled in turn, and in host mode each
run reads a bounded number of transcript bytes per batch, so that a run with a huge backlog or
a hostile file delays the others by one bounded batch at most.

Host mode: a run directory that appears is picked up at once. A run whose workflow has ended
(an ``end_time`` in its state, or a reported failure) and whose events are all delivered is
retired: its reader and ledgers are dropped (the kernel's watches on its folders stay, as they
belong to the one recursive watch). It is picked up again when its files change. A run directory
that was deleted is forgotten once its events are delivered. What stays in memory per past run
is its name.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

from agent import claims
from agent.account import WindowBudget
from agent.claims import Claim
from agent.config import Config
from agent.discover import RunDirs
from agent.errors import ConfigError, StorageError
from agent.health import StoreHealth
from agent.layout import RESCAN
from agent.outbox import Store
from agent.pipeline import run_ended
from agent.run import RunEvents, RunUnit
from agent.watch import RunWatch

log = logging.getLogger("adw_agent.runs")

#: How often a watched directory that is gone (or cannot be watched) is looked for.
MISSING_DIR_POLL = 1.0
#: Transcript bytes one run reads per batch in host mode.
HOST_READ_BUDGET = 1 << 20
#: Transcript bytes the one run reads per batch otherwise, over all its transcripts: a run with
#: many transcripts' backlog still catches up in bounded steps (and READY waits for one only).
RUN_READ_BUDGET = 8 << 20


class Runs:
    """Every run of the process, the one watcher that feeds them, and their turns."""

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        health: StoreHealth,
        events: RunEvents,
        claims: Path | None,
        claim: Claim | None = None,
    ) -> None:
        """``claims`` is the lock directory (None: no claims); ``claim`` the process's claim on
        its one run directory (host mode claims each run directory as it opens it)."""
        self.config = config
        self._claims = claims
        self._claim = claim
        #: Host mode: run directories another agent has claimed; tried again at each rescan.
        self.foreign: set[str] = set()
        self._store = store
        self._health = health
        self._events = events
        #: Set whenever any run may have work (shared by every run's batcher).
        self.changed = asyncio.Event()
        self.units: dict[str, RunUnit] = {}
        #: The message ids every run's transcripts may remember, together
        #: (``limits.dedup_total`` bounds the process, not each run).
        self.window_budget = WindowBudget(config.limits.dedup_total)
        #: Host mode: run directories whose runs ended and were delivered.
        self.retired: set[str] = set()
        self._dirs = RunDirs(config.adw.root) if config.adw.root is not None else None
        self.watch = RunWatch(config, self._notice, functools.partial(self._notice, closed=True))
        self.rescan_at = time.monotonic() + config.watch.rescan_interval
        self._turn = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- startup ----------------------------------------------------------------------------

    def start_watching(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start watching. Before the first snapshot (:meth:`sync`), so that no change can
        slip between the two."""
        self._loop = loop
        if self._dirs is None:
            # Opened first: its stream is checked before anything is queued in it.
            self._open(self.config)
        if not self.watch.start():
            self.rescan_at = time.monotonic() + MISSING_DIR_POLL

    def sync(self) -> None:
        """Queue the full picture of every run that has not ended and been delivered."""
        if self._dirs is None:
            unit = self.units.get(self.config.adw_id) or self._open(self.config)
            if unit is not None:
                self._grouped([unit], RunUnit.sync)
            return
        for adw_id in self._dirs.scan():
            if adw_id in self.units:
                self._grouped([self.units[adw_id]], RunUnit.sync)
            elif adw_id not in self.retired:
                if self._finished(adw_id):
                    self.retired.add(adw_id)
                elif (unit := self._open_run(adw_id)) is not None:
                    self._grouped([unit], RunUnit.sync)

    def sync_pending(self) -> None:
        """Queue the snapshots that the store could not take before."""
        self._grouped([u for u in self.units.values() if u.sync_pending], RunUnit.sync)

    def _open_run(self, adw_id: str) -> RunUnit | None:
        if self._dirs is None:
            return None
        return self._open(self.config.for_run(self._dirs.path(adw_id)))

    def _open(self, config: Config) -> RunUnit | None:
        claim = self._claim
        if self._dirs is not None and self._claims is not None:
            try:
                claim = claims.claim(self._claims, config.run_dir, key="adw.root")
            except (ConfigError, StorageError) as exc:
                if config.adw_id not in self.foreign:
                    log.warning("not reporting this run: %s", exc, extra={"adw_id": config.adw_id})
                self.foreign.add(config.adw_id)
                return None
            self.foreign.discard(config.adw_id)
        unit = RunUnit(
            config,
            self._store,
            health=self._health,
            events=self._events,
            changed=self.changed,
            read_budget=HOST_READ_BUDGET if self._dirs is not None else RUN_READ_BUDGET,
            window_budget=self.window_budget,
            claim=claim,
        )
        try:
            unit.check_stream()
        except StorageError as exc:
            self._events.store_failed(exc)
        self.units[unit.adw_id] = unit
        self.retired.discard(unit.adw_id)
        return unit

    # -- changes ----------------------------------------------------------------------------

    def _notice(self, path: str, closed: bool = False) -> None:
        """On the watcher's thread: hand the path to the event loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._route, path, closed)

    def _route(self, path: str, closed: bool) -> None:
        if self._dirs is None:
            unit = self.units.get(self.config.adw_id)
            if unit is not None:
                unit.batcher.note(path, closed)
            return
        adw_id = self._dirs.run_of(path)
        if adw_id is None:
            return  # the root itself, or something under it that is not a run
        unit = self.units.get(adw_id)
        if unit is None:
            if adw_id in self.foreign or not self._dirs.exists(adw_id):
                return
            # A new run, or a retired one whose files changed: its whole directory is read.
            unit = self._open_run(adw_id)
            if unit is None:
                return
            unit.batcher.add({RESCAN}, wake=True)
        unit.batcher.note(path, closed)

    def reconfigure(self, config: Config) -> None:
        if config.watch.rescan_interval != self.config.watch.rescan_interval:
            self.rescan_at = time.monotonic() + config.watch.rescan_interval
        self.config = config
        for unit in self.units.values():
            unit.reconfigure(config if self._dirs is None else config.for_run(unit.config.run_dir))

    def wake(self) -> None:
        self.changed.set()

    # -- the loop ---------------------------------------------------------------------------

    def next_deadline(self) -> float:
        return min([self.rescan_at, *(unit.ready_at() for unit in self.units.values())])

    def step(self, now: float) -> None:
        """Give every run with work its turn: one batch each, starting one further each time,
        all in one transaction (one wait for the disk, however many runs changed)."""
        self.changed.clear()
        units = [unit for unit in self.units.values() if unit.ready_at() <= now]
        if not units:
            return
        self._turn = (self._turn + 1) % len(units)
        self._grouped(units[self._turn :] + units[: self._turn], lambda unit: unit.step(now))

    def flush(self) -> None:
        """Handle whatever is pending now (the agent is stopping)."""
        self._grouped(list(self.units.values()), RunUnit.flush)

    def _grouped(self, units: list[RunUnit], work: Callable[[RunUnit], None]) -> None:
        """Run ``work`` for each unit inside one store transaction; if the commit fails, every
        one of them reads its changes again later."""
        done: list[RunUnit] = []
        try:
            with self._store.group():
                for unit in units:
                    done.append(unit)
                    work(unit)
        except BaseException as exc:
            for unit in done:
                unit.undo()
            if isinstance(exc, StorageError):
                log.debug(
                    "batch not recorded: the store cannot be written",
                    extra={"runs": [unit.adw_id for unit in done]},
                )
                self._events.store_failed(exc)
                return
            raise
        for unit in done:
            unit.committed()

    def rescan_due(self, now: float) -> bool:
        # A watcher that stopped by itself (its directory was deleted) is healed at once.
        return now >= self.rescan_at or not self.watch.healthy()

    async def reconcile(self, now: float) -> None:
        """Look at everything again: what inotify missed, runs that ended, a watcher to heal."""
        self.rescan_at = now + self.config.watch.rescan_interval
        found = await self.watch.reconcile()
        if found != "watching":
            self.rescan_at = time.monotonic() + MISSING_DIR_POLL
        if found == "gone":
            return
        self.rescan()
        self.retire()

    def rescan(self) -> None:
        """Read every run again, and pick up run directories the watcher missed."""
        if self._dirs is not None:
            for adw_id in self._dirs.scan():
                if adw_id not in self.units and adw_id not in self.retired:
                    self._open_run(adw_id)
        self._grouped(list(self.units.values()), RunUnit.rescan)

    def retire(self) -> None:
        """Host mode: drop the runs that ended and were delivered; forget deleted ones."""
        if self._dirs is None:
            return
        for adw_id, unit in list(self.units.items()):
            if unit.idle and self._finished(adw_id):
                del self.units[adw_id]
                if unit.claim is not None:
                    unit.claim.release()
                if self._dirs.exists(adw_id):
                    self.retired.add(adw_id)
                    log.debug("run retired", extra={"adw_id": adw_id})
        self.retired = {adw_id for adw_id in self.retired if self._dirs.exists(adw_id)}
        self.foreign = {adw_id for adw_id in self.foreign if self._dirs.exists(adw_id)}

    def close(self) -> None:
        """Give up the claims (the process ending would too)."""
        for unit in self.units.values():
            if unit.claim is not None and unit.claim is not self._claim:
                unit.claim.release()

    def _finished(self, adw_id: str) -> bool:
        """Ended as recorded in the store, and nothing of it left to deliver; or its directory
        is gone and nothing of it is left to deliver."""
        if self._dirs is None or self._store.queue.depth(adw_id) > 0:
            return False
        return not self._dirs.exists(adw_id) or run_ended(self._store, adw_id)

    # -- for status and the watchdog --------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self.watch.paused
