"""The hub on its own: a full queue drops that client and nobody else; a resynchronisation
queues a marker per client and reads one snapshot for all of them."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, cast

import orjson
import pytest

from adw_backend.broadcast import Hub, PgListener, Resync
from adw_backend.errors import DatabaseUnavailable
from adw_backend.store import Applied, Store
from tests.adw_backend.conftest import PgCluster


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


def test_a_resync_queues_one_marker_per_client_then_reads_the_snapshot_once() -> None:
    async def scenario() -> None:
        hub = Hub(bound=8)
        hub.loop = asyncio.get_running_loop()
        clients = [hub.add(), hub.add()]
        hub.publish({"n": 1})
        queued_at_read: list[int] = []
        was_read = asyncio.Event()

        async def read() -> str:
            # The read starts only once every marker is queued behind what came before.
            queued_at_read.extend(c.queue.qsize() for c in clients)
            was_read.set()
            return '{"type":"workflows_snapshot"}'

        hub.resync(read)
        hub.publish({"n": 2})
        await asyncio.wait_for(was_read.wait(), 10)
        for client in clients:
            assert await client.next() == '{"n":1}'
            marker = await client.next()
            assert isinstance(marker, Resync)
            assert await marker.snapshot == '{"type":"workflows_snapshot"}'
            assert await client.next() == '{"n":2}'
        assert queued_at_read == [3, 3]  # per client: 1, the marker, and 2 queued at once
        assert hub.resyncs_total == 1

    asyncio.run(scenario())


def test_a_failed_resync_read_reaches_every_client_and_nothing_else() -> None:
    async def scenario() -> None:
        hub = Hub(bound=8)
        hub.loop = asyncio.get_running_loop()
        client = hub.add()

        async def read() -> str:
            raise DatabaseUnavailable("database unavailable")

        hub.resync(read)
        marker = await client.next()
        assert isinstance(marker, Resync)
        with pytest.raises(DatabaseUnavailable):
            await marker.snapshot

    asyncio.run(scenario())


def test_a_resync_without_clients_reads_nothing_and_a_full_queue_drops_its_client() -> None:
    async def scenario() -> None:
        hub = Hub(bound=1)
        hub.loop = asyncio.get_running_loop()
        reads: list[None] = []

        async def read() -> str:
            reads.append(None)
            return "{}"

        hub.resync(read)
        assert hub.resyncs_total == 0
        full = hub.add()
        hub.publish({"n": 1})
        hub.resync(read)
        assert full.dropped
        assert hub.clients == 0

    asyncio.run(scenario())


class _UnreachableStore:
    origin = "this-replica"

    def event_messages(self, event_ids: list[str]) -> list[Applied]:
        raise DatabaseUnavailable("database unavailable")


def test_events_the_listener_cannot_load_make_it_start_again() -> None:
    """Rather than drop them: starting again resynchronises the clients once it listens."""
    listener = PgListener(
        "", "adw_events", cast(Store, _UnreachableStore()), lambda _m: None, lambda: ""
    )
    notices = [orjson.dumps({"event_id": "e1", "origin": "other-replica"}).decode()]
    with pytest.raises(DatabaseUnavailable):
        listener._handle(notices)  # the step between a notice and a client


class _BrokenOnceStore:
    """A store whose first load fails with a bug (not an outage), then loads nothing."""

    origin = "this-replica"

    def __init__(self) -> None:
        self.calls = 0

    def event_messages(self, event_ids: list[str]) -> list[Any]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug in loading")
        return []


def test_a_listener_that_hits_a_bug_starts_again_and_resynchronises(
    pg_cluster: PgCluster, caplog: pytest.LogCaptureFixture
) -> None:
    import psycopg  # noqa: PLC0415  (only with PostgreSQL)

    url = pg_cluster.create_database()
    listens: list[float] = []
    listener = PgListener(
        url,
        "adw_events",
        cast(Store, _BrokenOnceStore()),
        lambda _m: None,
        lambda: "",
        listening=lambda: listens.append(time.monotonic()),
    )
    listener.start()
    try:
        assert listener.ready.wait(30)
        note = orjson.dumps({"event_id": "e1", "origin": "other-replica"}).decode()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT pg_notify('adw_events', %s)", (note,))
        deadline = time.monotonic() + 30
        while len(listens) < 2 and time.monotonic() < deadline:
            threading.Event().wait(0.05)
        assert len(listens) == 2, "the listener did not listen again after the bug"
        assert listener.ready.wait(30)
    finally:
        listener.stop()
    assert "the replica listener failed; starting it again" in caplog.text
