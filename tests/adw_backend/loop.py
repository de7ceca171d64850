"""A small server of a test run on its own event loop in a thread, as a context manager.

A subclass writes ``_run``: it starts listening, sets ``_started`` once its address is known,
then awaits ``_stopped()`` and cleans up.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Self

WAIT = 30.0


class LoopServer:
    def __init__(self) -> None:
        self._started = threading.Event()
        self._loop = asyncio.new_event_loop()
        # Made here, not in the loop, so that leaving the block never finds it missing.
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),))

    async def _run(self) -> None:
        raise NotImplementedError

    async def _stopped(self) -> None:
        await self._stop.wait()

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._started.wait(WAIT)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT)
        self._loop.close()
