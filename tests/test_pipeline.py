"""Tests for agent.pipeline: which events a batch of changed files produces.

The pipeline runs on real files and a real store; the tests call ``process`` directly instead of
waiting for the watcher, so each step is deterministic. The same behaviour end to end, through a
running agent, is in tests/integration/test_pipeline_live.py.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import agent.pipeline_cost
from agent.account import OTHER, TranscriptLedger, cost_of_path
from agent.config import Config, load
from agent.errors import StorageError
from agent.layout import ERRORLOG, PHASES, RESCAN, Change, FileKey
from agent.layout import STATE as STATE_FILE
from agent.outbox import Store, Transaction
from agent.pipeline import Pipeline
from agent.report import status_report
from agent.transcript import Chunk
from tests.harness import AdwWriter, fixture_lines

ADW = "55b761f6"
STATE = {"adw_id": ADW, "issue_number": "7", "branch_name": None, "issue_class": "/feature"}


def keys(*names: str) -> set[Change]:
    """The changes named in the store's own spelling; ``agent:<name>`` is a folder appearing."""
    out: set[Change] = set()
    for name in names:
        if name == "rescan":
            out.add(RESCAN)
        elif name.startswith("agent:"):
            out.add(FileKey.transcript(name.removeprefix("agent:")))
        else:
            out.add(FileKey.parse(name))
    return out


