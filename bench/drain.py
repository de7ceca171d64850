"""Scenario 5: drain a backlog after an outage.

The run directory's outbox is filled with N ``phase_update`` events through the agent's own
store (``Store.transaction`` / ``Transaction.emit``, exactly what the pipeline uses; phase
transitions are never coalesced, so N changes stay N events). The agent then starts while the
backend is down (nothing listens on its port: connections are refused), retries, and the
receiver comes up on that port. Reported: events/s from the first to the last event delivered,
and from the moment the backend came back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from agent.outbox import Store
from bench.common import Agent, events, free_port, populate_run_dir
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
