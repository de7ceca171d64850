"""Host mode end to end: one agent process for every run directory under a root.

Real agent process, real backend on 127.0.0.1, run directories written the way
tac-webbuilder writes them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import host_status_id
from tests.harness import AdwWriter, AgentProcess, Backend, fixture_lines, run_cli

STATE = {"issue_number": "7", "branch_name": None, "issue_class": "/feature"}


def host_config(tmp_path: Path, root: Path, url: str, **extra: str) -> Path:
    path = tmp_path / "host.toml"
    lines = [
        "[adw]",
        f"root = {json.dumps(str(root))}",
        "[backend]",
        f"url = {json.dumps(url)}",
        "[storage]",
        f"dir = {json.dumps(str(tmp_path / 'storage'))}",
        "[watch]",
        "rescan_interval = 0.3",
        "[delivery]",
        "backoff_initial = 0.05",
        "backoff_max = 1.0",
        "drain_timeout = 2.0",
        "[log]",
        'level = "debug"',
    ]
    for section, body in extra.items():
        lines += [f"[{section}]", body]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "repo" / "agents"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def host(tmp_path: Path, root: Path, backend: Backend) -> Iterator[AgentProcess]:
    agent = AgentProcess(host_config(tmp_path, root, backend.url), tmp_path / "agent.log")
    yield agent
    if agent.running():
        assert agent.proc is not None
        agent.proc.kill()
        agent.proc.wait(10)


def of(backend: Backend, adw_id: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [e for e in backend.events(kind) if e["adw_id"] == adw_id]


def test_one_process_reports_every_run_under_the_root(
    root: Path, backend: Backend, host: AgentProcess
) -> None:
    AdwWriter(root / "55b761f6").state({**STATE, "adw_id": "55b761f6"})
    AdwWriter(root / "adw-0a1b2c3d").state({**STATE, "adw_id": "adw-0a1b2c3d"})
    # Not run directories: never read.
    AdwWriter(root / "notes").state({**STATE, "adw_id": "notes"})
    AdwWriter(root / "55B761F6").state({**STATE, "adw_id": "upper"})
    host.start().wait_started()
    backend.wait_for(
        lambda evs: (
            {"55b761f6", "adw-0a1b2c3d"}
            <= {e["adw_id"] for e in evs if e["type"] == "workflow_update"}
        )
    )
    # A run directory that appears later is picked up.
    late = AdwWriter(root / "0123abcd")
    late.state({**STATE, "adw_id": "0123abcd"})
    backend.wait_for(lambda evs: any(e["adw_id"] == "0123abcd" for e in evs))
    assert host.stop() == 0

    runs = {e["adw_id"] for e in backend.events() if e["type"] != "agent_status"}
    assert runs == {"55b761f6", "adw-0a1b2c3d", "0123abcd"}
    for adw_id in runs:
        events = of(backend, adw_id)
        seqs = [e["seq"] for e in events]
        # Each run is its own stream, with one epoch and its own seq: it counts only this
        # run's events (a few; an unsent snapshot replaced by a newer one leaves a gap).
        assert seqs == sorted(set(seqs))
        assert seqs[-1] <= 2 * len(seqs)
        assert len({e["epoch"] for e in events}) == 1
    assert {e["adw_id"] for e in backend.events("agent_status")} == {host_status_id()}


def test_hidden_folders_of_a_run_are_never_read(
    root: Path, backend: Backend, host: AgentProcess
) -> None:
    run = AdwWriter(root / "55b761f6")
    run.state({**STATE, "adw_id": "55b761f6"})
    # A transcript in a hidden folder would cost money if it were read: it must not be.
    hidden = root / "55b761f6" / ".gh-config"
    hidden.mkdir()
    (hidden / "hosts.yml").write_text("github.com:\n  oauth_token: secret\n")
    (hidden / "raw_output.jsonl").write_bytes(
        b"".join(fixture_lines("pricehawk_v2.0.57_builder_sonnet45_13turns.jsonl"))
    )
    run.append("planner", *fixture_lines("pricehawk_v2.0.57_builder_sonnet45_13turns.jsonl"))
    host.start().wait_started()
    backend.wait_for(lambda evs: any(e["type"] == "cost_update" for e in evs))
    assert host.stop() == 0
    last = of(backend, "55b761f6", "cost_update")[-1]["data"]
    assert set(last["breakdown"]["by_agent"]) == {"planner"}


def test_an_ended_run_is_retired_and_picked_up_again_when_it_changes(
    root: Path, backend: Backend, host: AgentProcess
) -> None:
    run = AdwWriter(root / "55b761f6")
    run.state({**STATE, "adw_id": "55b761f6", "end_time": "2026-11-30T10:00:00"})
    host.start().wait_started()
    host.wait_log(lambda e: e.get("message") == "run retired" and e.get("adw_id") == "55b761f6")
    run.state({**STATE, "adw_id": "55b761f6", "end_time": None, "branch_name": "again"})
    backend.wait_for(
        lambda evs: any(e["data"].get("branch_name") == "again" for e in evs),
    )
    assert host.stop() == 0


def test_dir_and_root_together_exit_78_with_one_line(tmp_path: Path, root: Path) -> None:
    config = host_config(tmp_path, root, "http://127.0.0.1:9")
    text = config.read_text().replace("[adw]\n", f'[adw]\ndir = "{root}"\n', 1)
    config.write_text(text)
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 78
    [line] = result.stderr.strip().splitlines()
    assert "set exactly one of adw.dir" in line
    assert str(config) in line


def test_root_from_the_environment_and_each_run_ends_on_its_own(
    tmp_path: Path, root: Path, backend: Backend
) -> None:
    """As the host-mode container runs: the file names only the backend, the root and storage
    come from the environment. One run fails while the other goes on; status tells which."""
    config = tmp_path / "agent.toml"
    config.write_text(f'[backend]\nurl = "{backend.url}"\n[log]\nlevel = "debug"\n')
    env = {
        "ADW_AGENT_ADW__ROOT": str(root),
        "ADW_AGENT_STORAGE__DIR": str(tmp_path / "storage"),
    }
    runs = {adw_id: AdwWriter(root / adw_id) for adw_id in ("55b761f6", "adw-0a1b2c3d")}
    for adw_id, run in runs.items():
        run.state({**STATE, "adw_id": adw_id})
        run.phases(["Plan"], "Build")
        gh = root / adw_id / ".gh-config"
        gh.mkdir()
        (gh / "hosts.yml").write_text("github.com:\n  oauth_token: gho_not_a_real_token\n")
        (gh / "hosts.yml").chmod(0o600)
    agent = AgentProcess(config, tmp_path / "agent.log", env=env)
    agent.start().wait_started()
    try:
        backend.wait_for(
            lambda evs: set(runs) <= {e["adw_id"] for e in evs if e["type"] == "phase_update"}
        )
        failing = runs["adw-0a1b2c3d"]
        failing.state({**STATE, "adw_id": "adw-0a1b2c3d", "end_time": "2026-11-30T12:00:00"})
        backend.wait_for(lambda evs: any(e["type"] == "workflow_failed" for e in evs))
        status = run_cli("status", "--json", "--config", str(config), env=env)
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert isinstance(report["outbox_depth"], int)
        assert report["runs"]["adw-0a1b2c3d"]["ended"]["kind"] == "failed"
        assert report["runs"]["55b761f6"]["ended"] is None
    finally:
        assert agent.stop() == 0

    [failed] = backend.events("workflow_failed")
    assert failed["adw_id"] == "adw-0a1b2c3d"
    for event in backend.events():
        if event["type"] != "agent_status":
            assert event["adw_id"] in runs
            assert event["adw_id"] == event["data"].get("adw_id", event["adw_id"])
    log = (tmp_path / "agent.log").read_text()
    assert ".gh-config" not in log
    assert "Traceback" not in log
