"""Read-only views for operators: ``cost``, ``status``, ``healthcheck`` and ``dead-letters``.

These read the agent's store through a read-only connection, so they never disturb a running
agent (requeueing dead letters is the one deliberate write).
"""

from __future__ import annotations

import math
import time
from typing import Any

import orjson

from agent import liveness
from agent.account import PriceTable, TranscriptCost, TranscriptLedger
from agent.config import Config
from agent.outbox import Store, StoreView
from agent.read import escape_name


def cost_report(costs: list[TranscriptCost]) -> dict[str, Any]:
    """The JSON shape of ``adw-agent cost``."""
    return {
        "current_cost": round(math.fsum(c.cost for c in costs), 10),
        "settled_cost": round(math.fsum(c.settled for c in costs), 10),
        "final": bool(costs) and all(c.final for c in costs),
        "estimate_complete": all(c.estimate_complete for c in costs),
        "transcripts": [
            {
                # Names that are not UTF-8 are escaped, as in events (see read.escape_name).
                "path": escape_name(str(c.path)),
                "agent": escape_name(c.agent),
                "cost": round(c.cost, 10),
                "settled": round(c.settled, 10),
                "final": c.final,
                "estimate_complete": c.estimate_complete,
                "attempts": c.attempts,
                "lines": c.lines,
                "bad_lines": c.bad_lines,
                "tokens": {
                    "input": c.tokens.input,
                    "output": c.tokens.output,
                    "cache_creation": c.tokens.cache_creation,
                    "cache_read": c.tokens.cache_read,
                },
                "by_model": {m: round(v, 10) for m, v in sorted(c.by_model.items())},
            }
            for c in costs
        ],
    }


def print_cost_table(report: dict[str, Any]) -> None:
    rows = report["transcripts"]
    width = max([len(r["agent"]) for r in rows] + [5])
    print(
        f"{'agent':<{width}}  {'cost (USD)':>12}  {'final':<5}  {'lines':>8}  "
        "tokens in/out/cache w/r"
    )
    for r in rows:
        t = r["tokens"]
        flag = "" if r["estimate_complete"] else "  (unknown model priced at fallback)"
        print(
            f"{r['agent']:<{width}}  {r['cost']:>12.6f}  {'yes' if r['final'] else 'no':<5}  "
            f"{r['lines']:>8}  "
            f"{t['input']}/{t['output']}/{t['cache_creation']}/{t['cache_read']}{flag}"
        )
    print(
        f"{'total':<{width}}  {report['current_cost']:>12.6f}  {'yes' if report['final'] else 'no'}"
    )


def status_report(config: Config) -> dict[str, Any]:
    """Everything ``adw-agent status`` shows, as plain data."""
    prices = PriceTable.from_config(config.cost)
    with StoreView(config.storage.dir, config.adw_id) as view:
        stats = view.stats()
        transcripts: dict[str, dict[str, Any]] = {}
        for key, value in view.transcript_records():
            try:
                saved = orjson.loads(value)
                ledger = TranscriptLedger.load(saved["ledger"], prices)
                transcripts[key.agent] = {
                    "offset": int(saved["position"]["offset"]),
                    "cost": round(ledger.cost, 10),
                    "final": ledger.final,
                    "bad_lines": ledger.bad_lines,
                }
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                transcripts[key.agent] = {"error": f"unreadable saved state: {exc}"}
        cost = view.record("cost")
        runs = view.runs()
        counted = view.delivery_counts()
        for adw_id, run in runs.items():
            # What an auditor of exactly-once delivery needs (agent.outbox.StreamCounts). A
            # running agent may have started a stream between the two reads: it shows next time.
            counts = counted["streams"].get(adw_id)
            run["superseded"] = counts["superseded"] if counts else 0
            run["counted_from"] = counts["counted_from"] if counts else run["seq"]
            run["expected"] = counts["expected"] if counts else 0
        for adw_id, run in runs.items():
            reported = view.record("cost", adw_id=adw_id)
            run["current_cost"] = round(orjson.loads(reported)["reported"], 10) if reported else 0.0
            # Set when the store was found lost, reset or replaced (agent.claims).
            run["replaced"] = view.meta(f"replaced:{adw_id}")
            # How the run ended, if it did (agent.endings): a record of each run.
            reported_end = view.record("ended", adw_id=adw_id)
            run["ended"] = orjson.loads(reported_end) if reported_end else None
        home = runs.get(config.adw_id)
        ended = None if home is None else home["ended"]
        return {
            "adw_id": config.adw_id,
            "mode": "host" if config.host_mode else "run",
            "store": str(config.storage.dir),
            **stats,
            "runs": runs,
            "seq": view.meta("seq") or 0,
            "last_delivery": view.meta("last_delivery"),
            "delivery": counted["totals"],
            "heartbeat": view.meta("heartbeat"),
            "sender": view.meta("sender"),
            "ended": ended,
            "dead_letter_list": view.dead_letters(),
            "transcripts": transcripts,
            "current_cost": round(orjson.loads(cost)["reported"], 10) if cost else 0.0,
        }


def _ago(ts: float | None) -> str:
    return "never" if ts is None else f"{time.time() - ts:.1f}s ago"


