"""401/403 from the backend: logged once per burst with a hint about the token, events kept
(never dead-lettered) and retried with backoff, and they arrive once the backend accepts."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

from tests.faults import (
    RunSimulator,
    await_guarantee,
    check_guarantee,
    drained,
    reap_agents,  # noqa: F401  (autouse fixture)
    start_agent,
    store_counts,
    store_db,
    wait_consumed,
    wait_until,
)
from tests.harness import AdwWriter, AgentProcess, Backend, Reply, write_config

TOKEN = "adw-tok-5f0c9e1d7b2a"


def _auth_warnings(agent: AgentProcess) -> list[dict[str, Any]]:
    return [e for e in agent.logs() if "refused the credentials" in e.get("message", "")]


def test_401_and_403_keep_events_and_deliver_them_once_accepted(
    tmp_path: Path, backend: Backend
) -> None:
    refusing = {"status": 401}
    lock = threading.Lock()

    def policy(event: dict[str, Any]) -> Reply:
        with lock:
            status = refusing["status"]
        return Reply(status, body=b'{"detail":"invalid token"}') if status else Reply(commit=True)

    backend.policy = policy
    run_dir = tmp_path / "repo" / "agents" / "a1b2c3d4"
    writer = AdwWriter(run_dir)
    storage = tmp_path / "storage"
    config = write_config(
        tmp_path / "agent.toml",
        run_dir,
        storage,
        backend.url,
        delivery={"backoff_initial": 0.05, "backoff_max": 0.4},
        log={"level": "info"},
    )
    agent = AgentProcess(config, tmp_path / "agent.log", env={"ADW_AGENT_TOKEN": TOKEN})
    sim = RunSimulator(
        writer,
        random.Random(5),
        run_dir.name,
        before_truncate=lambda name, path: wait_consumed(storage, name, path),
    )
    steps = sim.play()
    half = len(sim) // 2
    start_agent(agent)

    for burst, status in enumerate((401, 403), start=1):
        with lock:
            refusing["status"] = status
        for i in steps:
            if i >= half * burst:
                break
        # Refused again and again: one warning for the whole burst, nothing dead-lettered.
        seen = len(backend.requests)
        backend.wait_requests(seen + 8)
        warnings = _auth_warnings(agent)
        assert len(warnings) == burst, warnings
        assert str(status) in warnings[-1]["message"]
        assert "token" in warnings[-1]["message"]
        assert warnings[-1]["retry_in"] > 0
        assert store_counts(storage)[1] == 0
        with store_db(storage) as db:
            attempts = db.execute("SELECT MAX(attempts) FROM outbox").fetchone()[0]
        assert attempts >= 2
        # The backend takes the token again: what was kept arrives.
        with lock:
            refusing["status"] = 0
        wait_until(drained(storage), "the refused events to arrive")

    for _ in steps:
        pass
    await_guarantee(backend, sim.expected)
    wait_until(drained(storage), "the outbox to drain")
    assert agent.stop() == 0
    verdict = check_guarantee(backend, sim.expected, storage)
    refused = sum(1 for r in backend.requests if r.status in (401, 403))
    print(
        f"\nauth: {refused} refused attempts in 2 bursts, {len(_auth_warnings(agent))} "
        f"warnings; {verdict.summary()}"
    )
    verdict.assert_ok()
    assert all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in backend.requests)
    assert TOKEN not in agent.log.read_text()
