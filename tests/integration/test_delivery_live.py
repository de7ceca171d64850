"""Delivery end to end: the agent process against a real HTTP backend that misbehaves on cue.

The backend's ``policy`` decides each answer (503, Retry-After, 400, or nothing at all when it
is not listening yet). The agent's own store is read through the read-only inspection connection
to know when events are queued; nothing in the agent is mocked.
"""

from __future__ import annotations

import itertools
import json
import socket
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.errors import StorageError
from agent.outbox import Store
from agent.outbox_queue import dead_letter_rows
from tests.harness import AdwWriter, AgentProcess, Backend, Reply

TOKEN = "live-test-token-0123456789"
STATE: dict[str, Any] = {"adw_id": "55b761f6", "issue_number": "9", "issue_class": "/chore"}

StartAgent = Callable[..., AgentProcess]
Events = list[dict[str, Any]]


def of(kind: str, events: Events) -> Events:
    return [e for e in events if e["type"] == kind]


def queued(storage: Path) -> Events:
    """The events in the agent's outbox right now, read without disturbing it."""
    try:
        db = Store.inspect(storage)
    except StorageError:
        return []  # the agent has not created its store yet
    try:
        rows = db.execute("SELECT body FROM outbox ORDER BY seq").fetchall()
    except sqlite3.OperationalError:
        return []  # created, but the tables are not there yet
    finally:
        db.close()
    return [json.loads(row[0]) for row in rows]