def print_status(r: dict[str, Any]) -> None:
    """``adw-agent status`` for people."""
    print(f"ADW {r['adw_id']}  store {r['store']}")
    by_type = ", ".join(f"{k}={v}" for k, v in sorted(r["outbox_by_type"].items())) or "empty"
    age = r["oldest_undelivered_age"]
    oldest = f", oldest {age:.1f}s" if age is not None else ""
    print(f"outbox        {r['outbox_depth']} ({by_type}){oldest}")
    last = r["last_delivery"] or {}
    print(f"last delivery {_ago(last.get('at'))}: {last.get('result', '-')}")
    beat = r["heartbeat"] or {}
    state = f" ({beat['state']})" if beat.get("state") else ""
    print(f"heartbeat     {_ago(beat.get('at'))}{state}")
    problem = (r.get("sender") or {}).get("problem")
    if problem:
        print(f"delivery      {problem} (since {_ago(r['sender'].get('since'))})")
    totals = r["delivery"]
    since = f" (counted since {_ago(totals['since'])})" if totals["since"] is not None else ""
    print(
        f"delivered     {totals['delivered']} events, {totals['duplicates']} of them already "
        f"held by the backend{since}"
    )
    print(f"last seq      {r['seq']}")
    ended = r.get("ended")
    if isinstance(ended, dict):
        print(f"run ended     {ended.get('kind')} at {ended.get('end_time')}")
    print(f"dead letters  {r['dead_letters']}")
    for row in r["dead_letter_list"]:
        print(f"  seq {row['seq']} {row['type']} -> {row['status']}: {row['response'][:60]}")
    if r["mode"] == "host":
        print(f"runs          {len(r['runs'])}")
        for adw_id, run in r["runs"].items():
            age = run["oldest_undelivered_age"]
            oldest = f", oldest {age:.1f}s" if age is not None else ""
            replaced = "  STORE REPLACED" if run["replaced"] else ""
            over = run["ended"]
            ended = f"  ended {over.get('kind')} at {over.get('end_time')}" if over else ""
            print(
                f"  {adw_id:<14} seq {run['seq']:>6}  epoch {run['epoch']}  "
                f"outbox {run['outbox_depth']}{oldest}  dead letters {run['dead_letters']}  "
                f"superseded {run['superseded']}  expected {run['expected']}  "
                f"${run['current_cost']:.6f}{ended}{replaced}"
            )
        return
    run = r["runs"].get(r["adw_id"]) or {}
    if run.get("replaced"):
        print(
            f"STORE REPLACED {_ago(run['replaced']['at'])}: events were reported under epoch "
            f"{run['replaced']['reported_epoch']}; a new stream started (epoch {run['epoch']})"
        )
    if run:
        print(f"stream        {_stream_line(run)}")
    print(f"current cost  ${r['current_cost']:.6f}")
    for agent, t in sorted(r["transcripts"].items()):
        if "error" in t:
            print(f"  {agent:<24} {t['error']}")
            continue
        final = "final" if t["final"] else "running"
        print(f"  {agent:<24} offset {t['offset']:>10}  ${t['cost']:.6f}  {final}")


def _stream_line(run: dict[str, Any]) -> str:
    """One stream's counts: how many of its seqs the backend must hold once the outbox drained."""
    first = run["counted_from"] + 1
    earlier = " (earlier ones not counted)" if run["counted_from"] else ""
    return (
        f"epoch {run['epoch']}, seqs {first}-{run['seq']}{earlier}: {run['superseded']} "
        f"superseded, {run['dead_letters']} dead-lettered; the backend holds the other "
        f"{run['expected']} once each ({run['outbox_depth']} still queued)"
    )


def health(config: Config, max_stuck: float, now: float) -> str | None:
    """None when healthy, else the reason: no fresh heartbeat (the agent is hung, dead or was
    stopped), the sender reported that delivery cannot progress (the backend redirects, the
    sender stalled), or the oldest undelivered event has waited longer than ``max_stuck``
    seconds.

    The heartbeat's age is taken from the monotonic clock (see :mod:`agent.liveness`); one
    whose age cannot be known counts as unhealthy."""
    with StoreView(config.storage.dir, config.adw_id) as view:
        beat = view.meta("heartbeat")
        sender = view.meta("sender")
        runs = view.runs()
    allowed = 3 * config.intervals.heartbeat + 5
    if not beat:
        return f"no heartbeat within {allowed:.0f}s (last never)"
    beat_age = liveness.age(beat, now, time.monotonic(), liveness.boot_id())
    if beat_age is None:
        return (
            "heartbeat age unknown (written before a reboot, or the clock went back): "
            "liveness cannot be judged"
        )
    if beat_age > allowed:
        return f"no heartbeat within {allowed:.0f}s (last {beat_age:.0f}s ago)"
    if beat.get("state") == "stopping":
        return f"the agent stopped {beat_age:.0f}s ago"
    if isinstance(sender, dict) and sender.get("problem"):
        return f"delivery cannot progress: {sender['problem']}"
    stuck = sorted(
        (run["oldest_undelivered_age"], adw_id)
        for adw_id, run in runs.items()
        if run["oldest_undelivered_age"] is not None and run["oldest_undelivered_age"] > max_stuck
    )
    if stuck:
        age, adw_id = stuck[-1]
        others = f" and {len(stuck) - 1} other runs" if len(stuck) > 1 else ""
        return f"delivery stuck: oldest undelivered event is {age:.0f}s old (ADW {adw_id}{others})"
    return None


def dead_letters(config: Config, requeue: int | None, requeue_all: bool) -> dict[str, Any]:
    """List the dead letters, or put one (``requeue``) or all of them back in the outbox.

    A running agent notices requeued events within about a second; they keep their event_id and
    seq. Requeueing is the one write these views make, through the store's own transaction.
    """
    with StoreView(config.storage.dir, config.adw_id) as view:
        rows = view.dead_letters()
    if requeue is None and not requeue_all:
        return {"dead_letters": rows}
    home = None if config.host_mode else config.adw_id
    store = Store(config.storage.dir, home, config.storage.synchronous)
    try:
        return {"requeued": store.queue.requeue(None if requeue_all else requeue)}
    finally:
        store.close()
