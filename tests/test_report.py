"""The operator views (status, healthcheck, dead letters) on a real store filled by the pipeline."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import config as config_module
from agent.config import Config
from agent.errors import StorageError
from agent.layout import PHASES, STATE, FileKey
from agent.outbox import Store
from agent.outbox_queue import Queued
from agent.pipeline import Pipeline
from agent.report import dead_letters, health, print_status, status_report
from tests.harness import AdwWriter, fixture_lines

PLANNER = "tac7iso_raw_output_55b761f6_sdlc_planner_cli2022.jsonl"


@pytest.fixture
def config(tmp_path: Path, run_dir: Path) -> Config:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[adw]\ndir = "{run_dir}"\n[backend]\nurl = "http://127.0.0.1:9"\n'
        f'[storage]\ndir = "{tmp_path / "storage"}"\n[intervals]\nheartbeat = 10.0\n'
    )
    return config_module.load(path, environ={})


@pytest.fixture
def store(config: Config) -> Iterator[Store]:
    db = Store(config.storage.dir, config.adw_id, config.storage.synchronous)
    try:
        yield db
    finally:
        db.close()


def fill(config: Config, store: Store, writer: AdwWriter) -> list[bytes]:
    """A run with a state file and a half-written planner transcript, snapshotted."""
    writer.state({"adw_id": "55b761f6", "issue_number": "7", "issue_class": "/feature"})
    lines = fixture_lines(PLANNER)[:12]
    writer.append("sdlc_planner", *lines)
    Pipeline(config, store).snapshot()
    return lines


def dead_letter_head(store: Store, status: int = 400) -> Queued:
    event = store.queue.head()
    assert event is not None
    store.queue.dead_letter(event, status, '{"error":"schema"}')
    return event


def data_version(store: Store) -> int:
    """Changes when another connection commits to the database."""
    return int(store.db.execute("PRAGMA data_version").fetchone()[0])


def test_status_reports_outbox_transcripts_and_cost_without_writing(
    config: Config, store: Store, writer: AdwWriter
) -> None:
    lines = fill(config, store, writer)
    dead = dead_letter_head(store)
    before = data_version(store)

    report = status_report(config)

    assert data_version(store) == before, "status must only read"
    by_type = report["outbox_by_type"]
    assert by_type.get("cost_update") == 1
    assert dead.type not in by_type
    assert report["outbox_depth"] == sum(by_type.values()) >= 1
    assert report["oldest_undelivered_age"] is not None
    assert report["dead_letters"] == 1
    assert [(d["seq"], d["event_id"]) for d in report["dead_letter_list"]] == [
        (dead.seq, dead.event_id)
    ]
    assert report["seq"] >= report["outbox_depth"] + 1
    assert report["last_delivery"]["result"] == "dead-lettered (400)"
    planner = report["transcripts"]["sdlc_planner"]
    assert planner["offset"] == sum(len(line) for line in lines)
    assert planner["cost"] > 0
    assert planner["final"] is False
    assert report["current_cost"] == pytest.approx(planner["cost"])


def test_status_shows_an_unreadable_transcript_state_and_goes_on(
    config: Config, store: Store, writer: AdwWriter, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(config, store, writer)
    with store.transaction() as tx:
        tx.put_json(FileKey.transcript("broken"), {"position": {}, "ledger": {"v": -1}})
    report = status_report(config)
    assert "unreadable saved state" in report["transcripts"]["broken"]["error"]
    print_status(report)
    out = capsys.readouterr().out
    assert "broken" in out
    assert "sdlc_planner" in out
    assert "outbox" in out
    assert "current cost" in out


def test_status_without_a_store_is_a_storage_error(config: Config) -> None:
    with pytest.raises(StorageError, match="has not run yet"):
        status_report(config)


def beat(store: Store, age: float, state: str = "running") -> None:
    store.set_meta("heartbeat", {"at": time.time() - age, "pid": 1, "state": state})


def test_health_needs_a_fresh_heartbeat(config: Config, store: Store) -> None:
    now = time.time()
    reason = health(config, 600, now)
    assert reason is not None
    assert "no heartbeat within 35s (last never)" in reason
    beat(store, 1.0)
    assert health(config, 600, now) is None
    beat(store, 100.0)
    reason = health(config, 600, time.time())
    assert reason is not None
    assert reason.startswith("no heartbeat within 35s (last 100s ago")


def test_health_fails_once_the_agent_stopped(config: Config, store: Store) -> None:
    beat(store, 0.5, state="stopping")
    reason = health(config, 600, time.time())
    assert reason is not None
    assert "stopped" in reason


def test_health_fails_when_delivery_is_stuck(
    config: Config, store: Store, writer: AdwWriter
) -> None:
    fill(config, store, writer)
    beat(store, 0.0)
    assert health(config, 600, time.time()) is None
    store.db.execute("UPDATE outbox SET created = created - 1000")
    reason = health(config, 600, time.time())
    assert reason is not None
    assert reason.startswith("delivery stuck: oldest undelivered event is 100")


def test_dead_letters_list_and_requeue_keep_id_and_seq(
    config: Config, store: Store, writer: AdwWriter
) -> None:
    fill(config, store, writer)
    first = dead_letter_head(store)
    second = dead_letter_head(store, status=422)

    listed = dead_letters(config, None, False)["dead_letters"]
    assert [(d["seq"], d["status"]) for d in listed] == [(first.seq, 400), (second.seq, 422)]

    assert dead_letters(config, second.seq, False) == {"requeued": 1}
    assert dead_letters(config, second.seq, False) == {"requeued": 0}
    assert dead_letters(config, None, True) == {"requeued": 1}
    assert dead_letters(config, None, False) == {"dead_letters": []}

    head = store.queue.head()
    assert head is not None
    assert (head.seq, head.event_id) == (first.seq, first.event_id)
    assert json.loads(head.body)["event_id"] == first.event_id
    row = store.db.execute("SELECT event_id FROM outbox WHERE seq = ?", (second.seq,)).fetchone()
    assert row == (second.event_id,)


def test_dead_letters_never_creates_a_store(config: Config) -> None:
    with pytest.raises(StorageError):
        dead_letters(config, None, True)
    assert not (config.storage.dir / "agent.sqlite3").exists()


def test_status_tells_how_the_run_ended(
    config: Config, store: Store, writer: AdwWriter, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(config, store, writer)
    assert status_report(config)["ended"] is None
    writer.phases(["Plan"], "Build")
    writer.state({"adw_id": "55b761f6", "issue_number": "7", "end_time": "2026-11-30T12:00:00"})
    Pipeline(config, store).process({PHASES, STATE})
    report = status_report(config)
    assert report["ended"] == {"end_time": "2026-11-30T12:00:00", "kind": "failed"}
    print_status(report)
    assert "run ended     failed at 2026-11-30T12:00:00" in capsys.readouterr().out


# -- host mode: per run and in total -----------------------------------------------------------


@pytest.fixture
def host_config(tmp_path: Path) -> Config:
    root = tmp_path / "agents"
    root.mkdir()
    path = tmp_path / "host.toml"
    path.write_text(
        f'[adw]\nroot = "{root}"\n[backend]\nurl = "http://127.0.0.1:9"\n'
        f'[storage]\ndir = "{tmp_path / "host-storage"}"\n[intervals]\nheartbeat = 10.0\n'
    )
    return config_module.load(path, environ={})


def test_host_status_health_and_dead_letters_per_run(
    host_config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Store(host_config.storage.dir, None, "normal")
    try:
        for adw_id in ("55b761f6", "adw-0a1b2c3d", "55b761f6"):
            AdwWriter(host_config.watched / adw_id).state({"adw_id": adw_id, "end_time": None})
            Pipeline(host_config.for_run(host_config.watched / adw_id), store).snapshot()
        with store.transaction("host") as tx:
            tx.set_meta("heartbeat", {"at": time.time(), "pid": 1, "state": "running"})
        rejected = dead_letter_head(store)
        store.db.execute("UPDATE outbox SET created = created - 1000 WHERE adw_id = '55b761f6'")
    finally:
        store.close()

    report = status_report(host_config)
    assert report["mode"] == "host"
    runs = report["runs"]
    assert set(runs) == {"55b761f6", "adw-0a1b2c3d"}
    # The head of the outbox was adw-0a1b2c3d's: the first run's were replaced by newer ones.
    assert json.loads(rejected.body)["adw_id"] == "adw-0a1b2c3d"
    assert runs["adw-0a1b2c3d"]["dead_letters"] == 1
    assert runs["55b761f6"]["dead_letters"] == 0
    assert report["dead_letters"] == 1
    assert report["outbox_depth"] == sum(r["outbox_depth"] for r in runs.values())
    assert runs["55b761f6"]["epoch"] < runs["adw-0a1b2c3d"]["epoch"]
    print_status(report)
    out = capsys.readouterr().out
    assert "adw-0a1b2c3d" in out
    assert "runs          2" in out

    reason = health(host_config, 600, time.time())
    assert reason is not None
    assert "(ADW 55b761f6)" in reason

    [row] = dead_letters(host_config, None, False)["dead_letters"]
    assert (row["seq"], row["adw_id"]) == (rejected.seq, "adw-0a1b2c3d")
    assert dead_letters(host_config, rejected.seq, False) == {"requeued": 1}


def test_host_status_tells_how_each_run_ended(
    host_config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Store(host_config.storage.dir, None, "normal")
    try:
        for adw_id in ("55b761f6", "adw-0a1b2c3d"):
            AdwWriter(host_config.watched / adw_id).state({"adw_id": adw_id, "end_time": None})
            Pipeline(host_config.for_run(host_config.watched / adw_id), store).snapshot()
        ending = AdwWriter(host_config.watched / "adw-0a1b2c3d")
        ending.phases(["Plan"], "Build")
        ending.state({"adw_id": "adw-0a1b2c3d", "end_time": "2026-11-30T12:00:00"})
        run = Pipeline(host_config.for_run(host_config.watched / "adw-0a1b2c3d"), store)
        run.process({PHASES, STATE})
    finally:
        store.close()

    report = status_report(host_config)
    # Each run ends on its own: the other run, and the agent's own status, have not ended.
    assert report["runs"]["adw-0a1b2c3d"]["ended"] == {
        "end_time": "2026-11-30T12:00:00",
        "kind": "failed",
    }
    assert report["runs"]["55b761f6"]["ended"] is None
    assert report["ended"] is None
    print_status(report)
    assert "ended failed at 2026-11-30T12:00:00" in capsys.readouterr().out


def test_status_shows_what_an_auditor_needs_per_stream_and_in_total(
    config: Config, store: Store, writer: AdwWriter, capsys: pytest.CaptureFixture[str]
) -> None:
    writer.state({"adw_id": "55b761f6", "issue_number": "7"})
    Pipeline(config, store).snapshot()
    # Two more state changes before anything is sent: each supersedes the unsent one.
    for issue in ("8", "9"):
        writer.state({"adw_id": "55b761f6", "issue_number": issue})
        Pipeline(config, store).process({STATE})
    dead_letter_head(store)
    batch = store.queue.head_batch(100)
    store.queue.ack_many([event.seq for event in batch], duplicates=1)

    report = status_report(config)

    run = report["runs"]["55b761f6"]
    assert run["superseded"] >= 2
    assert run["counted_from"] == 0
    assert run["outbox_depth"] == 0
    assert run["dead_letters"] == 1
    assert run["expected"] == run["seq"] - run["superseded"] - 1 == len(batch)
    assert report["delivery"] == {"delivered": len(batch), "duplicates": 1, "since": None}
    print_status(report)
    out = capsys.readouterr().out
    assert f"delivered     {len(batch)} events, 1 of them already held by the backend\n" in out
    assert (
        f"seqs 1-{run['seq']}: {run['superseded']} superseded, 1 dead-lettered; the backend "
        f"holds the other {len(batch)} once each (0 still queued)\n"
    ) in out


def test_host_status_counts_superseded_seqs_per_run(
    host_config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Store(host_config.storage.dir, None, "normal")
    try:
        for adw_id in ("55b761f6", "adw-0a1b2c3d", "55b761f6"):
            AdwWriter(host_config.watched / adw_id).state({"adw_id": adw_id, "end_time": None})
            Pipeline(host_config.for_run(host_config.watched / adw_id), store).snapshot()
    finally:
        store.close()

    runs = status_report(host_config)["runs"]
    first, second = runs["55b761f6"], runs["adw-0a1b2c3d"]
    # The second snapshot of the first run superseded what its first one queued.
    assert first["superseded"] > second["superseded"]
    for run in (first, second):
        assert run["expected"] == run["seq"] - run["superseded"] == run["outbox_depth"]
    print_status(status_report(host_config))
    out = capsys.readouterr().out
    assert f"superseded {first['superseded']}  expected {first['expected']}" in out
