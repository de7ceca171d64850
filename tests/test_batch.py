"""Tests for agent.batch: how filesystem events become batches of changed files."""

from __future__ import annotations

import asyncio
from pathlib import Path

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


def test_a_batch_waits_for_writes_to_pause() -> None:
    async def scenario() -> None:
        b = batcher(0.2)
        b.note(STATE_PATH)
        assert b.changed.is_set()
        stop = asyncio.Event()
        settled = asyncio.create_task(b.settle(stop))
        await asyncio.sleep(0)
        assert not settled.done()
        await settled
        assert b.take() == {STATE}
        assert not b.pending
        assert not b.changed.is_set()

    asyncio.run(scenario())


def test_files_closed_by_their_writer_are_handed_out_at_once() -> None:
    async def scenario() -> None:
        b = batcher(3600.0)  # a window that would fail the test by its timeout
        b.note(STATE_PATH, closed=True)
        b.note(PLANNER, closed=True)
        await asyncio.wait_for(b.settle(asyncio.Event()), 10)
        assert b.take() == {STATE, FileKey.transcript("planner")}

    asyncio.run(scenario())


def test_a_write_after_the_close_waits_again_and_a_stop_ends_the_wait() -> None:
    async def scenario() -> None:
        b = batcher(3600.0)
        b.note(STATE_PATH, closed=True)
        b.note(STATE_PATH)  # written again: not complete any more
        stop = asyncio.Event()
        settled = asyncio.create_task(b.settle(stop))
        await asyncio.sleep(0.01)
        assert not settled.done()
        stop.set()
        b.interrupt()
        await asyncio.wait_for(settled, 10)

    asyncio.run(scenario())


def test_changes_put_back_wake_the_loop_only_when_asked() -> None:
    async def scenario() -> None:
        b = batcher(0.05)
        b.add({RESCAN}, wake=False)
        assert b.pending
        assert not b.changed.is_set()  # a failing store: waking now would only fail again
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
        await asyncio.wait_for(b.settle(asyncio.Event()), 10)
        assert b.take() == {STATE}

    asyncio.run(scenario())
