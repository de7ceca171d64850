"""Disk full under storage.dir: the agent says so loudly (log and agent_status), keeps running
and keeps what it has, survives a restart while the disk is still full, and when space returns
every change made meanwhile arrives.

storage.dir lives on a 2 MiB tmpfs mounted for the test (root can mount here); the disk is
filled by a filler file, as another process on the host would.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults import (
    Expected,
    attempt_cost,
    await_guarantee,
    check_guarantee,
    drained,
    reap_agents,  # noqa: F401  (autouse fixture)
    start_agent,
    stored_file,
    wait_until,
)
from tests.harness import AdwWriter, AgentProcess, Backend, Reply, fixture_lines, write_config

PLANNER = "tac7iso_raw_output_55b761f6_sdlc_planner_cli2022.jsonl"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN): {done.stderr}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem is full (unbuffered, down to single bytes)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 1):
            chunk = b"\0" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


def _storage_statuses(backend: Backend) -> list[dict[str, Any]]:
    return [e for e in backend.events("agent_status") if e["data"].get("storage_error") is not None]


def test_disk_full_is_reported_survived_and_recovered(
    tmp_path: Path, backend: Backend, small_disk: Path
) -> None:
    backend.policy = lambda event: Reply(commit=True)
    run_dir = tmp_path / "repo" / "agents" / "55b761f6"
    writer = AdwWriter(run_dir)
    storage = small_disk / "storage"
    config = write_config(
        tmp_path / "agent.toml",
        run_dir,
        storage,
        backend.url,
        intervals={"heartbeat": 0.5},
        watch={"rescan_interval": 1.0},
        delivery={"backoff_initial": 0.05, "backoff_max": 0.5},
        log={"level": "info"},
    )
    agent = AgentProcess(config, tmp_path / "agent.log")
    state: dict[str, Any] = {"adw_id": "55b761f6", "issue_number": "1", "issue_class": None}
    writer.state(state)
    start_agent(agent)
    backend.wait_for(lambda evs: any(e["type"] == "workflow_update" for e in evs))

    # An event queued while the backend is away: its delivery will not be recordable.
    backend.go_down()
    state = {**state, "issue_class": "/feature", "status": "running"}
    writer.state(state)
    wait_until(lambda: stored_file(storage, "state") == state, "the change to be queued")
    filler = fill(small_disk)
    backend.go_up()

    # Changes while the disk is full.
    writer.append("sdlc_planner", *fixture_lines(PLANNER))
    writer.phases(["plan"], "build")
    state = {**state, "current_phase": "build", "branch_name": "feature-issue-1"}
    writer.state(state)
    agent.wait_log(lambda e: "cannot write the store" in e.get("message", ""))
    backend.wait_for(lambda evs: bool(_storage_statuses(backend)))
    # A failure while nothing can be recorded: it must be reported (and logged) exactly once,
    # however many times the batch is retried.
    writer.error_log("ERROR build failed\n")
    state = {**state, "status": "failed"}
    writer.state(state)
    assert agent.running()

    # A restart while the disk is still full: the agent stays up and says so again.
    before = len(_storage_statuses(backend))
    agent.kill9()
    start_agent(agent)
    backend.wait_for(lambda evs: len(_storage_statuses(backend)) > before + 1)
    assert agent.running()

    # Space returns: everything made meanwhile arrives.
    filler.unlink()
    agent.wait_log(lambda e: "writable again" in e.get("message", ""))
    expected = Expected(
        "55b761f6",
        first_state={"adw_id": "55b761f6", "issue_number": "1", "issue_class": None},
        final_state=state,
        completed_phases=["plan"],
        current_phase="build",
        failures=1,
        cost=attempt_cost(fixture_lines(PLANNER)),
    )
    await_guarantee(backend, expected, 30)
    wait_until(drained(storage), "the outbox to drain")
    assert agent.stop() == 0
    verdict = check_guarantee(backend, expected, storage)
    statuses = _storage_statuses(backend)
    print(
        f"\ndisk full: {len(statuses)} agent_status with storage_error reached the backend "
        f"({statuses[0]['data']['storage_error']!r}); {verdict.summary()}"
    )
    verdict.assert_ok()
    # Loud in the log: an error naming storage.dir.
    errors = [e for e in agent.logs() if e.get("level") == "error"]
    assert any(str(storage) in e.get("message", "") for e in errors), errors
    assert json.dumps(errors).count("Traceback") == 0
    log_lines = [json.loads(x) for x in agent.log.read_text().splitlines() if x.startswith("{")]
    failed = [e for e in log_lines if e.get("message", "").startswith("workflow failed")]
    assert len(failed) == 1, failed
