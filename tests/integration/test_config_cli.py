"""Configuration through the real command line: ``adw-agent run`` and ``adw-agent check-config``.

A bad configuration must end with exit code 78 and one line on stderr naming the key and the
file, never a traceback; a good one is printed with the token redacted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import AgentProcess, Backend, run_cli, write_config

TOKEN = "cli-test-token-9876543210"
EX_CONFIG = 78

StartAgent = Callable[..., AgentProcess]


def config_file(tmp_path: Path, run_dir: Path, **sections: dict[str, Any]) -> Path:
    return write_config(
        tmp_path / "agent.toml", run_dir, tmp_path / "storage", "http://127.0.0.1:9", **sections
    )


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


PROBLEMS = ["unknown key", "wrong type", "missing run dir", "unreadable token file"]


def broken(tmp_path: Path, run_dir: Path, problem: str) -> tuple[Path, list[str]]:
    """A config with one problem, and the words the error line must contain."""
    if problem == "unknown key":
        path = config_file(tmp_path, run_dir, watch={"debounce": 5})
        return path, ["watch.debounce", "unknown key"]
    if problem == "wrong type":
        path = config_file(tmp_path, run_dir, watch={"debounce_ms": "5"})
        return path, ["watch.debounce_ms", "valid integer"]
    if problem == "missing run dir":
        missing = tmp_path / "agents" / "gone"
        return config_file(tmp_path, missing), ["adw.dir", str(missing), "not a directory"]
    token = tmp_path / "token-dir"
    token.mkdir()
    path = config_file(tmp_path, run_dir, backend={"token_file": str(token)})
    return path, ["backend.token_file", str(token), "cannot read"]


@pytest.mark.parametrize("command", ["run", "check-config"])
@pytest.mark.parametrize("problem", PROBLEMS)
def test_bad_config_exits_78_with_one_line(
    tmp_path: Path, run_dir: Path, command: str, problem: str
) -> None:
    path, words = broken(tmp_path, run_dir, problem)
    result = run_cli(command, "--config", str(path), timeout=30)
    assert result.returncode == EX_CONFIG, result.stderr
    line = one_line(result.stderr)
    assert line.startswith(f"adw-agent: config error: {path}: ")
    for word in words:
        assert word in line
    assert result.stdout == ""


def test_check_config_prints_the_effective_config_with_the_token_redacted(
    tmp_path: Path, run_dir: Path
) -> None:
    path = config_file(tmp_path, run_dir, watch={"debounce_ms": 7})
    env = {"ADW_AGENT_TOKEN": TOKEN, "ADW_AGENT_BACKEND__URL": "http://127.0.0.1:8123/"}
    result = run_cli("check-config", "--config", str(path), env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["backend"]["url"] == "http://127.0.0.1:8123"
    assert effective["backend"]["token"] == "<redacted>"
    assert effective["watch"]["debounce_ms"] == 7
    assert effective["adw"]["dir"] == str(run_dir)
    assert effective["delivery"]["drain_timeout"] == 2.0
    assert TOKEN not in result.stdout + result.stderr
    assert one_line(result.stderr) == f"config OK: {path}"


def test_check_config_finds_the_systemd_credential(tmp_path: Path, run_dir: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "adw-token").write_text(TOKEN + "\n")
    path = config_file(tmp_path, run_dir)
    without = run_cli("check-config", "--config", str(path), timeout=30)
    assert json.loads(without.stdout)["backend"]["token"] is None
    result = run_cli(
        "check-config", "--config", str(path), env={"CREDENTIALS_DIRECTORY": str(creds)}
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["backend"]["token"] == "<redacted>"
    assert TOKEN not in result.stdout + result.stderr


def test_the_credential_token_is_what_the_agent_sends(
    tmp_path: Path, backend: Backend, start_agent: StartAgent
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "adw-token").write_text(TOKEN + "\n")
    agent = start_agent(env={"CREDENTIALS_DIRECTORY": str(creds)})
    request = backend.wait_requests(1)[0]
    assert agent.stop() == 0
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in agent.log.read_text()


def test_env_override_points_the_running_agent_elsewhere(
    backend: Backend, start_agent: StartAgent
) -> None:
    agent = start_agent(url="http://127.0.0.1:9", env={"ADW_AGENT_BACKEND__URL": backend.url})
    backend.wait_for(lambda evs: any(e["type"] == "agent_status" for e in evs))
    assert agent.stop() == 0
