"""Scenario 5: drain a backlog after an outage; and batches against one event per request.

The run directory's outbox is filled with N ``phase_update`` events through the agent's own
store (``Store.transaction`` / ``Transaction.emit``, exactly what the pipeline uses; phase
transitions are never coalesced, so N changes stay N events). The agent then starts while the
backend is down (nothing listens on its port: connections are refused), retries, and the
receiver comes up on that port. Reported: events/s from the first to the last event delivered,
and from the moment the backend came back.

``python -m bench.drain`` compares the two ways of sending, side by side: batches of
``delivery.batch_max`` (100) events and one event per request (``batch_max = 1``), each drained
several times into ``adw-agent receive`` (its own process), and prints the median, lowest and
highest events/s of each. The drain is timed from the agent's side, by watching its outbox
empty (read-only, as ``adw-agent status`` does): so ``--url`` points it at any other backend,
such as the project's backend service, instead of ``adw-agent receive``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.outbox import Store
from bench.common import Agent, base_state, events, free_port, populate_run_dir, write_state
from bench.procstat import sample
from bench.receiver import ReceiverProcess, Record
from tests.harness import ROOT

PHASES = ["plan", "build", "test", "review", "document", "ship"]


def prefill(storage: Path, adw_id: str, count: int) -> None:
    """Queue ``count`` phase_update events the way the pipeline does."""
    store = Store(storage, adw_id, "full")
    try:
        with store.transaction() as tx:
            for i in range(count):
                done = PHASES[: i % len(PHASES)]
                tx.emit(
                    "phase_update",
                    {
                        "current_phase": PHASES[i % len(PHASES)],
                        "status": "running",
                        "completed_phases": done,
                        "completed_phase": done[-1] if done else None,
                        "phase_cost": round(0.01 * i, 6),
                    },
                )
    finally:
        store.close()


def _backlog(records: list[Record], adw_id: str, count: int) -> list[Record]:
    """The prefilled events (seq 1..count) among those received, in arrival order."""
    return [r for r in events(records, "phase_update", adw_id) if r.body["seq"] <= count]


def run(work: Path, count: int, outage_s: float = 1.0) -> dict[str, Any]:
    run_dir = work / "agents" / "d4c3b2a1"
    populate_run_dir(run_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    agent = Agent(work, run_dir, url, delivery={"backoff_initial": 0.05, "backoff_max": 0.5})
    prefill(agent.storage, agent.adw_id, count)
    receiver = None
    agent.start()
    try:
        # The agent is up and failing to deliver: the backend is down.
        deadline = time.monotonic() + 30
        while "delivery failed" not in agent.log.read_text(errors="replace"):
            if time.monotonic() > deadline or not agent.proc.running():
                raise RuntimeError(f"the agent never tried to deliver; see {agent.log}")
            time.sleep(0.05)
        time.sleep(outage_s)
        before = agent.sample()
        back_at = time.time()
        receiver = ReceiverProcess(ROOT, port)
        adw = agent.adw_id
        if not receiver.wait(lambda rs: len(_backlog(rs, adw, count)) >= count, 120, interval=0.2):
            raise RuntimeError(f"drain incomplete; see {agent.log}")
        after = agent.sample()
        receiver.fetch()
    finally:
        agent.stop()
        if receiver is not None:
            receiver.stop()
    drained = _backlog(receiver.records, adw, count)
    first, last = drained[0].at, drained[-1].at
    seqs = [r.body["seq"] for r in drained]
    return {
        "events": count,
        "delivered": len({r.body["event_id"] for r in drained}),
        "duplicates": len(drained) - len({r.body["event_id"] for r in drained}),
        "in_seq_order": seqs == sorted(seqs),
        "first_after_backend_up_s": round(first - back_at, 3),
        "drain_s": round(last - first, 3),
        "events_per_s": round((count - 1) / (last - first), 1) if last > first else None,
        "events_per_s_from_backend_up": round(count / (last - back_at), 1),
        "agent_cpu_s": round(after.cpu_s - before.cpu_s, 2),
        "agent_hwm_mb": round(after.hwm_mb, 1),
    }


# -- batches against one event per request ---------------------------------------------------


class ReceiveProcess:
    """``adw-agent receive`` as its own process, appending what it receives to a file."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "receive", "--port", "0", "--out", str(out)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        # "receiving on http://127.0.0.1:PORT (Ctrl-C to stop)"
        self.url = self.proc.stderr.readline().split()[2]

    def received(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.read_bytes().splitlines()]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _left(db: sqlite3.Connection, count: int) -> int:
    """How many of the prefilled events (seq 1..count) are still queued."""
    return int(db.execute("SELECT COUNT(*) FROM outbox WHERE seq <= ?", (count,)).fetchone()[0])


