"""Tests for agent.app run in-process: what the lifecycle does when its parts fail.

The agent runs for real on this test's event loop, against a real HTTP backend and a real run
directory. Where a part has to fail in a way that cannot be produced from outside (a sender
task that ends, inotify running out during a reload), that one part is replaced; everything
else is the agent's own. End-to-end lifecycle tests with the agent as a process are in
tests/integration/test_lifecycle_*.py.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from watchdog.observers.inotify import InotifyObserver

from agent import config as config_module
from agent import watch as watch_module
from agent.app import Agent
from agent.config import Config, load
from agent.deliver import Sender
from agent.notify import Notifier
from agent.watch import Watcher
from tests.harness import AdwWriter, Backend, write_config

ADW = "55b761f6"


class Records(logging.Handler):
    """Every record the agent logs, for waiting on and looking at."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def seen(self, predicate: Callable[[str], bool]) -> bool:
        return any(predicate(m) for m in self.messages())


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("adw_agent")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket as systemd binds for ``$NOTIFY_SOCKET``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def notify_lines(sock: socket.socket) -> list[str]:
    """Every line received so far (datagrams are queued by the kernel when sent)."""
    lines: list[str] = []
    while True:
        try:
            lines += sock.recv(65536).decode().split("\n")
        except BlockingIOError:
            return lines


def make_config(tmp_path: Path, run_dir: Path, url: str, **sections: Any) -> Config:
    path = write_config(tmp_path / "agent.toml", run_dir, tmp_path / "storage", url, **sections)
    return load(path, {})


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Let the agent run until ``predicate`` holds; fail with ``what`` if it never does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def started(agent: Agent, records: Records) -> asyncio.Task[int]:
    task = asyncio.create_task(agent.run())
    await until(
        lambda: task.done() or records.seen(lambda m: m == "agent started"), "the agent to start"
    )
    assert not task.done(), f"the agent exited with {task.result()}"
    return task


async def stopped(agent: Agent, task: asyncio.Task[int]) -> int:
    agent.should_exit.set()
    return await asyncio.wait_for(task, 30)


def test_a_sender_that_ends_stops_the_agent_with_exit_code_1(
    tmp_path: Path,
    run_dir: Path,
    backend: Backend,
    records: Records,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def ends(self: Sender) -> None:
        raise RuntimeError("the sender's loop ended")

    # Sender.run catches everything at its loop boundary; a task that ends anyway (a bug, a
    # BaseException) is what the agent must not survive silently.
    monkeypatch.setattr(Sender, "run", ends)
    agent = Agent(make_config(tmp_path, run_dir, backend.url))

    async def scenario() -> int:
        return await asyncio.wait_for(agent.run(), 30)  # never stopping is the failure

    assert asyncio.run(scenario()) == 1
    [error] = [r for r in records.records if r.getMessage().startswith("the sender stopped")]
    assert error.levelno == logging.ERROR
    assert error.exc_info is not None
    assert "the sender's loop ended" in str(error.exc_info[1])
    assert records.seen(lambda m: m == "shutting down")


def no_watches_left(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "inotify watch limit reached")


def test_a_reload_that_cannot_start_its_watcher_changes_nothing(
    tmp_path: Path,
    run_dir: Path,
    backend: Backend,
    writer: AdwWriter,
    records: Records,
    notify: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = Backend()
    watch = {"mode": "inotify", "poll_interval": 1.0, "rescan_interval": 3600.0}
    config = make_config(tmp_path, run_dir, backend.url, watch=watch)
    writer.state({"adw_id": ADW, "issue_number": "1", "issue_class": None})
    agent = Agent(config, Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")}))

    async def scenario() -> int:
        task = await started(agent, records)
        # A new backend and a new poll interval; starting the new watcher runs out of inotify.
        write_config(
            config.source,  # type: ignore[arg-type]
            run_dir,
            tmp_path / "storage",
            other.url,
            watch={**watch, "poll_interval": 2.0},
        )
        monkeypatch.setattr(InotifyObserver, "start", no_watches_left)
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: records.seen(lambda m: m.startswith("reload failed")), "the reload")
        # Still the running configuration, entirely: the old watcher notices the change, and
        # the old backend gets it.
        writer.state({"adw_id": ADW, "issue_number": "1", "issue_class": "/bug"})
        await asyncio.to_thread(
            backend.wait_for,
            lambda evs: any(e["data"].get("issue_class") == "/bug" for e in evs),
        )
        return await stopped(agent, task)

    try:
        assert asyncio.run(scenario()) == 0
    finally:
        other.close()
    [failed] = [m for m in records.messages() if m.startswith("reload failed")]
    assert "keeping the running configuration" in failed
    assert "watch.mode = 'inotify' but inotify failed" in failed
    assert not records.seen(lambda m: m == "configuration reloaded")
    assert other.requests == []
    assert agent.config.backend.url == backend.url
    lines = notify_lines(notify)
    assert "READY=1" in lines[lines.index("RELOADING=1") :]


def test_a_reload_that_fails_unexpectedly_still_ends_with_ready(
    tmp_path: Path,
    run_dir: Path,
    backend: Backend,
    records: Records,
    notify: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent = Agent(
        make_config(tmp_path, run_dir, backend.url),
        Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")}),
    )

    def broken(path: Path, environ: object = None) -> Config:
        raise RuntimeError("an error nobody foresaw")

    async def scenario() -> int:
        task = await started(agent, records)
        monkeypatch.setattr(config_module, "load", broken)
        os.kill(os.getpid(), signal.SIGHUP)
        await until(
            lambda: records.seen(lambda m: m.startswith("unexpected error in the main loop")),
            "the reload to fail",
        )
        return await stopped(agent, task)

    assert asyncio.run(scenario()) == 0
    lines = notify_lines(notify)
    reloading = lines.index("RELOADING=1")
    # systemd must not be left believing the agent is still reloading.
    assert "READY=1" in lines[reloading:]
    assert lines.index("STOPPING=1") > reloading


def test_stopping_the_watcher_leaves_the_event_loop_free(
    tmp_path: Path,
    run_dir: Path,
    backend: Backend,
    records: Records,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stops: list[bool] = []

    class NeedsTheLoop(Watcher):
        """Its stop() ends only once the event loop has run a callback: a stop() called on
        the loop's own thread can only time out."""

        loop: asyncio.AbstractEventLoop

        def stop(self, timeout: float = 2.0) -> None:
            super().stop(timeout)
            ran = threading.Event()
            self.loop.call_soon_threadsafe(ran.set)
            stops.append(ran.wait(10))

    monkeypatch.setattr(watch_module, "Watcher", NeedsTheLoop)
    agent = Agent(make_config(tmp_path, run_dir, backend.url, delivery={"drain_timeout": 30.0}))

    async def scenario() -> int:
        NeedsTheLoop.loop = asyncio.get_running_loop()
        task = await started(agent, records)
        return await stopped(agent, task)

    assert asyncio.run(scenario()) == 0
    assert stops == [True]
