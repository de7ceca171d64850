"""The hub on its own: a full queue drops that client and nobody else."""

from __future__ import annotations

import asyncio

from adw_backend.broadcast import Hub


def test_a_full_client_is_dropped_and_the_others_get_every_message() -> None:
    async def scenario() -> None:
        hub = Hub(bound=3)
        hub.loop = asyncio.get_running_loop()
        stalled, reading = hub.add(), hub.add()
        got: list[str | None] = []
        for n in range(10):
            hub.publish({"n": n})
            got.append(reading.queue.get_nowait())
        assert got == [f'{{"n":{n}}}' for n in range(10)]
        assert stalled.dropped
        assert stalled.queue.get_nowait() is None  # the sender's stop marker
        assert hub.clients == 1
        assert hub.dropped_total == 1

    asyncio.run(scenario())


def test_publish_from_another_thread() -> None:
    async def scenario() -> None:
        hub = Hub(bound=8)
        hub.loop = asyncio.get_running_loop()
        client = hub.add()
        await asyncio.to_thread(hub.publish_threadsafe, {"from": "listener"})
        assert await asyncio.wait_for(client.queue.get(), 10) == '{"from":"listener"}'

    asyncio.run(scenario())
