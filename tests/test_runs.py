"""Tests for agent.runs: host mode's runs, their turns, and retirement.

Real run directories and a real store; the watcher is left out (its paths are handed to the
runs directly), so each step is deterministic. The same through a running agent is in
tests/integration/test_host_live.py.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.claims import claim
from agent.config import Config, load
from agent.errors import StorageError
from agent.health import StoreHealth
from agent.layout import FileKey
from agent.outbox import Store
from agent.runs import HOST_READ_BUDGET, Runs
from tests.harness import AdwWriter

STATE = {"issue_number": "7", "branch_name": None, "issue_class": "/feature"}
ENDED = {**STATE, "end_time": "2026-11-30T10:00:00"}


class Events:
    """What the runs tell the process, counted."""

    def __init__(self) -> None:
        self.failed: list[StorageError] = []
        self.queued_calls = 0

    def store_failed(self, exc: StorageError) -> None:
        self.failed.append(exc)

    def store_ok(self) -> None:
        pass

    def queued(self) -> None:
        self.queued_calls += 1


class Host:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "agents"
        self.root.mkdir()
        path = tmp_path / "agent.toml"
        path.write_text(
            f'[adw]\nroot = "{self.root}"\n[backend]\nurl = "http://127.0.0.1:9"\n'
            f'[storage]\ndir = "{tmp_path / "storage"}"\n[watch]\ndebounce_ms = 0\n'
        )
        self.config: Config = load(path, {})
        self.store = Store(self.config.storage.dir, None, "normal")
        self.events = Events()
        self.locks = tmp_path / "locks"
        self.runs = Runs(
            self.config, self.store, health=StoreHealth(), events=self.events, claims=self.locks
        )

    def run(self, adw_id: str) -> AdwWriter:
        return AdwWriter(self.root / adw_id)

    def changed(self, path: Path) -> None:
        """What the watcher reports (on the event loop's side)."""
        self.runs._route(str(path), False)

    def queued(self) -> list[dict[str, Any]]:
        rows = self.store.db.execute("SELECT seq, body FROM outbox ORDER BY seq").fetchall()
        return [orjson.loads(body) for _, body in rows]

    def deliver(self) -> None:
        while (event := self.store.queue.head()) is not None:
            self.store.queue.ack(event.seq)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    yield h
    h.store.close()


def test_a_run_with_a_huge_backlog_delays_another_by_one_bounded_batch(host: Host) -> None:
    big = host.run("55b761f6")
    line = orjson.dumps({"type": "user", "text": "x" * 1000}) + b"\n"
    big.append("builder", *([line] * (5 * HOST_READ_BUDGET // len(line))))
    small = host.run("0123abcd")
    small.state({**STATE, "adw_id": "0123abcd"})
    host.changed(big.transcript("builder"))
    host.changed(small.run_dir / "adw_state.json")

    host.runs.step(1e9)  # one turn, with every batch ready
    # The small run's change is queued after one turn, while the big run is still reading.
    assert [e["type"] for e in host.queued() if e["adw_id"] == "0123abcd"] == ["workflow_update"]
    saved = host.store.record("55b761f6", FileKey.transcript("builder"))
    read = saved["position"]["offset"]
    assert 0 < read <= HOST_READ_BUDGET + len(line)
    assert host.runs.units["55b761f6"].batcher.pending  # the rest follows in later turns


def test_runs_that_ended_and_were_delivered_are_retired(host: Host) -> None:
    for i in range(1000):
        host.run(f"{i:08x}").state({**ENDED, "adw_id": f"{i:08x}"})
    live = host.run("adw-0a1b2c3d")
    live.state({**STATE, "adw_id": "adw-0a1b2c3d"})
    host.runs.sync()
    assert len(host.runs.units) == 1001
    host.runs.retire()
    assert len(host.runs.units) == 1001  # nothing is retired before it is delivered
    host.deliver()
    host.runs.retire()
    # What is left in memory of a past run is its name.
    assert set(host.runs.units) == {"adw-0a1b2c3d"}
    assert len(host.runs.retired) == 1000
    # A restart knows them from the store: no reader, no snapshot for them.
    host.runs.close()
    again = Runs(
        host.config, host.store, health=StoreHealth(), events=host.events, claims=host.locks
    )
    again.sync()
    assert set(again.units) == {"adw-0a1b2c3d"}


def test_a_retired_run_is_picked_up_again_when_it_changes(host: Host) -> None:
    run = host.run("55b761f6")
    run.state({**ENDED, "adw_id": "55b761f6"})
    host.runs.sync()
    host.deliver()
    host.runs.retire()
    assert "55b761f6" in host.runs.retired
    run.state({**STATE, "adw_id": "55b761f6", "branch_name": "again"})
    host.changed(run.run_dir / "adw_state.json")
    assert "55b761f6" not in host.runs.retired
    host.runs.step(1e9)
    [update] = [e for e in host.queued() if e["type"] == "workflow_update"]
    assert update["data"]["branch_name"] == "again"
    assert "end_time" in update["data"]["changed"]


def test_a_deleted_run_directory_is_forgotten_once_delivered(host: Host) -> None:
    run = host.run("55b761f6")
    run.state({**STATE, "adw_id": "55b761f6"})
    host.runs.sync()
    shutil.rmtree(run.run_dir)
    host.runs.retire()
    assert "55b761f6" in host.runs.units  # its events are not delivered yet
    host.deliver()
    host.runs.retire()
    assert "55b761f6" not in host.runs.units
    assert "55b761f6" not in host.runs.retired


def test_paths_outside_any_run_are_ignored(host: Host) -> None:
    notes = host.root / "notes"
    AdwWriter(notes).state({**STATE, "adw_id": "notes"})
    host.changed(notes / "adw_state.json")
    host.changed(host.root)
    host.changed(host.root / "0123abcd")  # not there (yet): nothing to open
    assert host.runs.units == {}


def test_a_run_another_agent_reports_is_left_to_it(host: Host) -> None:
    run = host.run("55b761f6")
    run.state({**STATE, "adw_id": "55b761f6"})
    other = claim(host.locks, run.run_dir, key="adw.dir")  # a per-worktree agent's claim
    host.runs.sync()
    assert host.runs.units == {}
    assert host.runs.foreign == {"55b761f6"}
    host.changed(run.run_dir / "adw_state.json")
    assert host.runs.units == {}
    other.release()
    host.runs.rescan()
    assert set(host.runs.units) == {"55b761f6"}


def test_every_run_shares_one_dedup_budget(host: Host) -> None:
    """limits.dedup_total bounds the message ids remembered by the whole process."""
    for n, adw_id in enumerate(("55b761f6", "0123abcd")):
        run = host.run(adw_id)
        run.state({**STATE, "adw_id": adw_id})
        lines = [
            orjson.dumps(
                {
                    "type": "assistant",
                    "session_id": f"s{n}",
                    "message": {
                        "id": f"msg_{n}_{i}",
                        "model": "claude-sonnet-4-5",
                        "usage": {"input_tokens": 10, "output_tokens": 5},
                        "content": [{"type": "text", "text": "hi"}],
                    },
                }
            )
            + b"\n"
            for i in range(20)
        ]
        run.append("builder", *lines)
        host.changed(run.transcript("builder"))
    host.runs.step(1e9)
    budget = host.runs.window_budget
    remembered = [
        unit.pipeline.costs._transcripts[FileKey.transcript("builder")].ledger.remembered
        for unit in host.runs.units.values()
    ]
    assert len(remembered) == 2
    assert all(r > 0 for r in remembered)
    # Both runs' ids are counted in the one budget.
    assert budget.used == sum(remembered) == 40


def test_a_rescan_reads_only_runs_whose_files_changed(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    run = host.run("55b761f6")
    run.state({**STATE, "adw_id": "55b761f6"})
    host.runs.sync()
    host.deliver()
    path = run.run_dir / "adw_state.json"
    # Written while the watcher missed it: the rescan finds it.
    run.state({**STATE, "adw_id": "55b761f6", "branch_name": "missed"})
    host.runs.rescan()
    [update] = [e for e in host.queued() if e["type"] == "workflow_update"]
    assert update["data"]["branch_name"] == "missed"
    host.deliver()
    # A saved state that no longer loads makes every read of the file warn: it shows reads.
    host.store.db.execute(
        "UPDATE files SET value = X'00' WHERE adw_id = '55b761f6' AND key = 'state'"
    )

    def reads() -> int:
        # Warnings about the state file itself (the ending step, which reads the saved state
        # too, warns under the store's path).
        return sum(
            "unexpected error" in r.getMessage() and getattr(r, "path", None) == str(path)
            for r in caplog.records
        )

    with caplog.at_level(logging.WARNING, "adw_agent"):
        host.runs.rescan()  # nothing written since the last rescan: nothing read
        assert reads() == 0
        path.write_text(path.read_text().replace("missed", "seen"))
        host.runs.rescan()  # written again: read again
        assert reads() == 1
