"""Live updates to WebSocket clients, and between replicas through PostgreSQL.

Each client has a queue bounded in messages and in bytes (a message's text is shared by all
clients, so memory is bounded by the bytes one client may hold). Publishing never waits: a
client whose queue is full has fallen behind, and it is dropped (closed with 1013, "try again
later"; the live page reconnects and starts again from a snapshot) rather than slow ingestion
or the other clients.
A message is serialised once, whatever the number of clients.

With PostgreSQL, a replica that applies an event also sends ``NOTIFY`` in the same transaction
(see :mod:`adw_backend.store_ingest`); :class:`PgListener` in every replica reads those, skips its
own, loads the event and projection from the database and publishes them to its own clients.

Notices sent while a listener is not listening (the database restarting, its connection
killed) are lost, and so would be the clients' updates. So every time the listener has its
``LISTEN`` in place again, each client is resynchronised: a :class:`Resync` marker goes into its
queue, and where the client reaches it it is sent a fresh ``workflows_snapshot`` read from the
database after the marker was queued. What was committed before that read is in the snapshot;
what was committed after it is heard and queued behind the marker; a message queued behind the
marker about an event already in the snapshot carries a ``revision`` no larger than the
snapshot's, and clients drop it (see :mod:`adw_backend.projection`). A failed read closes the
client with 1011; it reconnects and takes a new snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import orjson

from adw_backend.errors import DatabaseUnavailable
from adw_backend.projection import Projection
from adw_backend.store import Applied, Store, pg_connect_args

log = logging.getLogger(__name__)

#: Notices handled together at most (one query loads their events).
GROUP = 1000


def event_message(item: Applied) -> dict[str, Any]:
    """The seed plan's message shape for one applied event."""
    ev = item.event
    return {
        "type": ev["type"],
        "data": {
            **ev["data"],
            "adw_id": ev["adw_id"],
            "seq": ev["seq"],
            "epoch": ev["epoch"],
            "workflow": item.projection,
        },
        "timestamp": ev["timestamp"],
        "source": item.source,
    }


def snapshot_message(projections: list[Projection], timestamp: str) -> dict[str, Any]:
    return {
        "type": "workflows_snapshot",
        "data": {"workflows": projections},
        "timestamp": timestamp,
        "source": "backend",
    }


def deleted_message(adw_id: str, timestamp: str) -> dict[str, Any]:
    return {
        "type": "workflow_deleted",
        "data": {"adw_id": adw_id},
        "timestamp": timestamp,
        "source": "backend",
    }


#: WebSocket close codes: the client fell behind (try again later), the server is stopping.
BEHIND = 1013
GOING_AWAY = 1001


class Resync:
    """A marker in clients' queues: send the snapshot ``snapshot`` gives (serialised; one read
    shared by every client, started after the marker was queued)."""

    __slots__ = ("snapshot",)

    def __init__(self, snapshot: asyncio.Future[str]) -> None:
        self.snapshot = snapshot


Queued = str | Resync | None


class Client:
    """One WebSocket connection's outgoing queue; ``None`` in the queue means "stop", with
    ``close_code`` saying why."""

    def __init__(self, bound: int, max_bytes: int) -> None:
        self.queue: asyncio.Queue[Queued] = asyncio.Queue(maxsize=bound)
        self.max_bytes = max_bytes
        self.pending_bytes = 0
        self.dropped = False
        self.close_code = BEHIND

    def offer(self, text: str) -> bool:
        """Queue ``text``; False when the client is too far behind in messages or bytes."""
        if self.pending_bytes + len(text) > self.max_bytes and not self.queue.empty():
            return False
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            return False
        self.pending_bytes += len(text)
        return True

    def offer_resync(self, marker: Resync) -> bool:
        try:
            self.queue.put_nowait(marker)
        except asyncio.QueueFull:
            return False
        return True

    async def next(self) -> Queued:
        item = await self.queue.get()
        if isinstance(item, str):
            self.pending_bytes -= len(item)
        return item

    def drop(self, code: int = BEHIND) -> None:
        """Stop the sender: empty the queue so the stop marker fits."""
        self.dropped = True
        self.close_code = code
        while not self.queue.empty():
            self.queue.get_nowait()
        self.pending_bytes = 0
        self.queue.put_nowait(None)