def drain_once(work: Path, count: int, batch_max: int, url: str | None = None) -> dict[str, Any]:
    """Drain ``count`` prefilled events with ``batch_max``; the agent's view of the time."""
    work.mkdir(parents=True)
    run_dir = work / "agents" / "e5f6a7b8"
    run_dir.mkdir(parents=True)
    write_state(run_dir / "adw_state.json", base_state())
    receiver = ReceiveProcess(work / "received.jsonl") if url is None else None
    target = url or (receiver.url if receiver is not None else "")
    agent = Agent(
        work,
        run_dir,
        target,
        delivery={"batch_max": batch_max, "backoff_initial": 0.05, "backoff_max": 0.5},
    )
    prefill(agent.storage, agent.adw_id, count)
    db = Store.inspect(agent.storage)
    agent.start()
    pids = [agent.pid] + ([receiver.proc.pid] if receiver is not None else [])
    try:
        # Poll the outbox: the last moment all of the backlog was queued, and the first
        # moment none of it was. Each poll is a few microseconds; the error is one interval.
        begin = time.perf_counter()
        deadline = time.monotonic() + 300
        while (left := _left(db, count)) == count:
            begin = time.perf_counter()
            if time.monotonic() > deadline or not agent.proc.running():
                raise RuntimeError(f"the agent never delivered; see {agent.log}")
            time.sleep(0.002)
        # CPU from here on: the drain's, not start-up's (tick resolution, 10 ms).
        cpu_before = [sample(pid).cpu_s for pid in pids]
        while left:
            if time.monotonic() > deadline or not agent.proc.running():
                raise RuntimeError(f"drain incomplete ({left} left); see {agent.log}")
            time.sleep(0.002)
            left = _left(db, count)
        end = time.perf_counter()
        cpu = [sample(pid).cpu_s - before for pid, before in zip(pids, cpu_before, strict=True)]
    finally:
        db.close()
        agent.stop()
        if receiver is not None:
            receiver.stop()
    result: dict[str, Any] = {
        "batch_max": batch_max,
        "events": count,
        "drain_s": round(end - begin, 4),
        "events_per_s": round(count / (end - begin), 1),
        # CPU per 1,000 events: what the machine's load changes least.
        "agent_cpu_ms_per_1000": round(cpu[0] * 1e6 / count, 1),
    }
    if receiver is not None:
        result["receiver_cpu_ms_per_1000"] = round(cpu[1] * 1e6 / count, 1)
    if receiver is not None:
        got = [e for e in receiver.received() if e["type"] == "phase_update"]
        seqs = [e["seq"] for e in got if e["seq"] <= count]
        result["delivered"] = len(set(seqs))
        result["in_seq_order"] = seqs == sorted(seqs)
    return result


def compare(
    work: Path, count: int, runs: int, single_count: int, url: str | None = None
) -> dict[str, Any]:
    """Batches and one event per request, alternating, ``runs`` times each."""
    results: dict[str, list[dict[str, Any]]] = {"batched": [], "single": []}
    for i in range(runs):
        results["batched"].append(drain_once(work / f"batched-{i}", count, 100, url))
        results["single"].append(drain_once(work / f"single-{i}", single_count, 1, url))
    summary: dict[str, Any] = {}
    for mode, rows in results.items():
        rates = [r["events_per_s"] for r in rows]
        agent_cpu = [r["agent_cpu_ms_per_1000"] for r in rows]
        receiver_cpu = [r.get("receiver_cpu_ms_per_1000") for r in rows]
        summary[mode] = {
            "events": rows[0]["events"],
            "runs": len(rows),
            "median_events_per_s": round(statistics.median(rates), 1),
            "min_events_per_s": min(rates),
            "max_events_per_s": max(rates),
            "agent_cpu_ms_per_1000": round(statistics.median(agent_cpu), 1),
            "receiver_cpu_ms_per_1000": (
                round(statistics.median([c for c in receiver_cpu if c is not None]), 1)
                if None not in receiver_cpu
                else None
            ),
            "all_delivered_in_order": all(
                r.get("delivered", r["events"]) == r["events"] and r.get("in_seq_order", True)
                for r in rows
            ),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description="drain: batches against one event per request")
    parser.add_argument("--events", type=int, default=20_000, help="backlog for batches")
    parser.add_argument(
        "--single-events", type=int, default=5_000, help="backlog for one event per request"
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--url", help="drain into this backend instead of a fresh `adw-agent receive`"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adw-drain-") as scratch:
        summary = compare(Path(scratch), args.events, args.runs, args.single_events, args.url)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    target = args.url or "adw-agent receive"
    print(
        f"drain into {target}, {args.runs} runs each: events/s median [min-max]; "
        "CPU ms per 1,000 events (median) of the agent / the receiver"
    )
    for mode, label in (("batched", "batches of 100"), ("single", "one per request")):
        s = summary[mode]
        print(
            f"  {label:<16} {s['events']:>6} events  {s['median_events_per_s']:>9.1f}"
            f"  [{s['min_events_per_s']:.1f}-{s['max_events_per_s']:.1f}]"
            f"  cpu {s['agent_cpu_ms_per_1000']} / {s['receiver_cpu_ms_per_1000']}"
            f"  all delivered in order: {s['all_delivered_in_order']}"
        )


if __name__ == "__main__":
    main()
