"""``status``, ``healthcheck`` and ``dead-letters`` against a running agent's store."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness import (
    AdwWriter,
    AgentProcess,
    Backend,
    Reply,
    fixture_lines,
    run_cli,
    write_config,
)

TOKEN = "s3cr3t-status-token-value"
ENV = {"ADW_AGENT_TOKEN": TOKEN}
PLANNER = "tac7iso_raw_output_55b761f6_sdlc_planner_cli2022.jsonl"


def cli(agent: AgentProcess, *args: str) -> tuple[int, str, str]:
    done = run_cli(*args, "--config", str(agent.config), env=ENV)
    assert TOKEN not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return done.returncode, done.stdout, done.stderr


def status(agent: AgentProcess) -> dict[str, Any]:
    code, out, err = cli(agent, "status", "--json")
    assert code == 0, err
    return dict(json.loads(out))


def test_status_and_health_of_a_running_agent(
    backend: Backend, writer: AdwWriter, start_agent: Callable[..., AgentProcess]
) -> None:
    lines = fixture_lines(PLANNER)[:15]
    writer.append("sdlc_planner", *lines)
    agent = start_agent(env=ENV)
    backend.wait_for(lambda evs: any(e["type"] == "cost_update" for e in evs))
    backend.wait_for(lambda evs: any(e["type"] == "agent_status" for e in evs))

    report = status(agent)
    assert report["adw_id"] == "55b761f6"
    assert report["heartbeat"]["state"] in ("starting", "running")
    assert report["last_delivery"]["result"] == "ok"
    assert report["dead_letters"] == 0
    planner = report["transcripts"]["sdlc_planner"]
    assert planner["offset"] == sum(len(line) for line in lines)
    cost = backend.events("cost_update")[-1]["data"]
    assert planner["cost"] == cost["breakdown"]["by_agent"]["sdlc_planner"]
    assert report["current_cost"] == cost["current_cost"]

    code, out, _ = cli(agent, "status")
    assert code == 0
    assert "sdlc_planner" in out
    assert f"offset {planner['offset']:>10}" in out
    assert "last delivery" in out

    code, out, _ = cli(agent, "healthcheck")
    assert (code, out.strip()) == (0, "healthy")

    # Reading never disturbed the agent: it keeps reading and delivering.
    writer.append("sdlc_planner", *fixture_lines(PLANNER)[15:25])
    backend.wait_for(
        lambda evs: any(
            e["type"] == "cost_update" and e["data"]["current_cost"] > cost["current_cost"]
            for e in evs
        )
    )
    assert agent.stop() == 0

    code, out, _ = cli(agent, "healthcheck")
    assert code == 1
    assert out.startswith("unhealthy: the agent stopped")
    assert status(agent)["heartbeat"]["state"] == "stopping"


def test_healthcheck_reports_stuck_delivery(
    backend: Backend, start_agent: Callable[..., AgentProcess]
) -> None:
    backend.policy = lambda event: Reply(503)
    agent = start_agent(env=ENV)
    backend.wait_requests(1)
    code, out, _ = cli(agent, "healthcheck", "--max-stuck", "3600")
    assert (code, out.strip()) == (0, "healthy")
    # Synchronise on the agent's own record of a failed attempt, then ask with a small limit.
    while not (status(agent)["last_delivery"] or {}).get("result", "").startswith("backend"):
        backend.wait_requests(len(backend.requests) + 1)
    report = status(agent)
    assert report["outbox_depth"] >= 1
    assert report["last_delivery"]["result"] == "backend answered 503"
    code, out, _ = cli(agent, "healthcheck", "--max-stuck", "0.001")
    assert code == 1
    assert out.startswith("unhealthy: delivery stuck: oldest undelivered event is")


def test_dead_letters_are_requeued_and_delivered_by_the_running_agent(
    backend: Backend, writer: AdwWriter, start_agent: Callable[..., AgentProcess]
) -> None:
    backend.policy = lambda event: (
        Reply(400, body=b'{"error":"unknown field"}')
        if event["type"] == "workflow_update"
        else Reply()
    )
    # The default heartbeat (30 s) is far off: the requeue must be noticed on its own.
    agent = start_agent(env=ENV, intervals={"heartbeat": 30.0})
    writer.state({"adw_id": "55b761f6", "issue_number": "12", "issue_class": "/feature"})
    agent.wait_log(lambda e: e.get("message", "").startswith("event dead-lettered"))
    # A refused batch is split until the rejected event goes alone.
    rejected = [r.event for r in backend.requests if r.status == 400 and r.batch <= 1]

    code, out, _ = cli(agent, "dead-letters", "--json")
    assert code == 0
    dead = json.loads(out)["dead_letters"]
    assert [(d["seq"], d["event_id"], d["status"]) for d in dead] == [
        (e["seq"], e["event_id"], 400) for e in rejected
    ]
    assert "unknown field" in dead[0]["response"]
    code, out, _ = cli(agent, "dead-letters")
    assert f"seq {dead[0]['seq']}" in out
    assert status(agent)["dead_letters"] == len(dead)

    code, _, err = cli(agent, "dead-letters", "--requeue", "999999")
    assert code == 1
    assert "no dead letter with seq 999999" in err

    backend.policy = lambda event: Reply()  # the backend is fixed
    code, out, _ = cli(agent, "dead-letters", "--all")
    assert (code, out.strip()) == (0, f"requeued {len(dead)} event(s)")

    events = backend.wait_for(
        lambda evs: {e["event_id"] for e in rejected} <= {e["event_id"] for e in evs}
    )
    delivered = {e["event_id"]: e for e in events}
    for event in rejected:
        assert delivered[event["event_id"]]["seq"] == event["seq"]
        assert delivered[event["event_id"]]["data"] == event["data"]
    code, out, _ = cli(agent, "dead-letters", "--json")
    assert json.loads(out) == {"dead_letters": []}
    assert agent.stop() == 0


def test_status_before_the_agent_ever_ran(backend: Backend, tmp_path: Path, run_dir: Path) -> None:
    config = write_config(tmp_path / "agent.toml", run_dir, tmp_path / "storage", backend.url)
    for command in ("status", "healthcheck", "dead-letters"):
        done = run_cli(command, "--config", str(config))
        assert done.returncode == 1, command
        assert "has not run yet" in done.stdout + done.stderr
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "storage" / "agent.sqlite3").exists()
