"""The store's own cost per operation: ``python -m bench.store_ops [--events 2000]``.

Times, in this process on a real SQLite store in a temporary directory, the three writes the
delivery counters touch: queueing an event that coalesces an unsent one (``emit`` of a
``cost_update``), queueing one that does not (``workflow_failed``), and acknowledging events
(``ack_many``) one at a time and in batches of 100. Prints the median and p99 per call in
microseconds, for ``storage.synchronous`` full (the default) and normal. With ``full`` every
queueing write waits for the disk, so its figures are mostly the disk's; ``normal`` shows the
store's own work.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from agent.outbox import Store
from bench.common import percentile

ADW = "bench0001"

COST: dict[str, Any] = {
    "current_cost": 1.0,
    "cost_delta": 0.01,
    "final": False,
    "current_phase": "build",
    "estimate_complete": True,
    "breakdown": {"by_agent": {}, "by_model": {}, "by_phase": {}},
    "tokens": {"input": 1, "output": 2, "cache_creation": 3, "cache_read": 4},
}
FAILED: dict[str, Any] = {"reason": "error", "error_excerpt": "boom", "current_phase": None}


def _timed(calls: int, op: Callable[[int], None]) -> list[float]:
    out: list[float] = []
    for i in range(calls):
        started = time.perf_counter()
        op(i)
        out.append(time.perf_counter() - started)
    return out


def _summary(seconds: list[float]) -> dict[str, float]:
    values = sorted(x * 1e6 for x in seconds)
    return {
        "n": len(values),
        "median_us": round(statistics.median(values), 1),
        "p99_us": round(percentile(values, 99), 1),
    }


def run(events: int, synchronous: Literal["full", "normal"]) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="adw-bench-store-") as tmp:
        store = Store(Path(tmp), ADW, synchronous)
        try:

            def emit(kind: Literal["cost_update", "workflow_failed"]) -> Callable[[int], None]:
                data = COST if kind == "cost_update" else FAILED

                def op(_: int) -> None:
                    with store.transaction() as tx:
                        tx.emit(kind, data)

                return op

            found = {"emit coalescing": _summary(_timed(events, emit("cost_update")))}
            found["emit plain"] = _summary(_timed(events, emit("workflow_failed")))
            store.queue.ack_many(
                [int(row[0]) for row in store.db.execute("SELECT seq FROM outbox")]
            )
            for size in (1, 100):
                _timed(events, emit("workflow_failed"))
                seqs = [int(row[0]) for row in store.db.execute("SELECT seq FROM outbox")]
                batches = [seqs[i : i + size] for i in range(0, len(seqs), size)]

                def ack(i: int, batches: list[list[int]] = batches) -> None:
                    store.queue.ack_many(batches[i])

                found[f"ack_many x{size}"] = _summary(_timed(len(batches), ack))
            return found
        finally:
            store.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.store_ops", description=__doc__)
    p.add_argument("--events", type=int, default=2000)
    args = p.parse_args()
    for synchronous in ("full", "normal"):
        for name, s in run(args.events, synchronous).items():
            print(
                f"synchronous={synchronous:<6}  {name:<16}  n={s['n']:<5}  "
                f"median {s['median_us']:>8.1f} us  p99 {s['p99_us']:>8.1f} us"
            )


if __name__ == "__main__":
    main()
