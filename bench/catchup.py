"""Scenario 3: catching up on a run directory that already holds a lot of transcript data.

Synthetic transcripts are generated from real fixtures (``bench.common.synth_transcript``): the
real body repeated with unique message ids and one result line per attempt, so the true cost is
the sum of the result lines. The agent starts on the directory with an empty store; the clock
runs from the moment it is spawned to the arrival of the first ``cost_update`` whose
``current_cost`` equals the true cost. MB/s is the transcript bytes over that time; the same
time less the agent's startup on an empty directory (measured first) is reported too. Peak RSS is
the agent's VmHWM.

``adw-agent cost`` is run the same way on one large transcript: wall time, MB/s, and its peak
RSS from wait4().
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import poller
from bench.common import Agent, events, synth_transcript
from bench.receiver import ReceiverProcess
from tests.harness import ROOT

MB = 1024 * 1024
AGENTS = 10


def make_run_dir(run_dir: Path, total_bytes: int) -> tuple[float, int]:
    """Fill ``run_dir`` with AGENTS transcripts totalling about ``total_bytes``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "adw_state.json").open("w") as f:
        json.dump({"adw_id": run_dir.name, "issue_number": "7", "status": "running"}, f)
    costs = []
    for i in range(AGENTS):
        path = run_dir / f"agent_{i:02d}" / "raw_output.jsonl"
        costs.append(synth_transcript(path, total_bytes // AGENTS, base_index=i))
    size = sum(p.stat().st_size for p in run_dir.glob("*/raw_output.jsonl"))
    return math.fsum(costs), size


def _startup_s(work: Path, receiver: ReceiverProcess) -> float:
    """Seconds from spawn to the first event on an empty run directory."""
    run_dir = work / "agents" / "e0e0e0e0"
    run_dir.mkdir(parents=True)
    agent = Agent(work, run_dir, receiver.url, name="startup").start()
    try:
        if not receiver.wait(lambda rs: events(rs, "agent_status", agent.adw_id), 60, 0.01):
            raise RuntimeError(f"the agent did not start; see {agent.log}")
        return events(receiver.records, "agent_status", agent.adw_id)[0].at - agent.started_at
    finally:
        agent.stop()


def agent_catchup(work: Path, total_bytes: int, startup: float) -> dict[str, Any]:
    run_dir = work / "agents" / f"c{total_bytes // MB:07d}"
    true_cost, size = make_run_dir(run_dir, total_bytes)
    receiver = ReceiverProcess(ROOT)
    try:
        agent = Agent(work, run_dir, receiver.url, name=f"catchup{total_bytes // MB}").start()
        try:
            adw = agent.adw_id

            def correct(records: list[Any]) -> bool:
                return any(
                    abs(r.body["data"]["current_cost"] - true_cost) < 1e-6
                    for r in events(records, "cost_update", adw)
                )

            if not receiver.wait(correct, 300, 0.01):
                raise RuntimeError(f"the true cost never arrived; see {agent.log}")
            peak = agent.sample()
        finally:
            agent.stop()
        first = next(
            r
            for r in events(receiver.records, "cost_update", adw)
            if abs(r.body["data"]["current_cost"] - true_cost) < 1e-6
        )
        updates = len(events(receiver.records, "cost_update", adw))
    finally:
        receiver.stop()
    elapsed = first.at - agent.started_at
    return {
        "mb": round(size / MB, 1),
        "true_cost_usd": round(true_cost, 6),
        "seconds_to_true_cost": round(elapsed, 3),
        "mb_per_s": round(size / MB / elapsed, 1),
        "startup_s": round(startup, 3),
        "mb_per_s_after_startup": round(size / MB / max(elapsed - startup, 1e-6), 1),
        "cost_updates": updates,
        "peak_rss_mb": round(peak.hwm_mb, 1),
        "cpu_s": round(peak.cpu_s, 2),
    }


def cost_cli(work: Path, size: int) -> dict[str, Any]:
    path = work / "cli" / "one" / "raw_output.jsonl"
    true_cost = synth_transcript(path, size, base_index=0)
    actual = path.stat().st_size
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "cost", "--json", str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"adw-agent cost failed: {err.decode()[-2000:]}")
    report = json.loads(out)
    reported = _total_cost(report)
    return {
        "mb": round(actual / MB, 1),
        "seconds": round(elapsed, 3),
        "mb_per_s": round(actual / MB / elapsed, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "cost_correct": reported is not None and abs(reported - true_cost) < 1e-6,
    }


def _total_cost(report: Any) -> float | None:
    """``current_cost`` of ``adw-agent cost --json`` output."""
    value = report.get("current_cost") if isinstance(report, dict) else None
    return float(value) if isinstance(value, int | float) else None


class _NoPost(poller.Poster):
    """A poster that posts nothing: only the poller's reading and parsing are timed."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9", "none")

    def post(self, kind: str, data: Any) -> None:
        pass


def poller_cost(run_dir: Path) -> dict[str, Any]:
    """CPU seconds one poll of ``run_dir`` costs the poller (in this process, a steady poll)."""
    previous: dict[str, Any] = {}
    poster = _NoPost()
    poller.poll_once(run_dir, previous, poster)
    started = time.process_time()
    poller.poll_once(run_dir, previous, poster)
    per_poll = time.process_time() - started
    size = sum(p.stat().st_size for p in run_dir.glob("*/raw_output.jsonl"))
    return {
        "mb": round(size / MB, 1),
        "cpu_s_per_poll": round(per_poll, 3),
        "cpu_s_per_min_at_2s": round(min(60.0, per_poll * 30), 2),
        "cpu_s_per_min_at_10s": round(min(60.0, per_poll * 6), 2),
    }


def run(work: Path, sizes_mb: list[int], cli_mb: int) -> dict[str, Any]:
    receiver = ReceiverProcess(ROOT)
    try:
        startup = _startup_s(work, receiver)
    finally:
        receiver.stop()
    agents = [agent_catchup(work, mb * MB, startup) for mb in sizes_mb]
    smallest = work / "agents" / f"c{sizes_mb[0]:07d}"
    return {
        "agent": agents,
        "poller_on_smallest": poller_cost(smallest),
        "cost_cli": cost_cli(work, cli_mb * MB),
    }