class Hub:
    """The connected clients of this process. Call every method from the event loop,
    except :meth:`publish_threadsafe`."""

    def __init__(self, bound: int, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._bound = bound
        self._max_bytes = max_bytes
        self._clients: set[Client] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.dropped_total = 0
        self.resyncs_total = 0
        # Running snapshot reads, referenced until done (the loop keeps only weak references).
        self._reads: set[asyncio.Task[str]] = set()

    @property
    def clients(self) -> int:
        return len(self._clients)

    def add(self) -> Client:
        client = Client(self._bound, self._max_bytes)
        self._clients.add(client)
        return client

    def remove(self, client: Client) -> None:
        self._clients.discard(client)

    def publish(self, message: dict[str, Any]) -> None:
        if not self._clients:
            return
        text = orjson.dumps(message).decode()
        for client in list(self._clients):
            if not client.offer(text):
                self._behind(client)

    def _behind(self, client: Client) -> None:
        self._clients.discard(client)
        self.dropped_total += 1
        log.warning(
            "dropped a WebSocket client that fell behind (%d messages, %d bytes queued)",
            client.queue.qsize(),
            client.pending_bytes,
        )
        client.drop()

    def resync(self, read: Callable[[], Coroutine[Any, Any, str]]) -> None:
        """Bring every client back to the database's truth: queue a marker, then start one
        read of the snapshot (after the marker, so nothing committed in between is missed)."""
        if not self._clients:
            return
        self.resyncs_total += 1
        # The task's first step runs on a later turn of the loop: after every marker is queued.
        task = asyncio.get_running_loop().create_task(read())
        self._reads.add(task)
        task.add_done_callback(self._read_done)
        marker = Resync(task)
        for client in list(self._clients):
            if not client.offer_resync(marker):
                self._behind(client)

    def _read_done(self, task: asyncio.Task[str]) -> None:
        self._reads.discard(task)
        if not task.cancelled():
            # A failure is the clients' to handle (each one awaits the task); retrieved here so
            # that it is not also reported as never retrieved when no client was left.
            task.exception()

    def resync_threadsafe(self, read: Callable[[], Coroutine[Any, Any, str]]) -> None:
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: shutting down
                self.loop.call_soon_threadsafe(self.resync, read)

    def publish_applied(self, items: list[Applied]) -> None:
        """From the writing thread, right after a commit: one message per applied event, in
        order (the loop runs callbacks in the order they were scheduled)."""
        if self._clients and self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: shutting down
                self.loop.call_soon_threadsafe(self._publish_all, items)

    def _publish_all(self, items: list[Applied]) -> None:
        for item in items:
            if not self._clients:
                return
            self.publish(event_message(item))

    def publish_threadsafe(self, message: dict[str, Any]) -> None:
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: shutting down
                self.loop.call_soon_threadsafe(self.publish, message)

    def close(self) -> None:
        for client in list(self._clients):
            client.drop(GOING_AWAY)
        self._clients.clear()


class PgListener:
    """A thread that LISTENs on the notify channel and republishes other replicas' events.

    Its own connection is reconnected after an error (the database restarting, the connection
    killed, a notice's event that cannot be loaded), with a pause; each time ``LISTEN`` is in
    place, ``listening()`` is called so that the clients are resynchronised (notices may have
    been missed before it).
    """

    def __init__(
        self,
        conninfo: str,
        channel: str,
        store: Store,
        deliver: Callable[[dict[str, Any]], None],
        now: Callable[[], str],
        *,
        listening: Callable[[], None] = lambda: None,
    ) -> None:
        self._conninfo = conninfo
        self._channel = channel
        self._store = store
        self._deliver = deliver
        self._now = now
        self._listening = listening
        self._stop = threading.Event()
        self.ready = threading.Event()
        #: Set once the first attempt to listen has succeeded or failed.
        self.tried = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg  # noqa: PLC0415  (only with PostgreSQL)

        failing = False
        while not self._stop.is_set():
            try:
                given = psycopg.conninfo.conninfo_to_dict(self._conninfo).get("options")
                conninfo = psycopg.conninfo.make_conninfo(
                    self._conninfo, **pg_connect_args(given if isinstance(given, str) else None)
                )
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {self._channel}")  # the name is validated in Settings
                    self.ready.set()
                    self.tried.set()
                    failing = False
                    self._listening()
                    while not self._stop.is_set():
                        first = list(conn.notifies(timeout=0.5, stop_after=1))
                        if not first:
                            continue
                        # A batch commits its notices together: take what has already arrived
                        # with the first one, and load it all in one query.
                        more = list(conn.notifies(timeout=0.0, stop_after=GROUP - 1))
                        self._handle([note.payload for note in first + more])
            except Exception as exc:
                if not isinstance(exc, psycopg.Error | DatabaseUnavailable):
                    # A bug, not an outage: said with its traceback, and the listener starts
                    # again (and so resynchronises its clients) instead of dying while
                    # /healthz still says it listens.
                    log.exception("the replica listener failed; starting it again")
                elif not failing:
                    # An outage is said once, not once per retry.
                    reason = str(exc).strip().splitlines()
                    log.warning(
                        "cannot hear the other replicas, retrying: %s",
                        reason[0] if reason else type(exc).__name__,
                    )
                failing = True
                self.ready.clear()
                self.tried.set()
                self._stop.wait(1.0)

    def _handle(self, payloads: list[str]) -> None:
        pending: list[str] = []
        for payload in payloads:
            try:
                note = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(note, dict) or note.get("origin") == self._store.origin:
                continue
            if "deleted" in note:
                self._load(pending)
                pending = []
                self._deliver(deleted_message(str(note["deleted"]), self._now()))
            elif note.get("event_id"):
                pending.append(str(note["event_id"]))
        self._load(pending)

    def _load(self, event_ids: list[str]) -> None:
        """Publish the events ``event_ids``; :class:`DatabaseUnavailable` when they cannot be
        loaded, which makes the listener start again (and resynchronise the clients) rather
        than leave them without those events."""
        for item in self._store.event_messages(event_ids):
            self._deliver(event_message(item))
