"""Configuration edge cases through the real command line: ``check-config`` and ``run`` apply
one validation, a bad value ends with exit 78 and one line naming the key, and a secret in
the value is never echoed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.harness import run_cli, write_config

EX_CONFIG = 78
PASSWORD = "s3cr3t-PASSWORD-42"


def config_file(tmp_path: Path, run_dir: Path, url: str, **sections: dict[str, Any]) -> Path:
    return write_config(tmp_path / "agent.toml", run_dir, tmp_path / "storage", url, **sections)


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


BAD_URLS = {
    "userinfo": f"http://alice:{PASSWORD}@127.0.0.1:9",
    "user only": "https://alice@backend.example",
    "tab": "http://127.0.0.1:9\t/api",
    "trailing newline": "http://127.0.0.1:9\n",
    "space": "http://127.0.0.1:9/ api",
    "bad port": "http://127.0.0.1:99999",
}


@pytest.mark.parametrize("command", ["run", "check-config"])
@pytest.mark.parametrize("problem", sorted(BAD_URLS))
def test_a_url_the_client_would_reject_exits_78_naming_the_key(
    tmp_path: Path, run_dir: Path, command: str, problem: str
) -> None:
    config = config_file(tmp_path, run_dir, BAD_URLS[problem])
    result = run_cli(command, "--config", str(config), timeout=60)
    assert result.returncode == EX_CONFIG, result.stderr
    line = one_line(result.stderr)
    assert "backend.url" in line
    assert str(config) in line
    assert PASSWORD not in result.stderr + result.stdout
    assert "alice" not in result.stderr + result.stdout


def test_a_url_with_a_trailing_newline_from_the_environment_exits_78(
    tmp_path: Path, run_dir: Path
) -> None:
    config = config_file(tmp_path, run_dir, "http://127.0.0.1:9")
    env = {"ADW_AGENT_BACKEND__URL": "http://127.0.0.1:9\n"}
    for command in ("check-config", "run"):
        result = run_cli(command, "--config", str(config), env=env)
        assert result.returncode == EX_CONFIG, result.stderr
        assert "backend.url" in one_line(result.stderr)


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_adw_dir_that_is_a_symlink_exits_78_naming_the_key(
    tmp_path: Path, run_dir: Path, command: str
) -> None:
    link = tmp_path / "linked-run"
    link.symlink_to(run_dir, target_is_directory=True)
    config = config_file(tmp_path, link, "http://127.0.0.1:9")
    result = run_cli(command, "--config", str(config))
    assert result.returncode == EX_CONFIG, result.stderr
    line = one_line(result.stderr)
    assert "adw.dir" in line
    assert "symlink" in line


@pytest.mark.parametrize("mode", [0o644, 0o602])
def test_a_token_file_others_can_read_or_write_gets_a_warning(
    tmp_path: Path, run_dir: Path, mode: int
) -> None:
    token = tmp_path / "token"
    token.write_text("tok-0123456789abcdef\n")
    token.chmod(mode)
    config = config_file(
        tmp_path, run_dir, "http://127.0.0.1:9", backend={"token_file": str(token)}
    )
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    [warning] = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert "backend.token_file" in warning
    assert str(token) in warning
    assert f"{mode:04o}" in warning
    assert "tok-0123456789abcdef" not in result.stderr + result.stdout


def test_a_private_token_file_gets_no_warning(tmp_path: Path, run_dir: Path) -> None:
    token = tmp_path / "token"
    token.write_text("tok-0123456789abcdef\n")
    token.chmod(0o600)
    config = config_file(
        tmp_path, run_dir, "http://127.0.0.1:9", backend={"token_file": str(token)}
    )
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
