"""Scenario: one agent per run directory (per-worktree) against one agent for all (host mode).

For each size (15, then 50 runs) and each mode, side by side in one run: every run directory
gets a state write every 2 s and a transcript line every 0.5 s for the load window, written the
way tac-webbuilder writes them (state rewritten in place, transcript appended). Then nothing
changes for the idle window. Measured from /proc and the receiver:

- total RSS and PSS of the agent processes at the end of the load;
- total CPU over the load, and over the idle window, in CPU-seconds per minute (schedstat);
- write → arrival latency of every state write and transcript line (median, p99);
- host mode only: a new run directory appearing → its first event arriving.

Run: ``python -m bench.host [--sizes 15,50] [--load 60] [--idle 30] [--modes worktree,host]
[--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    Agent,
    base_state,
    events,
    first_at_least,
    init_line,
    live_lines,
    machine,
    summary_ms,
    write_state,
)
from bench.procstat import Sample
from bench.receiver import ReceiverProcess
from tests.harness import ROOT, AgentProcess

STATE_EVERY = 2.0
LINE_EVERY = 0.5


def _run_ids(count: int) -> list[str]:
    # Both of tac-webbuilder's formats.
    return [f"b{i:07x}" if i % 3 else f"adw-b{i:07x}" for i in range(count)]


def _prepare(root: Path, ids: Sequence[str]) -> None:
    for adw_id in ids:
        run_dir = root / adw_id
        (run_dir / "sdlc_implementor").mkdir(parents=True)
        write_state(run_dir / "adw_state.json", {**base_state(), "adw_id": adw_id, "bench_n": 0})
        (run_dir / "sdlc_implementor" / "raw_output.jsonl").write_bytes(init_line())


class _Load:
    """Writes every run's state and transcript on schedule, recording when each write was made.

    One thread for all runs, writing in the order the schedule asks for: what a host full of
    ADWs does, at the rates of the brief."""

    def __init__(self, root: Path, ids: Sequence[str], duration: float) -> None:
        self.root = root
        self.ids = list(ids)
        self.duration = duration
        self.state_writes: dict[str, list[tuple[float, float]]] = {i: [] for i in ids}
        self.line_writes: dict[str, list[tuple[float, float]]] = {i: [] for i in ids}
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        lines = {i: live_lines(int(self.duration / LINE_EVERY) + 1, i) for i in self.ids}
        tokens = dict.fromkeys(self.ids, 0)
        n = len(self.ids)
        start = time.monotonic()
        # Spread the runs over each period, as independent runs would be.
        plan: list[tuple[float, str, str]] = []
        for k, adw_id in enumerate(self.ids):
            offset = k / n
            t = offset * STATE_EVERY
            while t < self.duration:
                plan.append((t, "state", adw_id))
                t += STATE_EVERY
            t = offset * LINE_EVERY
            while t < self.duration:
                plan.append((t, "line", adw_id))
                t += LINE_EVERY
        plan.sort()
        counts = dict.fromkeys(self.ids, 0)
        for at, kind, adw_id in plan:
            delay = start + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            run_dir = self.root / adw_id
            if kind == "state":
                counts[adw_id] += 1
                state = {**base_state(), "adw_id": adw_id, "bench_n": counts[adw_id]}
                written = time.time()
                write_state(run_dir / "adw_state.json", state)
                self.state_writes[adw_id].append((written, float(counts[adw_id])))
            else:
                line, count = next(lines[adw_id])
                tokens[adw_id] += count
                written = time.time()
                with (run_dir / "sdlc_implementor" / "raw_output.jsonl").open("ab") as f:
                    f.write(line)
                self.line_writes[adw_id].append((written, float(tokens[adw_id])))


def _cpu_s(samples: Sequence[Sample]) -> float:
    return sum(s.cpu_ns for s in samples) / 1e9


def _latencies(receiver: ReceiverProcess, load: _Load) -> dict[str, Any]:
    receiver.fetch()
    state_lat: list[float] = []
    line_lat: list[float] = []
    expected_states = expected_lines = 0
    for adw_id in load.ids:
        updates = [
            (r.at, float(r.body["data"].get("bench_n") or 0))
            for r in events(receiver.records, "workflow_update", adw_id)
        ]
        state_lat += first_at_least(updates, load.state_writes[adw_id])
        expected_states += len(load.state_writes[adw_id])
        # The transcripts start with an init line only: every token counted is the load's.
        arrivals = [
            (r.at, _tokens(r.body)) for r in events(receiver.records, "cost_update", adw_id)
        ]
        line_lat += first_at_least(arrivals, load.line_writes[adw_id])
        expected_lines += len(load.line_writes[adw_id])
    return {
        "state": summary_ms(state_lat, expected_states),
        "transcript": summary_ms(line_lat, expected_lines),
        "all": summary_ms(state_lat + line_lat, expected_states + expected_lines),
    }


def _tokens(body: dict[str, Any]) -> float:
    t = body["data"]["tokens"]
    return float(t["input"] + t["output"] + t["cache_creation"] + t["cache_read"])


def _start(work: Path, root: Path, ids: Sequence[str], url: str, host: bool) -> list[Agent]:
    if host:
        agent = Agent(work, root / ids[0], url, name="host")
        text = agent.config.read_text().replace(
            f"dir = {json.dumps(str(root / ids[0]))}", f"root = {json.dumps(str(root))}", 1
        )
        agent.config.write_text(text)
        agent.proc = AgentProcess(agent.config, agent.log)
        agent.adw_id = "host"
        return [agent.start()]
    return [Agent(work, root / i, url, name=f"agent-{i}").start() for i in ids]


def run_one(work: Path, count: int, host: bool, load_s: float, idle_s: float) -> dict[str, Any]:
    mode = "host" if host else "worktree"
    root = work / f"{mode}{count}" / "agents"
    ids = _run_ids(count)
    _prepare(root, ids)
    receiver = ReceiverProcess(ROOT)
    agents: list[Agent] = []
    try:
        agents = _start(work / f"{mode}{count}", root, ids, receiver.url, host)
        ready = receiver.wait(
            lambda rs: all(events(rs, "workflow_update", i) for i in ids), 300, 0.2
        )
        if not ready:
            raise RuntimeError(f"agents did not start; see {work}")
        time.sleep(2.0)  # start-up work (first deliveries, imports) is not the load
        load = _Load(root, ids, load_s)
        before = [a.sample() for a in agents]
        t0 = time.monotonic()
        load.start()
        load.join()
        time.sleep(1.0)  # the last writes arrive
        loaded = [a.sample() for a in agents]
        load_window = time.monotonic() - t0
        idle_t0 = time.monotonic()
        time.sleep(idle_s)
        idle_window = time.monotonic() - idle_t0
        idle = [a.sample() for a in agents]
        result: dict[str, Any] = {
            "mode": mode,
            "runs": count,
            "processes": len(agents),
            "rss_mb_total": round(sum(s.rss_mb for s in loaded), 1),
            "pss_mb_total": round(sum(s.pss_mb for s in loaded), 1),
            "threads_total": sum(s.threads for s in loaded),
            "cpu_s_per_min_load": round((_cpu_s(loaded) - _cpu_s(before)) * 60 / load_window, 3),
            "cpu_s_per_min_idle": round((_cpu_s(idle) - _cpu_s(loaded)) * 60 / idle_window, 4),
            "latency": _latencies(receiver, load),
        }
        if host:
            result["new_dir_first_event"] = _new_dir(root, receiver)
        return result
    finally:
        for agent in agents:
            agent.stop()
        receiver.stop()


def _new_dir(root: Path, receiver: ReceiverProcess, tries: int = 10) -> dict[str, Any]:
    """A run directory appears (with its state file, as tac-webbuilder creates it): the time
    from the directory's creation to its first event at the receiver."""
    delays: list[float] = []
    for k in range(tries):
        adw_id = f"c{k:07x}"
        created = time.time()
        (root / adw_id).mkdir()
        write_state(root / adw_id / "adw_state.json", {**base_state(), "adw_id": adw_id})
        if receiver.wait(lambda rs, a=adw_id: events(rs, "workflow_update", a), 30, 0.01):
            delays.append(events(receiver.records, "workflow_update", adw_id)[0].at - created)
    return summary_ms(delays, tries)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__)
    p.add_argument("--sizes", default="15,50")
    p.add_argument("--load", type=float, default=60.0, help="seconds of load")
    p.add_argument("--idle", type=float, default=30.0, help="seconds of idle after the load")
    p.add_argument("--modes", default="worktree,host", help="which of worktree,host to run")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[str, Any] = {"machine": machine(), "load_s": args.load, "idle_s": args.idle}
    with tempfile.TemporaryDirectory(prefix="adw-bench-host-") as tmp:
        for count in sizes:
            for host in [mode == "host" for mode in args.modes.split(",")]:
                name = f"{'host' if host else 'worktree'}_{count}"
                print(f"running {name} ...", file=sys.stderr, flush=True)
                results[name] = run_one(Path(tmp), count, host, args.load, args.idle)
                print(_row(results[name]), file=sys.stderr, flush=True)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    print("\n" + "\n".join(_row(v) for k, v in results.items() if k.startswith(("host", "work"))))
    return 0


def _row(r: dict[str, Any]) -> str:
    lat = r["latency"]["all"]
    first = r.get("new_dir_first_event", {})
    new = f"  new dir p99 {first['p99_ms']} ms" if first else ""
    return (
        f"{r['mode']:<8} {r['runs']:>3} runs  {r['processes']:>3} proc  "
        f"RSS {r['rss_mb_total']:>7} MB  PSS {r['pss_mb_total']:>7} MB  "
        f"CPU load {r['cpu_s_per_min_load']:>7} s/min  idle {r['cpu_s_per_min_idle']:>7} s/min  "
        f"latency median {lat['median_ms']} p99 {lat['p99_ms']} ms (missed {lat['missed']}){new}"
    )


if __name__ == "__main__":
    sys.exit(main())