def wait_queued(
    storage: Path, predicate: Callable[[Events], bool], timeout: float = 20.0
) -> Events:
    """Wait until the agent has committed events matching ``predicate`` to its outbox."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = queued(storage)
        if predicate(events):
            return events
        time.sleep(0.02)
    raise AssertionError(f"not queued in time: {[(e['seq'], e['type']) for e in events]}")


def strictly_increasing(seqs: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(seqs))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unavailable(event: dict[str, Any]) -> Reply:
    return Reply(503, body=b'{"detail": "maintenance"}')


# -- the envelope -----------------------------------------------------------------------------


def test_envelope_headers_and_one_event_id_across_retries(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    refused: set[str] = set()

    def twice_unavailable(event: dict[str, Any]) -> Reply:
        if event["type"] == "workflow_update":
            if len([r for r in backend.requests if r.event["type"] == "workflow_update"]) < 2:
                refused.add(event["event_id"])
                return Reply(503)
        return Reply(200)

    backend.policy = twice_unavailable
    agent = start_agent(env={"ADW_AGENT_TOKEN": TOKEN})
    writer.state(STATE)
    backend.wait_for(lambda evs: bool(of("workflow_update", evs)))
    assert agent.stop() == 0

    for request in backend.requests:
        event = request.event
        if request.batch:
            assert request.path == "/api/v1/events"
            assert request.headers["Idempotency-Key"].startswith("batch-")
        else:
            assert request.path == f"/api/v1/event/{event['type']}"
            assert request.headers["Idempotency-Key"] == event["event_id"]
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        assert set(event) == {
            *("type", "event_id", "adw_id", "seq", "epoch", "timestamp", "source", "data")
        }
        assert event["adw_id"] == "55b761f6"
        assert event["source"] in {"event", "sync"}
        assert event["timestamp"].endswith("Z")
        stamp = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
        assert stamp.utcoffset() == UTC.utcoffset(None)

    attempts = [r.event for r in backend.requests if r.event["type"] == "workflow_update"]
    assert len(attempts) == 3
    assert len(refused) == 1
    assert {e["event_id"] for e in attempts} == refused
    assert all(e == attempts[0] for e in attempts)  # the very same event, byte for byte
    assert TOKEN not in agent.log.read_text()


# -- backend unavailable ----------------------------------------------------------------------


def test_backend_down_at_start_and_up_later_gets_everything_in_seq_order(
    tmp_path: Path, writer: AdwWriter, start_agent: StartAgent
) -> None:
    port = free_port()
    agent = start_agent(url=f"http://127.0.0.1:{port}")
    agent.wait_log(lambda e: e.get("message", "").startswith("delivery failed, will retry"))
    writer.state(STATE)
    writer.phases([], "plan")
    wait_queued(tmp_path / "storage", lambda evs: bool(of("phase_update", evs)))
    writer.phases(["plan"], "build")
    writer.error_log("ValueError: boom\n")
    wait_queued(
        tmp_path / "storage",
        lambda evs: len(of("phase_update", evs)) == 2 and bool(of("workflow_failed", evs)),
    )

    late = Backend(port)
    try:
        events = late.wait_for(
            lambda evs: len(of("phase_update", evs)) == 2 and bool(of("workflow_failed", evs))
        )
        assert agent.stop() == 0
        events = late.events()
    finally:
        late.close()
    seqs = [e["seq"] for e in events]
    assert strictly_increasing(seqs), seqs
    assert of("agent_status", events)[0]["data"]["state"] == "starting"
    assert of("workflow_update", events)[-1]["data"]["issue_class"] == "/chore"
    phases = [e["data"]["current_phase"] for e in of("phase_update", events)]
    assert phases == ["plan", "build"]


def test_retry_after_is_waited_for(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    def busy_once(event: dict[str, Any]) -> Reply:
        seen = [r for r in backend.requests if r.event["event_id"] == event["event_id"]]
        if event["type"] == "workflow_update" and not seen:
            return Reply(503, headers={"Retry-After": "1"})
        return Reply(200)

    backend.policy = busy_once
    agent = start_agent()
    writer.state(STATE)
    backend.wait_for(lambda evs: bool(of("workflow_update", evs)))
    assert agent.stop() == 0
    first, second = [r for r in backend.requests if r.event["type"] == "workflow_update"]
    assert first.status == 503
    assert second.event["event_id"] == first.event["event_id"]
    # Backoff alone would have retried after about 0.05 s.
    assert second.at - first.at >= 0.9


def test_a_rejected_event_is_dead_lettered_once_and_later_events_flow(
    tmp_path: Path, backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    def reject_bad(event: dict[str, Any]) -> Reply:
        if event["data"].get("issue_class") == "/bad":
            return Reply(400, body=b'{"detail": "issue_class not allowed"}')
        return Reply(200)

    backend.policy = reject_bad
    agent = start_agent()
    writer.state({**STATE, "issue_class": "/bad"})
    backend.wait_requests(1)
    backend.wait_for(lambda evs: bool(of("agent_status", evs)))
    wait_queued(tmp_path / "storage", lambda evs: not of("workflow_update", evs))
    writer.state(STATE)
    writer.phases([], "plan")
    backend.wait_for(lambda evs: bool(of("workflow_update", evs)) and bool(of("phase_update", evs)))
    assert agent.stop() == 0

    # A refused batch is split until the bad event goes alone; that one is not retried.
    rejected = [r for r in backend.requests if r.status == 400 and r.batch <= 1]
    assert len(rejected) == 1
    assert rejected[0].event["event_id"] not in backend.accepted
    [update] = of("workflow_update", backend.events())
    assert update["data"]["issue_class"] == "/chore"
    assert update["seq"] > rejected[0].event["seq"]
    dead_logs = [e for e in agent.logs() if e["message"].startswith("event dead-lettered")]
    assert len(dead_logs) == 1
    assert dead_logs[0]["level"] == "error"
    assert dead_logs[0]["status"] == 400
    assert dead_logs[0]["event_id"] == rejected[0].event["event_id"]
    db = Store.inspect(tmp_path / "storage")
    try:
        [dead] = dead_letter_rows(db)
    finally:
        db.close()
    assert (dead["event_id"], dead["status"]) == (rejected[0].event["event_id"], 400)
    assert "issue_class not allowed" in dead["response"]


# -- crash and restart ------------------------------------------------------------------------


def test_kill_9_with_undelivered_events_then_restart_delivers_all_and_seq_continues(
    tmp_path: Path, backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    storage = tmp_path / "storage"
    backend.policy = unavailable
    first = start_agent()
    backend.wait_requests(1)
    writer.state(STATE)
    writer.phases([], "plan")
    wait_queued(storage, lambda evs: len(of("phase_update", evs)) == 1)
    writer.phases(["plan"], "build")
    writer.error_log("Traceback (most recent call last):\nValueError: boom\n")
    writer.state({**STATE, "branch_name": "chore-issue-9"})

    def everything(evs: Events) -> bool:
        updates = of("workflow_update", evs)
        return (
            len(of("phase_update", evs)) == 2
            and len(of("workflow_failed", evs)) == 1
            and bool(updates)
            and updates[-1]["data"].get("branch_name") == "chore-issue-9"
        )

    before = wait_queued(storage, everything)
    first.kill9()

    backend.policy = lambda event: Reply(200)
    second = start_agent()
    pending_ids = {e["event_id"] for e in before}

    def all_arrived(evs: Events) -> bool:
        ids = {e["event_id"] for e in evs}
        restarted = [e for e in of("agent_status", evs) if e["event_id"] not in pending_ids]
        return pending_ids <= ids and bool(restarted)

    backend.wait_for(all_arrived)
    assert second.stop() == 0
    events = backend.events()

    seqs = [e["seq"] for e in events]
    assert strictly_increasing(seqs), seqs
    by_id = {e["event_id"]: e for e in events}
    for event in before:  # delivered exactly as queued before the crash
        assert by_id[event["event_id"]] == event
    after = [e for e in events if e["event_id"] not in pending_ids]
    assert after
    assert min(e["seq"] for e in after) > max(e["seq"] for e in before)
    bodies: dict[str, str] = {}
    for request in backend.requests:
        body = json.dumps(request.event, sort_keys=True)
        assert bodies.setdefault(request.event["event_id"], body) == body, "event_id reused"
    assert [e["data"]["current_phase"] for e in of("phase_update", before)] == ["plan", "build"]


def test_sigterm_exits_0_and_keeps_undelivered_events_for_the_next_start(
    tmp_path: Path, backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    storage = tmp_path / "storage"
    backend.policy = unavailable
    first = start_agent(delivery={"drain_timeout": 0.3})
    writer.phases([], "plan")
    before = wait_queued(storage, lambda evs: bool(of("phase_update", evs)))
    assert first.stop() == 0
    assert any(e["level"] == "warning" and "undelivered" in e["message"] for e in first.logs())
    left = queued(storage)
    assert {e["event_id"] for e in before} <= {e["event_id"] for e in left}
    assert of("agent_status", left)[-1]["data"]["state"] == "stopping"

    backend.policy = lambda event: Reply(200)
    second = start_agent()
    backend.wait_for(lambda evs: {e["event_id"] for e in left} <= {e["event_id"] for e in evs})
    assert second.stop() == 0
    assert strictly_increasing([e["seq"] for e in backend.events()])
