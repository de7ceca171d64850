"""What the run costs: its transcripts read into ledgers, and the run-wide ``cost_update``.

One step of a pipeline batch (see agent.pipeline for the order and the transaction): each
transcript is read from its saved position and fed to its ledger; the run's cost is then summed
over every ledger and charged to the phase that was current before the batch.

A transcript whose saved state no longer loads (a damaged store row, or one written by a newer
version) is frozen: it is not read, since reading it again from the start would count again what
the backend already has. Its row stays untouched, its last reported cost stays in the total and
in ``by_agent``, and the cost is reported neither final nor complete while it is frozen.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.account import PriceTable, Tokens, TranscriptLedger, WindowBudget, fold_key, run_figures
from agent.config import Config
from agent.errors import ReadError
from agent.layout import FileKey, RunLayout
from agent.notices import FileWarnings
from agent.outbox import Transaction
from agent.pipeline_batch import MAX_PHASES, Batch, current_phase, saved_cost
from agent.transcript import Position, TranscriptError, TranscriptReader

# The pipeline's logger: its records keep the name operators filter on.
log = logging.getLogger("adw_agent.pipeline")

UNPHASED = "unphased"
_READ_BUDGET = 8 << 20
#: Bound on the run-wide breakdown by model, whose keys come from files (see account.fold_key).
_MAX_MODELS = 32


@dataclass
class _Transcript:
    reader: TranscriptReader
    ledger: TranscriptLedger
    saved: bool  # whether the store has a row for it


class Costs:
    """Reads the run's transcripts and reports what the run costs."""

    def __init__(
        self,
        config: Config,
        layout: RunLayout,
        warnings: FileWarnings,
        prices: PriceTable,
        window_budget: WindowBudget,
    ) -> None:
        self.config = config
        self.layout = layout
        self.prices = prices
        self._warnings = warnings
        self._window_size = config.limits.dedup_window
        self._budget = window_budget
        self._transcripts: dict[FileKey, _Transcript] = {}
        # Transcripts whose saved state does not load: never read (see the module docstring).
        self._frozen: set[FileKey] = set()

    @property
    def _hardlinks(self) -> bool:
        """Whether files with more than one hard link are read (``watch.allow_hardlinks``)."""
        return self.config.watch.allow_hardlinks

    def forget(self, key: FileKey | None = None) -> None:
        """Drop the reader of ``key`` (of every transcript when None): the store did not keep
        what it consumed, so it is rebuilt from its saved row and reads the same bytes again."""
        if key is None:
            self._transcripts.clear()
        else:
            self._transcripts.pop(key, None)

    # -- transcripts ----------------------------------------------------------------------

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

    def transcript(self, b: Batch, key: FileKey) -> None:
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
        before = entry.reader.position
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
        # A moved position is saved even without lines (the middle of an over-long line), so
        # a restart does not read those bytes again.
        if fresh or changed or chunk.lines or chunk.skipped or chunk.position != before:
            b.tx.put_json(key, {"position": chunk.position.dump(), "ledger": entry.ledger.dump()})
            entry.saved = True
        if chunk.more_pending:
            b.outcome.more.add(key)
        b.cost_changed |= fresh or changed

    # -- cost -----------------------------------------------------------------------------

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

    def cost(self, b: Batch, force: bool = False) -> None:
        ledgers, frozen = self._ledgers(b.tx)
        if not ledgers and not frozen and not force:
            return
        saved = saved_cost(b.tx)
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
            phase = fold_key(current_phase(b.tx) or UNPHASED, by_phase, MAX_PHASES)
            by_phase[phase] = by_phase.get(phase, 0.0) + delta
        b.tx.emit(
            "cost_update",
            {
                "current_cost": round(total, 10),
                "cost_delta": round(delta, 10),
                "final": final,
                "settled_cost": round(settled, 10),
                "estimated_share": round(estimated_share, 6),
                "current_phase": current_phase(b.tx),
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
