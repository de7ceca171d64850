"""ADW runs written the way tac-webbuilder writes them today, each with the truth it must end as.

What is written (see the project's notes on tac-webbuilder's real behaviour):

- ``adw_state.json`` rewritten in place (sometimes in two halves), never with ``status`` or
  ``current_phase``; the keys arrive as the agents produce them, ``end_time`` last;
- ``completed_phases.json`` with capitalised phases, ``current: null`` between two phases;
- one ``raw_output.jsonl`` per Claude Code agent, reopened with ``"w"`` for a retry (the earlier
  attempt is truncated away), lines sometimes split in two writes; every transcript is a real one
  from ``tests/fixtures`` under a new session id;
- the scripts' ``execution.log`` files, and the orchestrator's "… phase failed after all
  retries" before the failure clean-up writes ``end_time`` while the phase is still current.

The truth of a run (:class:`Truth`) is computed here from what is written, never from the
agent: the final state, the phases, the outcome, and the cost as the sum of every attempt's
``result`` line. A retry truncates the earlier attempt only once the agent has durably read it
(``before_truncate``): an agent that was down while an attempt came and went cannot count it,
and tac-webbuilder's own notes say the same of any reader.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from tests.faults import attempt_cost, with_session
from tests.harness import AdwWriter, fixture_lines

Outcome = Literal["completed", "failed"]
#: Called before a transcript is truncated for a retry: (adw_id, agent name, path).
BeforeTruncate = Callable[[str, str, Path], None]


@dataclass(frozen=True)
class Agent:
    name: str
    script: str
    attempts: tuple[str, ...]


#: Phase → its Claude Code agents, each with the real transcripts of its attempts.
PHASES: dict[str, tuple[Agent, ...]] = {
    "Plan": (
        Agent("issue_classifier", "adw_plan_iso",
              ("tac7iso_raw_output_55b761f6_issue_classifier.jsonl",)),
        Agent("branch_generator", "adw_plan_iso",
              ("tac6_raw_output_b5b9b7d5_branch_generator_no_result_line.jsonl",)),
        Agent("sdlc_planner", "adw_plan_iso",
              ("tac7iso_raw_output_55b761f6_sdlc_planner_cli2022.jsonl",)),
    ),
    "Build": (
        Agent("sdlc_implementor", "adw_build_iso",
              ("pricehawk_v2.0.55_zero_turn_zero_cost.jsonl",
               "pricehawk_v2.0.57_builder_sonnet45_13turns.jsonl")),
    ),
    "Test": (
        Agent("tester", "adw_test_iso",
              ("gleam_v2.1.7_basic_query_golden.jsonl", "gleam_v2.1.7_basic_query_golden.jsonl")),
    ),
    "Review": (
        Agent("reviewer", "adw_review_iso",
              ("pricehawk_v2.0.55_planner_sonnet45_3models.jsonl",)),
    ),
    "Document": (
        Agent("documenter", "adw_document_iso",
              ("tac6_raw_output_af87dd64_pr_creator_cli2144.jsonl",)),
    ),
}  # fmt: skip
ORCHESTRATOR = "adw_sdlc_complete_iso"


@dataclass
class Truth:
    """What the backend must end up showing for one run."""

    adw_id: str
    host: int
    outcome: Outcome
    state: dict[str, Any] = field(default_factory=dict)
    completed_phases: list[str] = field(default_factory=list)
    current_phase: str | None = None
    failed_phase: str | None = None
    cost: float = 0.0
    attempts: int = 0
    ended: bool = False
    error: str | None = None


def _lines(fixture: str, rng: random.Random) -> list[bytes]:
    return with_session(fixture_lines(fixture), str(uuid.UUID(int=rng.getrandbits(128))))


class RunScript:
    """The steps of one run, built up front from a seeded generator, then played in order."""

    def __init__(
        self,
        run_dir: Path,
        rng: random.Random,
        truth: Truth,
        before_truncate: BeforeTruncate,
    ) -> None:
        self.writer = AdwWriter(run_dir)
        self.run_dir = run_dir
        self.rng = rng
        self.truth = truth
        self.before_truncate = before_truncate
        self._state: dict[str, Any] = {}
        self._steps: list[Callable[[], None]] = []
        self._build()

    def __len__(self) -> int:
        return len(self._steps)

    # building

    def _set_state(self, **changes: Any) -> None:
        self._state = {**self._state, **changes}
        snapshot = dict(self._state)
        halves = self.rng.random() < 0.3
        self.truth.state = snapshot
        self._steps.append(lambda: self.writer.state(snapshot, halves=halves, pause=0.01))

    def _set_phases(self, completed: list[str], current: str | None) -> None:
        data = {"completed": list(completed), "current": current,
                "last_updated": "2026-01-01T00:00:00"}  # fmt: skip
        halves = self.rng.random() < 0.3
        self.truth.completed_phases = list(completed)
        self.truth.current_phase = current
        self._steps.append(
            lambda: self.writer.write_json("completed_phases.json", data, halves, 0.01)
        )

    def _log(self, script: str, text: str) -> None:
        def write() -> None:
            folder = self.run_dir / script
            folder.mkdir(exist_ok=True)
            with (folder / "execution.log").open("a") as f:
                f.write(f"2026-01-01 00:00:00 - INFO - {text}\n")

        self._steps.append(write)

    def _attempt(self, agent: Agent, fixture: str, retry: bool) -> None:
        lines = _lines(fixture, self.rng)
        self.truth.cost += attempt_cost(lines)
        self.truth.attempts += 1
        path = self.writer.transcript(agent.name)
        adw_id = self.truth.adw_id

        def start() -> None:
            if retry:
                self.before_truncate(adw_id, agent.name, path)
            self.writer.start_attempt(agent.name)

        self._steps.append(start)
        i = 0
        while i < len(lines):
            batch = lines[i : i + self.rng.randint(1, 4)]
            i += len(batch)
            last = batch[-1]
            if self.rng.random() < 0.2 and len(last) > 8:
                # The CLI's pipe delivers a line in two writes: a reader sees half a line.
                cut = self.rng.randint(1, len(last) - 1)
                head = b"".join(batch[:-1]) + last[:cut]
                tail = last[cut:]
                self._steps.append(partial(self.writer.append, agent.name, head))
                self._steps.append(partial(self.writer.append, agent.name, tail))
            else:
                self._steps.append(partial(self.writer.append, agent.name, *batch))

    def _build(self) -> None:
        truth = self.truth
        self._set_state(adw_id=truth.adw_id, issue_number=str(self.rng.randint(1, 999)))
        phases = list(PHASES)
        failing = self.rng.choice(phases) if truth.outcome == "failed" else None
        completed: list[str] = []
        for phase in phases:
            self._set_phases(completed, phase)
            for agent in PHASES[phase]:
                self._log(agent.script, f"Running {agent.name}")
                for n, fixture in enumerate(agent.attempts):
                    self._attempt(agent, fixture, retry=n > 0)
                self._after_agent(agent.name)
            if phase == failing:
                truth.failed_phase = phase
                self._log(ORCHESTRATOR, f"{phase} phase failed after all retries")
                self._set_state(end_time="2026-01-01T01:00:00Z")
                return
            completed.append(phase)
            # Between two phases the file says no phase is current.
            self._set_phases(completed, None)
        self._set_state(end_time="2026-01-01T01:00:00Z")

    def _after_agent(self, name: str) -> None:
        adw_id = self.truth.adw_id
        if name == "issue_classifier":
            self._set_state(issue_class="/feature")
        elif name == "branch_generator":
            self._set_state(branch_name=f"feat-issue-{self._state['issue_number']}-adw-{adw_id}")
        elif name == "sdlc_planner":
            self._set_state(
                plan_file=f"specs/issue-{self._state['issue_number']}-adw-{adw_id}-plan.md",
                worktree_path=f"/srv/trees/{adw_id}",
                backend_port=9100 + self.rng.randint(0, 14),
                frontend_port=9200 + self.rng.randint(0, 14),
                model_set="base",
                all_adws=["adw_plan_iso", "adw_build_iso"],
            )
        elif name == "tester":
            self._set_state(external_build_results={"success": True, "errors": []})

    # playing

    def play(self, duration: float, stop: threading.Event) -> None:
        """Write every step, spread over about ``duration`` seconds (pacing, not waiting)."""
        pause = duration / max(1, len(self._steps))
        for step in self._steps:
            step()
            if stop.wait(pause * self.rng.uniform(0.2, 1.8)):
                # Stopping early still finishes the run: a half-written run has no truth.
                pause = 0.0
        self.truth.ended = True


class HostWorkload:
    """Keeps ``concurrency`` runs going under one host's ``agents/`` root until told to stop
    starting new ones; every run started is played to its end."""

    def __init__(
        self,
        root: Path,
        host: int,
        rng: random.Random,
        before_truncate: BeforeTruncate,
        *,
        concurrency: int = 2,
        run_seconds: tuple[float, float] = (15.0, 40.0),
        failed_share: float = 0.35,
    ) -> None:
        self.root = root
        self.host = host
        self.rng = rng
        self.before_truncate = before_truncate
        self.concurrency = concurrency
        self.run_seconds = run_seconds
        self.failed_share = failed_share
        self.truths: list[Truth] = []
        self.no_new = threading.Event()
        self.hurry = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for slot in range(self.concurrency):
            # Daemon: a writer still waiting for an agent never keeps a failed suite alive.
            thread = threading.Thread(
                target=self._slot, name=f"host{self.host}-{slot}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _new_run(self) -> tuple[RunScript, float]:
        with self._lock:
            bits = self.rng.getrandbits(32)
            adw_id = f"adw-{bits:08x}" if self.rng.random() < 0.25 else f"{bits:08x}"
            failed = self.rng.random() < self.failed_share
            truth = Truth(adw_id, self.host, "failed" if failed else "completed")
            script = RunScript(
                self.root / adw_id, random.Random(self.rng.getrandbits(64)), truth,
                self.before_truncate,
            )  # fmt: skip
            self.truths.append(truth)
            return script, self.rng.uniform(*self.run_seconds)

    def _slot(self) -> None:
        while not self.no_new.is_set():
            script, duration = self._new_run()
            try:
                script.play(duration, self.hurry)
            except Exception as exc:  # reported by the oracle, not lost in a thread
                script.truth.error = f"{type(exc).__name__}: {exc}"
                return

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)
