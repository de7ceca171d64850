"""SIGHUP: the agent re-reads its config file while running, and loses nothing."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import AdwWriter, AgentProcess, Backend, Reply, run_cli, write_config


@pytest.fixture
def backend_b() -> Iterator[Backend]:
    server = Backend()
    try:
        yield server
    finally:
        server.close()


def rewrite(agent: AgentProcess, run_dir: Path, url: str, **sections: Any) -> None:
    """Write a new config file in place of the running one."""
    write_config(agent.config, run_dir, agent.config.parent / "storage", url, **sections)


def is_reload(entry: dict[str, Any]) -> bool:
    message = str(entry.get("message", ""))
    return message == "configuration reloaded" or message.startswith("reload failed")


def reload(agent: AgentProcess) -> dict[str, Any]:
    """SIGHUP and wait until the agent has handled it; returns the log line that says how."""
    done = sum(map(is_reload, agent.logs()))
    agent.signal(signal.SIGHUP)
    agent.wait_log(lambda _: sum(map(is_reload, agent.logs())) > done)
    return [e for e in agent.logs() if is_reload(e)][-1]


def test_queued_events_follow_the_backend_switch_with_their_ids(
    backend: Backend,
    backend_b: Backend,
    writer: AdwWriter,
    run_dir: Path,
    start_agent: Callable[..., AgentProcess],
) -> None:
    backend.policy = lambda event: Reply(503)  # backend A is down
    agent = start_agent()
    writer.state({"adw_id": "55b761f6", "issue_number": "9", "issue_class": "/bug"})
    writer.phases(["plan"], "build")
    tried = backend.wait_requests(3)
    tried_ids = {r.event["event_id"] for r in tried}

    rewrite(agent, run_dir, backend_b.url, log={"level": "info"})
    line = reload(agent)
    assert line["message"] == "configuration reloaded"
    assert line["backend"] == backend_b.url

    events = backend_b.wait_for(
        lambda evs: {"workflow_update", "phase_update"} <= {e["type"] for e in evs}
    )
    assert backend.events() == []
    # What A refused arrives at B unchanged: same event ids, seq order kept.
    assert tried_ids <= {e["event_id"] for e in events}
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    state = [e for e in events if e["type"] == "workflow_update"][-1]
    assert state["data"]["issue_class"] == "/bug"
    assert agent.stop() == 0
    # The new log level applied too: no debug lines after the reload.
    logs = agent.logs()
    after = logs[logs.index(line) :]
    assert after
    assert [e for e in after if e["level"] == "debug"] == []


def test_a_broken_config_on_reload_is_logged_and_the_old_one_kept(
    backend: Backend, writer: AdwWriter, run_dir: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent()
    backend.wait_for(lambda evs: any(e["type"] == "agent_status" for e in evs))
    rewrite(agent, run_dir, backend.url, delivery={"backoff_max": -1.0})

    line = reload(agent)
    assert line["level"] == "error"
    assert "reload failed, keeping the running configuration" in line["message"]
    assert "delivery.backoff_max" in line["message"]
    assert str(agent.config) in line["message"]
    assert "Traceback" not in agent.log.read_text()

    # Still running, still delivering to the same backend.
    writer.state({"adw_id": "55b761f6", "issue_number": "3", "issue_class": "/chore"})
    backend.wait_for(lambda evs: any(e["data"].get("issue_class") == "/chore" for e in evs))
    assert agent.running()

    agent.config.write_text("[adw\nnot toml")
    line = reload(agent)
    assert "not valid TOML" in line["message"]
    assert agent.running()
    assert agent.stop() == 0


def test_a_new_heartbeat_interval_applies_at_once(
    backend: Backend, run_dir: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    # A heartbeat an hour away: without rescheduling, the next one would be that far off.
    agent = start_agent(intervals={"heartbeat": 3600.0})
    backend.wait_for(lambda evs: any(e["type"] == "agent_status" for e in evs))
    before = len(backend.events("agent_status"))

    rewrite(agent, run_dir, backend.url, intervals={"heartbeat": 0.2})
    reload(agent)
    backend.wait_for(lambda evs: sum(e["type"] == "agent_status" for e in evs) >= before + 3)
    running = [e for e in backend.events("agent_status") if e["data"]["state"] == "running"]
    assert len(running) >= 3
    assert agent.stop() == 0


def test_restart_only_keys_are_kept_with_a_warning(
    backend: Backend, tmp_path: Path, run_dir: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent()
    backend.wait_for(lambda evs: any(e["type"] == "agent_status" for e in evs))
    elsewhere = tmp_path / "other-storage"
    write_config(agent.config, run_dir, elsewhere, backend.url, intervals={"heartbeat": 0.2})
    line = reload(agent)
    assert line["message"] == "configuration reloaded"
    warning = agent.wait_log(lambda e: "take effect only on restart" in e.get("message", ""))
    assert warning["level"] == "warning"
    # The heartbeat change applied; the store stayed where it was.
    before = len(backend.events("agent_status"))
    backend.wait_for(lambda evs: sum(e["type"] == "agent_status" for e in evs) >= before + 2)
    assert not elsewhere.exists()
    assert agent.stop() == 0


def test_a_new_token_in_the_token_file_is_used_after_reload(
    backend: Backend, tmp_path: Path, run_dir: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    token = tmp_path / "adw-token"
    token.write_text("first-token-value\n")
    agent = start_agent(backend={"token_file": str(token)})
    backend.wait_for(lambda evs: any(e["type"] == "agent_status" for e in evs))
    assert backend.requests[-1].headers["Authorization"] == "Bearer first-token-value"

    token.write_text("second-token-value\n")
    rewrite(
        agent,
        run_dir,
        backend.url,
        backend={"token_file": str(token)},
        intervals={"heartbeat": 0.2},  # so that something is sent after the reload
    )
    assert reload(agent)["message"] == "configuration reloaded"
    # Heartbeats follow every 0.2 s; one sent with the new token proves the reload.
    bearer = [r.headers["Authorization"] for r in backend.requests]
    while "Bearer second-token-value" not in bearer:
        bearer = [r.headers["Authorization"] for r in backend.wait_requests(len(bearer) + 1)]
    switched = bearer.index("Bearer second-token-value")
    assert set(bearer[switched:]) == {"Bearer second-token-value"}
    assert agent.stop() == 0
    text = agent.log.read_text()
    assert "first-token-value" not in text
    assert "second-token-value" not in text


def test_a_reloaded_token_is_redacted_like_the_first(
    backend: Backend,
    tmp_path: Path,
    run_dir: Path,
    writer: AdwWriter,
    start_agent: Callable[..., AgentProcess],
) -> None:
    secret = "reloaded-Zq7-token-value"
    token = tmp_path / "adw-token"
    token.write_text("first-token-value\n")
    agent = start_agent(backend={"token_file": str(token)})
    backend.wait_for(lambda evs: any(e["type"] == "agent_status" for e in evs))
    token.write_text(secret + "\n")
    rewrite(agent, run_dir, backend.url, backend={"token_file": str(token)})
    assert reload(agent)["message"] == "configuration reloaded"

    # A careless backend rejects the event and echoes the credentials it was sent.
    backend.policy = lambda event: (
        Reply(400, body=f'{{"detail": "bad", "auth": "Bearer {secret}"}}'.encode())
        if event["type"] == "workflow_update"
        else Reply()
    )
    writer.state({"adw_id": "55b761f6", "issue_number": "7", "issue_class": "/bug"})
    dead = agent.wait_log(lambda e: str(e.get("message", "")).startswith("event dead-lettered"))
    assert backend.requests[-1].headers["Authorization"] == f"Bearer {secret}"
    assert "Bearer <redacted>" in dead["response"]
    listed = run_cli("dead-letters", "--json", "--config", str(agent.config))
    assert listed.returncode == 0, listed.stderr
    assert "Bearer <redacted>" in listed.stdout
    assert agent.stop() == 0
    assert secret not in agent.log.read_text()
    assert secret not in listed.stdout
