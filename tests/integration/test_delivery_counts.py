"""The counters an auditor of exactly-once delivery reads, end to end.

A real agent process delivers to the harness backend, which holds its first batch while the run
changes (so unsent snapshots are coalesced), then stores it and loses the answer (so the batch
is sent again and the backend answers that it already had it). ``adw-agent status --json``
must then account for every seq: delivered once, or superseded.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from agent.errors import StorageError
from agent.outbox import Store, StoreView
from tests.harness import AdwWriter, AgentProcess, Backend, Reply, run_cli

ADW = "55b761f6"
TOKEN = "counts-test-token-0123456789"
ENV = {"ADW_AGENT_TOKEN": TOKEN}


def queued(storage: Path) -> list[dict[str, Any]]:
    try:
        db = Store.inspect(storage)
    except StorageError:
        return []
    try:
        rows = db.execute("SELECT body FROM outbox ORDER BY seq").fetchall()
    finally:
        db.close()
    return [json.loads(r[0]) for r in rows]


def has_issue(events: list[dict[str, Any]], issue: str) -> bool:
    return any(
        e["type"] == "workflow_update" and e["data"].get("issue_number") == issue for e in events
    )


def issue_queued(storage: Path, issue: str) -> bool:
    return has_issue(queued(storage), issue)


def superseded(storage: Path) -> int:
    try:
        with StoreView(storage, ADW) as view:
            stream = view.delivery_counts()["streams"].get(ADW)
    except StorageError:
        return 0  # not created yet
    return 0 if stream is None else stream["superseded"]


def wait(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_status_accounts_for_every_seq_after_coalescing_and_a_lost_answer(
    tmp_path: Path, backend: Backend, writer: AdwWriter, start_agent: Callable[..., AgentProcess]
) -> None:
    held = threading.Event()
    release = threading.Event()
    first: list[str] = []
    lock = threading.Lock()

    def policy(event: dict[str, Any]) -> Reply:
        with lock:
            if not first:
                first.append(event["event_id"])
                holding = True
            else:
                holding = False
        if holding:
            held.set()
            release.wait(30)
            return Reply(commit=True, reset=True)  # stored, but the answer is lost
        return Reply(commit=True)

    backend.policy = policy
    writer.state({"adw_id": ADW, "issue_number": "1", "issue_class": "/chore"})
    agent = start_agent(env=ENV, backend={"timeout": 60.0})
    storage = tmp_path / "storage"
    try:
        assert held.wait(20), "the agent sent nothing"
        # While the first batch is held, each change's snapshot replaces the unsent one.
        for issue in range(2, 6):
            writer.state({"adw_id": ADW, "issue_number": str(issue), "issue_class": "/chore"})
            wait(partial(issue_queued, storage, str(issue)), f"issue {issue} queued")
        # Each replaced the one before it (the first one, the snapshot at the start too, unless
        # that went out in the held batch).
        assert superseded(storage) >= 3
    finally:
        release.set()
    backend.wait_for(lambda evs: has_issue(evs, "5"))
    assert agent.stop() == 0

    done = run_cli("status", "--json", "--config", str(agent.config), env=ENV)
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    report = json.loads(done.stdout)
    with backend._cond:
        accepted = [backend.accepted[i] for i in backend.order]
        deliveries = len(backend.deliveries)
    mine = [e for e in accepted if e["seq"] > 0]
    assert mine == accepted, "no event went out outside the outbox"

    run = report["runs"][ADW]
    assert (run["outbox_depth"], run["dead_letters"], run["counted_from"]) == (0, 0, 0)
    assert run["superseded"] >= 3
    # Every seq given was superseded or is held by the backend, once.
    seqs = [e["seq"] for e in mine]
    assert len(seqs) == len(set(seqs))
    assert {e["epoch"] for e in mine} == {run["epoch"]}
    assert run["expected"] == run["seq"] - run["superseded"] == len(mine)
    assert max(seqs) == run["seq"]
    # The first batch arrived twice: the second time, the backend said it had it.
    totals = report["delivery"]
    assert totals["delivered"] == len(mine)
    assert totals["duplicates"] == deliveries - len(accepted) >= 1
    assert totals["since"] is None

    text = run_cli("status", "--config", str(agent.config), env=ENV)
    assert text.returncode == 0, text.stderr
    assert (
        f"delivered     {len(mine)} events, {totals['duplicates']} of them already held by "
        "the backend\n"
    ) in text.stdout
    assert f"the backend holds the other {len(mine)} once each (0 still queued)" in text.stdout
