"""Tests for agent.pipeline: which events a batch of changed files produces.

The pipeline runs on real files and a real store; the tests call ``process`` directly instead of
waiting for the watcher, so each step is deterministic. The same behaviour end to end, through a
running agent, is in tests/integration/test_pipeline_live.py.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.account import cost_of_path
from agent.config import Config, load
from agent.errors import StorageError
from agent.outbox import Store
from agent.pipeline import Pipeline
from agent.report import status_report
from tests.harness import AdwWriter, fixture_lines

ADW = "55b761f6"
STATE = {"adw_id": ADW, "issue_number": "7", "branch_name": None, "issue_class": "/feature"}


class Run:
    """A run directory, its writer, and a pipeline over a fresh store."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.dir = config.adw.dir
        self.write = AdwWriter(self.dir)
        self.store = Store(config.storage.dir, ADW, "normal")
        self.pipeline = Pipeline(config, self.store)

    def process(self, *keys: str) -> list[dict[str, Any]]:
        """Process a batch and return the events it queued (then mark them delivered)."""
        self.pipeline.process(set(keys))
        return self.take()

    def take(self) -> list[dict[str, Any]]:
        rows = self.store.db.execute("SELECT seq, body FROM outbox ORDER BY seq").fetchall()
        for seq, _ in rows:
            self.store.ack(seq)
        return [orjson.loads(body) for _, body in rows]


def make_run(tmp_path: Path, limits: str = "") -> Run:
    run_dir = tmp_path / "agents" / ADW
    run_dir.mkdir(parents=True)
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[adw]\ndir = "{run_dir}"\n[backend]\nurl = "http://127.0.0.1:9"\n'
        f'[storage]\ndir = "{tmp_path / "storage"}"\n[limits]\nerror_excerpt_bytes = 256\n' + limits
    )
    return Run(load(path, {}))


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    r = make_run(tmp_path)
    yield r
    r.store.close()


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def result(usd: float, model_usage: dict[str, float] | None = None) -> dict[str, Any]:
    line: dict[str, Any] = {"type": "result", "subtype": "success", "total_cost_usd": usd}
    if model_usage is not None:
        line["modelUsage"] = {m: {"costUSD": c} for m, c in model_usage.items()}
    return line


# -- classification ---------------------------------------------------------------------------


def test_classify(run: Run) -> None:
    d = run.dir
    assert run.pipeline.classify(str(d / "adw_state.json")) == "state"
    assert run.pipeline.classify(str(d / "completed_phases.json")) == "phases"
    assert run.pipeline.classify(str(d / "error.log")) == "errorlog"
    assert run.pipeline.classify(str(d / "sdlc_planner")) == "agent:sdlc_planner"
    assert run.pipeline.classify(str(d / "sdlc_planner" / "raw_output.jsonl")) == (
        "transcript:sdlc_planner"
    )
    assert run.pipeline.classify(str(d / "sdlc_planner" / "raw_output.json")) is None
    assert run.pipeline.classify(str(d)) == "rescan"
    assert run.pipeline.classify(str(d.parent)) == "rescan"
    assert run.pipeline.classify("/elsewhere/adw_state.json") is None


# -- adw_state.json ---------------------------------------------------------------------------


def test_first_state_lists_every_key_as_changed(run: Run) -> None:
    run.write.state(STATE)
    [event] = run.process("state")
    assert event["type"] == "workflow_update"
    assert event["source"] == "event"
    assert event["data"] == {**STATE, "changed": sorted(STATE)}


def test_identical_rewrite_gives_nothing(run: Run) -> None:
    run.write.state(STATE)
    run.process("state")
    run.write.state(dict(reversed(STATE.items())))  # same content, other key order
    assert run.process("state") == []


def test_changed_names_what_changed(run: Run) -> None:
    run.write.state(STATE)
    run.process("state")
    run.write.state({**STATE, "branch_name": "feat-issue-7"})
    [event] = run.process("state")
    assert event["data"]["changed"] == ["branch_name"]
    assert event["data"]["branch_name"] == "feat-issue-7"
    without = {k: v for k, v in STATE.items() if k != "issue_class"}
    run.write.state({**without, "branch_name": "feat-issue-7", "plan_file": "specs/p.md"})
    [event] = run.process("state")
    assert event["data"]["changed"] == ["issue_class", "plan_file"]
    assert "issue_class" not in event["data"]


def test_the_real_fixture_states(run: Run) -> None:
    fixtures = Path(__file__).parent / "fixtures" / "real"
    before = json.loads((fixtures / "tac6_adw_state_e9906e09_initial_nulls.json").read_text())
    after = json.loads((fixtures / "tac6_adw_state_af87dd64_feature_complete.json").read_text())
    run.write.state(before)
    run.process("state")
    run.write.state(after)
    [event] = run.process("state")
    assert event["data"]["changed"] == sorted(
        k for k in after if before.get(k, object()) != after[k]
    )


