"""systemd's notify protocol, end to end: the agent as a process, ``$NOTIFY_SOCKET`` a real
AF_UNIX datagram socket bound by the test, as systemd does for ``Type=notify``."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import AgentProcess, Backend, Reply

DEPTH = re.compile(r"^STATUS=.*outbox depth (\d+)")


class NotifySocket:
    """Collects every datagram the agent sends, one list of lines per datagram."""

    def __init__(self, path: Path) -> None:
        assert len(str(path)) < 108, "AF_UNIX paths are limited to 107 bytes"
        self.path = path
        self.messages: list[list[str]] = []
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                return
            with self._cond:
                self.messages.append(data.decode().split("\n"))
                self._cond.notify_all()

    def close(self) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def lines(self) -> list[str]:
        with self._cond:
            return [line for message in self.messages for line in message]

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 20.0) -> list[str]:
        """Block until ``predicate(all lines so far)`` holds; fail the test on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                lines = [line for message in self.messages for line in message]
                if predicate(lines):
                    return lines
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting; notify lines so far: {lines[-20:]}")
                self._cond.wait(left)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    try:
        yield sock
    finally:
        sock.close()


def after(lines: list[str], marker: str) -> list[str]:
    return lines[lines.index(marker) + 1 :] if marker in lines else []


def test_ready_watchdog_status_and_stopping(
    backend: Backend, notify: NotifySocket, start_agent: Callable[..., AgentProcess]
) -> None:
    backend.policy = lambda event: Reply(503)
    agent = start_agent(
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"},
        intervals={"heartbeat": 0.5},
    )

    # READY=1 comes once the first snapshot is queued: the backend is down, so it is waiting.
    lines = notify.wait_for(lambda ls: "READY=1" in ls)
    ready_status = lines[lines.index("READY=1") + 1]
    match = DEPTH.match(ready_status)
    assert match is not None, ready_status
    assert int(match.group(1)) >= 1

    # WATCHDOG=1 every WATCHDOG_USEC/2 while watcher and sender run, with the backlog.
    lines = notify.wait_for(lambda ls: after(ls, "READY=1").count("WATCHDOG=1") >= 3)
    failing = [ln for ln in lines if ln.startswith("STATUS=") and "delivery failing" in ln]
    assert failing, lines[-10:]
    assert "503" in failing[-1]

    # The backend recovers: the outbox drains and the status line says so.
    backend.policy = lambda event: Reply()
    notify.wait_for(lambda ls: any((m := DEPTH.match(ln)) and m.group(1) == "0" for ln in ls))
    pings = after(notify.lines(), "READY=1").count("WATCHDOG=1")
    notify.wait_for(lambda ls: after(ls, "READY=1").count("WATCHDOG=1") >= pings + 2)

    assert agent.stop() == 0
    lines = notify.wait_for(lambda ls: "STOPPING=1" in ls)
    assert lines.index("READY=1") < lines.index("STOPPING=1")
    assert "WATCHDOG=1" not in after(lines, "STOPPING=1")
    stopping = [ln for ln in after(lines, "STOPPING=1") if ln.startswith("STATUS=stopping")]
    assert stopping, after(lines, "STOPPING=1")


def test_no_watchdog_pings_for_another_process(
    backend: Backend, notify: NotifySocket, start_agent: Callable[..., AgentProcess]
) -> None:
    # WATCHDOG_PID names the process systemd watches; here it is not the agent.
    agent = start_agent(
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"},
        intervals={"heartbeat": 0.3},
    )
    notify.wait_for(lambda ls: "READY=1" in ls)
    # Three heartbeats span several watchdog periods (0.2 s).
    backend.wait_for(lambda evs: sum(e["type"] == "agent_status" for e in evs) >= 3)
    assert agent.stop() == 0
    lines = notify.wait_for(lambda ls: "STOPPING=1" in ls)
    assert "WATCHDOG=1" not in lines


def test_sighup_reports_reloading_then_ready(
    backend: Backend, notify: NotifySocket, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent(env={"NOTIFY_SOCKET": str(notify.path)})
    notify.wait_for(lambda ls: "READY=1" in ls)
    agent.signal(signal.SIGHUP)
    lines = notify.wait_for(lambda ls: "READY=1" in after(ls, "RELOADING=1"))
    reload = after(lines, "RELOADING=1")
    assert reload[0].startswith("MONOTONIC_USEC=")
    assert int(reload[0].removeprefix("MONOTONIC_USEC=")) > 0
    agent.wait_log(lambda e: e.get("message") == "configuration reloaded")
    assert agent.stop() == 0


def test_watchdog_keeps_being_fed_while_waiting_for_a_removed_run_directory(
    backend: Backend,
    notify: NotifySocket,
    run_dir: Path,
    start_agent: Callable[..., AgentProcess],
) -> None:
    # Waiting for the directory is the main loop doing its job, not a hang: systemd must not
    # kill the agent for it.
    agent = start_agent(
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"},
        # Far away: the watchdog tick itself must notice that the watcher has ended.
        watch={"rescan_interval": 3600.0},
    )
    notify.wait_for(lambda ls: "READY=1" in ls)
    shutil.rmtree(run_dir)
    agent.wait_log(lambda e: e.get("message") == "the run directory is gone; waiting for it")
    lines = notify.wait_for(
        lambda ls: any(ln.startswith("STATUS=waiting for the run directory") for ln in ls)
    )
    start = max(i for i, ln in enumerate(lines) if ln.startswith("STATUS=waiting"))
    notify.wait_for(lambda ls: ls[start:].count("WATCHDOG=1") >= 3)
    assert agent.running()
    assert not any("withholding the watchdog ping" in e.get("message", "") for e in agent.logs())
    assert agent.stop() == 0
