"""The hub on its own: a full queue drops that client and nobody else."""

from __future__ import annotations

import asyncio

from adw_backend.broadcast import Hub


def test_a_full_client_is_dropped_and_the_others_get_every_message() -> None:
    async def scenario() -> None:
        hub = Hub(bound=3)
        hub.loop = asyncio.get_running_loop()
        stalled, reading = hub.add(), hub.add()
        got: list[object] = []
        for n in range(10):
            hub.publish({"n": n})
            got.append(await reading.next())
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


def test_a_client_too_far_behind_in_bytes_is_dropped() -> None:
    async def scenario() -> None:
        hub = Hub(bound=1000, max_bytes=100)
        hub.loop = asyncio.get_running_loop()
        client = hub.add()
        hub.publish({"big": "x" * 500})  # one message always fits, however large
        assert client.pending_bytes > 100
        assert not client.dropped
        hub.publish({"n": 1})
        assert client.dropped
        assert hub.clients == 0

    asyncio.run(scenario())


def test_reading_frees_the_bytes() -> None:
    async def scenario() -> None:
        hub = Hub(bound=1000, max_bytes=100)
        hub.loop = asyncio.get_running_loop()
        client = hub.add()
        for n in range(50):
            hub.publish({"n": n})
            assert await client.next() == f'{{"n":{n}}}'
        assert client.pending_bytes == 0
        assert not client.dropped

    asyncio.run(scenario())
