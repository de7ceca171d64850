"""Security: no token over plain http to another host, TLS verified (with an optional CA
bundle), the run directory is read-only to the agent and never a source of code, and the token
never shows up in logs, CLI output, error messages, exceptions or the store."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import ssl
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

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
from tests.harness import (
    AdwWriter,
    AgentProcess,
    Backend,
    Reply,
    fixture_lines,
    run_cli,
    write_config,
)

TOKEN = "adw-SECRET-9c41e7b2d06f"  # a distinctive value to grep for


# -- plain http --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_token_over_plain_http_to_another_host_is_a_config_error(
    tmp_path: Path, command: str
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = write_config(
        tmp_path / "agent.toml", run_dir, tmp_path / "storage", "http://backend.example:8000"
    )
    done = run_cli(command, "--config", str(config), env={"ADW_AGENT_TOKEN": TOKEN})
    assert done.returncode == 78, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "backend.url" in lines[0]
    assert str(config) in lines[0]
    assert "allow_insecure" in lines[0]
    assert TOKEN not in done.stdout + done.stderr

    allowed = write_config(
        tmp_path / "insecure.toml",
        run_dir,
        tmp_path / "storage",
        "http://backend.example:8000",
        backend={"allow_insecure": True},
    )
    done = run_cli("check-config", "--config", str(allowed), env={"ADW_AGENT_TOKEN": TOKEN})
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout + done.stderr


@pytest.mark.parametrize("token", ["tök-SECRET-1", "SECRET-2\n-tail", "SECRET 3", 'SECRET"4'])
def test_a_token_that_cannot_be_a_header_is_a_config_error(tmp_path: Path, token: str) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = write_config(tmp_path / "a.toml", run_dir, tmp_path / "storage", "http://127.0.0.1:9")
    for command in ("run", "check-config", "status"):
        done = run_cli(command, "--config", str(config), env={"ADW_AGENT_TOKEN": token})
        out = done.stdout + done.stderr
        assert done.returncode == 78, out
        assert "ADW_AGENT_TOKEN" in out
        assert "Traceback" not in out
        assert "SECRET" not in out


# -- TLS -------------------------------------------------------------------------------------


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it (openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command-line tool is not installed")
    ca_key, ca, key, csr, cert = (
        folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    commands = [
        "req -x509 -newkey rsa:2048 -nodes -keyout {ca_key} -out {ca} -days 2 -subj /CN=test-ca",
        "req -newkey rsa:2048 -nodes -keyout {key} -out {csr} -subj /CN=127.0.0.1",
        "x509 -req -in {csr} -CA {ca} -CAkey {ca_key} -CAcreateserial -out {cert} -days 2 "
        "-extfile {ext}",
    ]
    names = {"ca_key": ca_key, "ca": ca, "key": key, "csr": csr, "cert": cert, "ext": ext}
    for command in commands:
        args = [part.format(**names) for part in command.split()]
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    return ca, cert, key


def _attempts(storage: Path) -> int:
    with store_db(storage) as db:
        return int(db.execute("SELECT COALESCE(MAX(attempts), 0) FROM outbox").fetchone()[0])


def test_tls_is_verified_and_a_ca_bundle_makes_it_work(tmp_path: Path) -> None:
    ca, cert, key = _certificates(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    backend = Backend(ssl_context=context)
    try:
        backend.policy = lambda event: Reply(commit=True)
        run_dir = tmp_path / "repo" / "agents" / "0badc0de"
        writer = AdwWriter(run_dir)
        writer.state({"adw_id": "0badc0de", "issue_number": "7", "issue_class": "/bug"})
        storage = tmp_path / "storage"
        settings: dict[str, Any] = {
            "delivery": {"backoff_initial": 0.05, "backoff_max": 0.3},
            "log": {"level": "info"},
        }
        config = write_config(tmp_path / "agent.toml", run_dir, storage, backend.url, **settings)
        agent = AgentProcess(config, tmp_path / "agent.log", env={"ADW_AGENT_TOKEN": TOKEN})
        start_agent(agent)
        # Without the CA the certificate is not trusted: nothing is sent, everything is kept.
        agent.wait_log(
            lambda e: (
                "delivery failed" in e.get("message", "") and "ConnectError" in e.get("message", "")
            )
        )
        wait_until(lambda: _attempts(storage) >= 2, "the agent to retry")
        assert backend.requests == []
        assert store_counts(storage)[0] >= 1
        assert store_counts(storage)[1] == 0
        assert agent.stop() == 0

        trusted = write_config(
            tmp_path / "agent.toml",
            run_dir,
            storage,
            backend.url,
            backend={"ca_bundle": str(ca)},
            **settings,
        )
        agent = AgentProcess(trusted, tmp_path / "agent.log", env={"ADW_AGENT_TOKEN": TOKEN})
        start_agent(agent)
        backend.wait_for(
            lambda evs: any(
                e["type"] == "workflow_update" and e["data"]["issue_class"] == "/bug" for e in evs
            )
        )
        wait_until(drained(storage), "the outbox to drain over TLS")
        assert agent.stop() == 0
        assert all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in backend.requests)
        assert TOKEN not in agent.log.read_text()
    finally:
        backend.close()


# -- the run directory is read-only and inert -------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[str, int, str]]:
    """Relative path -> (kind, mode, content hash or link target), symlinks not followed."""
    out: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), "")
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(st.st_mode), digest)
    return out


def _plant(run_dir: Path, marker: Path, outside: Path) -> None:
    """Things that would run, or lead outside, if the agent ever executed or followed them."""
    script = f"#!/bin/sh\ntouch {marker}\n"
    for name in ("run.sh", "hooks/post-update", ".envrc"):
        path = run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        path.chmod(0o755)
    (run_dir / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (run_dir / "usercustomize.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    # A costly transcript outside: read through the link, it would change the final cost.
    (outside / "raw_output.jsonl").write_bytes(
        b"".join(fixture_lines("pricehawk_v2.0.55_builder_opus45_32turns.jsonl"))
    )
    (run_dir / "elsewhere").symlink_to(outside, target_is_directory=True)


def test_the_run_dir_is_never_written_followed_out_of_or_executed(
    tmp_path: Path, backend: Backend
) -> None:
    backend.policy = lambda event: Reply(commit=True)
    run_dir = tmp_path / "repo" / "agents" / "c0ffee11"
    replay = tmp_path / "replay" / "agents" / "c0ffee11"
    outside = tmp_path / "outside"
    outside.mkdir()
    marker = tmp_path / "EXECUTED"
    storage = tmp_path / "storage"
    writer = AdwWriter(run_dir)
    _plant(run_dir, marker, outside)
    config = write_config(
        tmp_path / "agent.toml",
        run_dir,
        storage,
        backend.url,
        watch={"rescan_interval": 0.5},
        log={"level": "info"},
    )
    agent = AgentProcess(config, tmp_path / "agent.log", env={"ADW_AGENT_TOKEN": TOKEN})
    start_agent(agent)
    sim = RunSimulator(
        writer,
        random.Random(3),
        run_dir.name,
        before_truncate=lambda name, path: wait_consumed(storage, name, path),
    )
    expected = sim.run()
    await_guarantee(backend, expected)
    wait_until(drained(storage), "the outbox to drain")
    assert agent.stop() == 0
    # The final cost is the run's alone: nothing was read through the link.
    check_guarantee(backend, expected, storage).assert_ok()

    # The same run written without an agent watching: the trees are identical.
    AdwWriter(replay)
    _plant(replay, marker, outside)
    RunSimulator(AdwWriter(replay), random.Random(3), run_dir.name).run()
    assert _tree(run_dir) == _tree(replay)
    assert not marker.exists()


# -- the token never shows ---------------------------------------------------------------------


def test_the_token_never_appears_in_logs_output_errors_or_the_store(
    tmp_path: Path, backend: Backend
) -> None:
    # A careless backend that echoes the credentials in its error bodies.
    echo = json.dumps({"detail": f"bad request for Authorization: Bearer {TOKEN}"}).encode()

    refused: list[str] = []

    def policy(event: dict[str, Any]) -> Reply:
        if event["type"] == "workflow_update":
            return Reply(400, body=echo)  # dead-lettered, with the body kept
        if event["type"] == "phase_update" and not refused:
            refused.append(event["event_id"])  # once: then the credentials are taken
            return Reply(401, body=echo)
        return Reply(commit=True)

    backend.policy = policy
    run_dir = tmp_path / "repo" / "agents" / "5ec2e7ed"
    writer = AdwWriter(run_dir)
    storage = tmp_path / "storage"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    config = write_config(
        tmp_path / "agent.toml",
        run_dir,
        storage,
        backend.url,
        backend={"token_file": str(token_file)},
        log={"level": "debug"},
    )
    agent = AgentProcess(config, tmp_path / "agent.log")
    writer.phases([], "plan")
    start_agent(agent)
    writer.state({"adw_id": "5ec2e7ed", "issue_number": "1", "issue_class": "/feature"})
    wait_until(lambda: store_counts(storage)[1] >= 1, "a dead letter")
    wait_until(drained(storage), "the outbox to drain")
    agent.signal(1)  # SIGHUP: a reload logs the configuration again
    agent.wait_log(lambda e: "reloaded" in e.get("message", ""))
    outputs = {"agent log": agent.log.read_text()}
    assert agent.stop() == 0
    outputs["agent log"] = agent.log.read_text()
    for args in (
        ["status"],
        ["status", "--json"],
        ["check-config"],
        ["healthcheck"],
        ["dead-letters"],
        ["dead-letters", "--json"],
    ):
        done = run_cli(*args, "--config", str(config))
        outputs[" ".join(args)] = done.stdout + done.stderr
    # Error messages: a config error while the token is set, and an unreachable token file.
    bad = write_config(
        tmp_path / "bad.toml",
        run_dir,
        storage,
        "http://backend.example",
        backend={"token_file": str(token_file)},
    )
    outputs["config error"] = run_cli("run", "--config", str(bad)).stderr
    for name, text in outputs.items():
        assert TOKEN not in text, f"the token leaked into {name}"
    assert "dead-lettered" in outputs["agent log"]
    assert "<redacted>" in outputs["check-config"]
    for path in storage.iterdir():
        assert TOKEN.encode() not in path.read_bytes(), f"the token is stored in {path.name}"
    assert all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in backend.requests)
