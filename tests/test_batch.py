"""Tests for agent.batch: how filesystem events become batches of changed files."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from agent.batch import ChangeBatcher
from agent.layout import RESCAN, STATE, FileKey, RunLayout

RUN = Path("/srv/agents/55b761f6")
STATE_PATH = str(RUN / "adw_state.json")
PLANNER = str(RUN / "planner" / "raw_output.jsonl")


def batcher(quiet: float) -> ChangeBatcher:
    return ChangeBatcher(quiet=quiet, classify=RunLayout(RUN).classify)


def test_paths_that_are_not_ours_change_nothing() -> None:
    async def scenario() -> None:
        b = batcher(0.05)
        b.note(str(RUN / "planner" / "prompts" / "plan.txt"))
        b.note("/elsewhere/adw_state.json")
        assert not b.pending
        assert not b.changed.is_set()

    asyncio.run(scenario())


def test_a_batch_is_ready_once_writes_pause() -> None:
    async def scenario() -> None:
        b = batcher(0.2)
        b.note(STATE_PATH)
        assert b.changed.is_set()
        first = b.ready_at()
        assert first > time.monotonic() - 1  # a quiet window from the write, not "now"
        b.note(STATE_PATH)  # written again: the window starts again
        assert b.ready_at() >= first
        assert b.take() == {STATE}
        assert not b.pending

    asyncio.run(scenario())


def test_a_steady_stream_of_writes_is_still_batched_after_twenty_windows() -> None:
    async def scenario() -> None:
        b = batcher(0.05)
        b.note(STATE_PATH)
        start = b.ready_at() - 0.05
        b._last_change += 10.0  # writes kept coming for ten seconds
        assert b.ready_at() == pytest.approx(start + 0.05 * 20)

    asyncio.run(scenario())


def test_files_closed_by_their_writer_are_ready_at_once() -> None:
    async def scenario() -> None:
        b = batcher(3600.0)
        b.note(STATE_PATH, closed=True)
        b.note(PLANNER, closed=True)
        assert b.ready_at() == 0.0
        assert b.take() == {STATE, FileKey.transcript("planner")}

    asyncio.run(scenario())


def test_a_write_after_the_close_waits_again() -> None:
    async def scenario() -> None:
        b = batcher(3600.0)
        b.note(STATE_PATH, closed=True)
        b.note(STATE_PATH)  # written again: not complete any more
        assert b.ready_at() > time.monotonic() + 3000

    asyncio.run(scenario())


def test_changes_put_back_wake_the_loop_only_when_asked() -> None:
    async def scenario() -> None:
        b = batcher(0.05)
        b.add({RESCAN}, wake=False)
        assert b.pending
        assert not b.changed.is_set()  # a failing store: waking now would only fail again
        assert b.ready_at() == 0.0  # put back: no quiet window to wait for
        b.add({STATE}, wake=True)
        assert b.changed.is_set()
        assert b.take() == {RESCAN, STATE}

    asyncio.run(scenario())


def test_events_from_another_thread_reach_the_loop() -> None:
    async def scenario() -> None:
        b = batcher(0.0)
        b.bind(asyncio.get_running_loop())
        await asyncio.to_thread(b.notice, PLANNER, True)
        await asyncio.wait_for(b.changed.wait(), 10)
        assert b.take() == {FileKey.transcript("planner")}

    asyncio.run(scenario())


def test_no_quiet_window_means_no_wait() -> None:
    async def scenario() -> None:
        b = batcher(0.0)
        b.note(STATE_PATH)
        assert b.ready_at() == 0.0

    asyncio.run(scenario())
