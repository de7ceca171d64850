"""Scenario 4: what agents cost when nothing changes.

N agents watch N realistic run directories (state, phases and five real transcripts each) on one
host, all delivering to one receiver. Once every agent has delivered its startup events and
settled, CPU time (utime + stime, and the threads' schedstat for sub-tick resolution), RSS and
voluntary context switches (wakeups) are read from /proc before and after a window of W seconds.
For the single-agent case two pollers watch the same directory over the same window, for
comparison.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import Agent, Child, events, populate_run_dir, start_poller
from bench.procstat import Sample
from bench.receiver import ReceiverProcess
from tests.harness import ROOT


def _delta(before: Sample, after: Sample, window: float) -> dict[str, Any]:
    cpu = after.cpu_s - before.cpu_s
    return {
        "cpu_s": round(cpu, 3),
        "cpu_s_per_min": round(cpu * 60 / window, 4),
        "cpu_ms_per_min_schedstat": round((after.cpu_ns - before.cpu_ns) / 1e6 * 60 / window, 1),
        "wakeups_per_s": round((after.voluntary_switches - before.voluntary_switches) / window, 2),
        "rss_mb": round(after.rss_mb, 1),
        "pss_mb": round(after.pss_mb, 1),
        "peak_rss_mb": round(after.hwm_mb, 1),
        "threads": after.threads,
    }


def run(
    work: Path, agents: int, window: float, pollers: list[float] | None = None
) -> dict[str, Any]:
    receiver = ReceiverProcess(ROOT)
    started: list[Agent] = []
    children: dict[str, Child] = {}
    try:
        for i in range(agents):
            run_dir = work / f"idle{agents}" / "agents" / f"1d1e{i:04d}"
            populate_run_dir(run_dir)
            started.append(
                Agent(work / f"idle{agents}", run_dir, receiver.url, name=f"agent{i}").start()
            )
        for agent in started:
            adw = agent.adw_id
            if not receiver.wait(lambda rs, adw=adw: events(rs, "cost_update", adw), 120, 0.1):
                raise RuntimeError(f"agent did not start; see {agent.log}")
        if pollers:
            run_dir = started[0].run_dir
            for interval in pollers:
                name = f"poll{interval:g}s"
                children[name] = start_poller(run_dir, interval, receiver.url, name)
            receiver.wait(
                lambda rs: all(any(r.path == f"/poll/{n}/ready" for r in rs) for n in children),
                30,
            )
        time.sleep(2.0)  # let start-up work (first deliveries, imports) finish
        before = [a.sample() for a in started]
        before_children = {n: c.sample() for n, c in children.items()}
        t0 = time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - t0
        after = [a.sample() for a in started]
        after_children = {n: c.sample() for n, c in children.items()}
    finally:
        for child in children.values():
            child.stop()
        for agent in started:
            agent.stop()
        receiver.stop()
    per_agent = [_delta(b, a, elapsed) for b, a in zip(before, after, strict=True)]
    result: dict[str, Any] = {
        "agents": agents,
        "window_s": round(elapsed, 1),
        # schedstat (ns) rather than the 10 ms ticks of /proc/<pid>/stat: idle costs are tiny.
        "cpu_s_per_min_mean": round(
            sum(p["cpu_ms_per_min_schedstat"] for p in per_agent) / agents / 1000, 4
        ),
        "cpu_s_per_min_max": round(max(p["cpu_ms_per_min_schedstat"] for p in per_agent) / 1000, 4),
        "cpu_s_per_min_ticks_max": max(p["cpu_s_per_min"] for p in per_agent),
        "wakeups_per_s_mean": round(sum(p["wakeups_per_s"] for p in per_agent) / agents, 2),
        "rss_mb_mean": round(sum(p["rss_mb"] for p in per_agent) / agents, 1),
        "rss_mb_max": max(p["rss_mb"] for p in per_agent),
        "pss_mb_mean": round(sum(p["pss_mb"] for p in per_agent) / agents, 1),
        "threads": per_agent[0]["threads"],
        "per_agent": per_agent,
    }
    if children:
        result["pollers"] = {
            n: _delta(before_children[n], after_children[n], elapsed) for n in children
        }
    return result
