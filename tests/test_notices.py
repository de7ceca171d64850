"""Warnings about files: once per problem until the file reads fine, and few per file."""

from __future__ import annotations

import logging

import pytest

from agent.notices import FileWarnings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING]


def test_once_per_problem_until_the_file_reads_fine(
    caplog: pytest.LogCaptureFixture, clock: Clock
) -> None:
    w = FileWarnings(logging.getLogger("adw_agent.test"), clock=clock)
    w.warn("state", "unreadable", "bad: %s", "x", path="/run/adw_state.json")
    w.warn("state", "unreadable", "bad: %s", "x", path="/run/adw_state.json")
    w.warn("state", "big", "too big", path="/run/adw_state.json")
    assert [r.getMessage() for r in warnings_of(caplog)] == ["bad: x", "too big"]
    assert warnings_of(caplog)[0].path == "/run/adw_state.json"  # type: ignore[attr-defined]


def test_a_rewrite_storm_gives_a_few_warnings_then_a_count(
    caplog: pytest.LogCaptureFixture, clock: Clock
) -> None:
    w = FileWarnings(logging.getLogger("adw_agent.test"), burst=3, window=60.0, clock=clock)
    for _ in range(50):  # bad, fine, bad, fine ... within 10 s
        w.warn("state", "unreadable", "ignoring unreadable file", path="/run/adw_state.json")
        w.ok("state")
        clock.now += 0.2
    assert len(warnings_of(caplog)) == 3
    # Another file is not held back by this one.
    w.warn("phases", "unreadable", "ignoring unreadable file", path="/run/completed_phases.json")
    assert len(warnings_of(caplog)) == 4
    clock.now += 60.0
    w.warn("state", "unreadable", "ignoring unreadable file", path="/run/adw_state.json")
    last = warnings_of(caplog)[-1]
    assert last.getMessage() == (
        "ignoring unreadable file (47 more warnings about this file held back)"
    )
    assert last.held_back == 47  # type: ignore[attr-defined]


def test_files_remembered_are_bounded(caplog: pytest.LogCaptureFixture, clock: Clock) -> None:
    w = FileWarnings(logging.getLogger("adw_agent.test"), limit=10, clock=clock)
    for i in range(100):
        w.warn(f"transcript:{i}", "unreadable", "bad", path=str(i))
    assert len(w._files) == 10
    assert w.problems("transcript:99") == {"unreadable"}
    assert w.problems("transcript:0") is None
