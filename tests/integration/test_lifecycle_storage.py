"""The main loop while the store cannot be written: it waits for the store instead of spinning,
and a status and the heartbeat it stands for are written together or not at all.

The first test puts storage.dir on a 2 MiB tmpfs and fills it (as in test_faults_diskfull.py);
the second makes only the heartbeat's write fail, with a trigger in the agent's own database.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests import faults
from tests.faults import reap_agents, wait_until  # noqa: F401  (reap_agents: autouse fixture)
from tests.harness import AdwWriter, AgentProcess, Backend, Reply, write_config
from tests.integration.test_faults_diskfull import fill, small_disk  # noqa: F401  (fixture)

ADW = "55b761f6"


def messages(agent: AgentProcess) -> list[str]:
    return [str(e.get("message", "")) for e in agent.logs()]


def test_a_retry_pending_while_the_disk_is_full_waits_for_the_store(
    tmp_path: Path,
    backend: Backend,
    small_disk: Path,  # noqa: F811  (the imported fixture)
) -> None:
    backend.policy = lambda event: Reply(commit=True)
    run_dir = tmp_path / "repo" / "agents" / ADW
    writer = AdwWriter(run_dir)
    config = write_config(
        tmp_path / "agent.toml",
        run_dir,
        small_disk / "storage",
        backend.url,
        # Only the store's own retries may run: no rescan, no heartbeat in the window.
        watch={"parse_retries": 1000, "parse_retry_ms": 200, "rescan_interval": 3600.0},
        intervals={"heartbeat": 3600.0},
        log={"level": "debug"},
    )
    writer.state({"adw_id": ADW, "issue_number": "1", "issue_class": None})
    agent = faults.start_agent(AgentProcess(config, tmp_path / "agent.log"))
    backend.wait_for(lambda evs: any(e["type"] == "workflow_update" for e in evs))

    # A state file half written: the agent schedules a retry of it.
    text = json.dumps({"adw_id": ADW, "issue_number": "1", "issue_class": "/feature"}, indent=2)
    with (run_dir / "adw_state.json").open("w") as f:
        f.write(text[: len(text) // 2])
        f.flush()
        agent.wait_log(lambda e: str(e.get("message", "")).startswith("cannot read yet"))
        filler = fill(small_disk)
        f.write(text[len(text) // 2 :])
    # Complete now, and it cannot be recorded: the retry stays pending while the store fails.
    agent.wait_log(lambda e: "cannot write the store" in str(e.get("message", "")))
    wait_until(
        lambda: messages(agent).count("trying the store again") >= 3,
        "three attempts to use the store",
    )
    after = messages(agent)
    after = after[next(i for i, m in enumerate(after) if "cannot write the store" in m) :]
    tries = after.count("trying the store again")
    batches = after.count("batch not recorded: the store cannot be written")
    # One failed batch per attempt to use the store (and the first one), not one per loop
    # iteration: a retry due in the past used to make the main loop spin on it.
    print(f"\n{batches} failed batches over {tries} attempts to use the store")
    assert 1 <= batches <= tries + 2, (batches, tries)

    filler.unlink()
    agent.wait_log(lambda e: "writable again" in str(e.get("message", "")))
    backend.wait_for(
        lambda evs: any(e["data"].get("issue_class") == "/feature" for e in evs), timeout=30
    )
    assert agent.stop() == 0


def store_path(tmp_path: Path) -> Path:
    return tmp_path / "storage" / "agent.sqlite3"


def test_a_status_and_its_heartbeat_are_written_together(
    tmp_path: Path, backend: Backend, start_agent: Callable[..., AgentProcess]
) -> None:
    backend.policy = lambda event: Reply(commit=True)  # accepted before the agent hears so
    agent = start_agent(intervals={"heartbeat": 0.3})
    agent.wait_started()
    backend.wait_for(lambda evs: any(e["type"] == "agent_status" for e in evs))
    with sqlite3.connect(store_path(tmp_path)) as db:
        # From now on the heartbeat cannot be written (as if the disk filled up just then).
        db.execute(
            "CREATE TRIGGER no_heartbeat BEFORE INSERT ON meta WHEN NEW.key = 'heartbeat' "
            "BEGIN SELECT RAISE(ABORT, 'no room for the heartbeat'); END"
        )
        seq = int(json.loads(db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]))

    def direct(evs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in evs if e["type"] == "agent_status" and e["seq"] == 0]

    # Statuses keep coming, sent directly: they could not be queued. Once the outbox is empty
    # too, every status queued meanwhile would have reached the backend.
    backend.wait_for(lambda evs: len(direct(evs)) >= 3)
    wait_until(faults.drained(tmp_path / "storage"), "the outbox to be empty")
    queued = [e for e in backend.events("agent_status") if e["seq"] > seq]
    assert queued == [], "a status was queued although its heartbeat was not written"
    assert direct(backend.events())[0]["data"]["storage_error"] is not None

    with sqlite3.connect(store_path(tmp_path)) as db:
        db.execute("DROP TRIGGER no_heartbeat")
    agent.wait_log(lambda e: "writable again" in str(e.get("message", "")))
    backend.wait_for(lambda evs: any(e["seq"] > seq for e in evs if e["type"] == "agent_status"))
    assert agent.stop() == 0
