"""Bad input: every case gives a clear warning naming the path, no crash, bounded memory (peak
RSS from /proc/<pid>/status VmHWM), no event carrying garbage, and the agent keeps serving the
other files (a later valid change still arrives).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.faults import (
    _valid,
    attempt_cost,
    last_of,
    peak_rss_mb,
    reap_agents,  # noqa: F401  (autouse fixture)
    start_agent,
)
from tests.harness import AdwWriter, AgentProcess, Backend, fixture_lines, write_config

RSS_LIMIT_MB = 150.0
MARKER = "GARBAGE-7f1e"
PLANNER = "tac7iso_raw_output_55b761f6_sdlc_planner_cli2022.jsonl"
#: A later change that must still arrive: the agent kept serving the other files.
NEXT_STATE = {"adw_id": "55b761f6", "issue_number": "1", "issue_class": "/chore"}

SETTINGS: dict[str, dict[str, Any]] = {
    "watch": {"parse_retries": 3, "parse_retry_ms": 20, "rescan_interval": 0.5},
    "log": {"level": "info"},
}


@dataclass
class Env:
    writer: AdwWriter
    agent: AgentProcess
    backend: Backend
    outside: Path  # a directory outside the run directory

    @property
    def run_dir(self) -> Path:
        return self.writer.run_dir


@pytest.fixture
def env(tmp_path: Path, backend: Backend) -> Iterator[Env]:
    run_dir = tmp_path / "repo" / "agents" / "55b761f6"
    writer = AdwWriter(run_dir)
    outside = tmp_path / "outside"
    outside.mkdir()
    config = write_config(
        tmp_path / "agent.toml", run_dir, tmp_path / "storage", backend.url, **SETTINGS
    )
    agent = AgentProcess(config, tmp_path / "agent.log")
    yield Env(writer, agent, backend, outside)
    if agent.running():
        agent.kill9()


def _warned(agent: AgentProcess, path: Path, text: str) -> dict[str, Any]:
    """The warning about ``path`` (as a field or in the message) that contains ``text``."""

    def match(entry: dict[str, Any]) -> bool:
        names_path = entry.get("path") == str(path) or str(path) in entry.get("message", "")
        return (
            entry.get("level") in ("warning", "error")
            and names_path
            and text in entry.get("message", "")
        )

    return agent.wait_log(match, timeout=20)


def _state_is(expected: dict[str, Any]) -> Callable[[list[dict[str, Any]]], bool]:
    def check(events: list[dict[str, Any]]) -> bool:
        last = last_of(events, "workflow_update")
        return (
            last is not None
            and {k: v for k, v in last["data"].items() if k != "changed"} == expected
        )

    return check


def _cost_is(cost: float, final: bool | None = None) -> Callable[[list[dict[str, Any]]], bool]:
    def check(events: list[dict[str, Any]]) -> bool:
        last = last_of(events, "cost_update")
        return (
            last is not None
            and abs(last["data"]["current_cost"] - cost) < 1e-9
            and (final is None or last["data"]["final"] is final)
        )

    return check


def _finish(e: Env, case: str) -> float:
    """A later valid change arrives, memory stayed bounded, nothing carried garbage."""
    e.writer.state(NEXT_STATE)
    e.backend.wait_for(_state_is(NEXT_STATE))
    assert e.agent.running()
    assert e.agent.proc is not None
    rss = peak_rss_mb(e.agent.proc.pid)
    print(f"\nbad input {case}: peak RSS {rss:.1f} MB")
    assert rss < RSS_LIMIT_MB
    with e.backend._cond:
        requests = list(e.backend.requests)
    for r in requests:
        assert _valid(r.event) is None, r.event
        assert MARKER not in json.dumps(r.event)
    for entry in e.agent.logs():
        assert "Traceback" not in json.dumps(entry), entry
    assert e.agent.stop() == 0
    return rss


def _start(e: Env) -> None:
    e.writer.state({"adw_id": "55b761f6", "issue_number": "1", "issue_class": "/feature"})
    start_agent(e.agent)
    e.backend.wait_for(lambda evs: any(ev["type"] == "workflow_update" for ev in evs))


# -- adw_state.json ----------------------------------------------------------------------------

STATE_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "state invalid JSON": (
        lambda p: p.write_bytes(b'{"adw_id": "55b761f6", "issue_class": "' + MARKER.encode()),
        "not valid JSON",
    ),
    "state wrong types": (
        lambda p: p.write_text(
            json.dumps({"adw_id": [MARKER], "issue_number": {"n": 1}, "backend_port": MARKER})
        ),
        "field",
    ),
    "state 50 MB": (
        lambda p: p.write_text(json.dumps({"adw_id": "55b761f6", "nl_input": MARKER * 5_000_000})),
        "over the",
    ),
    "state binary": (
        lambda p: p.write_bytes(os.urandom(256 * 1024) + MARKER.encode()),
        "not valid JSON",
    ),
}


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_bad_state_file(env: Env, case: str) -> None:
    write, reason = STATE_CASES[case]
    _start(env)
    path = env.run_dir / "adw_state.json"
    write(path)
    _warned(env.agent, path, reason)
    _finish(env, case)


def test_state_file_symlink_out_of_the_run_dir_is_not_followed(env: Env) -> None:
    _start(env)
    secret = env.outside / "secret.json"
    secret.write_text(json.dumps({"adw_id": "55b761f6", "issue_class": MARKER}))
    path = env.run_dir / "adw_state.json"
    path.unlink()
    path.symlink_to(secret)
    _warned(env.agent, path, "symlink")
    path.unlink()
    _finish(env, "state symlink")


# -- agent directories and transcripts ---------------------------------------------------------


def _outside_transcript(e: Env, name: str) -> Path:
    """A transcript outside the run directory, costing a distinctive amount."""
    folder = e.outside / name
    folder.mkdir()
    (folder / "raw_output.jsonl").write_bytes(
        b"".join(fixture_lines("pricehawk_v2.0.55_builder_opus45_32turns.jsonl"))
    )
    return folder


def test_agent_dir_symlink_out_of_the_run_dir_is_not_followed(env: Env) -> None:
    _start(env)
    env.writer.append("sdlc_planner", *fixture_lines(PLANNER))
    planner = attempt_cost(fixture_lines(PLANNER))
    env.backend.wait_for(_cost_is(planner))
    link = env.run_dir / "evil"
    link.symlink_to(_outside_transcript(env, "evil"), target_is_directory=True)
    _warned(env.agent, link, "symlink")
    _finish(env, "agent dir symlink")
    # The Opus transcript outside ($1.40) was never counted.
    env.backend.wait_for(_cost_is(planner))
    assert all(
        abs(ev["data"]["current_cost"] - planner) < 1e-9
        for ev in env.backend.events("cost_update")
        if ev["seq"] > 0 and ev["data"]["current_cost"] > 0
    )


def test_agent_dir_replaced_by_a_symlink_is_not_followed(env: Env) -> None:
    """A directory the agent already follows is swapped for a symlink to elsewhere."""
    _start(env)
    env.writer.append("sdlc_planner", *fixture_lines(PLANNER))
    planner = attempt_cost(fixture_lines(PLANNER))
    env.backend.wait_for(_cost_is(planner))
    shutil.rmtree(env.run_dir / "sdlc_planner")
    (env.run_dir / "sdlc_planner").symlink_to(
        _outside_transcript(env, "elsewhere"), target_is_directory=True
    )
    _warned(env.agent, env.run_dir / "sdlc_planner", "symlink")
    _finish(env, "agent dir swapped for a symlink")
    costs = [ev["data"]["current_cost"] for ev in env.backend.events("cost_update")]
    assert max(costs) < planner + 1e-9, costs


def test_transcript_symlink_is_not_followed(env: Env) -> None:
    _start(env)
    (env.run_dir / "tester").mkdir()
    link = env.run_dir / "tester" / "raw_output.jsonl"
    link.symlink_to(_outside_transcript(env, "t") / "raw_output.jsonl")
    _warned(env.agent, link, "symlink")
    _finish(env, "transcript symlink")
    assert all(ev["data"]["current_cost"] == 0 for ev in env.backend.events("cost_update"))


def _corrupt_planner(kind: str) -> list[bytes]:
    lines = fixture_lines(PLANNER)
    i = next(n for n, raw in enumerate(lines) if b'"usage"' in raw and b'"assistant"' in raw)
    if kind == "invalid UTF-8":
        lines[i] = lines[i].replace(b'"text":"', b'"text":"\xff\xfe\xc3(', 1)
        assert b"\xff" in lines[i]
    elif kind == "NUL bytes":
        lines[i] = b"\x00" * 4096 + lines[i].replace(b'"type"', b'"ty\x00pe"', 1)
    elif kind == "20 MB line":
        huge = (
            b'{"type":"assistant","message":{"id":"msg_huge","model":"claude-sonnet-4-5",'
            b'"usage":{"input_tokens":1},"content":[{"type":"text","text":"'
            + MARKER.encode() * (20 * 1024 * 1024 // len(MARKER))
            + b'"}]}}\n'
        )
        lines.insert(i, huge)
    return lines


@pytest.mark.parametrize("kind", ["invalid UTF-8", "NUL bytes", "20 MB line"])
def test_corrupt_transcript_lines_are_skipped(env: Env, kind: str) -> None:
    _start(env)
    lines = _corrupt_planner(kind)
    env.writer.append("sdlc_planner", *lines)
    path = env.run_dir / "sdlc_planner" / "raw_output.jsonl"
    _warned(env.agent, path, "skipping")
    # The result line covers the lost line: the cost is exactly the CLI's figure.
    env.backend.wait_for(_cost_is(attempt_cost(fixture_lines(PLANNER)), final=True))
    _finish(env, f"transcript {kind}")


@pytest.mark.parametrize(
    ("kind", "value"), [("negative", -5.0), ("string", "0.2192615"), ("missing", None)]
)
def test_result_with_untrusted_cost_keeps_the_estimate(env: Env, kind: str, value: Any) -> None:
    _start(env)
    lines = fixture_lines(PLANNER)
    result = json.loads(lines[-1])
    assert result["type"] == "result"
    if value is None:
        del result["total_cost_usd"]
    else:
        result["total_cost_usd"] = value
    lines[-1] = json.dumps(result).encode() + b"\n"
    env.writer.append("sdlc_planner", *lines)
    path = env.run_dir / "sdlc_planner" / "raw_output.jsonl"
    _warned(env.agent, path, "total_cost_usd")
    _finish(env, f"result total_cost_usd {kind}")
    last = last_of(env.backend.events(), "cost_update")
    assert last is not None
    cost = last["data"]["current_cost"]
    # The estimate from the assistant lines: positive, not the untrusted figure, not final.
    assert 0 < cost < 10
    assert last["data"]["final"] is False


# -- the run directory itself ------------------------------------------------------------------


def test_run_dir_deleted_and_recreated_is_watched_again(env: Env) -> None:
    _start(env)
    shutil.rmtree(env.run_dir)
    env.agent.wait_log(lambda e: "run directory is gone" in e.get("message", ""))
    env.run_dir.mkdir()
    env.agent.wait_log(lambda e: "watching the run directory again" in e.get("message", ""))
    again = {"adw_id": "55b761f6", "issue_number": "1", "issue_class": "/bug"}
    env.writer.state(again)
    env.backend.wait_for(_state_is(again))
    # Deleted and recreated at once, between two rescans (its inode number may be reused).
    count = sum(
        "watching the run directory again" in e.get("message", "") for e in env.agent.logs()
    )
    shutil.rmtree(env.run_dir)
    env.run_dir.mkdir()
    env.agent.wait_log(
        lambda e: (
            "watching the run directory again" in e.get("message", "")
            and sum(
                "watching the run directory again" in x.get("message", "") for x in env.agent.logs()
            )
            > count
        )
    )
    _finish(env, "run dir deleted and recreated")


# -- unreadable files: permissions do not apply to root, so the agent runs as nobody ----------


def _nobody() -> tuple[int, int]:
    import pwd  # noqa: PLC0415

    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _can_drop_privileges() -> str | None:
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    probe = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "true"],
        capture_output=True,
        check=False,
    )
    return None if probe.returncode == 0 else f"setpriv cannot drop to nobody: {probe.stderr!r}"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the agent as another user")
def test_unreadable_files_warn_and_recover(backend: Backend) -> None:
    missing = _can_drop_privileges()
    if missing:
        pytest.skip(missing)
    uid, gid = _nobody()
    # pytest's tmp_path is private to root: use a directory the nobody user can enter.
    top = Path(tempfile.mkdtemp(prefix="adw-unreadable-"))
    try:
        top.chmod(0o755)
        run_dir = top / "agents" / "55b761f6"
        writer = AdwWriter(run_dir)
        storage = top / "storage"
        storage.mkdir()
        os.chown(storage, uid, gid)
        config = write_config(top / "agent.toml", run_dir, storage, backend.url, **SETTINGS)
        agent = AgentProcess(
            config,
            top / "agent.log",
            prefix=["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"],
        )
        e = Env(writer, agent, backend, top)
        _start(e)
        state = run_dir / "adw_state.json"
        state.chmod(0)
        writer.state({"adw_id": "55b761f6", "issue_number": "1", "issue_class": "/patch"})
        _warned(agent, state, "ermission denied")
        writer.append("sdlc_planner", *fixture_lines(PLANNER))
        transcript = run_dir / "sdlc_planner" / "raw_output.jsonl"
        transcript.chmod(0)
        writer.append("sdlc_planner", b"\n")
        _warned(agent, transcript, "ermission denied")
        # Readable again: both are picked up.
        state.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
        transcript.chmod(0o644)
        writer.append("sdlc_planner", b"\n")
        backend.wait_for(_cost_is(attempt_cost(fixture_lines(PLANNER)), final=True))
        _finish(e, "unreadable files (chmod 000, agent as nobody)")
    finally:
        if "agent" in locals() and agent.running():
            agent.kill9()
        shutil.rmtree(top, ignore_errors=True)
