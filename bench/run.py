"""Run every scenario, print a table, write JSON: ``python -m bench [--smoke] [--out FILE]``.

Scenarios (see each module): ``latency`` (state write / transcript line to delivered event, with
pollers side by side for comparison), ``catchup`` (a run directory full of transcripts, and
``adw-agent cost`` on one big transcript), ``idle`` (one agent, and many agents on one host),
``drain`` (a backlog queued during an outage). Everything runs against a local receiver process
on 127.0.0.1, with the agent as a real ``python -m agent run`` process. ``--smoke`` runs each
scenario small and short (for CI; the numbers are not meaningful). ``--profile DIR`` samples
every agent with py-spy (if installed) into DIR, for ``python -m bench.profile_summary``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import catchup, common, drain, idle, latency
from tests.harness import ROOT

SCENARIOS = ("latency", "catchup", "idle", "drain")


@dataclass(frozen=True)
class Plan:
    """How big each scenario is."""

    changes: int = 500
    rate: float = 20.0
    burst: int = 10
    poll_intervals: tuple[float, ...] = (2.0, 10.0)
    catchup_mb: tuple[int, ...] = (100, 200, 400)
    cli_mb: int = 100
    idle_window: float = 60.0
    idle_many: int = 20
    drain_events: int = 10_000


FULL = Plan()
SMOKE = Plan(
    changes=30,
    rate=40.0,
    burst=10,
    poll_intervals=(1.0,),
    catchup_mb=(8,),
    cli_mb=4,
    idle_window=3.0,
    idle_many=2,
    drain_events=500,
)


def run_scenarios(plan: Plan, only: set[str], work: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for name in SCENARIOS:
        if name not in only:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            results[name] = _run_one(name, plan, work / name)
        except Exception:
            # Keep going: one broken scenario should not cost the numbers of the others.
            results[name] = {"error": traceback.format_exc()}
            print(results[name]["error"], file=sys.stderr, flush=True)
        timings[name] = round(time.monotonic() - started, 1)
    results["scenario_seconds"] = timings
    return results


def _run_one(name: str, plan: Plan, scratch: Path) -> Any:
    if name == "latency":
        return latency.run(scratch, plan.changes, plan.rate, plan.burst, list(plan.poll_intervals))
    if name == "catchup":
        return catchup.run(scratch, list(plan.catchup_mb), plan.cli_mb)
    if name == "idle":
        return {
            "one": idle.run(scratch, 1, plan.idle_window, list(plan.poll_intervals)),
            "many": idle.run(scratch, plan.idle_many, plan.idle_window),
        }
    return drain.run(scratch, plan.drain_events)


# -- verdicts and the table ----------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the measured value and whether it is met."""
    out: list[dict[str, Any]] = []
    results = {k: v for k, v in results.items() if not (isinstance(v, dict) and "error" in v)}

    def add(name: str, value: Any, limit: float, higher_is_better: bool = False) -> None:
        met = None if value is None else (value >= limit if higher_is_better else value <= limit)
        op = ">=" if higher_is_better else "<="
        out.append({"target": f"{name} {op} {limit:g}", "value": value, "met": met})

    lat = results.get("latency")
    if lat:
        for phase in ("state_steady", "state_burst"):
            agent = lat["phases"][phase]["agent"]
            add(f"{phase} median ms", agent["median_ms"], 5)
            add(f"{phase} p99 ms", agent["p99_ms"], 25)
        for phase in ("line_steady", "line_burst"):
            add(f"{phase} p99 ms", lat["phases"][phase]["agent"]["p99_ms"], 25)
    cu = results.get("catchup")
    if cu:
        # The target is stated for a 200 MB run directory.
        main = min(cu["agent"], key=lambda r: abs(r["mb"] - 200))
        add(f"catch-up {main['mb']:g} MB, MB/s from spawn", main["mb_per_s"], 250, True)
        add(
            f"catch-up {main['mb']:g} MB, MB/s excluding start-up",
            main["mb_per_s_after_startup"],
            250,
            True,
        )
        if len(cu["agent"]) > 1:
            peaks = [r["peak_rss_mb"] for r in cu["agent"]]
            add(
                "catch-up peak RSS spread MB across run dir sizes",
                round(max(peaks) - min(peaks), 1),
                10,
            )
        add("adw-agent cost MB/s", cu["cost_cli"]["mb_per_s"], 250, True)
    idle_results = results.get("idle")
    if idle_results:
        for key in ("one", "many"):
            r = idle_results[key]
            add(f"idle x{r['agents']} CPU s/min (max)", r["cpu_s_per_min_max"], 0.1)
            add(f"idle x{r['agents']} RSS MB (max)", r["rss_mb_max"], 45)
    dr = results.get("drain")
    if dr:
        add("drain events/s", dr["events_per_s"], 2000, True)
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def table(results: dict[str, Any]) -> str:
    lines: list[str] = []
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    for name in failed:
        lines.append(f"{name}: FAILED (see the error in the JSON results)")
    results = {k: v for k, v in results.items() if k not in failed}
    lat = results.get("latency")
    if lat:
        lines.append(
            f"Latency: {lat['count']} changes per phase, {lat['rate_per_s']:g}/s "
            f"(bursts of {lat['burst']}); ms from write to arrival"
        )
        lines.append(
            f"{'phase':<14}{'observer':<10}{'median':>9}{'p95':>9}{'p99':>9}{'max':>9}{'missed':>8}"
        )
        for phase, row in lat["phases"].items():
            for who, s in row.items():
                lines.append(
                    f"{phase:<14}{who:<10}{_fmt(s['median_ms']):>9}{_fmt(s['p95_ms']):>9}"
                    f"{_fmt(s['p99_ms']):>9}{_fmt(s['max_ms']):>9}{s['missed']:>8}"
                )
        cpu = ", ".join(
            f"{k} {v:.2f} s ({lat['cpu_s_per_min'][k]:.2f}/min)" for k, v in lat["cpu_s"].items()
        )
        lines.append(f"CPU over the {lat['window_s']:g} s run: {cpu}")
        lines.append("")
    cu = results.get("catchup")
    if cu:
        lines.append("Catch-up (agent from spawn to the first correct current_cost)")
        lines.append(
            f"{'MB':>7}{'seconds':>9}{'MB/s':>8}{'startup s':>11}{'MB/s excl.':>12}"
            f"{'peak RSS MB':>13}{'CPU s':>7}"
        )
        for r in cu["agent"]:
            lines.append(
                f"{r['mb']:>7.1f}{r['seconds_to_true_cost']:>9.3f}{r['mb_per_s']:>8.1f}"
                f"{r['startup_s']:>11.3f}{r['mb_per_s_after_startup']:>12.1f}"
                f"{r['peak_rss_mb']:>13.1f}{r['cpu_s']:>7.2f}"
            )
        pc = cu.get("poller_on_smallest")
        if pc:
            lines.append(
                f"poller on the {pc['mb']:.0f} MB run dir: {pc['cpu_s_per_poll']:.2f} CPU s "
                f"per poll = {pc['cpu_s_per_min_at_2s']:.1f} CPU s/min at 2 s, "
                f"{pc['cpu_s_per_min_at_10s']:.1f} at 10 s"
            )
        c = cu["cost_cli"]
        lines.append(
            f"adw-agent cost on {c['mb']:.1f} MB: {c['seconds']:.3f} s, {c['mb_per_s']:.1f} MB/s, "
            f"peak RSS {c['peak_rss_mb']:.1f} MB, correct={c['cost_correct']}"
        )
        lines.append("")
    idle_results = results.get("idle")
    if idle_results:
        lines.append("Idle")
        lines.append(
            f"{'agents':>7}{'window s':>10}{'CPU s/min':>11}{'(max)':>8}{'ticks max':>11}"
            f"{'wakeups/s':>11}{'RSS MB':>8}{'(max)':>8}{'PSS MB':>8}"
        )
        for key in ("one", "many"):
            r = idle_results[key]
            lines.append(
                f"{r['agents']:>7}{r['window_s']:>10.1f}{r['cpu_s_per_min_mean']:>11.3f}"
                f"{r['cpu_s_per_min_max']:>8.3f}{r['cpu_s_per_min_ticks_max']:>11.3f}"
                f"{r['wakeups_per_s_mean']:>11.2f}{r['rss_mb_mean']:>8.1f}{r['rss_mb_max']:>8.1f}"
                f"{r['pss_mb_mean']:>8.1f}"
            )
        for name, p in idle_results["one"].get("pollers", {}).items():
            lines.append(
                f"{name:>7}{idle_results['one']['window_s']:>10.1f}"
                f"{p['cpu_ms_per_min_schedstat'] / 1000:>11.3f}{'':>8}{p['cpu_s_per_min']:>11.3f}"
                f"{p['wakeups_per_s']:>11.2f}"
                f"{p['rss_mb']:>8.1f}"
            )
        lines.append("")
    dr = results.get("drain")
    if dr:
        lines.append(
            f"Drain: {dr['events']} events in {dr['drain_s']:.2f} s = {dr['events_per_s']} "
            f"events/s ({dr['events_per_s_from_backend_up']} from backend up; first after "
            f"{dr['first_after_backend_up_s']:.2f} s); in order={dr['in_seq_order']}, "
            f"duplicates={dr['duplicates']}, agent CPU {dr['agent_cpu_s']:.2f} s"
        )
        lines.append("")
    verdicts = results.get("targets", [])
    if verdicts:
        lines.append("Targets")
        for t in verdicts:
            mark = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
            lines.append(f"  {t['target']:<58} {_fmt(t['value']):>9}  {mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="small and short, for CI")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument(
        "--only", help=f"comma-separated scenarios to run (default: all of {','.join(SCENARIOS)})"
    )
    parser.add_argument("--profile", help="sample every agent with py-spy into this directory")
    parser.add_argument("--work", help="scratch directory (default: a temporary one)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a setting of every agent, e.g. watch.debounce_ms=0 (value as JSON)",
    )
    args = parser.parse_args(argv)
    for item in args.set:
        name, _, value = item.partition("=")
        section, _, key = name.partition(".")
        if not (section and key and value):
            parser.error(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        common.OVERRIDES.setdefault(section, {})[key] = parsed
    only = set(args.only.split(",")) if args.only else set(SCENARIOS)
    unknown = only - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if args.profile:
        common.PROFILE_DIR = Path(args.profile).resolve()
    plan = SMOKE if args.smoke else FULL
    started = time.monotonic()
    # Compile and cache the agent's bytecode first, so no scenario pays for it.
    subprocess.run(
        [sys.executable, "-c", "import agent.app, agent.cli, agent.pipeline, agent.report"],
        cwd=ROOT,
        check=True,
    )
    with tempfile.TemporaryDirectory(prefix="adw-bench-", dir=args.work) as scratch:
        results = run_scenarios(plan, only, Path(scratch))
    results["targets"] = targets(results)
    results["overrides"] = common.OVERRIDES
    results["mode"] = "smoke" if args.smoke else "full"
    results["machine"] = common.machine()
    results["total_seconds"] = round(time.monotonic() - started, 1)
    print(table(results))
    print(f"\n{results['mode']} run took {results['total_seconds']:.0f} s", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    failed = [k for k in SCENARIOS if isinstance(results.get(k), dict) and "error" in results[k]]
    return 1 if failed else 0
