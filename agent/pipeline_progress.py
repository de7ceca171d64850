"""How the run is going: adw_state.json, completed_phases.json, error.log, and how it ended.

One step of a pipeline batch (see agent.pipeline for the order and the transaction): each file
read here is compared with its last recorded snapshot, and its change queued as
``workflow_update``, ``phase_update``, ``workflow_failed`` or ``workflow_completed``.

Failures: a ``workflow_failed`` is queued when adw_state.json's status turns to "failed", unless
a failure was already reported since the status last left "failed"; and every time error.log
appears or grows, as it carries new error text. So error.log first and a failed status later (or
both in one batch) give one event, while a failed status first and error.log appearing later
give two, the second with the log's tail.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import orjson

from agent import endings
from agent.account import fold_key
from agent.config import Config
from agent.errors import ReadError
from agent.events import utc_now
from agent.layout import ERRORLOG, PHASES, STATE, FileKey, RunLayout
from agent.notices import FileWarnings
from agent.outbox import Transaction
from agent.pipeline_batch import MAX_PHASES, Batch, current_phase, saved_cost
from agent.read import latest_failure_tail, read_phases, read_state, read_tail

_DIGITS = re.compile(r"\d+")

# The pipeline's logger: its records keep the name operators filter on.
log = logging.getLogger("adw_agent.pipeline")

_MISSING = object()
_T = TypeVar("_T")


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


class Progress:
    """Reads the run's state, phases and error log, and reports how the run ended."""

    def __init__(self, config: Config, layout: RunLayout, warnings: FileWarnings) -> None:
        self.config = config
        self.layout = layout
        self._warnings = warnings
        self._last_read_error: dict[FileKey, ReadError] = {}
        self._failures: list[str] = []  # reported failures, logged once their batch commits
        self._completions: list[str] = []  # likewise for completed runs (their end_time)

    @property
    def _hardlinks(self) -> bool:
        """Whether files with more than one hard link are read (``watch.allow_hardlinks``)."""
        return self.config.watch.allow_hardlinks

    # -- what waits for the commit ------------------------------------------------------------

    def mark(self) -> tuple[int, int]:
        """How many failures and completions wait for the commit now (see rollback)."""
        return len(self._failures), len(self._completions)

    def rollback(self, mark: tuple[int, int]) -> None:
        """Forget the failures and completions reported since ``mark``: they were rolled back."""
        del self._failures[mark[0] :]
        del self._completions[mark[1] :]

    def forget(self) -> None:
        """Nothing reported since the last commit was kept."""
        self._failures.clear()
        self._completions.clear()

    def committed(self, adw_id: str) -> None:
        """What was read is committed: log the failures and completions it reported."""
        for reason in self._failures:
            log.warning(
                "workflow failed: %s",
                reason,
                extra={"event_type": "workflow_failed", "adw_id": adw_id},
            )
        self._failures.clear()
        for end_time in self._completions:
            log.info(
                "workflow completed",
                extra={
                    "event_type": "workflow_completed",
                    "end_time": end_time,
                    "adw_id": adw_id,
                },
            )
        self._completions.clear()

    # -- adw_state.json and completed_phases.json -----------------------------------------

    def _read(self, b: Batch, key: FileKey, read: Callable[[Path, int], _T]) -> _T | None:
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

    def state(self, b: Batch, force: bool = False) -> None:
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

    def phases(self, b: Batch) -> None:
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
        by_phase: dict[str, float] = saved_cost(b.tx)["by_phase"]
        for i, phase in enumerate(newly):
            # Several phases completed in one write: each intermediate update names the next
            # completed phase as current, so none of them claims the workflow has finished.
            current = newly[i + 1] if i + 1 < len(newly) else now["current"]
            # A phase folded into "other" (see agent.pipeline_cost) has no cost of its own.
            own = fold_key(phase, by_phase, MAX_PHASES) == phase
            cost = round(by_phase.get(phase, 0.0), 10) if own else None
            update = _phase_update(current, now["completed"], phase, cost)
            b.tx.emit("phase_update", update, b.source)
        if not newly:
            b.tx.emit("phase_update", _phase_update(now["current"], now["completed"]), b.source)
        b.tx.put_json(PHASES, now)

    def phases_snapshot(self, b: Batch) -> None:
        phases = b.tx.get_json(PHASES)
        if phases is not None:
            b.tx.emit(
                "phase_update", _phase_update(phases["current"], phases["completed"]), b.source
            )

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

    def errorlog(self, b: Batch) -> None:
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

    def ending(self, b: Batch) -> None:
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
            final_cost = float(saved_cost(b.tx)["reported"])
            b.tx.emit("workflow_completed", endings.completed_data(ending, final_cost, started))
            self._completions.append(ending.end_time)
        elif not b.tx.get_json("failure_reported"):
            # An older lineage may have reported this failure already (status or error.log).
            excerpt = latest_failure_tail(
                self.layout.run_dir,
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
            {"reason": reason, "error_excerpt": excerpt, "current_phase": current_phase(tx)},
        )
        self._failures.append(reason)
