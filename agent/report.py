"""Read-only views for operators: ``cost``, ``status``, ``healthcheck`` and ``dead-letters``.

These read the agent's store through a read-only connection, so they never disturb a running
agent (requeueing dead letters is the one deliberate write).
"""

from __future__ import annotations

import math
import time
from typing import Any

import orjson

from agent.account import TranscriptCost, TranscriptLedger
from agent.config import Config
from agent.outbox import Store, dead_letter_rows, outbox_stats, read_meta


def cost_report(costs: list[TranscriptCost]) -> dict[str, Any]:
    """The JSON shape of ``adw-agent cost``."""
    return {
        "current_cost": round(math.fsum(c.cost for c in costs), 10),
        "final": bool(costs) and all(c.final for c in costs),
        "estimate_complete": all(c.estimate_complete for c in costs),
        "transcripts": [
            {
                "path": c.path,
                "agent": c.agent,
                "cost": round(c.cost, 10),
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
    from agent.pipeline import price_table  # noqa: PLC0415  (avoids an import cycle)

    db = Store.inspect(config.storage.dir)
    try:
        stats = outbox_stats(db)
        prices = price_table(config)
        transcripts = {}
        for key, value in db.execute("SELECT key, value FROM files WHERE key LIKE 'transcript:%'"):
            saved = orjson.loads(value)
            ledger = TranscriptLedger.load(saved["ledger"], prices)
            transcripts[str(key).removeprefix("transcript:")] = {
                "offset": saved["position"]["offset"],
                "cost": round(ledger.cost, 10),
                "final": ledger.final,
                "bad_lines": saved.get("bad_lines", 0),
            }
        cost = db.execute("SELECT value FROM files WHERE key = 'cost'").fetchone()
        return {
            "adw_id": config.adw_id,
            "store": str(config.storage.dir),
            **stats,
            "seq": read_meta(db, "seq"),
            "last_delivery": read_meta(db, "last_delivery"),
            "heartbeat": read_meta(db, "heartbeat"),
            "dead_letter_list": dead_letter_rows(db),
            "transcripts": transcripts,
            "current_cost": round(orjson.loads(cost[0])["reported"], 10) if cost else 0.0,
        }
    finally:
        db.close()


def _ago(ts: float | None) -> str:
    return "never" if ts is None else f"{time.time() - ts:.1f}s ago"


def print_status(r: dict[str, Any]) -> None:
    print(f"ADW {r['adw_id']}  store {r['store']}")
    by_type = ", ".join(f"{k}={v}" for k, v in sorted(r["outbox_by_type"].items())) or "empty"
    age = r["oldest_undelivered_age"]
    print(
        f"outbox        {r['outbox_depth']} ({by_type})" + (f", oldest {age:.1f}s" if age else "")
    )
    last = r["last_delivery"] or {}
    print(f"last delivery {_ago(last.get('at'))}: {last.get('result', '-')}")
    beat = r["heartbeat"] or {}
    print(f"heartbeat     {_ago(beat.get('at'))}")
    print(f"dead letters  {r['dead_letters']}")
    for row in r["dead_letter_list"]:
        print(f"  seq {row['seq']} {row['type']} -> {row['status']}: {row['response'][:60]}")
    print(f"current cost  ${r['current_cost']:.6f}")
    for agent, t in sorted(r["transcripts"].items()):
        final = "final" if t["final"] else "running"
        print(f"  {agent:<24} offset {t['offset']:>10}  ${t['cost']:.6f}  {final}")


def health(config: Config, max_stuck: float, now: float) -> str | None:
    """None when healthy, else the reason."""
    db = Store.inspect(config.storage.dir)
    try:
        beat = read_meta(db, "heartbeat")
        stats = outbox_stats(db)
    finally:
        db.close()
    allowed = 3 * config.intervals.heartbeat + 5
    if not beat or now - beat["at"] > allowed:
        age = "never" if not beat else f"{now - beat['at']:.0f}s ago"
        return f"no heartbeat within {allowed:.0f}s (last {age})"
    age = stats["oldest_undelivered_age"]
    if age is not None and age > max_stuck:
        return f"delivery stuck: oldest undelivered event is {age:.0f}s old"
    return None


def dead_letters(config: Config, requeue: int | None, requeue_all: bool) -> dict[str, Any]:
    if requeue is None and not requeue_all:
        db = Store.inspect(config.storage.dir)
        try:
            return {"dead_letters": dead_letter_rows(db)}
        finally:
            db.close()
    store = Store(config.storage.dir, config.adw_id, config.storage.synchronous)
    try:
        return {"requeued": store.requeue(None if requeue_all else requeue)}
    finally:
        store.close()