def test_unreadable_state_is_retried_quietly_then_warned_once(
    run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    run.write.state(STATE)
    run.process("state")
    path = run.dir / "adw_state.json"
    path.write_text(json.dumps({**STATE, "branch_name": "x"})[:30])  # half written
    with caplog.at_level(logging.DEBUG, "adw_agent"):
        outcome = run.pipeline.process({"state"})
        assert outcome.retry == {"state"}
        assert run.take() == []
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        run.pipeline.report_unreadable("state")
        run.pipeline.report_unreadable("state")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].path == str(path)  # type: ignore[attr-defined]
    assert "is not valid JSON" in warnings[0].getMessage()
    # The last good state stays: the next good write is compared with it.
    run.write.state({**STATE, "branch_name": "x"})
    [event] = run.process("state")
    assert event["data"]["changed"] == ["branch_name"]


def test_a_symlinked_state_is_not_followed(run: Run, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(STATE))
    (run.dir / "adw_state.json").symlink_to(outside)
    assert run.pipeline.process({"state"}).retry == {"state"}
    assert run.take() == []


def test_missing_state_is_not_an_error(run: Run) -> None:
    outcome = run.pipeline.process({"state", "phases", "errorlog"})
    assert outcome.retry == set()
    assert run.take() == []


# -- failures ---------------------------------------------------------------------------------


def test_error_log_appearing_and_growing(run: Run) -> None:
    run.write.state({**STATE, "current_phase": "build"})
    run.process("state")
    run.write.error_log("x" * 1000 + "\nTraceback (most recent call last):\nValueError: boom\n")
    [event] = run.process("errorlog")
    assert event["type"] == "workflow_failed"
    assert event["data"]["reason"] == "error.log appeared"
    assert event["data"]["current_phase"] == "build"
    excerpt = event["data"]["error_excerpt"]
    assert excerpt == "Traceback (most recent call last):\nValueError: boom"
    assert run.process("errorlog") == []  # no growth, no event
    run.write.error_log("RuntimeError: again\n")
    [event] = run.process("errorlog")
    assert event["data"]["reason"] == "error.log grew"
    assert event["data"]["error_excerpt"].endswith("RuntimeError: again")
    assert len(event["data"]["error_excerpt"].encode()) <= 256


def test_error_log_replaced_counts_again(run: Run) -> None:
    run.write.error_log("first\n")
    run.process("errorlog")
    (run.dir / "error.log").unlink()
    run.write.error_log("second\n")
    [event] = run.process("errorlog")
    assert event["data"]["error_excerpt"] == "second"


def test_empty_error_log_is_not_a_failure(run: Run) -> None:
    run.write.error_log("")
    assert run.process("errorlog") == []


def test_failed_status_reports_once(run: Run) -> None:
    run.write.state(STATE)
    run.process("state")
    run.write.error_log("ValueError: boom\n")
    run.write.state({**STATE, "status": "failed"})
    events = run.process("state")
    assert types(events) == ["workflow_update", "workflow_failed"]
    assert events[1]["data"]["reason"] == "state status is 'failed'"
    assert events[1]["data"]["error_excerpt"] == "ValueError: boom"
    run.write.state({**STATE, "status": "failed", "branch_name": "b"})
    assert types(run.process("state")) == ["workflow_update"]


def test_failed_status_after_error_log_is_not_a_second_failure(run: Run) -> None:
    run.write.state(STATE)
    run.process("state")
    run.write.error_log("ValueError: boom\n")
    [failure] = run.process("errorlog")
    assert failure["data"]["reason"] == "error.log appeared"
    run.write.state({**STATE, "status": "failed"})
    assert types(run.process("state")) == ["workflow_update"]


def test_failed_status_and_error_log_in_one_batch_report_once(run: Run) -> None:
    run.write.state(STATE)
    run.process("state")
    run.write.state({**STATE, "status": "failed"})
    run.write.error_log("ValueError: boom\n")
    events = run.process("state", "errorlog")
    assert types(events).count("workflow_failed") == 1


def test_a_retried_run_that_fails_again_is_a_new_failure(run: Run) -> None:
    run.write.state({**STATE, "status": "failed"})
    assert types(run.process("state")) == ["workflow_update", "workflow_failed"]
    run.write.state({**STATE, "status": "running"})
    assert types(run.process("state")) == ["workflow_update"]
    run.write.state({**STATE, "status": "failed"})
    assert types(run.process("state")) == ["workflow_update", "workflow_failed"]


# -- completed_phases.json --------------------------------------------------------------------


def phase_data(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            e["data"]["current_phase"],
            e["data"]["status"],
            e["data"]["completed_phases"],
            e["data"]["completed_phase"],
        )
        for e in events
        if e["type"] == "phase_update"
    ]


