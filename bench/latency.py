"""Scenario 1 and 2: change-to-delivery latency of the agent, with pollers side by side.

One run directory, one agent, and two pollers (``bench.poller``) at two intervals all watch the
same writes. Four phases run one after another:

* ``state_steady``: ``adw_state.json`` rewritten in place at a steady rate;
* ``state_burst``: the same, in bursts of back-to-back writes;
* ``line_steady``: assistant lines appended to a transcript held open (as the Claude CLI's
  redirected stdout is), at a steady rate;
* ``line_burst``: the same, in bursts.

Latency is ``time.time()`` just before the write to ``time.time()`` when the receiver has read the
request that carries the change (or a later one: a coalesced snapshot also delivers it). State
writes carry a counter (``bench_n``) and lines a known number of tokens, so every write can be
matched to the first event that reflects it. CPU seconds of the agent and of each poller are read
from /proc over the whole run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import (
    Agent,
    base_state,
    event_tokens,
    events,
    first_at_least,
    init_line,
    live_lines,
    populate_run_dir,
    sleep_until,
    start_poller,
    summary_ms,
    write_state,
)
from bench.receiver import ReceiverProcess, Record
from tests.harness import ROOT


def _schedule(count: int, rate: float, burst: int) -> list[float]:
    """Offsets (s) of each write: steady at ``rate``, or ``burst`` back-to-back at that mean."""
    if burst <= 1:
        return [i / rate for i in range(count)]
    return [(i // burst) * burst / rate for i in range(count)]


def _state_phase(
    run_dir: Path, state: dict[str, Any], first_n: int, offsets: list[float]
) -> list[tuple[float, float]]:
    path = run_dir / "adw_state.json"
    writes = []
    start = time.monotonic() + 0.05
    for i, offset in enumerate(offsets):
        sleep_until(start + offset)
        n = first_n + i
        state["bench_n"] = n
        written_at = time.time()
        write_state(path, state)
        writes.append((written_at, float(n)))
    return writes


def _line_phase(run_dir: Path, agent_name: str, offsets: list[float]) -> list[tuple[float, float]]:
    (run_dir / agent_name).mkdir(exist_ok=True)
    writes = []
    total = 0
    # The orchestrator opens the transcript with "w" and the CLI writes each line to it.
    with (run_dir / agent_name / "raw_output.jsonl").open("wb", buffering=0) as f:
        f.write(init_line())
        time.sleep(0.2)
        start = time.monotonic() + 0.05
        for offset, (line, tokens) in zip(
            offsets, live_lines(len(offsets), agent_name), strict=True
        ):
            sleep_until(start + offset)
            total += tokens
            written_at = time.time()
            f.write(line)
            writes.append((written_at, float(total)))
    return writes


def _agent_state_arrivals(records: list[Record], adw_id: str) -> list[tuple[float, float]]:
    return [
        (r.at, float(r.body["data"].get("bench_n", -1)))
        for r in events(records, "workflow_update", adw_id)
    ]


def _agent_token_arrivals(
    records: list[Record], adw_id: str, baseline: int
) -> list[tuple[float, float]]:
    return [
        (r.at, float(event_tokens(r.body) - baseline))
        for r in events(records, "cost_update", adw_id)
    ]


def _poller_arrivals(records: list[Record], name: str, file: str) -> list[tuple[float, float]]:
    out = []
    for r in records:
        if not r.path.startswith(f"/poll/{name}/") or not isinstance(r.body, dict):
            continue
        data = r.body.get("data") or {}
        if data.get("file") != file:
            continue
        value = data.get("value") or {}
        if file == "state":
            out.append((r.at, float(value.get("bench_n", -1))))
        else:
            out.append((r.at, float(value.get("tokens", 0))))
    return out


def _tokens_now(receiver: ReceiverProcess, adw_id: str) -> int:
    costs = events(receiver.records, "cost_update", adw_id)
    return event_tokens(costs[-1].body) if costs else 0


def run(
    work: Path, count: int, rate: float, burst: int, intervals: list[float], **sections: Any
) -> dict[str, Any]:
    run_dir = work / "agents" / "a1b2c3d4"
    populate_run_dir(run_dir)
    receiver = ReceiverProcess(ROOT)
    agent = Agent(work, run_dir, receiver.url, **sections).start()
    pollers = {}
    try:
        adw = agent.adw_id
        if not receiver.wait(lambda rs: events(rs, "cost_update", adw), 30):
            raise RuntimeError(f"the agent sent nothing; see {agent.log}")
        for interval in intervals:
            name = f"poll{interval:g}s"
            pollers[name] = start_poller(run_dir, interval, receiver.url, name)
        if not receiver.wait(
            lambda rs: all(any(r.path == f"/poll/{n}/ready" for r in rs) for n in pollers), 30
        ):
            raise RuntimeError("a poller did not start")
        time.sleep(0.5)
        before = {"agent": agent.sample(), **{n: p.sample() for n, p in pollers.items()}}
        started = time.monotonic()

        state = base_state()
        phases: dict[str, dict[str, Any]] = {}
        n = 1
        for phase, b in (("state_steady", 1), ("state_burst", burst)):
            writes = _state_phase(run_dir, state, n, _schedule(count, rate, b))
            n += count
            last = n - 1
            if not receiver.wait(
                lambda rs, last=last: any(v >= last for _, v in _agent_state_arrivals(rs, adw)),
                30,
            ):
                raise RuntimeError(f"{phase}: the last write never arrived; see {agent.log}")
            phases[phase] = {"writes": writes, "kind": "state"}
        for phase, b in (("line_steady", 1), ("line_burst", burst)):
            baseline = _tokens_now(receiver, adw)
            name = f"bench_{phase}"
            writes = _line_phase(run_dir, name, _schedule(count, rate, b))
            goal = writes[-1][1]
            if not receiver.wait(
                lambda rs, baseline=baseline, goal=goal: any(
                    v >= goal for _, v in _agent_token_arrivals(rs, adw, baseline)
                ),
                30,
            ):
                raise RuntimeError(f"{phase}: the last line never arrived; see {agent.log}")
            phases[phase] = {"writes": writes, "kind": "line", "baseline": baseline, "file": name}

        # Give the slowest poller time to see the last changes.
        time.sleep(max(intervals) + 1.0)
        elapsed = time.monotonic() - started
        after = {"agent": agent.sample(), **{n: p.sample() for n, p in pollers.items()}}
        receiver.fetch()
    finally:
        for p in pollers.values():
            p.stop()
        agent.stop()
        receiver.stop()

    records = receiver.records
    results: dict[str, Any] = {"count": count, "rate_per_s": rate, "burst": burst, "phases": {}}
    for phase, info in phases.items():
        writes = info["writes"]
        row: dict[str, Any] = {}
        if info["kind"] == "state":
            row["agent"] = summary_ms(
                first_at_least(_agent_state_arrivals(records, adw), writes), len(writes)
            )
            for name in pollers:
                row[name] = summary_ms(
                    first_at_least(_poller_arrivals(records, name, "state"), writes), len(writes)
                )
        else:
            row["agent"] = summary_ms(
                first_at_least(_agent_token_arrivals(records, adw, info["baseline"]), writes),
                len(writes),
            )
            for name in pollers:
                arrivals = _poller_arrivals(records, name, f"transcript:{info['file']}")
                row[name] = summary_ms(first_at_least(arrivals, writes), len(writes))
        results["phases"][phase] = row
    results["window_s"] = round(elapsed, 1)
    results["cpu_s"] = {k: round(after[k].cpu_s - before[k].cpu_s, 2) for k in before}
    results["cpu_s_per_min"] = {
        k: round((after[k].cpu_s - before[k].cpu_s) * 60 / elapsed, 3) for k in before
    }
    results["agent_events"] = len([r for r in records if "/event/" in r.path])
    return results
