"""Where one state change's latency goes: ``python -m bench.stages [--writes 100]``.

Runs the agent in this process (``agent.app.Agent``, default settings, log level warning),
wraps a few of its methods with timestamps, rewrites ``adw_state.json`` in place at 20/s and
prints, for each stage, the median and p90 of the time from the write to the stage: watchdog's
callback (``Runs._notice``), the event loop (``Runs._route``), processing
(``Pipeline.process``), the POST (``Exchange.post_batch``), the receiver's arrival time, and
the ack. The timing wrappers add a few microseconds; the end-to-end figure is the latency
scenario's, this is the breakdown.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import app, config, deliver_http, logs, outbox_queue, pipeline, runs
from bench.common import base_state, events, populate_run_dir, write_state
from bench.receiver import ReceiverProcess
from tests.harness import ROOT, write_config

STAGES = [
    ("watchdog callback", "notice>"),
    ("event loop", "note>"),
    ("processing starts", "process>"),
    ("processing ends", "process<"),
    ("POST starts", "post>"),
    ("receiver has it", "arrive"),
    ("POST returns", "post<"),
    ("ack committed", "ack<"),
]


class Marks:
    """Timestamps of entering (``name>``) and leaving (``name<``) wrapped methods."""

    def __init__(self) -> None:
        self.at: dict[str, list[float]] = {}

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        original: Callable[..., Any] = getattr(owner, attr)
        marks = self.at

        if asyncio.iscoroutinefunction(original):

            @functools.wraps(original)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                marks.setdefault(name + ">", []).append(time.time())
                result = await original(*args, **kwargs)
                marks.setdefault(name + "<", []).append(time.time())
                return result

            setattr(owner, attr, timed_async)
        else:

            @functools.wraps(original)
            def timed(*args: Any, **kwargs: Any) -> Any:
                marks.setdefault(name + ">", []).append(time.time())
                result = original(*args, **kwargs)
                marks.setdefault(name + "<", []).append(time.time())
                return result

            setattr(owner, attr, timed)

    def first_after(self, name: str, t: float) -> float | None:
        return next((x for x in self.at.get(name, []) if x >= t), None)


def run(writes: int) -> dict[str, tuple[float, float]]:
    marks = Marks()
    # The watcher's thread hands each path to the loop (Runs._notice), which routes it to its
    # run (Runs._route); the sender posts batches and acknowledges them together.
    marks.wrap(runs.Runs, "_notice", "notice")
    marks.wrap(runs.Runs, "_route", "note")
    marks.wrap(pipeline.Pipeline, "process", "process")
    marks.wrap(deliver_http.Exchange, "post_batch", "post")
    marks.wrap(outbox_queue.Queue, "ack_many", "ack")
    written: list[float] = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        run_dir = work / "agents" / "5a6e5000"
        populate_run_dir(run_dir)
        receiver = ReceiverProcess(ROOT)
        try:
            path = write_config(
                work / "agent.toml",
                run_dir,
                work / "storage",
                receiver.url,
                log={"level": "warning"},
            )
            agent = app.Agent(config.load(path))
            logs.setup("warning")

            def writer() -> None:
                time.sleep(1.5)
                marks.at.clear()
                state = base_state()
                for n in range(writes):
                    state["bench_n"] = n
                    written.append(time.time())
                    write_state(run_dir / "adw_state.json", state)
                    time.sleep(0.05)
                time.sleep(0.5)
                agent.should_exit.set()

            threading.Thread(target=writer, daemon=True).start()
            asyncio.run(agent.run())
            receiver.fetch()
        finally:
            receiver.stop()
    arrived = {
        r.body["data"]["bench_n"]: r.at
        for r in events(receiver.records, "workflow_update")
        if "bench_n" in r.body["data"]
    }
    rows: list[list[float]] = []
    for n, t in enumerate(written):
        if n not in arrived:
            continue
        row = []
        for _, key in STAGES:
            at = arrived[n] if key == "arrive" else marks.first_after(key, t)
            if at is None:
                break
            row.append((at - t) * 1000)
        else:
            rows.append(row)
    out = {}
    for i, (label, _) in enumerate(STAGES):
        column = sorted(r[i] for r in rows)
        out[label] = (column[len(column) // 2], column[int(len(column) * 0.9)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--writes", type=int, default=100)
    args = parser.parse_args()
    print("ms from the write (median, p90)")
    for label, (median, p90) in run(args.writes).items():
        print(f"  {label:<20}{median:7.2f}{p90:7.2f}")


if __name__ == "__main__":
    main()
