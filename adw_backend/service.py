"""What the routes share: the store, the WebSocket hub, the replica listener and the host's
callback, started once per process (by the router's lifespan, or by the first request)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable

import anyio
import orjson
from pydantic import SecretStr

from adw_backend.broadcast import Hub, PgListener, deleted_message, snapshot_message
from adw_backend.errors import CommitUnknown, DatabaseUnavailable, Unauthorized
from adw_backend.projection import EventView, Projection
from adw_backend.settings import Settings
from adw_backend.store import Applied, Outcome, Store
from agent.events import utc_now

log = logging.getLogger(__name__)

OnApplied = Callable[[Projection], Awaitable[None] | None]

#: Workflows in a WebSocket snapshot and, by default, in a listing (the most recent ones).
SNAPSHOT_LIMIT = 1000
#: Seconds a start waits for the first attempt to listen to the other replicas.
LISTEN_WAIT = 10.0


class Service:
    """What the routes share: the store, the hub and, on PostgreSQL, the listener."""

    def __init__(self, settings: Settings, on_applied: OnApplied | None) -> None:
        self.settings = settings
        self.on_applied = on_applied
        self.store = Store(
            settings.sqlalchemy_url,
            cost_points=settings.cost_points,
            notify_channel=settings.notify_channel,
            origin=uuid.uuid4().hex,
            sqlite_synchronous=settings.sqlite_synchronous,
        )
        self.hub = Hub(settings.ws_queue, settings.ws_queue_bytes)
        self.listener: PgListener | None = None
        self._started = False

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.hub.loop = asyncio.get_running_loop()
        try:
            await anyio.to_thread.run_sync(self.store.setup)
        except DatabaseUnavailable:
            log.warning("database unavailable at start; requests answer 503 until it is back")
        if self.store.is_postgres:
            url = self.store.engine.url.set(drivername="postgresql")
            self.listener = PgListener(
                url.render_as_string(hide_password=False),
                self.settings.notify_channel,
                self.store,
                self.hub.publish_threadsafe,
                utc_now,
                listening=lambda: self.hub.resync_threadsafe(self.snapshot_text),
            )
            self.listener.start()
            # Clients are served once this replica hears the others (or has failed to, the
            # database being down): a client taken on before would miss what they apply
            # meanwhile, until the listener's first resynchronisation.
            await anyio.to_thread.run_sync(self.listener.tried.wait, LISTEN_WAIT)

    async def snapshot_text(self) -> str:
        """A ``workflows_snapshot`` message, serialised, read now."""
        found = await anyio.to_thread.run_sync(self.store.workflows, None, SNAPSHOT_LIMIT)
        return orjson.dumps(snapshot_message(found, utc_now())).decode()

    async def stop(self) -> None:
        self.hub.close()
        if self.listener is not None:
            await anyio.to_thread.run_sync(self.listener.stop)
        self.store.close()
        self._started = False

    async def ingest(self, batch: list[EventView], sources: list[str]) -> Outcome:
        await self.start()
        # Published from the writing thread right after the commit (on SQLite, before the next
        # write begins): the clients see the events in the order they were committed, even
        # when requests overlap.
        try:
            outcome = await anyio.to_thread.run_sync(
                self.store.ingest, list(zip(batch, sources, strict=True)), self.hub.publish_applied
            )
        except CommitUnknown:
            # Perhaps committed, and then neither published here nor (being this replica's
            # own) heard back from the database: bring the clients back to what it holds.
            self.hub.resync(self.snapshot_text)
            raise
        for item in outcome.applied:
            await self._notify(item)
        return outcome

    async def delete(self, adw_id: str) -> None:
        """Forget a workflow and tell the clients; a deletion that may have committed
        resynchronises them, as in :meth:`ingest`."""
        await self.start()
        try:
            await anyio.to_thread.run_sync(self.store.delete, adw_id)
        except CommitUnknown:
            self.hub.resync(self.snapshot_text)
            raise
        self.hub.publish(deleted_message(adw_id, utc_now()))

    async def _notify(self, item: Applied) -> None:
        if self.on_applied is None:
            return
        callback = self.on_applied
        # The store keeps (and shares) the projections it folds: the host gets its own copy,
        # which it may change.
        projection: Projection = orjson.loads(orjson.dumps(item.projection))
        try:
            if inspect.iscoroutinefunction(callback):
                await callback(projection)
            else:
                # A plain function may block (the host's own database): keep it off the loop.
                result = await anyio.to_thread.run_sync(callback, projection)
                if inspect.isawaitable(result):
                    await result
        except Exception:
            # The event is stored and broadcast; the host's own update failing must not make
            # the agent send it again.
            log.exception("on_applied callback failed for %s", item.event["adw_id"])

    def authorize(self, header: str | None, *, write: bool) -> None:
        """Constant-time check of a bearer token against every configured token."""
        settings = self.settings
        if not settings.auth_enabled:
            return
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing Authorization: Bearer token")
        given = token.strip().encode()
        # Every token is compared (no early exit), so the time taken does not say which matched.
        writes = [_same(given, t) for t in settings.tokens]
        reads = [_same(given, t) for t in settings.read_tokens]
        if any(writes) or (not write and any(reads)):
            return
        raise Unauthorized("this token may not write" if any(reads) else "invalid token")


def _same(given: bytes, token: SecretStr) -> bool:
    # Digests of equal length: compare_digest on the raw values returns at once when the
    # lengths differ, which would tell a caller how long the token is.
    expected = hashlib.sha256(token.get_secret_value().encode()).digest()
    return hmac.compare_digest(hashlib.sha256(given).digest(), expected)
