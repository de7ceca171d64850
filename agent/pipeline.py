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
once, as on every catch-up after a restart. While a transcript has more to read than one batch
takes, phase and state changes wait for it, so a backlog is charged to the phase it was written
in (lines written after a phase change but seen in the same batch go to the earlier phase).

Failures: a ``workflow_failed`` is queued when adw_state.json's status turns to "failed", unless
a failure was already reported since the status last left "failed"; and every time error.log
appears or grows, as it carries new error text. So error.log first and a failed status later (or
both in one batch) give one event, while a failed status first and error.log appearing later
give two, the second with the log's tail.

Warnings follow one rule: once per problem per file, until that file reads fine again, and at
most a few per file per minute (see agent.notices).

A transcript whose saved state no longer loads (a damaged store row, or one written by a newer
version) is frozen: it is not read, since reading it again from the start would count again what
the backend already has. Its row stays untouched, its last reported cost stays in the total and
in ``by_agent``, and the cost is reported neither final nor complete while it is frozen.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson

from agent import endings
from agent.account import (
    PriceTable,
    Tokens,
    TranscriptLedger,
    WindowBudget,
    fold_key,
    run_figures,
)
from agent.config import Config
from agent.errors import ReadError, StorageError
from agent.events import Source, utc_now
from agent.layout import ERRORLOG, PHASES, RESCAN, STATE, Change, FileKey, RunLayout
from agent.notices import FileWarnings
from agent.outbox import Store, Transaction
from agent.read import latest_failure_tail, read_phases, read_state, read_tail
from agent.transcript import Position, TranscriptError, TranscriptReader

_DIGITS = re.compile(r"\d+")

log = logging.getLogger("adw_agent.pipeline")

UNPHASED = "unphased"
_READ_BUDGET = 8 << 20
#: Bounds on the run-wide breakdowns, whose keys come from files (see account.fold_key).
_MAX_MODELS = 32
_MAX_PHASES = 64
_MISSING = object()
_T = TypeVar("_T")
#: What one isolated step of a batch handles: one file, the run's cost, or how it ended.
Step = FileKey | Literal["cost", "ending"]


@dataclass
class _Transcript:
    reader: TranscriptReader
    ledger: TranscriptLedger
    saved: bool  # whether the store has a row for it


@dataclass
class Outcome:
    """What one batch did: events queued, and paths to look at again soon."""

    emitted: int = 0
    retry: set[FileKey] = field(default_factory=set)
    more: set[FileKey] = field(default_factory=set)


@dataclass
class _Batch:
    tx: Transaction
    source: Source
    outcome: Outcome = field(default_factory=Outcome)
    cost_changed: bool = False
    #: Transcript bytes this batch may still read (None: no bound over the batch).
    budget: int | None = None


