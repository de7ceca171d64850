"""Memory of the cost ledgers with many open transcripts: ``python -m bench.cost_memory``.

Each scenario runs in a fresh interpreter: it builds ``--transcripts`` ledgers (1,500 by
default) and feeds each ``--messages`` assistant lines with distinct message ids and no result
line, so every ledger wants a full deduplication window. It prints the interpreter's RSS
before and after, and the ids held, for three set-ups:

- ``unbounded``: no shared budget, 1,024 ids per transcript (the earlier behaviour);
- ``budget``: the agent's defaults, ``limits.dedup_window = 1024`` and
  ``limits.dedup_total = 16384`` shared by all the ledgers;
- ``settled``: the same budget, and every transcript then gets its result line.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys

import orjson

from agent.account import PriceTable, TranscriptLedger, WindowBudget
from agent.transcript import Chunk, Position

SCENARIOS = ("unbounded", "budget", "settled")


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def lines_for(transcript: int, messages: int) -> list[bytes]:
    return [
        orjson.dumps(
            {
                "type": "assistant",
                "message": {
                    "id": f"msg_01{transcript:06d}{i:06d}XXXXXXXXXX",
                    "model": "claude-sonnet-4-5-20250929",
                    "usage": {
                        "input_tokens": 3,
                        "output_tokens": 8,
                        "cache_creation_input_tokens": 500,
                        "cache_read_input_tokens": 20000,
                    },
                    "content": [{"type": "text", "text": "ok"}],
                },
            }
        )
        for i in range(messages)
    ]


def run(scenario: str, transcripts: int, messages: int) -> dict[str, float | int | str]:
    prices = PriceTable()
    budget = None if scenario == "unbounded" else WindowBudget(16384)
    gc.collect()
    before = rss_kib()
    ledgers = []
    for t in range(transcripts):
        ledger = TranscriptLedger(prices, lambda _m: None, 1024, budget)
        ledger.feed_chunk(Chunk(lines_for(t, messages), False, Position(0, 0, 0, None), 0))
        if scenario == "settled":
            ledger.feed({"type": "result", "total_cost_usd": 1.0})
        ledgers.append(ledger)
    gc.collect()
    after = rss_kib()
    held = sum(ledger.remembered for ledger in ledgers)
    state = sum(len(orjson.dumps(ledger.dump())) for ledger in ledgers)
    return {
        "scenario": scenario,
        "transcripts": transcripts,
        "messages_each": messages,
        "ids_held": held,
        "rss_before_mib": round(before / 1024, 1),
        "rss_after_mib": round(after / 1024, 1),
        "growth_mib": round((after - before) / 1024, 1),
        "growth_per_transcript_kib": round((after - before) / transcripts, 1),
        "saved_state_mib": round(state / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cost_memory")
    parser.add_argument("--transcripts", type=int, default=1500)
    parser.add_argument("--messages", type=int, default=1100)
    parser.add_argument("--scenario", choices=SCENARIOS)
    args = parser.parse_args(argv)
    if args.scenario:
        result = run(args.scenario, args.transcripts, args.messages)
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        return 0
    for scenario in SCENARIOS:
        # A fresh interpreter each, so one scenario's freed memory does not hide another's.
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.cost_memory",
                "--scenario",
                scenario,
                "--transcripts",
                str(args.transcripts),
                "--messages",
                str(args.messages),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        sys.stdout.write(done.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
