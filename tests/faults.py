"""Fault-injection helpers: a realistic ADW run with a known true cost, a guarantee checker,
an RSS probe and a soak runner.

The guarantee every fault scenario ends by asserting (:func:`check_guarantee`):

* every state change, phase change, failure and cost increase the agent observed reaches the
  backend at least once, and the accepted events' ``seq`` strictly increases in first-accepted
  order (out-of-band statuses, ``seq`` 0, are outside the sequence);
* a re-sent event carries the same ``event_id`` (and the same bytes), so a backend that
  deduplicates by ``event_id`` sees each event exactly once;
* the final ``current_cost`` equals the true cost: the sum of each attempt's ``result``
  ``total_cost_usd``, computed here from the fixture files, not by the agent's code;
* snapshots may be coalesced, failures never are.

Soak run (not part of CI)::

    python -m tests.faults soak --minutes 30 [--seed N] [--kill-every 0.5:4]

It repeats the chaos scenario (random ``kill -9`` of the agent, a flapping backend, outages)
over fresh runs for the given time and prints one line per round and a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import signal
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    FIXTURES,
    AdwWriter,
    AgentProcess,
    Backend,
    Reply,
    fixture_lines,
    write_config,
)

DB_NAME = "agent.sqlite3"

# -- fixtures and the true cost ----------------------------------------------------------------


def attempt_cost(lines: list[bytes]) -> float:
    """The true cost of one attempt, read straight from the fixture: its last ``result`` line's
    ``total_cost_usd``. Attempts used here must make this exact: nothing with ``usage`` may
    follow the last result, and an attempt without a result must carry no usage at all."""
    cost = 0.0
    usage_after_result = False
    for raw in lines:
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if line.get("type") == "result":
            value = line["total_cost_usd"]
            assert isinstance(value, int | float), value
            assert value >= 0, value
            cost = float(value)
            usage_after_result = False
        elif line.get("type") == "assistant" and "usage" in line.get("message", {}):
            usage_after_result = True
    assert not usage_after_result, "fixture has priced lines after its result (cost not exact)"
    return cost


def with_session(lines: list[bytes], session: str) -> list[bytes]:
    """The same transcript under a new session id, as a retry of the CLI would write it (the
    agent tells attempts apart by their first line)."""
    old = None
    for raw in lines:
        with contextlib.suppress(ValueError):
            old = json.loads(raw).get("session_id")
            if old:
                break
    if not old:
        return list(lines)
    return [raw.replace(old.encode(), session.encode()) for raw in lines]


# -- the run simulator -------------------------------------------------------------------------


@dataclass
class AgentPlan:
    """One Claude Code agent of the run: a subdirectory and its attempts (fixture names)."""

    name: str
    phase: str
    attempts: list[str]
    fail_between: bool = False  # the workflow fails (error.log, status) before the retry


#: A tac-webbuilder-like run: every transcript is a real fixture, retries truncate the file.
STANDARD_RUN = [
    AgentPlan("issue_classifier", "plan", ["tac7iso_raw_output_55b761f6_issue_classifier.jsonl"]),
    AgentPlan(
        "branch_generator",
        "plan",
        ["tac6_raw_output_b5b9b7d5_branch_generator_no_result_line.jsonl"],
    ),
    AgentPlan("sdlc_planner", "plan", ["tac7iso_raw_output_55b761f6_sdlc_planner_cli2022.jsonl"]),
    AgentPlan(
        "sdlc_implementor",
        "build",
        [
            "pricehawk_v2.0.55_zero_turn_zero_cost.jsonl",
            "pricehawk_v2.0.57_builder_sonnet45_13turns.jsonl",
        ],
    ),
    AgentPlan(
        "tester",
        "test",
        ["gleam_v2.1.7_basic_query_golden.jsonl", "gleam_v2.1.7_basic_query_golden.jsonl"],
        fail_between=True,
    ),
    AgentPlan("reviewer", "review", ["pricehawk_v2.0.55_planner_sonnet45_3models.jsonl"]),
    AgentPlan(
        "documenter",
        "document",
        [
            "tac6_raw_output_af87dd64_pr_creator_cli2144.jsonl",
            "tac6_raw_output_af87dd64_pr_creator_cli2144.jsonl",
        ],
        fail_between=True,
    ),
]

#: The soak run adds the large Opus builder transcript (355 KB, 75 lines) to the build phase.
SOAK_RUN = [*STANDARD_RUN[:4]]
SOAK_RUN += [
    AgentPlan(
        "opus_builder",
        "build",
        [
            "tac7iso_raw_output_09dba0c0_issue_classifier_zero_cost_empty_result.jsonl",
            "pricehawk_v2.0.55_builder_opus45_32turns.jsonl",
        ],
    ),
    *STANDARD_RUN[4:],
]


@dataclass
class Expected:
    """What the backend must end up knowing, computed from what the simulator wrote."""

    adw_id: str
    first_state: dict[str, Any] = field(default_factory=dict)
    final_state: dict[str, Any] = field(default_factory=dict)
    completed_phases: list[str] = field(default_factory=list)
    current_phase: str | None = None
    failures: int = 0
    cost: float = 0.0
    attempts: int = 0


Hook = Callable[[str, Path], None]


class RunSimulator:
    """Builds the steps of one realistic ADW run, then plays them into a run directory.

    ``before_truncate(agent, path)`` runs before a transcript is truncated for a retry; the
    chaos test uses it to wait until the agent has read the attempt that is about to be
    destroyed (an agent that never saw a line cannot be expected to count it).
    """

    def __init__(
        self,
        writer: AdwWriter,
        rng: random.Random,
        adw_id: str,
        plan: list[AgentPlan] | None = None,
        before_truncate: Hook | None = None,
        churn: int = 0,
        after_phases: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.writer = writer
        self.rng = rng
        self.plan = plan if plan is not None else STANDARD_RUN
        self.before_truncate = before_truncate
        # Extra rewrites of completed_phases.json with a moving "current" (sub-steps of a
        # phase): each one is a phase change, which is never coalesced.
        self.churn = churn
        self.after_phases = after_phases
        self.expected = Expected(adw_id)
        self._state: dict[str, Any] = {}
        self._completed: list[str] = []
        self._steps: list[Callable[[], None]] = []
        self._build()

    def __len__(self) -> int:
        return len(self._steps)

    # building

    def _step(self, fn: Callable[[], None]) -> None:
        self._steps.append(fn)

    def _set_state(self, **changes: Any) -> None:
        self._state = {**self._state, **changes}
        snapshot = dict(self._state)
        halves = self.rng.random() < 0.3
        self._step(lambda: self.writer.state(snapshot, halves=halves, pause=0.02))

    def _set_phases(self, current: str | None) -> None:
        completed = list(self._completed)
        self.expected.completed_phases = completed
        self.expected.current_phase = current
        data = {"completed": completed, "current": current, "last_updated": "2026-01-01T00:00:00"}
        halves = self.rng.random() < 0.3

        def write() -> None:
            self.writer.write_json("completed_phases.json", data, halves, 0.02)
            if self.after_phases is not None:
                self.after_phases({"completed": completed, "current": current})

        self._step(write)

    def _transcript(self, agent: str, fixture: str, retry: bool) -> None:
        lines = with_session(fixture_lines(fixture), str(uuid.UUID(int=self.rng.getrandbits(128))))
        self.expected.cost += attempt_cost(lines)
        self.expected.attempts += 1
        path = self.writer.transcript(agent)

        def start() -> None:
            if retry and self.before_truncate is not None:
                self.before_truncate(agent, path)
            self.writer.start_attempt(agent)

        self._step(start)
        i = 0
        while i < len(lines):
            batch = lines[i : i + self.rng.randint(1, 4)]
            i += len(batch)
            if self.rng.random() < 0.2 and len(batch[-1]) > 8:
                # The CLI's pipe delivers a line in two writes: the reader sees half a line.
                cut = self.rng.randint(1, len(batch[-1]) - 1)
                head, tail = b"".join(batch)[: -len(batch[-1]) + cut], batch[-1][cut:]
                self._step(lambda a=agent, h=head: self.writer.append(a, h))
                self._step(lambda a=agent, t=tail: self.writer.append(a, t))
            else:
                self._step(lambda a=agent, b=batch: self.writer.append(a, *b))

    def _fail(self, reason: str) -> None:
        self.expected.failures += 1
        text = (
            f"ERROR {reason}\nTraceback (most recent call last):\n  ...\nRuntimeError: {reason}\n"
        )
        # error.log first, then the status: one failure per episode whatever the agent sees.
        self._step(lambda: self.writer.error_log(text))
        self._set_state(status="failed")

    def _build(self) -> None:
        adw_id = self.expected.adw_id
        initial = json.loads(
            (FIXTURES / "real" / "tac6_adw_state_e9906e09_initial_nulls.json").read_text()
        )
        later = json.loads(
            (
                FIXTURES / "real" / "tac7iso_adw_state_55b761f6_after_plan_EXTRACTED_from_"
                "execution_log.json"
            ).read_text()
        )
        self._set_state(**{**initial, "adw_id": adw_id})
        self.expected.first_state = dict(self._state)
        self._set_state(status="running", start_time="2026-01-01T00:00:00Z", current_phase="plan")
        self._set_phases("plan")
        phase = "plan"
        for agent in self.plan:
            if agent.phase != phase:
                self._completed.append(phase)
                phase = agent.phase
                self._set_state(current_phase=phase)
                self._set_phases(phase)
                if phase == "review":
                    for i in range(self.churn):
                        self._set_phases(f"review step {i + 1}")
                    self._set_phases(phase)
            for n, fixture in enumerate(agent.attempts):
                if n and agent.fail_between:
                    self._fail(f"{agent.name} attempt {n} failed")
                    self._set_state(status="running")
                self._transcript(agent.name, fixture, retry=n > 0)
            if agent.name == "issue_classifier":
                self._set_state(issue_class=later["issue_class"])
            elif agent.name == "branch_generator":
                self._set_state(branch_name=later["branch_name"].replace("55b761f6", adw_id))
            elif agent.name == "sdlc_planner":
                self._set_state(
                    plan_file=later["plan_file"].replace("55b761f6", adw_id),
                    worktree_path=f"/srv/trees/{adw_id}",
                    backend_port=later["backend_port"],
                    frontend_port=later["frontend_port"],
                    model_set=later["model_set"],
                    all_adws=later["all_adws"],
                )
        self._completed.append(phase)
        # As the orchestrator does: the last phase completes before end_time is written (an
        # end_time while a phase is current is how a run fails).
        self._set_phases(None)
        self._set_state(status="completed", current_phase=None, end_time="2026-01-01T01:00:00Z")
        self.expected.final_state = dict(self._state)

    # playing

    def play(self, duration: float = 0.0, stop: threading.Event | None = None) -> Iterator[int]:
        """Run the steps, spread over about ``duration`` seconds; yields after each step."""
        pause = duration / max(1, len(self._steps))
        for i, step in enumerate(self._steps):
            if stop is not None and stop.is_set():
                return
            step()
            yield i
            if pause:
                # Pacing of the workload, not synchronisation: the agent is never waited for.
                time.sleep(pause * self.rng.uniform(0.2, 1.8))

    def run(self, duration: float = 0.0) -> Expected:
        for _ in self.play(duration):
            pass
        return self.expected


# -- the agent's store, read from outside ------------------------------------------------------


@contextlib.contextmanager
def store_db(storage: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the agent's SQLite store."""
    db = sqlite3.connect(f"file:{storage / DB_NAME}?mode=ro", uri=True, timeout=10)
    try:
        yield db
    finally:
        db.close()


