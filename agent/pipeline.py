"""From changed paths to queued events: the read → account → outbox step for one run directory.

Every batch of changes is handled in one store transaction: what was read (state snapshots,
error.log size, transcript offsets and cost ledgers) is recorded together with the events it
produced. If the transaction fails, the in-memory readers are dropped and rebuilt from the store,
so the same bytes are read again later and nothing is counted twice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from agent.account import PriceTable, Tokens, TranscriptLedger
from agent.config import Config
from agent.errors import ReadError
from agent.events import Source
from agent.outbox import Store, Transaction
from agent.read import (
    ERROR_LOG,
    PHASES_FILE,
    STATE_FILE,
    TRANSCRIPT,
    read_phases,
    read_state,
    read_tail,
    safe_subdir,
)
from agent.transcript import Position, TranscriptError, TranscriptReader

log = logging.getLogger("adw_agent.pipeline")

UNPHASED = "unphased"
_READ_BUDGET = 8 << 20
_MISSING = object()


@dataclass
class _Transcript:
    reader: TranscriptReader
    ledger: TranscriptLedger


@dataclass
class Outcome:
    """What one batch did: events queued, and paths to look at again soon."""

    emitted: int = 0
    retry: set[str] = field(default_factory=set)
    more: set[str] = field(default_factory=set)


class Pipeline:
    """Reads the files of one run directory and queues the events their changes mean."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.run_dir = config.adw.dir
        self.prices = PriceTable.from_config(config.cost)
        self._transcripts: dict[str, _Transcript] = {}
        self._warned: set[str] = set()
        self._last_read_error: dict[str, ReadError] = {}
        self._failures: list[str] = []  # reported failures, logged once their batch commits

    # -- classification -------------------------------------------------------------------

    def classify(self, path: str) -> str | None:
        """The key of the file a changed path belongs to, or None if it is not ours.

        Keys: ``state``, ``phases``, ``errorlog``, ``transcript:<agent>``, ``agent:<agent>``
        (a directory appeared) and ``rescan`` (the run directory itself changed).
        """
        try:
            parts = Path(path).relative_to(self.run_dir).parts
        except ValueError:
            return "rescan" if Path(path) in self.run_dir.parents else None
        if not parts:
            return "rescan"
        if len(parts) == 1:
            name = parts[0]
            return {STATE_FILE: "state", PHASES_FILE: "phases", ERROR_LOG: "errorlog"}.get(
                name, f"agent:{name}"
            )
        if len(parts) == 2 and parts[1] == TRANSCRIPT:
            return f"transcript:{parts[0]}"
        return None

    def all_keys(self) -> set[str]:
        """Every file key that exists now, for a full rescan."""
        keys = {"state", "phases", "errorlog"}
        try:
            names = [p.name for p in self.run_dir.iterdir()]
        except OSError:
            return keys
        for name in names:
            if safe_subdir(self.run_dir, name) is not None:
                keys.add(f"transcript:{name}")
        return keys | {f"transcript:{a}" for a in self._known_agents()}

    # -- processing -----------------------------------------------------------------------

    def process(self, keys: Iterable[str], source: Source = "event") -> Outcome:
        """Handle a batch of changed files in one transaction."""
        keys = self._expand(keys)
        outcome = Outcome()
        # Transcripts before phases: lines written before a phase ends count towards it.
        ordered = sorted(keys, key=lambda k: (not k.startswith("transcript:"), k != "phases", k))
        try:
            with self.store.transaction() as tx:
                cost_dirty = False
                for key in ordered:
                    if key.startswith("transcript:"):
                        cost_dirty |= self._transcript(tx, key, outcome)
                    elif key == "state":
                        self._state(tx, source, outcome)
                    elif key == "phases":
                        self._phases(tx, outcome)
                    elif key == "errorlog":
                        self._errorlog(tx)
                if cost_dirty:
                    self._cost(tx, "event")
                outcome.emitted = len(tx.emitted)
        except BaseException:
            # The store did not record what the readers consumed: rebuild them from the store.
            self._transcripts.clear()
            self._failures.clear()
            raise
        self._log_failures()
        return outcome

    def _log_failures(self) -> None:
        # Logged once committed: a batch that is rolled back (disk full) and retried must not
        # report the same failure again and again.
        for reason in self._failures:
            log.warning("workflow failed: %s", reason, extra={"event_type": "workflow_failed"})
        self._failures.clear()

    def snapshot(self) -> Outcome:
        """Queue the full picture as ``sync`` events, so a backend that missed some converges.

        Changes made while the agent was down are first read as ordinary events."""
        outcome = self.process(self.all_keys())
        with self.store.transaction() as tx:
            self._state(tx, "sync", Outcome(), force=True)
            phases = tx.get_json("phases")
            if phases is not None:
                tx.emit(
                    "phase_update",
                    {
                        "current_phase": phases["current"],
                        "status": "running" if phases["current"] else "completed",
                        "completed_phases": phases["completed"],
                    },
                    "sync",
                )
            self._cost(tx, "sync", force=True)
            outcome.emitted += len(tx.emitted)
        self._log_failures()
        return outcome

    def _expand(self, keys: Iterable[str]) -> set[str]:
        out: set[str] = set()
        for key in keys:
            if key == "rescan":
                out |= self.all_keys()
            elif key.startswith("agent:"):
                out.add("transcript:" + key.removeprefix("agent:"))
            else:
                out.add(key)
        return out

    def _warn_once(self, key: str, message: str, *args: Any, **extra: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args, extra=extra)

    # -- adw_state.json -------------------------------------------------------------------

    def _state(
        self, tx: Transaction, source: Source, outcome: Outcome, force: bool = False
    ) -> None:
        path = self.run_dir / STATE_FILE
        try:
            state = read_state(path, self.config.limits.max_state_bytes)
        except FileNotFoundError:
            return
        except ReadError as exc:
            outcome.retry.add("state")
            self._failed_read("state", exc)
            return
        self._warned.discard("read:state")
        canonical = orjson.dumps(state, option=orjson.OPT_SORT_KEYS)
        last = tx.get("state")
        if canonical == last and not force:
            return
        previous: dict[str, Any] = orjson.loads(last) if last else {}
        changed = sorted(
            k
            for k in state.keys() | previous.keys()
            if state.get(k, _MISSING) != previous.get(k, _MISSING)
        )
        tx.emit("workflow_update", {**state, "changed": changed}, source)
        tx.put("state", canonical)
        failed, was_failed = state.get("status") == "failed", previous.get("status") == "failed"
        if failed and not was_failed and not tx.get_json("failure_reported"):
            self._failure(tx, "state status is 'failed'", self._error_excerpt())
        elif was_failed and not failed:
            # A retried run that fails again is a new failure.
            tx.delete("failure_reported")

    def _failed_read(self, key: str, exc: ReadError) -> None:
        # Half-written files are normal and retried quietly; the caller warns once retries run
        # out (see report_unreadable).
        log.debug("cannot read yet: %s", exc, extra={"path": exc.path})
        self._last_read_error[key] = exc

    def report_unreadable(self, key: str) -> None:
        """Retries for ``key`` ran out: warn once, with the path, and keep the last good state."""
        exc = self._last_read_error.get(key)
        if exc is not None:
            self._warn_once(
                f"read:{key}",
                "ignoring unreadable file, keeping the last good state: %s",
                exc.reason,
                path=exc.path,
            )

    # -- completed_phases.json ------------------------------------------------------------

    def _phases(self, tx: Transaction, outcome: Outcome) -> None:
        path = self.run_dir / PHASES_FILE
        try:
            phases = read_phases(path, self.config.limits.max_state_bytes)
        except FileNotFoundError:
            return
        except ReadError as exc:
            outcome.retry.add("phases")
            self._failed_read("phases", exc)
            return
        self._warned.discard("read:phases")
        now: dict[str, Any] = {"completed": phases.completed, "current": phases.current}
        previous = tx.get_json("phases") or {"completed": [], "current": None}
        if now == previous:
            return
        remaining = list(previous["completed"])
        newly: list[str] = []
        for phase in phases.completed:
            if phase in remaining:
                remaining.remove(phase)
            else:
                newly.append(phase)
        by_phase = (tx.get_json("cost") or {}).get("by_phase", {})
        for i, phase in enumerate(newly):
            # Several phases completed in one write: each intermediate update names the next
            # completed phase as current, so none of them claims the workflow has finished.
            current = newly[i + 1] if i + 1 < len(newly) else now["current"]
            tx.emit(
                "phase_update",
                {
                    "current_phase": current,
                    "status": "running" if current else "completed",
                    "completed_phases": now["completed"],
                    "completed_phase": phase,
                    "phase_cost": round(by_phase.get(phase, 0.0), 10),
                },
            )
        if not newly:
            tx.emit(
                "phase_update",
                {
                    "current_phase": now["current"],
                    "status": "running" if now["current"] else "completed",
                    "completed_phases": now["completed"],
                },
            )
        tx.put_json("phases", now)

    def current_phase(self, tx: Transaction) -> str | None:
        phases = tx.get_json("phases")
        if phases and phases.get("current"):
            return str(phases["current"])
        state = tx.get_json("state")
        phase = state.get("current_phase") if isinstance(state, dict) else None
        return phase if isinstance(phase, str) and phase else None

    # -- error.log ------------------------------------------------------------------------

    def _error_excerpt(self) -> str:
        try:
            return read_tail(
                self.run_dir / ERROR_LOG, self.config.limits.error_excerpt_bytes
            ).excerpt
        except (FileNotFoundError, ReadError):
            return ""

    def _errorlog(self, tx: Transaction) -> None:
        path = self.run_dir / ERROR_LOG
        try:
            tail = read_tail(path, self.config.limits.error_excerpt_bytes)
        except FileNotFoundError:
            return
        except ReadError as exc:
            self._warn_once("read:errorlog", "cannot read error.log: %s", exc.reason, path=exc.path)
            return
        previous = tx.get_json("errorlog") or {"ino": None, "size": 0}
        same_file = previous["ino"] == tail.ino and tail.size >= previous["size"]
        grown = tail.size > previous["size"] if same_file else tail.size > 0
        if grown:
            reason = "error.log grew" if same_file and previous["size"] else "error.log appeared"
            self._failure(tx, reason, tail.excerpt)
        if (previous["ino"], previous["size"]) != (tail.ino, tail.size):
            tx.put_json("errorlog", {"ino": tail.ino, "size": tail.size})

    def _failure(self, tx: Transaction, reason: str, excerpt: str) -> None:
        """Queue a failure. One failed state is reported once, whichever signal comes first;
        error.log growing later is still reported, as it carries new information."""
        tx.put_json("failure_reported", True)
        tx.emit(
            "workflow_failed",
            {"reason": reason, "error_excerpt": excerpt, "current_phase": self.current_phase(tx)},
        )
        self._failures.append(reason)

    # -- transcripts and cost -------------------------------------------------------------

    def _known_agents(self) -> list[str]:
        rows = self.store.db.execute(
            "SELECT key FROM files WHERE key LIKE 'transcript:%'"
        ).fetchall()
        return [str(r[0]).removeprefix("transcript:") for r in rows]

    def _load(self, tx: Transaction, key: str) -> _Transcript:
        entry = self._transcripts.get(key)
        if entry is not None:
            return entry
        agent = key.removeprefix("transcript:")
        saved = tx.get_json(key)
        on_warning = self._transcript_warning(agent)
        position = Position.load(saved["position"]) if saved else None
        ledger = (
            TranscriptLedger.load(saved["ledger"], self.prices, on_warning)
            if saved
            else TranscriptLedger(self.prices, on_warning)
        )
        reader = TranscriptReader(
            self.run_dir / agent / TRANSCRIPT,
            position,
            max_line_bytes=self.config.limits.max_line_bytes,
            on_warning=on_warning,
        )
        entry = _Transcript(reader, ledger)
        self._transcripts[key] = entry
        return entry

    def _transcript_warning(self, agent: str) -> Any:
        path = str(self.run_dir / agent / TRANSCRIPT)

        def warn(message: str) -> None:
            log.warning("%s", message, extra={"path": path})

        return warn

    def _transcript(self, tx: Transaction, key: str, outcome: Outcome) -> bool:
        agent = key.removeprefix("transcript:")
        if safe_subdir(self.run_dir, agent) is None:
            # Not a real directory (gone, a file, or a symlink that could lead outside the run
            # directory): read nothing; what was counted from it stays in the store.
            if (self.run_dir / agent).is_symlink():
                self._warn_once(
                    f"link:{agent}",
                    "not following symlinked directory",
                    path=str(self.run_dir / agent),
                )
            return False
        # A transcript seen for the first time is news even when empty: an agent has started,
        # so the run's cost is no longer final.
        fresh = tx.get(key) is None
        entry = self._load(tx, key)
        try:
            chunk = entry.reader.read(_READ_BUDGET)
        except FileNotFoundError:
            return False
        except (TranscriptError, OSError) as exc:
            self._warn_once(
                f"transcript:{agent}",
                "cannot read transcript: %s",
                exc,
                path=str(entry.reader.path),
            )
            return False
        changed, _ = entry.ledger.feed_chunk(chunk)
        changed |= fresh
        if fresh or chunk.lines or chunk.restarted or chunk.skipped:
            tx.put_json(key, {"position": chunk.position.dump(), "ledger": entry.ledger.dump()})
        if chunk.more_pending:
            outcome.more.add(key)
        return changed

    def _all_ledgers(self, tx: Transaction) -> dict[str, TranscriptLedger]:
        return {
            key.removeprefix("transcript:"): self._load(tx, key).ledger
            for key in {f"transcript:{a}" for a in self._known_agents()} | set(self._transcripts)
        }

    def _cost(self, tx: Transaction, source: Source, force: bool = False) -> None:
        ledgers = self._all_ledgers(tx)
        if not ledgers and not force:
            return
        total = math.fsum(ledger.cost for ledger in ledgers.values())
        tokens = Tokens()
        by_model: dict[str, float] = {}
        for ledger in ledgers.values():
            tokens = tokens + ledger.tokens
            for model, usd in ledger.by_model.items():
                by_model[model] = by_model.get(model, 0.0) + usd
        final = bool(ledgers) and all(ledger.final for ledger in ledgers.values())
        complete = all(ledger.estimate_complete for ledger in ledgers.values())
        saved = tx.get_json("cost") or {
            "reported": 0.0,
            "by_phase": {},
            "final": False,
            "tokens": None,
        }
        token_list = [tokens.input, tokens.output, tokens.cache_creation, tokens.cache_read]
        delta = total - saved["reported"]
        unchanged = abs(delta) < 1e-12 and saved["final"] == final and saved["tokens"] == token_list
        if unchanged and not force:
            return
        phase = self.current_phase(tx) or UNPHASED
        by_phase: dict[str, float] = saved["by_phase"]
        if abs(delta) >= 1e-12:
            by_phase[phase] = by_phase.get(phase, 0.0) + delta
        tx.emit(
            "cost_update",
            {
                "current_cost": round(total, 10),
                "cost_delta": round(delta, 10),
                "final": final,
                "current_phase": self.current_phase(tx),
                "estimate_complete": complete,
                "breakdown": {
                    "by_agent": {a: round(lg.cost, 10) for a, lg in sorted(ledgers.items())},
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
            source,
        )
        tx.put_json(
            "cost", {"reported": total, "by_phase": by_phase, "final": final, "tokens": token_list}
        )
