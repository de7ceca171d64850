"""One agent per storage.dir: a second agent on the same directory exits 78 at once, while the
read-only tools keep working next to the running one; a storage.dir that holds another ADW's
state is a configuration error too. (Requeueing dead letters next to a running agent is in
test_status_cli.py.)"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from agent.outbox import Store
from tests.faults import reap_agents  # noqa: F401  (autouse fixture)
from tests.harness import AdwWriter, AgentProcess, Backend, run_cli, write_config


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


def locked_config(tmp_path: Path, name: str, run_dir: Path, url: str, storage: str) -> Path:
    """A config with its own lock directory (storage.lock_dir) under the test's directory."""
    path = write_config(tmp_path / f"{name}.toml", run_dir, tmp_path / storage, url)
    text = path.read_text().replace(
        "[storage]\n", f"[storage]\nlock_dir = {json.dumps(str(tmp_path / 'locks'))}\n", 1
    )
    path.write_text(text)
    return path


def test_a_second_agent_on_the_same_run_directory_exits_78(
    tmp_path: Path, backend: Backend, run_dir: Path
) -> None:
    first_config = locked_config(tmp_path, "first", run_dir, backend.url, "storage")
    first = AgentProcess(first_config, tmp_path / "first.log").start().wait_started()
    # Its own storage.dir, so the store's lock does not stop it: the run directory's claim does.
    config = locked_config(tmp_path, "second", run_dir, backend.url, "other")
    second = AgentProcess(config, tmp_path / "second.log").start()
    assert second.proc is not None
    assert second.proc.wait(30) == 78
    text = second.log.read_text()
    assert "Traceback" not in text
    [line] = [json.loads(x) for x in text.splitlines()]
    assert line["message"].startswith(
        f"startup failed: adw.dir: {run_dir} is already watched by another agent (pid "
    )
    assert list(run_dir.iterdir()) == []  # the claim is not in the run directory
    assert first.stop() == 0


def test_a_lost_store_starts_a_new_stream_with_a_larger_epoch_and_says_so(
    tmp_path: Path, backend: Backend, writer: AdwWriter, run_dir: Path
) -> None:
    config = locked_config(tmp_path, "agent", run_dir, backend.url, "storage")
    writer.state({"adw_id": "55b761f6", "issue_number": "4", "issue_class": "/chore"})
    first = AgentProcess(config, tmp_path / "first.log").start().wait_started()
    backend.wait_for(lambda evs: any(e["type"] == "workflow_update" for e in evs))
    assert first.stop() == 0
    before = backend.events()
    old_epoch = {e["epoch"] for e in before} - {0}
    assert len(old_epoch) == 1

    shutil.rmtree(tmp_path / "storage")  # lost: a new store starts at seq 1 again
    writer.state({"adw_id": "55b761f6", "issue_number": "4", "issue_class": "/bug"})
    second = AgentProcess(config, tmp_path / "second.log").start().wait_started()
    backend.wait_for(lambda evs: any(e["data"].get("issue_class") == "/bug" for e in evs))
    error = second.wait_log(lambda e: "lost, reset or replaced" in e.get("message", ""))
    assert error["level"] == "error"
    after = [e for e in backend.events() if e not in before and e["seq"] > 0]
    assert after
    assert min(e["epoch"] for e in after) > max(old_epoch)
    status = run_cli("status", "--json", "--config", str(config))
    replaced = json.loads(status.stdout)["runs"]["55b761f6"]["replaced"]
    assert replaced["reported_epoch"] == max(old_epoch)
    assert second.stop() == 0


def test_a_damaged_store_exits_78_naming_the_recovery_which_then_works(
    tmp_path: Path, backend: Backend, writer: AdwWriter, run_dir: Path
) -> None:
    config = locked_config(tmp_path, "agent", run_dir, backend.url, "storage")
    writer.state({"adw_id": "55b761f6", "issue_number": "4", "issue_class": "/chore"})
    store = tmp_path / "storage" / "agent.sqlite3"
    store.parent.mkdir()
    store.write_bytes(b"SQLite format 3\x00" + b"\xff" * 8000)  # a header, then garbage
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    assert agent.proc is not None
    assert agent.proc.wait(30) == 78
    text = agent.log.read_text()
    assert "Traceback" not in text
    [line] = [json.loads(x) for x in text.splitlines()]
    assert line["message"].startswith(f"startup failed: storage.dir: the store {store} is damaged")
    assert "adw-agent recover-store --config" in line["message"]

    done = run_cli("recover-store", "--config", str(config))
    assert done.returncode == 0, done.stderr
    [aside] = (tmp_path / "storage").glob("agent.sqlite3.damaged-*")
    assert aside.read_bytes().endswith(b"\xff" * 100)
    again = AgentProcess(config, tmp_path / "again.log").start().wait_started()
    backend.wait_for(lambda evs: any(e["type"] == "workflow_update" for e in evs))
    assert again.stop() == 0


def test_recover_store_refuses_while_an_agent_runs(
    tmp_path: Path, backend: Backend, run_dir: Path
) -> None:
    config = locked_config(tmp_path, "agent", run_dir, backend.url, "storage")
    agent = AgentProcess(config, tmp_path / "agent.log").start().wait_started()
    done = run_cli("recover-store", "--config", str(config))
    assert done.returncode == 78
    assert "in use by another running agent" in done.stderr
    assert (tmp_path / "storage" / "agent.sqlite3").exists()
    assert agent.stop() == 0