def stored_file(storage: Path, key: str) -> Any:
    """What the agent durably recorded for one of its file keys ("phases", "cost", ...)."""
    if not (storage / DB_NAME).exists():
        return None
    with store_db(storage) as db:
        row = db.execute("SELECT value FROM files WHERE key = ?", (key,)).fetchone()
    return None if row is None else json.loads(row[0])


def outbox_rows(storage: Path) -> dict[int, tuple[str, str, bytes]]:
    """seq -> (event_id, type, body) of every queued event."""
    if not (storage / DB_NAME).exists():
        return {}
    with store_db(storage) as db:
        rows = db.execute("SELECT seq, event_id, type, body FROM outbox").fetchall()
    return {int(r[0]): (str(r[1]), str(r[2]), bytes(r[3])) for r in rows}


def store_counts(storage: Path) -> tuple[int, int]:
    """(outbox depth, dead letters)."""
    with store_db(storage) as db:
        depth = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        dead = db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
    return int(depth), int(dead)


def consumed_offset(storage: Path, agent: str) -> int:
    """How far the agent has durably read ``agent``'s transcript (-1: not at all)."""
    if not (storage / DB_NAME).exists():
        return -1
    try:
        with store_db(storage) as db:
            row = db.execute(
                "SELECT value FROM files WHERE key = ?", (f"transcript:{agent}",)
            ).fetchone()
    except sqlite3.Error:
        return -1
    return -1 if row is None else int(json.loads(row[0])["position"]["offset"])