def test_each_phase_change_gives_a_phase_update(run: Run) -> None:
    run.write.phases([], "plan")
    assert phase_data(run.process("phases")) == [("plan", "running", [], None)]
    run.write.phases(["plan"], "build")
    assert phase_data(run.process("phases")) == [("build", "running", ["plan"], "plan")]
    run.write.phases(["plan"], "build")
    assert run.process("phases") == []
    run.write.phases(["plan", "build"], None)
    assert phase_data(run.process("phases")) == [(None, "completed", ["plan", "build"], "build")]


def test_several_phases_completed_at_once_are_still_running(run: Run) -> None:
    run.write.phases([], "plan")
    run.process("phases")
    run.write.phases(["plan", "build", "test"], "review")
    assert phase_data(run.process("phases")) == [
        ("build", "running", ["plan", "build", "test"], "plan"),
        ("test", "running", ["plan", "build", "test"], "build"),
        ("review", "running", ["plan", "build", "test"], "test"),
    ]


def test_a_phase_dropped_on_retry_is_reported(run: Run) -> None:
    run.write.phases(["plan", "build"], "test")
    run.process("phases")
    run.write.phases(["plan"], "build")
    assert phase_data(run.process("phases")) == [("build", "running", ["plan"], None)]


def test_half_written_phases_are_retried(run: Run) -> None:
    (run.dir / "completed_phases.json").write_text('{"completed": ["pl')
    assert run.pipeline.process({"phases"}).retry == {"phases"}
    assert run.take() == []


# -- the startup snapshot ---------------------------------------------------------------------


def test_snapshot_sends_the_full_picture_as_sync(run: Run) -> None:
    run.write.state(STATE)
    run.write.phases(["plan"], "build")
    run.pipeline.snapshot()
    events = run.take()
    sync = [e for e in events if e["source"] == "sync"]
    assert {e["type"] for e in sync} == {"workflow_update", "phase_update", "cost_update"}
    update = next(e for e in events if e["type"] == "workflow_update")
    assert update["source"] == "sync"
    assert update["data"]["changed"] == sorted(STATE)  # coalesced with the first read
    # A second snapshot with nothing new still sends the whole picture.
    run.pipeline.snapshot()
    again = run.take()
    assert {e["type"] for e in again} == {"workflow_update", "phase_update", "cost_update"}
    assert all(e["source"] == "sync" for e in again)
    assert next(e for e in again if e["type"] == "workflow_update")["data"]["changed"] == []


def test_snapshot_of_an_empty_run_directory(run: Run) -> None:
    run.pipeline.snapshot()
    assert types(run.take()) == ["cost_update"]


# -- transcripts ------------------------------------------------------------------------------


def test_a_transcript_produces_a_cost_update(run: Run) -> None:
    run.write.phases([], "plan")
    run.process("phases")
    run.write.append(
        "issue_classifier", *fixture_lines("tac7iso_raw_output_55b761f6_issue_classifier.jsonl")
    )
    events = run.process("agent:issue_classifier")
    [cost] = [e for e in events if e["type"] == "cost_update"]
    assert cost["data"]["current_cost"] > 0
    assert cost["data"]["current_phase"] == "plan"
    assert set(cost["data"]["breakdown"]["by_agent"]) == {"issue_classifier"}
    assert run.process("transcript:issue_classifier") == []


# -- one transaction per batch ----------------------------------------------------------------


def test_a_failed_batch_records_nothing_and_is_read_again(run: Run) -> None:
    run.write.state(STATE)
    run.write.error_log("boom\n")
    run.store.db.execute("PRAGMA busy_timeout = 0")
    other = sqlite3.connect(run.store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StorageError, match="locked"):
            run.pipeline.process({"state", "errorlog"})
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert run.take() == []
    events = run.process("state", "errorlog")
    assert types(events) == ["workflow_failed", "workflow_update"]


# -- bad lines are counted in one place -------------------------------------------------------


def test_status_and_cost_count_the_same_bad_lines(tmp_path: Path) -> None:
    run = make_run(tmp_path, "max_line_bytes = 1024\n")
    try:
        run.write.append(
            "planner",
            b'{"type":"assistant","usage" broken\n',
            b'{"usage":"' + b"x" * 5000 + b'"}\n',
            {"type": "assistant", "message": {"id": "m", "usage": {"input_tokens": -1}}},
            {"type": "result", "total_cost_usd": "0.5"},
            b"some log text\n",
            result(0.5),
        )
        run.process("transcript:planner")
        [cost] = cost_of_path(run.dir, run.pipeline.prices, max_line_bytes=1024)
        assert cost.bad_lines == 4
        assert status_report(run.config)["transcripts"]["planner"]["bad_lines"] == 4
    finally:
        run.store.close()