def _phase_update(
    current: str | None,
    completed: list[str],
    completed_phase: str | None = None,
    phase_cost: float | None = None,
) -> dict[str, Any]:
    """The data of a ``phase_update``."""
    return {
        "current_phase": current,
        "status": "running" if current else "completed",
        "completed_phases": completed,
        "completed_phase": completed_phase,
        "phase_cost": phase_cost,
    }


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
        self.config = config
        self.store = store
        self.adw_id = config.adw_id
        self.run_dir = config.run_dir
        self.layout = RunLayout(self.run_dir)
        #: Bytes of transcript read per batch at most, over all of this run's transcripts
        #: (None: the module's default, per transcript). Host mode bounds it per run, so that
        #: one run's backlog delays the others by one bounded batch at most.
        self.read_budget = read_budget
        self.prices = PriceTable.from_config(config.cost)
        self._window_size = config.limits.dedup_window
        # One budget for every transcript of the process (host mode passes the runs' shared
        # one), so limits.dedup_total bounds the whole agent, however many runs it watches.
        self._budget = window_budget or WindowBudget(config.limits.dedup_total)
        self._transcripts: dict[FileKey, _Transcript] = {}
        # Transcripts whose saved state does not load: never read (see the module docstring).
        self._frozen: set[FileKey] = set()
        self._warnings = FileWarnings(log)
        self._last_read_error: dict[FileKey, ReadError] = {}
        self._failures: list[str] = []  # reported failures, logged once their batch commits
        self._completions: list[str] = []  # likewise for completed runs (their end_time)

    @property
    def _hardlinks(self) -> bool:
        """Whether files with more than one hard link are read (``watch.allow_hardlinks``)."""
        return self.config.watch.allow_hardlinks

    def forget(self) -> None:
        """The store did not keep what the readers consumed (a group of batches was rolled
        back after they ran): rebuild them from the store, so the same bytes are read again."""
        self._transcripts.clear()
        self._failures.clear()
        self._completions.clear()

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
                self._isolated(b, key, partial(self._transcript, b, key))
            if b.cost_changed:
                self._isolated(b, "cost", partial(self._cost, b))
            # A transcript with a backlog: it was written before the phase or state change seen
            # now, so that change waits until the backlog is charged to the earlier phase.
            waiting = keys & {PHASES, STATE} if b.outcome.more else set()
            b.outcome.more |= waiting
            for key, step in (
                (PHASES, self._phases),
                (ERRORLOG, self._errorlog),
                (STATE, self._state),
            ):
                if key in keys and key not in waiting:
                    self._isolated(b, key, partial(step, b))
            if keys & {PHASES, STATE} - waiting:
                self._isolated(b, "ending", partial(self._ending, b))
        return b.outcome

    def snapshot(self) -> Outcome:
        """Queue the full picture as ``sync`` events, so a backend that missed some converges.

        Changes made while the agent was down are first read as ordinary events."""
        outcome = self.process(self.all_keys())
        with self._batch("sync") as b:
            self._isolated(b, STATE, partial(self._state, b, force=True))
            self._isolated(b, PHASES, partial(self._phases_snapshot, b))
            self._isolated(b, "cost", partial(self._cost, b, force=True))
        outcome.emitted += b.outcome.emitted
        return outcome

    @contextmanager
    def _batch(self, source: Source) -> Iterator[_Batch]:
        # Inside a group of batches (see Store.group), the commit comes with the group.
        grouped = self.store.in_transaction
        failures, completions = len(self._failures), len(self._completions)
        try:
            with self.store.transaction(self.adw_id) as tx:
                batch = _Batch(tx, source, budget=self.read_budget)
                yield batch
                batch.outcome.emitted = len(tx.emitted)
        except BaseException:
            # The store did not record what the readers consumed: rebuild them from the store.
            self._transcripts.clear()
            del self._failures[failures:]
            del self._completions[completions:]
            raise
        if not grouped:
            self.committed()

    def committed(self) -> None:
        """What was read is committed: log the failures it reported.

        Logged only then: a batch that is rolled back (disk full) and retried must not report
        the same failure again and again."""
        for reason in self._failures:
            log.warning(
                "workflow failed: %s",
                reason,
                extra={"event_type": "workflow_failed", "adw_id": self.adw_id},
            )
        self._failures.clear()
        for end_time in self._completions:
            log.info(
                "workflow completed",
                extra={
                    "event_type": "workflow_completed",
                    "end_time": end_time,
                    "adw_id": self.adw_id,
                },
            )
        self._completions.clear()

    def _isolated(self, b: _Batch, key: Step, step: Callable[[], None]) -> None:
        """Run one file's step under a savepoint, so that its failure spares the other files.

        A failure of the store itself is not caught: the whole batch is rolled back and retried.
        """
        emitted, failures = len(b.tx.emitted), len(self._failures)
        completions = len(self._completions)
        problems = self._warnings.problems(key)
        try:
            with b.tx.savepoint():
                step()
        except StorageError:
            raise
        except Exception as exc:
            del b.tx.emitted[emitted:]
            del self._failures[failures:]
            del self._completions[completions:]
            if isinstance(key, FileKey):
                # Rebuilt from its saved row next time, so the rolled-back lines are read again.
                self._transcripts.pop(key, None)
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

    # -- adw_state.json and completed_phases.json -----------------------------------------

    def _read(self, b: _Batch, key: FileKey, read: Callable[[Path, int], _T]) -> _T | None:
        """The parsed state or phases file; None when it is absent or unreadable right now."""
        path = self.layout.path(key)
        try:
            value = read(path, self.config.limits.max_state_bytes)
        except FileNotFoundError:
            self._warnings.ok(key)
            return None
        except ReadError as exc:
            # Half-written files are normal and retried quietly; the caller warns once retries
            # run out (see report_unreadable).
            b.outcome.retry.add(key)
            log.debug("cannot read yet: %s", exc, extra={"path": exc.path})
            self._last_read_error[key] = exc
            return None
        self._warnings.ok(key)
        return value

    def report_unreadable(self, key: FileKey) -> None:
        """Retries for ``key`` ran out: warn once per kind of problem, with the path, and keep
        the last good state."""
        exc = self._last_read_error.get(key)
        if exc is not None:
            # The kind of problem, not its figures: a file seen empty mid-write and then too
            # large is two problems, but a file growing past the limit is one.
            self._warnings.warn(
                key,
                "unreadable: " + _DIGITS.sub("N", exc.reason),
                "ignoring unreadable file, keeping the last good state: %s",
                exc.reason,
                path=exc.path,
            )

    def _state(self, b: _Batch, force: bool = False) -> None:
        state = self._read(b, STATE, partial(read_state, allow_hardlinks=self._hardlinks))
        if state is None:
            return
        canonical = orjson.dumps(state, option=orjson.OPT_SORT_KEYS)
        last = b.tx.get(STATE)
        if canonical == last and not force:
            return
        previous: dict[str, Any] = orjson.loads(last) if last else {}
        changed = sorted(
            k
            for k in state.keys() | previous.keys()
            if state.get(k, _MISSING) != previous.get(k, _MISSING)
        )
        b.tx.emit("workflow_update", {**state, "changed": changed}, b.source)
        b.tx.put(STATE, canonical)
        failed, was_failed = state.get("status") == "failed", previous.get("status") == "failed"
        if failed and not was_failed and not b.tx.get_json("failure_reported"):
            self._failure(b.tx, "state status is 'failed'", self._error_excerpt())
        elif was_failed and not failed:
            # A retried run that fails again is a new failure.
            b.tx.delete("failure_reported")

    def _phases(self, b: _Batch) -> None:
        phases = self._read(b, PHASES, partial(read_phases, allow_hardlinks=self._hardlinks))
        if phases is None:
            return
        now: dict[str, Any] = {"completed": phases.completed, "current": phases.current}
        previous = b.tx.get_json(PHASES) or {"completed": [], "current": None}
        if now == previous:
            return
        remaining = list(previous["completed"])
        newly: list[str] = []
        for phase in phases.completed:
            if phase in remaining:
                remaining.remove(phase)
            else:
                newly.append(phase)
        by_phase: dict[str, float] = self._saved_cost(b.tx)["by_phase"]
        for i, phase in enumerate(newly):
            # Several phases completed in one write: each intermediate update names the next
            # completed phase as current, so none of them claims the workflow has finished.
            current = newly[i + 1] if i + 1 < len(newly) else now["current"]
            # A phase folded into "other" (see _cost) has no cost of its own to report.
            own = fold_key(phase, by_phase, _MAX_PHASES) == phase
            cost = round(by_phase.get(phase, 0.0), 10) if own else None
            update = _phase_update(current, now["completed"], phase, cost)
            b.tx.emit("phase_update", update, b.source)
        if not newly:
            b.tx.emit("phase_update", _phase_update(now["current"], now["completed"]), b.source)
        b.tx.put_json(PHASES, now)

    def _phases_snapshot(self, b: _Batch) -> None:
        phases = b.tx.get_json(PHASES)
        if phases is not None:
            b.tx.emit(
                "phase_update", _phase_update(phases["current"], phases["completed"]), b.source
            )

    def current_phase(self, tx: Transaction) -> str | None:
        """The phase now current as last recorded: completed_phases.json, else the state's."""
        phases = tx.get_json(PHASES)
        if phases and phases.get("current"):
            return str(phases["current"])
        state = tx.get_json(STATE)
        phase = state.get("current_phase") if isinstance(state, dict) else None
        return phase if isinstance(phase, str) and phase else None

    # -- error.log ------------------------------------------------------------------------

    def _error_excerpt(self) -> str:
        try:
            return read_tail(
                self.layout.path(ERRORLOG),
                self.config.limits.error_excerpt_bytes,
                allow_hardlinks=self._hardlinks,
            ).excerpt
        except (FileNotFoundError, ReadError):
            return ""

    def _errorlog(self, b: _Batch) -> None:
        path = self.layout.path(ERRORLOG)
        try:
            tail = read_tail(
                path, self.config.limits.error_excerpt_bytes, allow_hardlinks=self._hardlinks
            )
        except FileNotFoundError:
            self._warnings.ok(ERRORLOG)
            return
        except ReadError as exc:
            self._warnings.warn(
                ERRORLOG, "unreadable", "cannot read error.log: %s", exc.reason, path=exc.path
            )
            return
        self._warnings.ok(ERRORLOG)
        previous = b.tx.get_json(ERRORLOG) or {"ino": None, "size": 0}
        same_file = previous["ino"] == tail.ino and tail.size >= previous["size"]
        grown = tail.size > previous["size"] if same_file else tail.size > 0
        if grown:
            reason = "error.log grew" if same_file and previous["size"] else "error.log appeared"
            self._failure(b.tx, reason, tail.excerpt)
        if (previous["ino"], previous["size"]) != (tail.ino, tail.size):
            b.tx.put_json(ERRORLOG, {"ino": tail.ino, "size": tail.size})

    # -- how the run ended (see agent.endings) ---------------------------------------------

    def _ending(self, b: _Batch) -> None:
        """Report the run's end once: ``end_time`` in the state, with or without a phase
        current in a read of completed_phases.json made now, after the state was read."""
        state = b.tx.get_json(STATE)
        if not isinstance(state, dict):
            return
        # Records of this run, not of the store: in host mode every run ends on its own.
        if b.tx.get_json("first_seen") is None:
            b.tx.put_json("first_seen", utc_now())
        reported = b.tx.get_json("ended")
        end_time = endings.end_time_of(state)
        if end_time is None or (
            isinstance(reported, dict) and reported.get("end_time") == end_time
        ):
            return  # not over, or reported already: no need to read the phases again
        try:
            phases = read_phases(
                self.layout.path(PHASES),
                self.config.limits.max_state_bytes,
                allow_hardlinks=self._hardlinks,
            )
            completed, current = phases.completed, phases.current
        except FileNotFoundError:
            completed, current = [], None
        except ReadError as exc:
            # Half-written: decided when it reads, as a failure must not pass for a success.
            b.outcome.retry.add(PHASES)
            self._last_read_error[PHASES] = exc
            return
        ending = endings.decide(state, completed, current, reported)
        if ending is None:
            return
        b.tx.put_json("ended", endings.Reported(end_time=ending.end_time, kind=ending.kind))
        if ending.kind == "completed":
            started = state.get("start_time") or b.tx.get_json("first_seen")
            final_cost = float(self._saved_cost(b.tx)["reported"])
            b.tx.emit("workflow_completed", endings.completed_data(ending, final_cost, started))
            self._completions.append(ending.end_time)
        elif not b.tx.get_json("failure_reported"):
            # An older lineage may have reported this failure already (status or error.log).
            excerpt = latest_failure_tail(
                self.run_dir,
                self.config.limits.error_excerpt_bytes,
                allow_hardlinks=self._hardlinks,
            )
            b.tx.put_json("failure_reported", True)
            b.tx.emit("workflow_failed", endings.failed_data(ending, excerpt))
            self._failures.append(ending.reason)

    def _failure(self, tx: Transaction, reason: str, excerpt: str) -> None:
        """Queue a failure and mark it reported (when: see the module docstring)."""
        tx.put_json("failure_reported", True)
        tx.emit(
            "workflow_failed",
            {"reason": reason, "error_excerpt": excerpt, "current_phase": self.current_phase(tx)},
        )
        self._failures.append(reason)

    # -- transcripts and cost -------------------------------------------------------------

    def _transcript_warning(self, path: Path) -> Callable[[str], None]:
        def warn(message: str) -> None:
            log.warning("%s", message, extra={"path": str(path)})

        return warn

    def _restore(self, tx: Transaction, key: FileKey) -> _Transcript | None:
        """A reader and ledger from the saved row (new ones without a row); None if frozen."""
        path = self.layout.path(key)
        warn = self._transcript_warning(path)
        try:
            saved = tx.get_json(key)
            if saved is None:
                position = None
                ledger = TranscriptLedger(self.prices, warn, self._window_size, self._budget)
            else:
                position = Position.load(saved["position"])
                ledger = TranscriptLedger.load(
                    saved["ledger"], self.prices, warn, self._budget, self._window_size
                )
        except (KeyError, TypeError, ValueError) as exc:  # TypeError: a row that is not a blob
            self._frozen.add(key)
            self._warnings.warn(
                key,
                "damaged",
                "the saved state of this transcript does not load (%.200s): it is no longer "
                "read, so nothing is counted twice, and its last reported cost is kept",
                exc,
                path=str(path),
            )
            return None
        reader = TranscriptReader(
            path,
            position,
            max_line_bytes=self.config.limits.max_line_bytes,
            on_warning=warn,
            allow_hardlinks=self._hardlinks,
        )
        return _Transcript(reader, ledger, saved is not None)

    def _transcript(self, b: _Batch, key: FileKey) -> None:
        if key in self._frozen:
            return
        agent = key.agent
        if self.layout.agent_dir(agent) is None:
            # Not a real directory (gone, a file, or a symlink that could lead outside the run
            # directory): read nothing; what was counted from it stays in the store.
            folder = self.layout.path(key).parent
            if folder.is_symlink():
                self._warnings.warn(
                    key, "symlink", "not following symlinked directory", path=str(folder)
                )
            return
        entry = self._transcripts.get(key) or self._restore(b.tx, key)
        if entry is None:
            return
        if b.budget is not None and b.budget <= 0:
            b.outcome.more.add(key)  # this run's share of the batch is used up: next batch
            return
        try:
            chunk = entry.reader.read(_READ_BUDGET if b.budget is None else b.budget)
        except FileNotFoundError:
            # A directory without a transcript (screenshots/, say) is no agent: nothing is kept
            # for it until a transcript appears.
            self._warnings.ok(key)
            return
        except (TranscriptError, OSError) as exc:
            reason = exc.reason if isinstance(exc, ReadError) else exc.strerror or str(exc)
            self._warnings.warn(
                key, "unreadable", "cannot read transcript: %s", reason, path=str(entry.reader.path)
            )
            return
        self._warnings.ok(key)
        self._transcripts[key] = entry
        if b.budget is not None:
            b.budget -= sum(map(len, chunk.lines))
        changed, _ = entry.ledger.feed_chunk(chunk)
        # A transcript seen for the first time is news even when empty: an agent has started,
        # so the run's cost is no longer final.
        fresh = not entry.saved
        if fresh or changed or chunk.lines or chunk.skipped:
            b.tx.put_json(key, {"position": chunk.position.dump(), "ledger": entry.ledger.dump()})
            entry.saved = True
        if chunk.more_pending:
            b.outcome.more.add(key)
        b.cost_changed |= fresh or changed

    def _ledgers(self, tx: Transaction) -> tuple[dict[str, TranscriptLedger], list[str]]:
        """The ledger of every transcript in the store, and the agents whose one is frozen."""
        ledgers: dict[str, TranscriptLedger] = {}
        frozen: list[str] = []
        for key in tx.transcripts():
            agent = key.agent
            entry = self._transcripts.get(key)
            if entry is None and key not in self._frozen:
                entry = self._restore(tx, key)
                if entry is not None:
                    self._transcripts[key] = entry
            if entry is None:
                frozen.append(agent)
            else:
                ledgers[agent] = entry.ledger
        return ledgers, frozen

    @staticmethod
    def _saved_cost(tx: Transaction) -> dict[str, Any]:
        saved: dict[str, Any] = tx.get_json("cost") or {
            "reported": 0.0,
            "by_phase": {},
            "final": False,
            "tokens": None,
        }
        saved.setdefault("by_agent", {})  # absent from rows saved by earlier versions
        return saved

    def _cost(self, b: _Batch, force: bool = False) -> None:
        ledgers, frozen = self._ledgers(b.tx)
        if not ledgers and not frozen and not force:
            return
        saved = self._saved_cost(b.tx)
        # The agents that settled first calibrate the rest (see agent.account.ledger).
        figures = run_figures(ledgers)
        by_agent = {agent: figure.cost for agent, figure in figures.items()}
        for agent in frozen:
            by_agent[agent] = float(saved["by_agent"].get(agent, 0.0))
        total = math.fsum(by_agent.values())
        settled = math.fsum(figure.settled for figure in figures.values())
        estimated_share = min(max((total - settled) / total, 0.0), 1.0) if total > 0 else 0.0
        tokens = Tokens()
        by_model: dict[str, float] = {}
        for agent in sorted(ledgers):
            tokens = tokens + ledgers[agent].tokens
            for model, usd in sorted(figures[agent].by_model.items()):
                key = fold_key(model, by_model, _MAX_MODELS)
                by_model[key] = by_model.get(key, 0.0) + usd
        final = bool(ledgers) and not frozen and all(lg.final for lg in ledgers.values())
        complete = not frozen and all(lg.estimate_complete for lg in ledgers.values())
        token_list = [tokens.input, tokens.output, tokens.cache_creation, tokens.cache_read]
        delta = total - saved["reported"]
        unchanged = (
            abs(delta) < 1e-12
            and saved["final"] == final
            and saved["tokens"] == token_list
            and abs(settled - saved.get("settled", settled)) < 1e-12
        )
        if unchanged and not force:
            return
        by_phase: dict[str, float] = saved["by_phase"]
        if abs(delta) >= 1e-12:
            phase = fold_key(self.current_phase(b.tx) or UNPHASED, by_phase, _MAX_PHASES)
            by_phase[phase] = by_phase.get(phase, 0.0) + delta
        b.tx.emit(
            "cost_update",
            {
                "current_cost": round(total, 10),
                "cost_delta": round(delta, 10),
                "final": final,
                "settled_cost": round(settled, 10),
                "estimated_share": round(estimated_share, 6),
                "current_phase": self.current_phase(b.tx),
                "estimate_complete": complete,
                "breakdown": {
                    "by_agent": {a: round(v, 10) for a, v in sorted(by_agent.items())},
                    "by_model": {m: round(v, 10) for m, v in sorted(by_model.items())},
                    "by_phase": {p: round(v, 10) for p, v in sorted(by_phase.items())},
                },
                "tokens": {
                    "input": tokens.input,
                    "output": tokens.output,
                    "cache_creation": tokens.cache_creation,
                    "cache_read": tokens.cache_read,
                },
            },
            b.source,
        )
        record = {
            "reported": total,
            "by_phase": by_phase,
            "final": final,
            "tokens": token_list,
            "by_agent": by_agent,
            "settled": settled,
        }
        b.tx.put_json("cost", record)