def wait_consumed(storage: Path, agent: str, path: Path, timeout: float = 90.0) -> None:
    """Block until the agent's saved position covers the whole transcript file."""
    size = path.stat().st_size
    deadline = time.monotonic() + timeout
    while consumed_offset(storage, agent) < size:
        if time.monotonic() > deadline:
            raise AssertionError(f"agent never consumed {path} ({size} bytes)")
        time.sleep(0.02)


# -- process probes ----------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def start_agent(agent: AgentProcess, timeout: float = 30.0) -> AgentProcess:
    """Start the agent and wait until it has queued its startup snapshot (signals handled)."""
    offset = agent.log.stat().st_size if agent.log.exists() else 0
    agent.start()

    def started() -> bool:
        if not agent.running():
            raise AssertionError(
                f"agent exited with {agent.proc.returncode if agent.proc else '?'}"
            )
        with agent.log.open("rb") as f:
            f.seek(offset)
            return b'"message":"agent started"' in f.read()

    wait_until(started, "the agent to start", timeout)
    return agent


def drained(storage: Path) -> Callable[[], bool]:
    return lambda: store_counts(storage)[0] == 0


@pytest.fixture(autouse=True)
def reap_agents(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Import into a test module: every agent process its tests start is killed at the end,
    even when the test fails half way."""
    started: list[AgentProcess] = []
    start = AgentProcess.start

    def tracked(self: AgentProcess) -> AgentProcess:
        started.append(self)
        return start(self)

    monkeypatch.setattr(AgentProcess, "start", tracked)
    yield
    for agent in started:
        if agent.running():
            agent.kill9()


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


# -- the guarantee -----------------------------------------------------------------------------


@dataclass
class Verdict:
    """The outcome of :func:`check_guarantee`, with the numbers a report wants."""

    events_checked: int = 0
    outbox_seen: int = 0
    lost: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    requests: int = 0
    deliveries: int = 0
    duplicates: int = 0
    collapsed: int = 0
    seq_gaps: int = 0
    final_cost: float | None = None

    @property
    def ok(self) -> bool:
        return not self.lost and not self.problems

    def summary(self) -> str:
        return (
            f"events checked {self.events_checked} (+{self.outbox_seen} seen queued across "
            f"kills), lost {len(self.lost)}, requests {self.requests}, duplicate deliveries "
            f"{self.duplicates}, collapsed by event_id {self.collapsed}, coalesced seq gaps "
            f"{self.seq_gaps}, final cost {self.final_cost}"
        )

    def assert_ok(self) -> None:
        assert self.ok, "guarantee violated:\n" + "\n".join(
            [f"LOST: {x}" for x in self.lost] + [f"PROBLEM: {x}" for x in self.problems]
        )


def _valid(event: dict[str, Any]) -> str | None:
    from agent.events import Event, check_data  # noqa: PLC0415

    try:
        Event.model_validate(event)
        check_data(event["type"], event["data"])
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    for key in ("current_cost", "cost_delta"):
        value = event["data"].get(key) if event["type"] == "cost_update" else None
        if value is not None and not math.isfinite(value):
            return f"{key} is not finite"
    return None


def last_of(events: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    """The accepted event of ``kind`` with the highest seq."""
    mine = [e for e in events if e["type"] == kind and e["seq"] > 0]
    return max(mine, key=lambda e: e["seq"]) if mine else None


def check_guarantee(
    backend: Backend,
    expected: Expected,
    storage: Path | None = None,
    outbox_seen: dict[int, tuple[str, str, bytes]] | None = None,
) -> Verdict:
    """Check the guarantee on what the backend accepted (call it with the agent stopped)."""
    v = Verdict()
    with backend._cond:
        accepted = [backend.accepted[i] for i in backend.order]
        requests = list(backend.requests)
        deliveries = list(backend.deliveries)
    v.requests = len(requests)
    v.deliveries = len(deliveries)
    v.events_checked = len(accepted)

    # Well-formed, ours, in order.
    for event in accepted:
        problem = _valid(event)
        if problem:
            v.problems.append(f"garbage event seq {event.get('seq')}: {problem}")
        if event.get("adw_id") != expected.adw_id:
            v.problems.append(f"event for another ADW: {event.get('adw_id')!r}")
    seqs = [e["seq"] for e in accepted if e["seq"] > 0]
    for a, b in itertools.pairwise(seqs):
        if b <= a:
            v.problems.append(f"seq {b} accepted after seq {a}")
    if seqs:
        v.seq_gaps = max(seqs) - len(set(seqs))

    # Re-sent events keep their id and their bytes; duplicates collapse by event_id.
    ids_by_seq: dict[int, set[str]] = {}
    for r in requests:
        if r.event.get("seq", 0) > 0:
            ids_by_seq.setdefault(r.event["seq"], set()).add(r.event["event_id"])
    for seq, ids in sorted(ids_by_seq.items()):
        if len(ids) > 1:
            v.problems.append(f"seq {seq} was sent under {len(ids)} event_ids")
    first_body: dict[str, bytes] = {}
    per_id = Counter(event_id for event_id, _, _ in deliveries)
    for event_id, _, body in deliveries:
        if event_id in first_body:
            v.duplicates += 1
            if json.loads(body) == json.loads(first_body[event_id]):
                v.collapsed += 1
            else:
                v.problems.append(f"event {event_id} re-sent with different content")
        else:
            first_body[event_id] = body
    assert sum(per_id.values()) == len(deliveries)

    # Everything that was ever queued (seen in the store between kills) arrived, unchanged.
    by_id = {e["event_id"]: e for e in accepted}
    for seq, (event_id, kind, body) in sorted((outbox_seen or {}).items()):
        v.outbox_seen += 1
        got = by_id.get(event_id)
        if got is None:
            v.lost.append(f"queued event seq {seq} ({kind}, {event_id}) never arrived")
        elif got["seq"] != seq or json.loads(body) != got:
            v.problems.append(f"queued event seq {seq} arrived altered")

    if storage is not None:
        depth, dead = store_counts(storage)
        if depth:
            v.lost.append(f"{depth} events still in the outbox")
        if dead:
            v.lost.append(f"{dead} events dead-lettered")

    # The facts of the run: phases, failures, the final state, the cost.
    completions = Counter(
        e["data"].get("completed_phase") for e in accepted if e["type"] == "phase_update"
    )
    for phase, times in Counter(expected.completed_phases).items():
        if completions[phase] < times:
            v.lost.append(f"completion of phase {phase!r} arrived {completions[phase]} of {times}")
        elif completions[phase] > times:
            v.problems.append(f"completion of phase {phase!r} arrived {completions[phase]} times")
    last_phase = last_of(accepted, "phase_update")
    if expected.completed_phases and (
        last_phase is None
        or last_phase["data"]["completed_phases"] != expected.completed_phases
        or last_phase["data"]["current_phase"] != expected.current_phase
    ):
        v.lost.append(f"last phase_update is not the final phases: {last_phase}")

    failures = sum(1 for e in accepted if e["type"] == "workflow_failed")
    if failures < expected.failures:
        v.lost.append(f"{expected.failures - failures} workflow_failed never arrived")
    elif failures > expected.failures:
        v.problems.append(f"{failures} workflow_failed for {expected.failures} failures")

    last_state = last_of(accepted, "workflow_update")
    if expected.final_state:
        got_state = {k: x for k, x in (last_state or {}).get("data", {}).items() if k != "changed"}
        if got_state != expected.final_state:
            v.lost.append(f"final state differs: {got_state} != {expected.final_state}")
        seen_changed = {
            k for e in accepted if e["type"] == "workflow_update" for k in e["data"]["changed"]
        }
        moved = {
            k
            for k in expected.final_state.keys() | expected.first_state.keys()
            if expected.final_state.get(k) != expected.first_state.get(k)
        }
        if moved - seen_changed:
            v.lost.append(f"state keys never reported as changed: {sorted(moved - seen_changed)}")

    last_cost = last_of(accepted, "cost_update")
    v.final_cost = None if last_cost is None else last_cost["data"]["current_cost"]
    if v.final_cost is None or abs(v.final_cost - expected.cost) > 1e-6:
        v.lost.append(f"final current_cost {v.final_cost} != true cost {expected.cost}")
    deltas = math.fsum(e["data"]["cost_delta"] for e in accepted if e["type"] == "cost_update")
    if v.final_cost is not None and abs(deltas - v.final_cost) > 1e-6:
        v.lost.append(f"cost deltas add up to {deltas}, not {v.final_cost}: a cost change is lost")
    v.events_checked += v.outbox_seen
    return v


def guarantee_reached(expected: Expected) -> Callable[[list[dict[str, Any]]], bool]:
    """A ``Backend.wait_for`` predicate: the run's final facts have all arrived."""

    def reached(events: list[dict[str, Any]]) -> bool:
        cost = last_of(events, "cost_update")
        state = last_of(events, "workflow_update")
        phases = last_of(events, "phase_update")
        done = {e["data"].get("completed_phase") for e in events if e["type"] == "phase_update"}
        return (
            cost is not None
            and abs(cost["data"]["current_cost"] - expected.cost) <= 1e-6
            and state is not None
            and {k: x for k, x in state["data"].items() if k != "changed"} == expected.final_state
            and phases is not None
            and phases["data"]["completed_phases"] == expected.completed_phases
            and set(expected.completed_phases) <= done
            and sum(1 for e in events if e["type"] == "workflow_failed") >= expected.failures
        )

    return reached


def await_guarantee(
    backend: Backend,
    expected: Expected,
    timeout: float = 30.0,
    outbox_seen: dict[int, tuple[str, str, bytes]] | None = None,
) -> None:
    """Wait until the run's final facts have arrived; on timeout, fail with what is missing
    (the verdict of :func:`check_guarantee`) rather than the whole event list."""
    try:
        backend.wait_for(guarantee_reached(expected), timeout=timeout)
    except AssertionError:
        v = check_guarantee(backend, expected, None, outbox_seen)
        lines = [f"LOST: {x}" for x in v.lost] + [f"PROBLEM: {x}" for x in v.problems]
        more = f"\n... and {len(lines) - 20} more" if len(lines) > 20 else ""
        raise AssertionError(
            f"the run's final facts did not arrive within {timeout:.0f}s:\n"
            + "\n".join(lines[:20])
            + more
        ) from None


# -- chaos -------------------------------------------------------------------------------------


@dataclass
class ChaosResult:
    seed: int
    kills: int
    in_flight_kills: int
    terms: int  # clean stops (SIGTERM) mixed in between the kills
    outages: int
    verdict: Verdict
    seconds: float


class FlakyBackend:
    """The backend's policy during chaos: random 503s, resets and lost answers, and a hook
    that lets the killer strike while a request is in flight."""

    def __init__(self, backend: Backend, rng: random.Random, fault_rate: float = 0.25) -> None:
        self.backend = backend
        self.rng = rng
        self.fault_rate = fault_rate
        self.calm = False
        self._lock = threading.Lock()
        self._arm = threading.Event()
        self.in_flight = threading.Event()
        backend.policy = self.reply

    def arm(self) -> None:
        """The next request is held (after it is stored) until the agent has been killed."""
        self.in_flight.clear()
        self._arm.set()

    def reply(self, event: dict[str, Any]) -> Reply:
        with self._lock:
            if self._arm.is_set():
                self._arm.clear()
                self.in_flight.set()
                return Reply(commit=True, delay=1.0)
            roll = self.rng.random()
        if self.calm or roll >= self.fault_rate:
            return Reply(commit=True)
        roll /= self.fault_rate
        if roll < 0.5:
            return Reply(503, headers={"Retry-After": "0"} if roll < 0.1 else {})
        if roll < 0.75:
            return Reply(reset=True)
        return Reply(commit=True, reset=True)  # stored, but the answer is lost


def run_chaos(
    workdir: Path,
    seed: int,
    kills: int = 30,
    run_seconds: float = 50.0,
    kill_gap: tuple[float, float] = (0.3, 2.2),
    outage_seconds: float = 10.0,
    plan: list[AgentPlan] | None = None,
    log: Callable[[str], None] = print,
) -> ChaosResult:
    """One chaos round: a simulated run while the agent is killed ``kills`` times or more and
    the backend flaps and goes down once; then everything must arrive."""
    started = time.monotonic()
    rng = random.Random(seed)
    run_dir = workdir / "repo" / "agents" / f"c{seed % 10**7:07d}"
    storage = workdir / "storage"
    writer = AdwWriter(run_dir)
    backend = Backend()
    flaky = FlakyBackend(backend, random.Random(rng.getrandbits(64)))
    config = write_config(
        workdir / "agent.toml",
        run_dir,
        storage,
        backend.url,
        delivery={"backoff_initial": 0.05, "backoff_max": 0.5, "drain_timeout": 1.0},
        watch={"rescan_interval": 2.0},
        intervals={"heartbeat": 1.0},
        log={"level": "info"},
    )
    agent = AgentProcess(config, workdir / "agent.log")
    seen: dict[int, tuple[str, str, bytes]] = {}
    problems: list[str] = []

    def remember_outbox() -> None:
        for seq, row in outbox_rows(storage).items():
            if seq in seen and seen[seq][0] != row[0]:
                problems.append(f"seq {seq} changed event_id in the store across a restart")
            seen.setdefault(seq, row)

    sim = RunSimulator(
        writer,
        random.Random(rng.getrandbits(64)),
        run_dir.name,
        plan,
        before_truncate=lambda name, path: wait_consumed(storage, name, path),
    )
    done = threading.Event()
    failure: list[BaseException] = []

    def write() -> None:
        try:
            sim.run(run_seconds)
        except BaseException as exc:
            failure.append(exc)
        finally:
            done.set()

    outages = 0
    outage_at = started + rng.uniform(0.25, 0.5) * run_seconds
    outage_until = 0.0
    killed = in_flight = terms = 0
    agent.start()
    thread = threading.Thread(target=write, name="adw-run", daemon=True)
    thread.start()
    try:
        while killed < kills or not done.is_set():
            now = time.monotonic()
            if not outages and now >= outage_at:
                backend.go_down()
                outages, outage_until = 1, now + outage_seconds
                log(f"  backend down for {outage_seconds:.0f}s")
            if outage_until and now >= outage_until:
                backend.go_up()
                outage_until = 0.0
                log("  backend up")
            if backend.up and rng.random() < 0.3:
                flaky.arm()
                flaky.in_flight.wait(kill_gap[1])
                in_flight += flaky.in_flight.is_set()
            else:
                time.sleep(rng.uniform(*kill_gap))
            if not agent.running():
                problems.append(f"the agent died by itself (exit {agent.proc.returncode})")  # type: ignore[union-attr]
            if rng.random() < 0.15:
                # A clean stop now and then: shutdown drains under the same faults. Before
                # Python has installed its handlers, SIGTERM's default action applies.
                code = agent.stop(timeout=30)
                if code not in (0, -signal.SIGTERM):
                    problems.append(f"agent exited {code} on SIGTERM")
                terms += 1
            else:
                agent.kill9()
                killed += 1
            remember_outbox()
            agent.start()
            if failure:
                raise failure[0]
        thread.join(120)
        if failure:
            raise failure[0]
        if outage_until:
            backend.go_up()
        # The end: a calm backend, the agent running; everything must arrive.
        flaky.calm = True
        agent.kill9()
        remember_outbox()
        start_agent(agent)
        await_guarantee(backend, sim.expected, 90, seen)
        wait_until(drained(storage), "the outbox to drain", 60)
        code = agent.stop(timeout=30)
        if code != 0:
            problems.append(f"agent exited {code} on SIGTERM")
        verdict = check_guarantee(backend, sim.expected, storage, seen)
        verdict.problems += problems
    finally:
        if agent.running():
            agent.kill9()
        backend.close()
    return ChaosResult(seed, killed, in_flight, terms, outages, verdict, time.monotonic() - started)


# -- soak --------------------------------------------------------------------------------------


def soak(minutes: float, seed: int | None, kill_gap: tuple[float, float]) -> int:
    """Chaos rounds back to back for ``minutes``; returns 1 if any round broke the guarantee."""
    base = seed if seed is not None else random.SystemRandom().randrange(2**31)
    print(f"soak: base seed {base} (rerun one round with --seed <round seed>)", flush=True)
    end = time.monotonic() + minutes * 60
    totals: Counter[str] = Counter()
    failed = 0
    n = 0
    while time.monotonic() < end:
        round_seed = base + n
        n += 1
        with tempfile.TemporaryDirectory(prefix="adw-soak-") as tmp:
            result = run_chaos(
                Path(tmp),
                round_seed,
                kills=30,
                run_seconds=60.0,
                kill_gap=kill_gap,
                plan=SOAK_RUN,
                log=lambda _msg: None,
            )
            v = result.verdict
            totals.update(
                kills=result.kills,
                events=v.events_checked,
                lost=len(v.lost),
                duplicates=v.duplicates,
                collapsed=v.collapsed,
            )
            status = "ok" if v.ok else "FAILED"
            print(
                f"round {n} seed {round_seed}: {status}, kills {result.kills} "
                f"({result.in_flight_kills} in flight), {result.terms} SIGTERM, {v.summary()}, "
                f"{result.seconds:.0f}s",
                flush=True,
            )
            if not v.ok:
                failed += 1
                for line in v.lost + v.problems:
                    print(f"    {line}", flush=True)
                log = Path(tmp) / "agent.log"
                keep = Path(tempfile.gettempdir()) / f"adw-soak-{round_seed}.log"
                keep.write_bytes(log.read_bytes())
                print(f"    agent log kept at {keep}", flush=True)
    print(
        f"soak: {n} rounds, {failed} failed; kills {totals['kills']}, events checked "
        f"{totals['events']}, lost {totals['lost']}, duplicate deliveries {totals['duplicates']} "
        f"(collapsed by event_id {totals['collapsed']})",
        flush=True,
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.faults")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("soak", help="repeat the chaos scenario for a while")
    s.add_argument("--minutes", type=float, default=30.0)
    s.add_argument("--seed", type=int, default=None, help="base seed; round n uses seed + n")
    s.add_argument(
        "--kill-every",
        default="0.3:2.2",
        help="seconds between kills, MIN:MAX (default 0.3:2.2)",
    )
    args = p.parse_args(argv)
    low, high = (float(x) for x in args.kill_every.split(":"))
    return soak(args.minutes, args.seed, (low, high))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
