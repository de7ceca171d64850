"""Tests for agent.watch: inotify and polling notice writes; auto mode falls back to polling."""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from watchdog.observers.inotify import InotifyObserver

from agent.watch import Watcher, WatchMode

Make = Callable[..., Watcher]


class Seen:
    """Collects reported paths; ``wait(path)`` blocks until that path was reported."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, path: str) -> None:
        with self._cond:
            self.paths.append(path)
            self._cond.notify_all()

    def wait(self, path: Path, timeout: float = 10.0) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: str(path) in self.paths, timeout)
        assert ok, f"{path} was not reported; saw {self.paths}"


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def watch(tmp_path: Path, seen: Seen) -> Iterator[Make]:
    started: list[Watcher] = []

    def make(mode: WatchMode, poll_interval: float = 0.05) -> Watcher:
        watcher = Watcher(tmp_path, mode, poll_interval, seen)
        started.append(watcher)
        watcher.start()
        return watcher

    yield make
    for watcher in started:
        watcher.stop()


def test_inotify_notices_an_in_place_write(tmp_path: Path, seen: Seen, watch: Make) -> None:
    watcher = watch("inotify")
    assert watcher.active == "inotify"
    assert watcher.alive()
    state = tmp_path / "adw_state.json"
    with state.open("w") as f:
        f.write("{}")
    seen.wait(state)


def test_inotify_watches_new_subdirectories(tmp_path: Path, seen: Seen, watch: Make) -> None:
    watch("inotify")
    (tmp_path / "sdlc_planner").mkdir()
    seen.wait(tmp_path / "sdlc_planner")
    transcript = tmp_path / "sdlc_planner" / "raw_output.jsonl"
    transcript.write_text("{}\n")
    seen.wait(transcript)


def test_reads_do_not_wake_the_agent(tmp_path: Path, seen: Seen, watch: Make) -> None:
    state = tmp_path / "adw_state.json"
    state.write_text("{}")
    watch("inotify")
    state.read_text()  # open + close without writing, as the agent's own reads do
    marker = tmp_path / "error.log"
    marker.write_text("x")
    seen.wait(marker)  # inotify delivers in order: a report for the read would be here already
    assert str(state) not in seen.paths


def test_moves_report_both_paths(tmp_path: Path, seen: Seen, watch: Make) -> None:
    tmp = tmp_path / "adw_state.json.tmp"
    tmp.write_text("{}")
    watch("inotify")
    tmp.rename(tmp_path / "adw_state.json")
    seen.wait(tmp_path / "adw_state.json")
    assert str(tmp) in seen.paths


def test_polling_notices_a_write(tmp_path: Path, seen: Seen, watch: Make) -> None:
    watcher = watch("poll")
    assert watcher.active == "poll"
    state = tmp_path / "adw_state.json"
    state.write_text("{}")
    seen.wait(state)


def test_polling_does_not_follow_symbolic_links(tmp_path: Path, seen: Seen) -> None:
    run_dir = tmp_path / "run"
    outside = tmp_path / "outside"
    run_dir.mkdir()
    outside.mkdir()
    # Followed, the two loops make a snapshot that never ends (2^40 paths before ELOOP), and
    # the link to / is a walk of the whole filesystem on every poll.
    (run_dir / "loop").symlink_to(".")
    (run_dir / "loop2").symlink_to(".")
    (run_dir / "root").symlink_to("/")
    (run_dir / "elsewhere").symlink_to(outside)
    watcher = Watcher(run_dir, "poll", 0.05, seen)
    # watchdog takes the first snapshot in start(), on the caller's thread: run it on another
    # one so that an endless snapshot fails the test instead of hanging it.
    starter = threading.Thread(target=watcher.start, daemon=True)
    starter.start()
    starter.join(10)
    assert not starter.is_alive(), "the first snapshot never finished"
    try:
        (outside / "raw_output.jsonl").write_text("{}\n")
        state = run_dir / "adw_state.json"
        state.write_text("{}")
        seen.wait(state)
        assert watcher.alive()
    finally:
        # Off this thread: a poller stuck in an endless snapshot could never be joined.
        stopper = threading.Thread(target=watcher.stop, daemon=True)
        stopper.start()
        stopper.join(10)
    links = [str(run_dir / name) + "/" for name in ("loop", "loop2", "root", "elsewhere")]
    assert [p for p in seen.paths if p.startswith(tuple(links))] == []


def no_watches_left(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "inotify watch limit reached")


def test_auto_falls_back_to_polling_when_inotify_is_exhausted(
    tmp_path: Path,
    seen: Seen,
    watch: Make,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(InotifyObserver, "start", no_watches_left)
    with caplog.at_level(logging.WARNING, "adw_agent.watch"):
        watcher = watch("auto")
    assert watcher.active == "poll"
    [record] = caplog.records
    message = record.getMessage()
    assert "fs.inotify.max_user_watches" in message
    assert "sysctl" in message
    assert "falling back to polling" in message
    assert record.path == str(tmp_path)  # type: ignore[attr-defined]
    state = tmp_path / "adw_state.json"
    state.write_text("{}")
    seen.wait(state)


def test_inotify_mode_does_not_fall_back(
    watch: Make,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(InotifyObserver, "start", no_watches_left)
    with pytest.raises(OSError, match="watch limit"):
        watch("inotify")


def test_auto_does_not_hide_other_errors(
    watch: Make,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(InotifyObserver, "start", denied)
    with pytest.raises(PermissionError):
        watch("auto")


def test_stop(tmp_path: Path, seen: Seen) -> None:
    watcher = Watcher(tmp_path, "inotify", 1.0, seen)
    watcher.start()
    assert watcher.alive()
    watcher.stop()
    assert not watcher.alive()
    watcher.stop()  # idempotent
