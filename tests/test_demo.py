"""``adw-agent demo``: the backend, a simulated run and the agent, as a user runs it."""

from __future__ import annotations

import importlib.util
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import orjson
import pytest

from agent import demo
from tests.harness import ROOT


class DemoProcess:
    """``python -m agent demo`` with its output lines collected as they come."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "demo", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_line(self, prefix: str, timeout: float = 90.0) -> str:
        for line in self.lines:
            if line.startswith(prefix):
                return line
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                got = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if got is None:
                break
            self.lines.append(got)
            if got.startswith(prefix):
                return got
        raise AssertionError(f"no line starting with {prefix!r}; output so far: {self.lines}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def run_demo() -> Iterator[type[DemoProcess]]:
    started: list[DemoProcess] = []

    class Tracked(DemoProcess):
        def __init__(self, *args: str) -> None:
            super().__init__(*args)
            started.append(self)

    yield Tracked
    for p in started:
        p.stop()


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read()


def _port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def test_demo_prints_the_page_and_every_event_then_exits(run_demo: type[DemoProcess]) -> None:
    p = run_demo("--duration", "4")
    page = p.wait_line("live page: ")
    url = page.removeprefix("live page: ").rstrip("/")
    assert url.startswith("http://127.0.0.1:")
    p.wait_line("agent watching ")
    p.wait_line("#")
    summary = p.wait_line("demo finished: ")
    assert p.proc.wait(30) == 0
    events = [line for line in p.lines if line.startswith("#")]
    kinds = {line.split()[2] for line in events}
    assert {"workflow_update", "phase_update", "cost_update", "workflow_failed"} <= kinds
    assert any("branch_name" in line for line in events)
    assert "demo1234 is failed" in summary
    # The backend child went away with the demo.
    assert not _port_open(url)


def test_demo_lingers_with_the_live_page_and_the_stored_workflow(
    run_demo: type[DemoProcess],
) -> None:
    p = run_demo("--duration", "4", "--linger", "120")
    url = p.wait_line("live page: ").removeprefix("live page: ").rstrip("/")
    p.wait_line("demo finished: ")
    p.wait_line("the live page stays up for 120 s")
    assert p.proc.poll() is None

    status, body = _get(url + "/")
    assert status == 200
    assert b"<title>ADW workflows</title>" in body
    status, body = _get(url + "/api/v1/workflows/demo1234")
    assert status == 200
    workflow = orjson.loads(body)
    assert workflow["status"] == "failed"
    assert workflow["state"]["branch_name"] == "feature-issue-42-adw-demo1234-dark-mode"
    assert workflow["cost"]["current_cost"] > 0
    assert "Plan" in workflow["completed_phases"]

    # Ctrl-C ends the linger cleanly and takes the backend down with the demo.
    p.proc.send_signal(signal.SIGINT)
    assert p.proc.wait(30) == 0
    assert not _port_open(url)


def test_demo_without_the_backend_extra_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "sqlalchemy" else real(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert demo.run(duration=1.0) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "demo: the demo runs the backend, which needs sqlalchemy: pip install 'adw-agent[backend]'"
    )
    assert "Traceback" not in err
