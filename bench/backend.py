"""The backend's benchmarks: ``python -m bench.backend [--only ...] [--db ...] [--smoke]``.

Scenarios (see each module): ``latency`` (a state write → the message at a WebSocket client,
with a real agent, ``serve`` and client: :mod:`bench.backend_latency`), ``ingest`` (single-event
POSTs and batches of 100 and 1,000: :mod:`bench.backend_ingest`), ``fanout`` (200 WebSocket
clients at 100 events/s, with and without a client that stops reading, and the backend's RSS:
:mod:`bench.backend_fanout`). Each runs on SQLite and on PostgreSQL (a throwaway cluster from
Debian's binaries) unless ``--db`` says otherwise. ``--smoke`` runs everything small and short;
its numbers are not meaningful. The table is printed; ``--out`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import backend_fanout, backend_ingest, backend_latency
from bench.backend_common import DATABASES, Databases
from bench.common import machine

SCENARIOS = ("latency", "ingest", "fanout")


@dataclass(frozen=True)
class Plan:
    changes: int = 300
    rate: float = 20.0
    singles: int = 3000
    batch_events: int = 20_000
    clients: int = 200
    fanout_rate: float = 100.0
    fanout_seconds: float = 10.0


FULL = Plan()
SMOKE = Plan(
    changes=20,
    rate=40.0,
    singles=200,
    batch_events=2000,
    clients=5,
    fanout_rate=50.0,
    fanout_seconds=1.0,
)


def run(plan: Plan, only: list[str], kinds: tuple[str, ...], work: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with Databases(work, kinds) as dbs:
        for kind in kinds:
            for name in only:
                print(f"running {name} on {kind} ...", file=sys.stderr, flush=True)
                scratch = work / kind / name
                started = time.monotonic()
                try:
                    if name == "latency":
                        found = backend_latency.run(
                            scratch, dbs.fresh(kind), plan.changes, plan.rate
                        )
                    elif name == "ingest":
                        found = backend_ingest.run(
                            scratch, dbs, kind, plan.singles, plan.batch_events
                        )
                    else:
                        found = backend_fanout.run(
                            scratch,
                            dbs.fresh(kind),
                            plan.clients,
                            plan.fanout_rate,
                            plan.fanout_seconds,
                        )
                except Exception:
                    # One broken scenario must not cost the numbers of the others.
                    found = {"error": traceback.format_exc()}
                    print(found["error"], file=sys.stderr, flush=True)
                found["seconds"] = round(time.monotonic() - started, 1)
                results.setdefault(kind, {})[name] = found
    return results


def _ms(s: dict[str, Any]) -> str:
    return f"{s['median_ms']:>8.2f}{s['p95_ms']:>9.2f}{s['p99_ms']:>9.2f}{s['max_ms']:>9.2f}"


def table(results: dict[str, Any]) -> str:
    lines = []
    for kind, scenarios in results.items():
        if not isinstance(scenarios, dict) or kind not in DATABASES:
            continue
        lines.append(f"== {kind}")
        for name, r in scenarios.items():
            if "error" in r:
                lines.append(f"{name}: FAILED (see the JSON)")
                continue
            if name == "latency":
                s = r["write_to_ws"]
                lines.append(f"{'latency, ms':<34}{'median':>8}{'p95':>9}{'p99':>9}{'max':>9}")
                lines.append(f"{'state write -> WS message':<34}{_ms(s)}  missed {s['missed']}")
            elif name == "ingest":
                lines.append(f"{'ingest':<34}{'events/s':>8}   request ms median / p99")
                for key, row in r.items():
                    if not isinstance(row, dict):
                        continue
                    req = row["request"]
                    lines.append(
                        f"{key:<34}{row['events_per_s']:>8}   "
                        f"{req['median_ms']:.2f} / {req['p99_ms']:.2f}"
                    )
            elif name == "fanout":
                lines.append(f"{'fan-out, ms':<34}{'median':>8}{'p95':>9}{'p99':>9}{'max':>9}")
                for key in ("plain", "with_stalled"):
                    row = r[key]
                    label = f"{row['clients']} clients" + (" + 1 stalled" if key != "plain" else "")
                    lines.append(f"{label + ', last client':<34}{_ms(row['to_last_client'])}")
                    lines.append(f"{label + ', median client':<34}{_ms(row['to_median_client'])}")
                stalled = r["with_stalled"]
                plain = r["plain"]
                lines.append(
                    f"CPU s over the {plain['load_s']:g} s load: serve {plain['serve_cpu_s']:.2f}"
                    f", the clients' process {plain['clients_cpu_s']:.2f}"
                )
                lines.append(
                    f"stalled client dropped: {stalled['ws_clients_at_end'] == stalled['clients']}"
                    f"; RSS MB idle {r['rss_mb_idle']:.1f}, {plain['clients']} clients "
                    f"connected {plain['rss_mb_connected']:.1f}, peak under load {r['hwm_mb']:.1f}"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backend", description=__doc__)
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    p.add_argument("--db", default=",".join(DATABASES), help="sqlite, postgresql or both")
    p.add_argument("--smoke", action="store_true", help="small and short, for CI")
    p.add_argument("--out", help="write the results as JSON")
    p.add_argument("--work", help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    kinds = tuple(k for k in args.db.split(",") if k)
    unknown = [s for s in only if s not in SCENARIOS] + [k for k in kinds if k not in DATABASES]
    if unknown:
        p.error(f"unknown: {', '.join(unknown)}")
    plan = SMOKE if args.smoke else FULL
    with tempfile.TemporaryDirectory(prefix="adw-bench-backend-", dir=args.work) as tmp:
        results = run(plan, only, kinds, Path(tmp))
    results["mode"] = "smoke" if args.smoke else "full"
    results["machine"] = machine()
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    failed = any("error" in r for k in kinds for r in results.get(k, {}).values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
