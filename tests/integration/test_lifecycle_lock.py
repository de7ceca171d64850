"""One agent per storage.dir: a second agent on the same directory exits 78 at once, while the
read-only tools keep working next to the running one; a storage.dir that holds another ADW's
state is a configuration error too. (Requeueing dead letters next to a running agent is in
test_status_cli.py.)"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from agent.outbox import Store
from tests.faults import reap_agents  # noqa: F401  (autouse fixture)
from tests.harness import AdwWriter, AgentProcess, Backend, run_cli


def test_a_second_agent_on_the_same_storage_dir_exits_78(
    tmp_path: Path,
    backend: Backend,
    writer: AdwWriter,
    start_agent: Callable[..., AgentProcess],
) -> None:
    first = start_agent().wait_started()
    storage = tmp_path / "storage"

    second = AgentProcess(first.config, tmp_path / "second.log").start()
    assert second.proc is not None
    assert second.proc.wait(30) == 78
    text = second.log.read_text()
    assert "Traceback" not in text
    [line] = [json.loads(x) for x in text.splitlines()]
    assert line["level"] == "error"
    assert line["message"] == (
        f"startup failed: storage.dir: {storage} is in use by another running agent (it holds "
        f"the lock on {storage / 'agent.lock'}); give each agent its own storage.dir"
    )

    # The first agent is undisturbed; the tools that only read do not take the lock.
    writer.state({"adw_id": "55b761f6", "issue_number": "4", "issue_class": "/chore"})
    backend.wait_for(lambda evs: any(e["data"].get("issue_class") == "/chore" for e in evs))
    for command in (["status"], ["healthcheck"], ["dead-letters"]):
        done = run_cli(*command, "--config", str(first.config))
        assert done.returncode == 0, done.stderr
    assert first.running()
    assert first.stop() == 0

    # The lock goes with the process that held it, however it ends.
    third = AgentProcess(first.config, tmp_path / "third.log").start().wait_started()
    third.kill9()
    fourth = AgentProcess(first.config, tmp_path / "fourth.log").start().wait_started()
    assert fourth.stop() == 0


def test_a_storage_dir_holding_another_adws_state_exits_78(
    tmp_path: Path, backend: Backend, start_agent: Callable[..., AgentProcess]
) -> None:
    Store(tmp_path / "storage", "another-adw", "normal").close()
    agent = start_agent()
    assert agent.proc is not None
    assert agent.proc.wait(30) == 78
    text = agent.log.read_text()
    assert "Traceback" not in text
    [line] = [json.loads(x) for x in text.splitlines()]
    assert line["message"].startswith(
        f"startup failed: storage.dir: {tmp_path / 'storage'} holds the state of ADW "
        "'another-adw', not '55b761f6'"
    )
