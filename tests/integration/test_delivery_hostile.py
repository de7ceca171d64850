"""Delivery against hostile and misconfigured backends, with the agent as a real process.

The backend is a real HTTP server on 127.0.0.1 that drips its answer a byte at a time, sends
``102 Processing`` without end, redirects, echoes the token back in encoded forms, lacks the
batch route, or keeps asking to come back in ten minutes while the operator reloads.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from agent.outbox import Store
from agent.outbox_queue import dead_letter_rows
from tests.harness import (
    ROOT,
    AdwWriter,
    AgentProcess,
    Backend,
    Reply,
    run_cli,
    write_config,
)

TOKEN = "hostile/test+token.0123456789abcdef"
ENV = {"ADW_AGENT_TOKEN": TOKEN}
STATE: dict[str, Any] = {"adw_id": "55b761f6", "issue_number": "9", "issue_class": "/chore"}

StartAgent = Callable[..., AgentProcess]


def cli(agent: AgentProcess, *args: str) -> tuple[int, str]:
    done = run_cli(*args, "--config", str(agent.config), env=ENV)
    assert "Traceback" not in done.stderr
    assert TOKEN not in done.stdout + done.stderr
    return done.returncode, done.stdout


def status(agent: AgentProcess) -> dict[str, Any]:
    code, out = cli(agent, "status", "--json")
    assert code == 0
    return dict(json.loads(out))


def first_then_fine(hostile: Reply) -> Callable[[dict[str, Any]], Reply]:
    """The first request gets the hostile answer; every later one a plain 200."""
    calls: list[int] = []

    def policy(event: dict[str, Any]) -> Reply:
        calls.append(1)
        return hostile if len(calls) == 1 else Reply()

    return policy


@pytest.mark.parametrize(
    "hostile",
    [
        # Every read gets a byte well within the timeout; the answer takes minutes.
        pytest.param(Reply(drip=0.5), id="headers-dripped"),
        pytest.param(Reply(body=b"x" * 400, drip=0.3), id="body-dripped"),
        pytest.param(Reply(processing=3600), id="endless-102-processing"),
    ],
)
def test_a_slow_backend_is_cut_at_backend_timeout_and_retried(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent, hostile: Reply
) -> None:
    backend.policy = first_then_fine(hostile)
    agent = start_agent(env=ENV, backend={"timeout": 2.0})
    writer.state(STATE)
    backend.wait_for(lambda evs: any(e["type"] == "workflow_update" for e in evs))
    timed_out = [
        e
        for e in agent.logs()
        if e["message"].startswith("delivery failed, will retry: timed out: the exchange")
    ]
    assert len(timed_out) == 1
    assert agent.stop() == 0


def test_a_redirect_keeps_the_events_and_is_reported_until_fixed(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    location = "https://alice:pa55word@new.example.com/api/v1/events?key=s3cret#x"
    moved = Reply(308, headers={"Location": location})
    backend.policy = lambda event: moved
    agent = start_agent(env=ENV)
    writer.state(STATE)
    backend.wait_requests(4)
    agent.wait_log(lambda e: "redirecting to" in e["message"])

    code, out = cli(agent, "healthcheck")
    assert code == 1
    assert "backend redirects to https://new.example.com/api/v1/events (308)" in out
    report = status(agent)
    assert report["dead_letters"] == 0
    assert report["outbox_depth"] >= 1
    assert report["sender"]["problem"].startswith("backend redirects to")
    _, text = cli(agent, "status")
    assert "backend redirects to https://new.example.com/api/v1/events" in text

    backend.policy = lambda event: Reply()  # the operator fixed it on the backend's side
    backend.wait_for(lambda evs: any(e["type"] == "workflow_update" for e in evs))
    deadline = time.monotonic() + 20
    while cli(agent, "healthcheck")[0] != 0:
        assert time.monotonic() < deadline, "healthcheck never recovered"
        backend.wait_requests(len(backend.requests) + 1)
    assert agent.stop() == 0

    errors = [e for e in agent.logs() if e["level"] == "error"]
    assert len(errors) == 1  # one error, however many retries
    assert "https://new.example.com/api/v1/events" in errors[0]["message"]
    log = agent.log.read_text()
    assert "pa55word" not in log
    assert "s3cret" not in log
    assert status(agent)["dead_letters"] == 0


@pytest.fixture
def backend_b() -> Iterator[Backend]:
    server = Backend()
    try:
        yield server
    finally:
        server.close()


def test_a_reload_to_a_new_backend_ends_a_retry_after_wait(
    backend: Backend,
    backend_b: Backend,
    writer: AdwWriter,
    run_dir: Path,
    start_agent: StartAgent,
) -> None:
    backend.policy = lambda event: Reply(503, headers={"Retry-After": "3600"})
    agent = start_agent(env=ENV)
    writer.state(STATE)
    backend.wait_requests(1)
    agent.wait_log(lambda e: e["message"].startswith("delivery failed, will retry"))
    write_config(agent.config, run_dir, agent.config.parent / "storage", backend_b.url)
    agent.signal(signal.SIGHUP)
    # The wait would have lasted 600 s (the cap on Retry-After); the new backend gets the
    # events long before this test's own 20 s limit.
    backend_b.wait_for(lambda evs: any(e["type"] == "workflow_update" for e in evs))
    assert agent.stop() == 0


def test_a_backend_without_the_batch_route_gets_one_event_per_request(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    backend.batch_status = 404
    agent = start_agent(env=ENV)
    writer.state(STATE)
    writer.phases([], "plan")
    writer.phases(["plan"], "build")
    backend.wait_for(lambda evs: len([e for e in evs if e["type"] == "phase_update"]) == 2)
    assert agent.stop() == 0
    batches = [r for r in backend.requests if r.batch]
    singles = [r for r in backend.requests if not r.batch]
    assert len({r.headers["Idempotency-Key"] for r in batches}) == 1  # asked once, remembered
    assert all(r.status == 404 for r in batches)
    assert all(r.path == f"/api/v1/event/{r.event['type']}" for r in singles)
    seqs = [e["seq"] for e in backend.events()]
    assert seqs == sorted(seqs)
    warnings = [e for e in agent.logs() if "takes no batches" in e["message"]]
    assert len(warnings) == 1
    assert status(agent)["dead_letters"] == 0


def test_an_echoed_token_is_redacted_in_every_form(
    backend: Backend, tmp_path: Path, writer: AdwWriter, start_agent: StartAgent
) -> None:
    escaped = json.dumps(TOKEN)[1:-1].replace("/", "\\/")
    percent = quote(TOKEN, safe="")
    unicode = "".join(f"\\u{ord(c):04x}" for c in TOKEN)
    filler = "." * (2000 - 200 - len(escaped) - len(percent) - len(unicode) - 12)
    # The excerpt kept is 2,000 bytes: the last echo is cut 12 characters into the token.
    echo = f'{{"sent": "{escaped}", "as": "{percent}", "or": "{unicode}"}}'
    body = (echo + filler).ljust(2000 - 12, ".") + TOKEN + " and more"
    assert body[2000 - 12 : 2000] == TOKEN[:12]
    backend.policy = lambda event: Reply(400, body=body.encode())
    agent = start_agent(env=ENV)
    writer.state(STATE)
    agent.wait_log(lambda e: e["message"].startswith("event dead-lettered"))
    agent.wait_log(lambda e: e["message"] == "agent started")
    assert agent.stop() == 0

    db = Store.inspect(tmp_path / "storage")
    try:
        rows = dead_letter_rows(db)
    finally:
        db.close()
    assert rows
    for row in rows:
        response = row["response"]
        assert response.endswith("<redacted>")
        for form in (TOKEN[:8], escaped[:8], percent[:8], unicode[:12]):
            assert form not in response
    log = agent.log.read_text()
    for form in (TOKEN[:12], escaped, percent, unicode, unicode.replace("\\", "\\\\")):
        assert form not in log


def test_adw_agent_receive_takes_batches(
    tmp_path: Path, writer: AdwWriter, start_agent: StartAgent
) -> None:
    out = tmp_path / "received.jsonl"
    receiver = subprocess.Popen(
        [sys.executable, "-m", "agent", "receive", "--port", "0", "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stderr is not None
        line = receiver.stderr.readline()
        url = line.split()[2]
        assert url.startswith("http://127.0.0.1:")
        agent = start_agent(url=url, env=ENV)
        writer.state(STATE)
        for done in ([], ["plan"], ["plan", "build"]):
            writer.phases(done, "ship")

        def received() -> list[dict[str, Any]]:
            if not out.exists():
                return []
            return [json.loads(x) for x in out.read_text().splitlines() if x.endswith("}")]

        deadline = time.monotonic() + 20
        while len([e for e in received() if e["type"] == "phase_update"]) < 3:
            assert time.monotonic() < deadline, f"received: {received()}"
            time.sleep(0.05)
        assert agent.stop() == 0
        events = received()
        assert len({e["event_id"] for e in events}) == len(events)  # each once
        assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
        assert not [e for e in agent.logs() if "takes no batches" in e["message"]]
        assert [e for e in agent.logs() if e["message"] == "events delivered"]
    finally:
        receiver.send_signal(signal.SIGINT)
        receiver.wait(10)
