"""One-shot costing for ``adw-agent cost``: every transcript a path names, in one pass each.

The transcripts found under one path are taken as one run: their unsettled estimates are
calibrated by their settled attempts together, as in the agent (:func:`run_figures`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.account.estimates import run_figures
from agent.account.figures import Tokens
from agent.account.ledger import TranscriptLedger
from agent.account.prices import PriceTable
from agent.read import TRANSCRIPT
from agent.transcript import TranscriptReader

__all__ = ["TranscriptCost", "cost_of_path"]


@dataclass
class TranscriptCost:
    """The cost of one transcript file, as read in one pass."""

    path: str
    agent: str
    cost: float
    final: bool
    settled: float
    estimate_complete: bool
    tokens: Tokens
    by_model: dict[str, float] = field(default_factory=dict)
    attempts: int = 0
    lines: int = 0
    bad_lines: int = 0


def _transcripts(path: Path) -> Iterator[Path]:
    """The transcript files PATH names, never following symlinks."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        # A file (or a symlink, which the reader refuses with UnsafeFile).
        yield path
        return
    direct = path / TRANSCRIPT
    if _is_regular(direct):
        yield direct
    with os.scandir(path) as entries:
        subdirs = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    for name in subdirs:
        candidate = path / name / TRANSCRIPT
        if _is_regular(candidate):
            yield candidate


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _ledger_of_file(
    path: Path,
    prices: PriceTable,
    max_line_bytes: int,
    on_warning: Callable[[str], None] | None,
) -> tuple[TranscriptLedger, int]:
    """The ledger after reading the whole file, and the number of lines read."""
    reader = TranscriptReader(path, None, max_line_bytes=max_line_bytes, on_warning=on_warning)
    # Only the lines after an attempt's last result are remembered, so one file's window is
    # the one bound needed here.
    ledger = TranscriptLedger(prices, on_warning)
    lines = 0
    while True:
        chunk = reader.read(budget=8 << 20)
        lines += len(chunk.lines) + chunk.skipped
        ledger.feed_chunk(chunk)
        if not chunk.more_pending:
            break
    return ledger, lines


def cost_of_path(
    path: Path,
    prices: PriceTable,
    max_line_bytes: int = 8 << 20,
    on_warning: Callable[[str], None] | None = None,
) -> list[TranscriptCost]:
    """Cost every transcript PATH names, streaming each in constant memory.

    PATH is a transcript file, or a run directory: then ``raw_output.jsonl`` in it
    and in each subdirectory one level down. Symlinks are not followed (a
    symlinked PATH file raises :class:`~agent.transcript.UnsafeFile`).
    ``bad_lines`` counts lines that could matter but could not be used, as
    :meth:`TranscriptLedger.feed_chunk` does for the running agent. Unsettled estimates
    are calibrated by every settled attempt under PATH, as :func:`run_figures` says.
    """
    read: list[tuple[Path, TranscriptLedger, int]] = []
    for transcript in _transcripts(path):
        ledger, lines = _ledger_of_file(transcript, prices, max_line_bytes, on_warning)
        read.append((transcript, ledger, lines))
    figures = run_figures({transcript: ledger for transcript, ledger, _ in read})
    results = []
    for transcript, ledger, lines in read:
        figure = figures[transcript]
        results.append(
            TranscriptCost(
                path=str(transcript),
                agent=transcript.parent.name,
                cost=figure.cost,
                final=ledger.final,
                settled=figure.settled,
                estimate_complete=ledger.estimate_complete,
                tokens=ledger.tokens,
                by_model=figure.by_model,
                attempts=ledger.attempts,
                lines=lines,
                bad_lines=ledger.bad_lines,
            )
        )
    return results
