"""Tests for agent.cli run in-process: exit codes, and what goes to stdout and stderr."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from agent import __version__
from agent.cli import EX_CONFIG, main
from agent.outbox import Store


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("ADW_AGENT_TOKEN", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    run_dir = tmp_path / "agents" / "abc123"
    run_dir.mkdir(parents=True)
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[adw]\ndir = "{run_dir}"\n[backend]\nurl = "http://127.0.0.1:9"\n'
        f'[storage]\ndir = "{tmp_path / "storage"}"\n'
    )
    return path


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"adw-agent {__version__}\n"


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "required" in capsys.readouterr().err


def test_check_config(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    effective = json.loads(out)
    assert effective["backend"] == {
        "url": "http://127.0.0.1:9",
        "token_file": None,
        "event_path": "/api/v1/event/{type}",
        "batch_path": "/api/v1/events",
        "connect_timeout": 3.0,
        "timeout": 10.0,
        "ca_bundle": None,
        "allow_insecure": False,
        "token": None,
    }
    assert "token" not in effective
    assert "source" not in effective
    assert err == f"config OK: {config}\n"


def test_config_error_is_one_line_and_exit_78(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config.write_text(config.read_text() + "[watch]\nmood = 1\n")
    assert main(["check-config", "--config", str(config)]) == EX_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"adw-agent: config error: {config}: watch.mood: unknown key\n"


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.toml"
    assert main(["run", "--config", str(missing)]) == EX_CONFIG
    assert capsys.readouterr().err == f"adw-agent: config error: {missing}: no such file\n"


def test_an_agent_error_is_exit_1_and_one_line(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dead-letters", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("adw-agent: no agent store at ")


def test_schema_writes_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "schemas"
    assert main(["schema", "--check", "--out", str(out)]) == 1
    assert main(["schema", "--out", str(out)]) == 0
    written = capsys.readouterr().out.splitlines()
    assert sorted(Path(p).name for p in written) == sorted(p.name for p in out.iterdir())
    assert main(["schema", "--check", "--out", str(out)]) == 0


def one_line(err: str) -> str:
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err.strip()


def test_schema_into_an_unwritable_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "schemas"
    assert main(["schema", "--out", str(out)]) == 1
    assert one_line(capsys.readouterr().err) == f"adw-agent: {out}: Not a directory"


def test_receive_on_a_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["receive", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert one_line(err) == f"adw-agent: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_cost_of_a_symlink(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "raw_output.jsonl"
    target.write_text("{}\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    assert main(["cost", str(link)]) == 1
    assert one_line(capsys.readouterr().err).startswith(f"adw-agent: {link}: ")


def test_requeueing_into_another_adws_store_is_a_config_error(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Store(tmp_path / "storage", "another", "normal").close()
    assert main(["dead-letters", "--all", "--config", str(config)]) == EX_CONFIG
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"adw-agent: config error: storage.dir: {tmp_path / 'storage'} holds")
