"""How close the live cost comes to the bill: ``python -m bench.cost_accuracy``.

Every real transcript fixture is fed to a ledger line by line, as the agent reads it. Just
before each result line, the attempt's live figure (what the ledger adds for that attempt,
calibrated by the file's earlier settled attempts) is taken as a share of the attempt's own
``total_cost_usd``. Prints one row per settled attempt, then the median and the minimum over
the ordinary runs (those with priced messages and a non-zero result), and checks that no
figure ever exceeded 110% of the file's final one or went down other than at a result line.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson

from agent.account import PriceTable, TranscriptLedger
from agent.transcript import parse_line
from tests.harness import FIXTURES

#: Every real transcript fixture (stream-json, not Claude Code's own session files).
SOURCES = sorted(
    p
    for folder in ("claude_stream", "real", "multi_run")
    for p in (FIXTURES / folder).glob("*.jsonl")
    if not p.name.startswith("claudeless_")
)


@dataclass(frozen=True, slots=True)
class Row:
    file: str
    attempt: int
    cli: str
    final: float
    live: float
    lines: int

    @property
    def share(self) -> float | None:
        return self.live / self.final if self.final > 0 else None


@dataclass(frozen=True, slots=True)
class Replay:
    rows: list[Row]
    final: float
    highest_share: float
    drops_outside_results: int


def replay(path: Path) -> Replay:
    """Feed ``path`` line by line; the live share before each result and the figure's path."""
    ledger = TranscriptLedger(PriceTable(), lambda _m: None)
    rows: list[Row] = []
    figures: list[float] = []
    drops = 0
    attempt_start = 0.0
    attempt = 0
    cli = "?"
    lines_in_attempt = 0
    previous = 0.0
    for raw in path.read_bytes().splitlines():
        line = parse_line(raw)
        if line is None:
            continue
        kind = line.get("type")
        if kind == "system" and line.get("subtype") == "init":
            ledger.feed(line)
            attempt += 1
            attempt_start = ledger.cost
            cli = str(line.get("claude_code_version") or "<2.0")
            lines_in_attempt = 0
        elif kind == "result":
            live = ledger.cost - attempt_start
            total = line.get("total_cost_usd")
            if isinstance(total, int | float):
                row = Row(path.name, max(attempt, 1), cli, float(total), live, lines_in_attempt)
                rows.append(row)
            ledger.feed(line)
        else:
            ledger.feed(line)
            lines_in_attempt += 1
        now = ledger.cost
        if now < previous - 1e-9 and kind != "result":
            drops += 1
        previous = now
        figures.append(now)
    final = ledger.cost
    highest = max(figures, default=0.0) / final if final > 0 else 0.0
    return Replay(rows, final, highest, drops)


def main() -> int:
    ordinary: list[float] = []
    worst_highest = 0.0
    drops = 0
    print(f"{'file':<62} {'run':>3} {'CLI':>7} {'final $':>9} {'live $':>9} {'live %':>7}")
    for path in SOURCES:
        result = replay(path)
        worst_highest = max(worst_highest, result.highest_share)
        drops += result.drops_outside_results
        for row in result.rows:
            share = row.share
            shown = "n/a" if share is None else f"{share * 100:6.1f}%"
            print(
                f"{row.file[:62]:<62} {row.attempt:>3} {row.cli:>7} {row.final:>9.4f} "
                f"{row.live:>9.4f} {shown:>7}"
            )
            if share is not None and row.live > 0:
                ordinary.append(share)
    ordinary.sort()
    summary = {
        "ordinary_runs": len(ordinary),
        "median_pct": round(statistics.median(ordinary) * 100, 1) if ordinary else None,
        "min_pct": round(ordinary[0] * 100, 1) if ordinary else None,
        "max_pct": round(ordinary[-1] * 100, 1) if ordinary else None,
        "highest_live_vs_final_pct": round(worst_highest * 100, 1),
        "drops_outside_result_lines": drops,
    }
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
