"""The HTTP API through a real ``adw-agent serve`` process, on SQLite and on PostgreSQL."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.adw_backend.conftest import ServeProcess
from tests.adw_backend.factory import (
    agent_status,
    completed,
    cost_update,
    failed,
    phase_update,
    workflow_update,
)
from tests.harness import ROOT

Start = Callable[..., ServeProcess]


def post(client: httpx.Client, ev: dict[str, Any], **headers: str) -> httpx.Response:
    return client.post(
        f"/api/v1/event/{ev['type']}",
        content=orjson.dumps(ev),
        headers={"Idempotency-Key": ev["event_id"], "Content-Type": "application/json", **headers},
    )


def test_dedup_across_restart(start_serve: Start, database: str) -> None:
    server = start_serve(database)
    first = cost_update("a1", 3, 1.25)
    with server.client() as client:
        assert post(client, first).json() == {"accepted": 1, "duplicates": 0}
        assert post(client, first).json() == {"accepted": 0, "duplicates": 1}
    assert server.stop() == 0
    again = start_serve(database)
    with again.client() as client:
        response = post(client, first)
        assert response.status_code == 200
        assert response.json() == {"accepted": 0, "duplicates": 1}
        workflow = client.get("/api/v1/workflows/a1").json()
        assert workflow["cost"]["current_cost"] == 1.25
        assert len(workflow["cost_points"]) == 1
        assert len(client.get("/api/v1/workflows/a1/events").json()["events"]) == 1


def test_order_per_adw(start_serve: Start, database: str) -> None:
    server = start_serve(database)
    with server.client() as client:
        for ev in (
            workflow_update("a1", 6, branch_name="feat-new", issue_number="42"),
            workflow_update("a1", 2, branch_name="feat-old"),
            cost_update("a1", 7, 2.0, "Build"),
            cost_update("a1", 5, 1.0, "Plan"),
            phase_update("a1", 8, "Build", ["Plan"], "Plan", 1.0),
            # Older: its completed phase and cost count, its current phase does not.
            phase_update("a1", 4, "Plan", []),
            agent_status("a1", 9, depth=3),
            agent_status("a1", 1, depth=99),
        ):
            assert post(client, ev).status_code == 200
        workflow = client.get("/api/v1/workflows/a1").json()
    assert workflow["state"] == {"branch_name": "feat-new", "issue_number": "42"}
    assert workflow["cost"]["current_cost"] == 2.0
    assert [p["cost"] for p in workflow["cost_points"]] == [1.0, 2.0]
    assert workflow["current_phase"] == "Build"
    assert workflow["completed_phases"] == ["Plan"]
    assert workflow["phase_costs"] == {"Plan": 1.0}
    assert workflow["agent"]["outbox_depth"] == 3
    assert workflow["status"] == "running"


def test_newer_epoch_wins_over_larger_seq(start_serve: Start, database: str) -> None:
    server = start_serve(database)
    with server.client() as client:
        post(client, cost_update("a1", 900, 5.0, epoch=1))
        post(client, cost_update("a1", 2, 6.0, epoch=2))
        post(client, cost_update("a1", 950, 7.0, epoch=1))
        assert client.get("/api/v1/workflows/a1").json()["cost"]["current_cost"] == 6.0


def test_failed_stays_failed_until_deleted(start_serve: Start, database: str) -> None:
    server = start_serve(database)
    with server.client() as client:
        post(client, phase_update("a1", 3, "Build", ["Plan"], "Plan", 0.5))
        post(client, failed("a1", 4))
        post(client, completed("a1", 5, ["Plan", "Build"]))
        post(client, workflow_update("b2", 1, branch_name="other"))
        workflow = client.get("/api/v1/workflows/a1").json()
        assert workflow["status"] == "failed"
        assert workflow["failed_phase"] == "Build"
        assert "failed after all retries" in workflow["last_error"]
        listed = client.get("/api/v1/workflows", params={"status": "failed"}).json()
        assert [w["adw_id"] for w in listed["workflows"]] == ["a1"]
        every = client.get("/api/v1/workflows").json()["workflows"]
        assert {w["adw_id"] for w in every} == {"a1", "b2"}
        assert client.delete("/api/v1/workflows/a1").status_code == 200
        assert client.get("/api/v1/workflows/a1").status_code == 404
        assert client.delete("/api/v1/workflows/a1").status_code == 404


def test_completed(start_serve: Start, database: str) -> None:
    server = start_serve(database)
    with server.client() as client:
        post(client, completed("a1", 5, ["Plan", "Build"]))
        workflow = client.get("/api/v1/workflows/a1").json()
    assert workflow["status"] == "completed"
    assert workflow["completed_phases"] == ["Plan", "Build"]
    assert workflow["ended_at"] is not None


def test_events_route_pages_in_order(start_serve: Start, database: str) -> None:
    server = start_serve(database)
    with server.client() as client:
        for seq in (5, 1, 3, 2, 4):
            post(client, agent_status("a1", seq))
        page = client.get("/api/v1/workflows/a1/events", params={"after_seq": 1, "limit": 2})
        assert [e["seq"] for e in page.json()["events"]] == [2, 3]
        rest = client.get("/api/v1/workflows/a1/events", params={"after_seq": 3})
        assert [e["seq"] for e in rest.json()["events"]] == [4, 5]
        bad = client.get("/api/v1/workflows/a1/events", params={"limit": "many"})
        assert bad.status_code == 400
        assert bad.json()["detail"] == "limit must be an integer"


def test_batch(start_serve: Start, database: str) -> None:
    server = start_serve(database)
    one = workflow_update("a1", 1, branch_name="feat-a")
    batch = [one, cost_update("a1", 2, 0.5), workflow_update("b2", 1, branch_name="feat-b"), one]
    with server.client() as client:
        response = client.post("/api/v1/events", content=orjson.dumps(batch))
        assert response.status_code == 200
        assert response.json() == {"accepted": 3, "duplicates": 1}
        response = client.post("/api/v1/events", content=orjson.dumps(batch[:2]))
        assert response.json() == {"accepted": 0, "duplicates": 2}
        assert client.get("/api/v1/workflows/b2").json()["state"]["branch_name"] == "feat-b"

        # One bad event rejects the whole batch: nothing of it is stored.
        broken = [workflow_update("c3", 1, branch_name="x"), {**cost_update("c3", 2, 1.0)}]
        broken[1]["data"] = {"current_cost": "a lot"}
        response = client.post("/api/v1/events", content=orjson.dumps(broken))
        assert response.status_code == 422
        assert response.json()["detail"].startswith("event 1: data does not fit cost_update")
        assert client.get("/api/v1/workflows/c3").status_code == 404

        many = [agent_status("d4", seq) for seq in range(1, 1002)]
        response = client.post("/api/v1/events", content=orjson.dumps(many))
        assert response.status_code == 413
        assert client.post("/api/v1/events", content=b'{"not": "a list"}').status_code == 400


def test_bad_input_is_4xx_and_changes_nothing(start_serve: Start, database: str) -> None:
    limits = {"ADW_BACKEND_MAX_EVENT_BYTES": "4096", "ADW_BACKEND_MAX_BATCH_BYTES": "8192"}
    server = start_serve(database, env=limits)
    good = cost_update("a1", 1, 1.0)
    wrong_data = {**good, "data": {**good["data"], "tokens": {"input": "many"}}}
    cases: list[tuple[str, bytes, int, str]] = [
        ("bogus", orjson.dumps(good), 400, "unknown event type 'bogus'"),
        ("cost_update", b"{not json", 400, "body is not JSON"),
        ("cost_update", orjson.dumps({**good, "seq": -1}), 422, "invalid envelope: seq"),
        ("cost_update", orjson.dumps({**good, "seq": 2**63}), 422, "invalid envelope: seq"),
        ("cost_update", orjson.dumps({**good, "epoch": 2**64 - 1}), 422, "epoch"),
        ("cost_update", orjson.dumps({**good, "adw_id": "a\x00b"}), 422, "adw_id"),
        ("cost_update", orjson.dumps({**good, "adw_id": "x" * 201}), 422, "adw_id"),
        ("cost_update", orjson.dumps({**good, "extra": 1}), 422, "invalid envelope: extra"),
        ("cost_update", orjson.dumps({**good, "timestamp": "yesterday"}), 422, "timestamp"),
        ("cost_update", orjson.dumps({**good, "timestamp": "0001-01-01T00:00+14:00"}), 422, "tim"),
        ("cost_update", orjson.dumps(wrong_data), 422, "data does not fit cost_update"),
        ("phase_update", orjson.dumps(good), 400, "the path says phase_update"),
        ("cost_update", orjson.dumps({**good, "pad": "x" * 5000}), 413, "over the limit"),
        ("cost_update", orjson.dumps([good]), 422, "invalid envelope"),
    ]
    with server.client() as client:
        for kind, body, status, reason in cases:
            response = client.post(f"/api/v1/event/{kind}", content=body)
            assert response.status_code == status, (kind, body[:80], response.text)
            detail = response.json()["detail"]
            assert reason in detail
            assert "\n" not in detail
        response = client.post(
            "/api/v1/event/cost_update",
            content=orjson.dumps(good),
            headers={"Idempotency-Key": "another"},
        )
        assert response.status_code == 400
        # Odd but valid text in the data is stored as sent, on either database.
        odd = workflow_update("z9", 1, branch_name="nul\x00 and \u2028 and \U0001f600")
        response = post(client, odd)
        assert response.status_code == 200, response.text
        stored = client.get("/api/v1/workflows/z9").json()["state"]["branch_name"]
        assert stored == "nul\x00 and \u2028 and \U0001f600"
        assert client.delete("/api/v1/workflows/z9").status_code == 200
        batch = orjson.dumps([cost_update("a1", seq, 1.0) for seq in range(1, 20)])
        response = client.post("/api/v1/events", content=batch)
        assert response.status_code == 413
        assert response.json()["detail"] == "body over the limit of 8192 bytes"
        assert client.get("/api/v1/workflows").json() == {"workflows": []}
        assert client.get("/api/v1/workflows", params={"status": "lost"}).status_code == 400
        assert client.get("/api/v1/workflows/none").status_code == 404
    assert "Traceback" not in server.stderr()


def test_auth(start_serve: Start, database: str, tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("old-token\nwrite-token\n")
    (tmp_path / "read").write_text("read-token\n")
    server = start_serve(
        database,
        ["--token-file", str(tmp_path / "tokens"), "--read-token-file", str(tmp_path / "read")],
    )
    ev = workflow_update("a1", 1, branch_name="feat-a")
    with server.client() as anonymous:
        assert post(anonymous, ev).status_code == 401
        assert anonymous.get("/api/v1/workflows").status_code == 401
        assert post(anonymous, ev, Authorization="Bearer nope").status_code == 401
        assert post(anonymous, ev, Authorization="Basic write-token").status_code == 401
        assert anonymous.get("/healthz").status_code == 200
    with server.client("read-token") as reader:
        assert post(reader, ev).status_code == 401
        assert reader.get("/api/v1/workflows").json() == {"workflows": []}
        assert reader.delete("/api/v1/workflows/a1").status_code == 401
    with server.client("write-token") as writer:
        assert post(writer, ev).status_code == 200
        assert writer.get("/api/v1/workflows/a1").status_code == 200
    with server.client("old-token") as writer:
        assert post(writer, ev).json() == {"accepted": 0, "duplicates": 1}
    for secret in ("write-token", "read-token", "old-token"):
        assert secret not in server.stderr()


def test_bad_settings_exit_78(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    result = subprocess.run(
        [sys.executable, "-m", "agent", "serve", "--port", "0", "--token-file", str(missing)],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 78
    assert result.stderr.strip().splitlines() == [
        f"adw-agent serve: config error: --token-file {missing}: No such file or directory"
    ]
    result = subprocess.run(
        [sys.executable, "-m", "agent", "serve", "--port", "0", "--database", "mysql://x"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 78
    assert "--database" in result.stderr
    assert "Traceback" not in result.stderr


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_database_down_is_503(start_serve: Start, tmp_path: Path, kind: str) -> None:
    # A database that cannot be reached (a SQLite file in a directory that does not exist,
    # a PostgreSQL port nobody listens on): the service starts, answers 503 (which the agent
    # retries), and never 500.
    url = (
        f"sqlite:///{tmp_path / 'missing' / 'b.db'}"
        if kind == "sqlite"
        else f"postgresql://postgres:secret-pw@127.0.0.1:{_closed_port()}/x"
    )
    server = start_serve(url, wait_healthy=False)
    with server.client() as client:
        assert client.get("/healthz").status_code == 503
        response = post(client, workflow_update("a1", 1, branch_name="x"))
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
    assert "Traceback" not in server.stderr()
    assert "secret-pw" not in server.stderr()
