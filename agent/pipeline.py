"""From changed paths to queued events: the read → account → outbox step for one run directory.

Every batch of changes is handled in one store transaction: what was read (state snapshots,
error.log size, transcript offsets and cost ledgers) is recorded together with the events it
produced. If the transaction fails (the store cannot be written), the in-memory readers are
dropped and rebuilt from the store, so the same bytes are read again later and nothing is
counted twice.

Within the batch each file is handled under its own savepoint. An unexpected error while
handling one file (a bug, or input nobody foresaw) rolls back only that file's reads and events
and drops its in-memory reader, so its changes are read again from the last saved point the next
time it changes; it is logged once, with the file's path, until that file is handled again
without error. The other files' events still commit. Only a failing store fails a whole batch.

Order within a batch: transcripts; then the cost they add, charged to the phase that was current
*before* this batch; then completed_phases.json, error.log and adw_state.json. Lines written
just before a phase ends therefore count towards that phase even when the agent sees both at
once, as on every catch-up after a restart. A transcript with more to read than one batch takes
(a backlog) is read in bounded steps, each committed with its saved offset, and state, phase and
error.log changes never wait for it: they go out in the first batch that sees them. The rest of
the backlog is then charged to the phase that is current when its bytes are read.

The steps themselves: agent.pipeline_cost (transcripts and cost) and agent.pipeline_progress
(state, phases, error.log and how the run ended), over the batch of agent.pipeline_batch.

Warnings follow one rule: once per problem per file, until that file reads fine again, and at
most a few per file per minute (see agent.notices).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial

from agent.account import PriceTable, WindowBudget
from agent.config import Config
from agent.errors import StorageError
from agent.events import Source
from agent.layout import ERRORLOG, PHASES, RESCAN, STATE, Change, FileKey, RunLayout
from agent.notices import FileWarnings
from agent.outbox import Store
from agent.pipeline_batch import Batch, Outcome, Step
from agent.pipeline_cost import Costs
from agent.pipeline_progress import Progress

__all__ = ["Outcome", "Pipeline", "run_ended"]

log = logging.getLogger("adw_agent.pipeline")


def run_ended(store: Store, adw_id: str) -> bool:
    """Whether the run's workflow has ended, as last recorded: an ``end_time`` in its state, or
    a failure reported."""
    if store.record(adw_id, "failure_reported"):
        return True
    state = store.record(adw_id, STATE)
    return isinstance(state, dict) and bool(state.get("end_time"))


class Pipeline:
    """Reads the files of one run directory and queues the events their changes mean."""

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        read_budget: int | None = None,
        window_budget: WindowBudget | None = None,
    ) -> None:
        self.store = store
        self.adw_id = config.adw_id
        self.run_dir = config.run_dir
        self.layout = RunLayout(self.run_dir)
        #: Bytes of transcript read per batch at most, over all of this run's transcripts
        #: (None: the module's default, per transcript). Host mode bounds it per run, so that
        #: one run's backlog delays the others by one bounded batch at most.
        self.read_budget = read_budget
        self.prices = PriceTable.from_config(config.cost)
        self._warnings = FileWarnings(log)
        self.progress = Progress(config, self.layout, self._warnings)
        # One budget for every transcript of the process (host mode passes the runs' shared
        # one), so limits.dedup_total bounds the whole agent, however many runs it watches.
        budget = window_budget or WindowBudget(config.limits.dedup_total)
        self.costs = Costs(config, self.layout, self._warnings, self.prices, budget)
        self.config = config

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """A reloaded configuration reaches both steps (the run directory never changes)."""
        self._config = config
        self.progress.config = config
        self.costs.config = config

    def forget(self) -> None:
        """The store did not keep what the readers consumed (a group of batches was rolled
        back after they ran): rebuild them from the store, so the same bytes are read again."""
        self.costs.forget()
        self.progress.forget()

    # -- which files ---------------------------------------------------------------------

    def all_keys(self) -> set[FileKey]:
        """Every file that may exist now, and every transcript the store knows: a full rescan."""
        return self.layout.present() | set(self.store.transcripts(self.adw_id))

    def expand(self, changes: Iterable[Change]) -> set[FileKey]:
        """The files of a batch: a rescan stands for every file."""
        out: set[FileKey] = set()
        for change in changes:
            if change == RESCAN:
                out |= self.all_keys()
            elif isinstance(change, FileKey):
                out.add(change)
        return out

    # -- processing -----------------------------------------------------------------------

    def process(self, changes: Iterable[Change]) -> Outcome:
        """Handle a batch of changed files in one transaction (order: see the module docstring).

        Raises :class:`~agent.errors.StorageError` when the store cannot be written; then
        nothing of the batch is recorded and it can be processed again.
        """
        keys = self.expand(changes)
        with self._batch("event") as b:
            for key in sorted(k for k in keys if k.is_transcript):
                self._isolated(b, key, partial(self.costs.transcript, b, key))
            if b.cost_changed:
                self._isolated(b, "cost", partial(self.costs.cost, b))
            # Never behind a transcript's backlog: a state or phase change goes out now, and
            # the backlog's later steps are charged to the phase current when they are read.
            for key, step in (
                (PHASES, self.progress.phases),
                (ERRORLOG, self.progress.errorlog),
                (STATE, self.progress.state),
            ):
                if key in keys:
                    self._isolated(b, key, partial(step, b))
            if keys & {PHASES, STATE}:
                self._isolated(b, "ending", partial(self.progress.ending, b))
        return b.outcome

    def snapshot(self) -> Outcome:
        """Queue the full picture as ``sync`` events, so a backend that missed some converges.

        Changes made while the agent was down are first read as ordinary events."""
        outcome = self.process(self.all_keys())
        with self._batch("sync") as b:
            self._isolated(b, STATE, partial(self.progress.state, b, force=True))
            self._isolated(b, PHASES, partial(self.progress.phases_snapshot, b))
            self._isolated(b, "cost", partial(self.costs.cost, b, force=True))
        outcome.emitted += b.outcome.emitted
        return outcome

    @contextmanager
    def _batch(self, source: Source) -> Iterator[Batch]:
        # Inside a group of batches (see Store.group), the commit comes with the group.
        grouped = self.store.in_transaction
        mark = self.progress.mark()
        try:
            with self.store.transaction(self.adw_id) as tx:
                batch = Batch(tx, source, budget=self.read_budget)
                yield batch
                batch.outcome.emitted = len(tx.emitted)
        except BaseException:
            # The store did not record what the readers consumed: rebuild them from the store.
            self.costs.forget()
            self.progress.rollback(mark)
            raise
        if not grouped:
            self.committed()

    def committed(self) -> None:
        """What was read is committed: log the failures it reported.

        Logged only then: a batch that is rolled back (disk full) and retried must not report
        the same failure again and again."""
        self.progress.committed(self.adw_id)

    def _isolated(self, b: Batch, key: Step, step: Callable[[], None]) -> None:
        """Run one file's step under a savepoint, so that its failure spares the other files.

        A failure of the store itself is not caught: the whole batch is rolled back and retried.
        """
        emitted, mark = len(b.tx.emitted), self.progress.mark()
        problems = self._warnings.problems(key)
        try:
            with b.tx.savepoint():
                step()
        except StorageError:
            raise
        except Exception as exc:
            del b.tx.emitted[emitted:]
            self.progress.rollback(mark)
            if isinstance(key, FileKey):
                # Rebuilt from its saved row next time, so the rolled-back lines are read again.
                self.costs.forget(key)
                b.outcome.more.discard(key)
            # A step that failed did not read its file fine, whatever it got to first.
            self._warnings.restore(key, problems)
            self._warnings.warn(
                key,
                "failed",
                "skipping this file's changes after an unexpected error: %s: %.300s",
                type(exc).__name__,
                exc,
                path=self._path_of(key),
            )
            log.debug("unexpected error handling %s", key, exc_info=True)

    def _path_of(self, key: Step) -> str:
        return str(self.layout.path(key)) if isinstance(key, FileKey) else str(self.store.path)

    def report_unreadable(self, key: FileKey) -> None:
        """Retries for ``key`` ran out: warn once per kind of problem, with the path, and keep
        the last good state."""
        self.progress.report_unreadable(key)