class Run:
    """A run directory, its writer, and a pipeline over a fresh store."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.dir = config.adw.dir
        self.write = AdwWriter(self.dir)
        self.store = Store(config.storage.dir, ADW, "normal")
        self.pipeline = Pipeline(config, self.store)

    def process(self, *names: str) -> list[dict[str, Any]]:
        """Process a batch and return the events it queued (then mark them delivered)."""
        self.pipeline.process(keys(*names))
        return self.take()

    def take(self) -> list[dict[str, Any]]:
        rows = self.store.db.execute("SELECT seq, body FROM outbox ORDER BY seq").fetchall()
        for seq, _ in rows:
            self.store.queue.ack(seq)
        return [orjson.loads(body) for _, body in rows]

    def restart(self) -> Pipeline:
        """A new pipeline on the same store, as after a restart of the agent."""
        self.pipeline = Pipeline(self.config, self.store)
        return self.pipeline


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


def the(kind: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    """The data of the one event of ``kind``."""
    [event] = [e for e in events if e["type"] == kind]
    return dict(event["data"])


def warnings_about(caplog: pytest.LogCaptureFixture, path: Path) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and getattr(r, "path", None) == str(path)
    ]


# -- classification ---------------------------------------------------------------------------


def test_classify(run: Run) -> None:
    d = run.dir
    classify = run.pipeline.layout.classify
    assert classify(str(d / "adw_state.json")) == STATE_FILE
    assert classify(str(d / "completed_phases.json")) == PHASES
    assert classify(str(d / "error.log")) == ERRORLOG
    # A folder appearing: its transcript may follow.
    assert classify(str(d / "sdlc_planner")) == FileKey.transcript("sdlc_planner")
    assert classify(str(d / "sdlc_planner" / "raw_output.jsonl")) == (
        FileKey.transcript("sdlc_planner")
    )
    assert classify(str(d / "sdlc_planner" / "raw_output.json")) is None
    assert classify(str(d)) == RESCAN
    assert classify(str(d.parent)) == RESCAN
    assert classify("/elsewhere/adw_state.json") is None


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
        outcome = run.pipeline.process(keys("state"))
        assert outcome.retry == keys("state")
        assert run.take() == []
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        run.pipeline.report_unreadable(STATE_FILE)
        run.pipeline.report_unreadable(STATE_FILE)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].path == str(path)  # type: ignore[attr-defined]
    assert "is not valid JSON" in warnings[0].getMessage()
    # The last good state stays: the next good write is compared with it.
    run.write.state({**STATE, "branch_name": "x"})
    [event] = run.process("state")
    assert event["data"]["changed"] == ["branch_name"]


def test_a_state_that_goes_bad_in_another_way_is_warned_about_again(
    run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    # A writer that truncates and then writes a huge file is first seen empty, then over the
    # limit: the second problem must not hide behind the first one's warning.
    run.write.state(STATE)
    run.process("state")
    path = run.dir / "adw_state.json"
    with caplog.at_level(logging.WARNING, "adw_agent"):
        path.write_text("")
        run.pipeline.process(keys("state"))
        run.pipeline.report_unreadable(STATE_FILE)
        limit = run.pipeline.config.limits.max_state_bytes
        for extra in (1, 2):  # the same problem with another size is not warned about again
            path.write_text(json.dumps({**STATE, "nl_input": "x" * (limit + extra)}))
            run.pipeline.process(keys("state"))
            run.pipeline.report_unreadable(STATE_FILE)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == 2, messages
    assert "is empty" in messages[0]
    assert "-byte limit" in messages[1]


def test_a_symlinked_state_is_not_followed(run: Run, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(STATE))
    (run.dir / "adw_state.json").symlink_to(outside)
    assert run.pipeline.process(keys("state")).retry == keys("state")
    assert run.take() == []


def test_missing_state_is_not_an_error(run: Run) -> None:
    outcome = run.pipeline.process(keys("state", "phases", "errorlog"))
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
    assert run.pipeline.process(keys("phases")).retry == keys("phases")
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
            run.pipeline.process(keys("state", "errorlog"))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert run.take() == []
    events = run.process("state", "errorlog")
    assert types(events) == ["workflow_failed", "workflow_update"]


def test_an_error_inside_a_step_that_is_the_stores_fails_the_whole_batch(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    run.write.state(STATE)
    run.write.error_log("boom\n")

    def disk_full(self: Transaction, key: str, value: bytes) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Transaction, "put", disk_full)
    with pytest.raises(StorageError, match="disk is full"):
        run.pipeline.process(keys("state", "errorlog"))
    monkeypatch.undo()
    assert run.take() == []
    assert types(run.process("state", "errorlog")) == ["workflow_failed", "workflow_update"]


# -- one file's failure spares the others ------------------------------------------------------


def test_an_unexpected_error_in_one_file_spares_the_others_and_is_warned_once(
    run: Run, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    feed_chunk = TranscriptLedger.feed_chunk

    def faulty(self: TranscriptLedger, chunk: Chunk) -> tuple[bool, int]:
        if any(b"POISON" in line for line in chunk.lines):
            raise RuntimeError("injected fault")
        return feed_chunk(self, chunk)

    monkeypatch.setattr(TranscriptLedger, "feed_chunk", faulty)
    bad = run.dir / "bad" / "raw_output.jsonl"
    run.write.append("bad", result(0.25), b'{"type":"user","text":"POISON"}\n')
    run.write.append("good", result(1.0))
    run.write.state(STATE)
    with caplog.at_level(logging.WARNING, "adw_agent"):
        events = run.process("transcript:bad", "transcript:good", "state")
        assert types(events) == ["cost_update", "workflow_update"]
        cost = the("cost_update", events)
        assert cost["breakdown"]["by_agent"] == {"good": 1.0}
        assert cost["final"] is True
        [warning] = warnings_about(caplog, bad)
        assert "injected fault" in warning
        assert (
            run.store.db.execute("SELECT 1 FROM files WHERE key = 'transcript:bad'").fetchall()
            == []
        )
        # Still failing: the other files go on, and the warning is not repeated.
        run.write.append("bad", result(0.5))
        run.write.state({**STATE, "branch_name": "b"})
        assert types(run.process("transcript:bad", "state")) == ["workflow_update"]
        assert len(warnings_about(caplog, bad)) == 1
        # Fixed: read from where it stopped (the start), and counted once.
        monkeypatch.undo()
        cost = the("cost_update", run.process("transcript:bad"))
        assert cost["breakdown"]["by_agent"] == {"bad": 0.5, "good": 1.0}
        # Handled fine once: a new failure is warned about again.
        monkeypatch.setattr(TranscriptLedger, "feed_chunk", faulty)
        run.write.append("bad", b'{"POISON":1}\n')
        assert run.process("transcript:bad") == []
        assert len(warnings_about(caplog, bad)) == 2


def test_counts_that_would_overflow_are_bad_lines_and_the_batch_commits(
    run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    path = run.dir / "hostile" / "raw_output.jsonl"
    huge = [
        {
            "type": "assistant",
            "message": {
                "id": f"m{i}",
                "model": "claude-sonnet-4-5",
                "usage": {"input_tokens": 2**63 - 1},
            },
        }
        for i in range(3)
    ]
    run.write.append("hostile", *huge)
    run.write.state(STATE)
    with caplog.at_level(logging.WARNING, "adw_agent"):
        events = run.process("transcript:hostile", "state")
    assert sorted(types(events)) == ["cost_update", "workflow_update"]
    assert the("cost_update", events)["tokens"]["input"] == 0
    [warning] = warnings_about(caplog, path)
    assert "malformed usage" in warning
    assert status_report(run.config)["transcripts"]["hostile"]["bad_lines"] == 3
    # The reader went past them: the next line is counted.
    run.write.append("hostile", result(0.5))
    assert the("cost_update", run.process("transcript:hostile"))["current_cost"] == 0.5


DAMAGE: dict[str, Callable[[dict[str, Any]], bytes | str]] = {
    "ledger of a newer version": lambda row: orjson.dumps(
        {**row, "ledger": {**row["ledger"], "v": 99}}
    ),
    "position garbage": lambda row: orjson.dumps({**row, "position": {"offset": -1}}),
    "not a mapping": lambda row: orjson.dumps([row]),
    "not JSON": lambda row: orjson.dumps(row)[:-5],
    "stored as text": lambda row: orjson.dumps(row).decode(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_saved_transcript_is_frozen_and_the_rest_goes_on(
    run: Run, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    planner = run.dir / "planner" / "raw_output.jsonl"
    run.write.append("planner", result(0.5))
    run.write.append("builder", result(0.25))
    run.process("transcript:planner", "transcript:builder")
    row = orjson.loads(
        run.store.db.execute("SELECT value FROM files WHERE key = 'transcript:planner'").fetchone()[
            0
        ]
    )
    damaged = DAMAGE[damage](row)
    run.store.db.execute("UPDATE files SET value = ? WHERE key = 'transcript:planner'", (damaged,))
    run.restart()
    with caplog.at_level(logging.WARNING, "adw_agent"):
        run.pipeline.snapshot()  # raised before: startup failed with a traceback
        cost = the("cost_update", run.take())
        # Its last reported cost stays; as it can no longer be followed, nothing is final.
        assert cost["current_cost"] == 0.75
        assert cost["breakdown"]["by_agent"] == {"builder": 0.25, "planner": 0.5}
        assert cost["final"] is False
        assert cost["estimate_complete"] is False
        # Not read again (that would count it twice); the other files go on.
        run.write.append("planner", result(9.0))
        run.write.append("tester", result(0.125))
        run.write.state(STATE)
        events = run.process("transcript:planner", "transcript:tester", "state")
        assert types(events) == ["cost_update", "workflow_update"]
        assert the("cost_update", events)["current_cost"] == 0.875
        [warning] = warnings_about(caplog, planner)
        assert "does not load" in warning
    stored = run.store.db.execute("SELECT value FROM files WHERE key = 'transcript:planner'")
    assert stored.fetchone()[0] == damaged


# -- cost and phases in one batch ------------------------------------------------------------


def test_cost_seen_with_a_phase_change_is_charged_to_the_phase_that_ended(run: Run) -> None:
    run.write.phases([], "Plan")
    run.process("phases")
    run.write.append("planner", result(1.5))
    run.write.phases(["Plan"], "Build")
    events = run.process("transcript:planner", "phases")
    assert types(events) == ["cost_update", "phase_update"]
    cost = the("cost_update", events)
    assert cost["breakdown"]["by_phase"] == {"Plan": 1.5}
    assert cost["current_phase"] == "Plan"
    update = the("phase_update", events)
    assert (update["completed_phase"], update["phase_cost"]) == ("Plan", 1.5)
    assert update["current_phase"] == "Build"


def test_catch_up_after_a_restart_charges_the_phase_that_ended(run: Run) -> None:
    run.write.phases([], "Plan")
    run.process("phases")
    # The agent is down while the planner finishes and the phase ends.
    run.write.append(
        "planner", *fixture_lines("tac7iso_raw_output_55b761f6_sdlc_planner_cli2022.jsonl")
    )
    run.write.phases(["Plan"], "Build")
    run.restart().snapshot()
    events = run.take()
    update = the("phase_update", [e for e in events if e["source"] == "event"])
    assert update["completed_phase"] == "Plan"
    assert update["phase_cost"] == pytest.approx(0.2192615, abs=1e-9)
    assert the("cost_update", events)["breakdown"]["by_phase"] == {
        "Plan": pytest.approx(0.2192615, abs=1e-9)
    }


def test_state_and_phase_changes_go_out_before_a_backlog_longer_than_one_batch(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent.pipeline_cost, "_READ_BUDGET", 4096)
    # Over the reader's 1 MiB reads, so the transcript takes several batches; the result line
    # at the end covers every message before it.
    padding = "x" * 1000
    init, *rest = fixture_lines("tac7iso_raw_output_55b761f6_sdlc_planner_cli2022.jsonl")
    # The messages belong to the fixture's own attempt: after its init line.
    lines = [
        init,
        *[
            orjson.dumps(
                {
                    "type": "assistant",
                    "message": {
                        "id": f"m{i}",
                        "model": "claude-sonnet-4-5",
                        "usage": {"input_tokens": 1000},
                        "content": [{"type": "text", "text": padding}],
                    },
                }
            )
            + b"\n"
            for i in range(3000)
        ],
        *rest,
    ]
    run.write.phases([], "Plan")
    run.process("phases")
    run.write.append("planner", *lines)
    run.write.phases(["Plan"], "Build")
    state_changed = {**STATE, "current_phase": "Build"}
    run.write.state(state_changed)
    pending = keys("transcript:planner", "phases", "state")
    first = run.pipeline.process(pending)
    # The first batch already sends the state and the phase change, the backlog still pending.
    assert first.more == keys("transcript:planner")
    early = run.take()
    assert the("workflow_update", early)["current_phase"] == "Build"
    assert the("phase_update", early)["completed_phase"] == "Plan"
    pending = set(first.more)
    batches = 1
    while pending:
        pending = set(run.pipeline.process(pending).more)
        batches += 1
    assert batches > 2
    late = run.take()
    assert not [e for e in late if e["type"] in ("workflow_update", "phase_update")]
    # What was read after the phase change is charged to the new phase (here the result line's
    # correction of the estimates); the result line at the end settles the whole transcript.
    last = [e for e in late if e["type"] == "cost_update"][-1]["data"]
    by_phase = last["breakdown"]["by_phase"]
    assert set(by_phase) == {"Plan", "Build"}
    assert sum(by_phase.values()) == pytest.approx(0.2192615, abs=1e-9)


# -- what is an agent ------------------------------------------------------------------------


def test_a_directory_without_a_transcript_is_not_an_agent(run: Run) -> None:
    (run.dir / "screenshots").mkdir()
    (run.dir / "screenshots" / "home.png").write_bytes(b"\x89PNG")
    (run.dir / "review_img").mkdir()
    run.write.append("planner", result(0.5))
    events = run.process("agent:screenshots", "agent:review_img", "transcript:planner")
    cost = the("cost_update", events)
    assert cost["breakdown"]["by_agent"] == {"planner": 0.5}
    assert cost["final"] is True
    rows = run.store.db.execute("SELECT key FROM files WHERE key LIKE 'transcript:%'")
    assert [r[0] for r in rows] == ["transcript:planner"]
    # The same picture after a restart.
    run.restart().snapshot()
    sync = the("cost_update", run.take())
    assert (sync["breakdown"]["by_agent"], sync["final"]) == ({"planner": 0.5}, True)
    # A transcript appearing there makes it an agent.
    run.write.append("screenshots", result(0.25))
    cost = the("cost_update", run.process("transcript:screenshots"))
    assert cost["breakdown"]["by_agent"] == {"planner": 0.5, "screenshots": 0.25}


# -- bounded breakdowns ------------------------------------------------------------------------


def test_by_phase_is_bounded_and_a_folded_phase_has_no_cost_of_its_own(run: Run) -> None:
    completed: list[str] = []
    long_name = "phase-" + "x" * 1000
    names = [long_name] + [f"phase-{i}" for i in range(70)]
    events: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        run.write.phases(completed, name)
        events += run.process("phases")
        run.write.append(f"agent{i}", result(0.01))
        run.process(f"transcript:agent{i}")
        completed = [*completed, name]
    run.write.phases(completed, None)
    events += run.process("phases")
    run.write.append("last", result(0.01))
    by_phase = the("cost_update", run.process("transcript:last"))["breakdown"]["by_phase"]
    assert len(by_phase) <= 65
    assert long_name not in by_phase
    assert sum(by_phase.values()) == pytest.approx(0.01 * (len(names) + 1))
    costs = {e["data"]["completed_phase"]: e["data"]["phase_cost"] for e in events[1:]}
    assert costs["phase-0"] == pytest.approx(0.01)
    assert costs[long_name] is None
    assert costs["phase-69"] is None


def test_by_model_over_all_transcripts_is_bounded(run: Run) -> None:
    for i in range(40):
        run.write.append(f"agent{i}", result(0.01, {f"model-{i}": 0.01}))
    keys = [f"transcript:agent{i}" for i in range(40)]
    by_model = the("cost_update", run.process(*keys))["breakdown"]["by_model"]
    assert len(by_model) == 33
    assert by_model[OTHER] == pytest.approx(0.08)


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


# -- warnings ----------------------------------------------------------------------------------


def test_a_problem_is_warned_once_and_again_after_the_file_read_fine(
    run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    errorlog = run.dir / "error.log"
    transcript = run.dir / "planner" / "raw_output.jsonl"
    outside = run.dir.parent / "outside.jsonl"
    outside.write_bytes(orjson.dumps(result(1.0)) + b"\n")
    (run.dir / "planner").mkdir()
    with caplog.at_level(logging.WARNING, "adw_agent"):
        for _ in range(2):
            errorlog.mkdir()
            transcript.symlink_to(outside)
            run.process("errorlog", "transcript:planner")
            run.process("errorlog", "transcript:planner")
            errorlog.rmdir()
            transcript.unlink()
            run.write.error_log("boom\n")
            run.write.append("planner", result(0.5))
            run.process("errorlog", "transcript:planner")
            errorlog.unlink()
            transcript.unlink()
    assert len(warnings_about(caplog, errorlog)) == 2
    assert len(warnings_about(caplog, transcript)) == 2


def test_a_helper_heavy_agent_does_not_lift_another_agents_figure_past_the_bill(
    run: Run,
) -> None:
    # The planner spent a fifth of its bill on helper models; the builder, read line by line
    # (and across a restart), must not be scaled by that.
    planner = fixture_lines("pricehawk_v2.0.55_planner_sonnet45_3models.jsonl")
    builder = fixture_lines("pricehawk_v2.0.55_builder_opus45_32turns.jsonl")
    final = sum(
        json.loads(line)["total_cost_usd"]
        for line in planner + builder
        if json.loads(line).get("type") == "result"
    )
    run.write.append("planner", *planner)
    run.process("agent:planner")
    previous = 0.0
    for i, line in enumerate(builder):
        if i == len(builder) // 2:
            run.restart()
        run.write.append("builder", line)
        for event in run.process("agent:builder"):
            if event["type"] != "cost_update":
                continue
            data = event["data"]
            assert data["current_cost"] <= 1.10 * final, f"line {i}"
            if b'"type":"result"' not in line:
                assert data["cost_delta"] >= 0, f"line {i}"
            previous = data["current_cost"]
    assert previous == pytest.approx(final, abs=1e-9)
