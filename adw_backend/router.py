"""The routes, as a router any FastAPI app mounts with one call.

::

    from adw_backend import Settings, create_router

    app.include_router(create_router(settings=Settings(database_url="sqlite:///adw.db")))

The router carries its own lifespan (FastAPI merges a router's lifespan into the app's on
``include_router``): it creates the tables, binds the WebSocket hub to the running loop and,
on PostgreSQL, starts listening to the other replicas. If a host mounts it in a way that skips
lifespans, the first request does the same. Every error is answered here, inside the routes,
so the host app needs no exception handler: bad input is a 4xx with a one-line ``detail``, a
database that does not answer is a 503, and nothing the client sends produces a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast, get_args

import anyio
import orjson
from fastapi import APIRouter, FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, Response
from starlette.websockets import WebSocketDisconnect

from adw_backend.broadcast import BEHIND, Resync
from adw_backend.errors import (
    BackendError,
    BadInput,
    DatabaseUnavailable,
    Unauthorized,
)
from adw_backend.intake import parse_batch, parse_one, read_body
from adw_backend.projection import Status
from adw_backend.service import SNAPSHOT_LIMIT, OnApplied, Service
from adw_backend.settings import Settings
from agent.events import DATA_MODELS

STATIC = Path(__file__).resolve().parent / "static"


#: WebSocket close code when the database does not answer (an internal error, in RFC 6455).
UNAVAILABLE = 1011


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(value), status, headers, media_type="application/json")


def _problem(exc: BackendError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    if isinstance(exc, DatabaseUnavailable):
        headers = {"Retry-After": "1"}
    return _json({"detail": str(exc)}, exc.status, headers)


def _int_param(request: Request, name: str, default: int, low: int, high: int = 2**62) -> int:
    """A query parameter as an int in [low, high]; one-line 400 otherwise."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadInput(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise BadInput(f"{name} must be between {low} and {high}")
    return value


def _status_param(request: Request) -> Status | None:
    raw = request.query_params.get("status")
    if raw is None or raw == "":
        return None
    for status in get_args(Status):
        if raw == status:
            return cast(Status, status)
    raise BadInput("status must be running, completed or failed")


def create_router(*, settings: Settings, on_applied: OnApplied | None = None) -> APIRouter:
    """The backend's routes. ``on_applied(projection)`` is called after each newly applied
    event with its workflow's new projection, in order, before the request is answered, so a
    host app can update its own tables or broadcast its own message. An ``async def`` runs on
    the event loop; a plain function runs in a worker thread (it may block). An exception in
    it is logged; the event stays stored and is answered 200."""
    service = Service(settings, on_applied)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    router = APIRouter(lifespan=lifespan)

    @router.post("/api/v1/event/{event_type}")
    async def post_event(event_type: str, request: Request) -> Response:
        try:
            service.authorize(request.headers.get("authorization"), write=True)
            if event_type not in DATA_MODELS:
                raise BadInput(f"unknown event type {event_type[:60]!r}")
            body = await read_body(request, settings.max_event_bytes)
            view, source = parse_one(body)
            if view["type"] != event_type:
                raise BadInput(f"the path says {event_type} but the event is {view['type']}")
            key = request.headers.get("idempotency-key")
            if key is not None and key != view["event_id"]:
                raise BadInput("Idempotency-Key differs from the event's event_id")
            outcome = await service.ingest([view], [source])
        except BackendError as exc:
            return _problem(exc)
        return _json({"accepted": len(outcome.applied), "duplicates": outcome.duplicates})

    @router.post("/api/v1/events")
    async def post_events(request: Request) -> Response:
        try:
            service.authorize(request.headers.get("authorization"), write=True)
            body = await read_body(request, settings.max_batch_bytes)
            # Decoding and checking a thousand events takes a while: off the event loop, so
            # WebSocket clients and other requests are not held up meanwhile.
            parsed = await anyio.to_thread.run_sync(parse_batch, body, settings.max_batch_events)
            outcome = await service.ingest([v for v, _ in parsed], [s for _, s in parsed])
        except BackendError as exc:
            return _problem(exc)
        return _json({"accepted": len(outcome.applied), "duplicates": outcome.duplicates})

    @router.get("/api/v1/workflows")
    async def list_workflows(request: Request) -> Response:
        try:
            service.authorize(request.headers.get("authorization"), write=False)
            status = _status_param(request)
            limit = _int_param(request, "limit", SNAPSHOT_LIMIT, 1, 10 * SNAPSHOT_LIMIT)
            await service.start()
            found = await anyio.to_thread.run_sync(service.store.workflows, status, limit)
        except BackendError as exc:
            return _problem(exc)
        return _json({"workflows": found})

    @router.get("/api/v1/workflows/{adw_id}")
    async def get_workflow(adw_id: str, request: Request) -> Response:
        try:
            service.authorize(request.headers.get("authorization"), write=False)
            await service.start()
            found = await anyio.to_thread.run_sync(service.store.workflow, adw_id)
        except BackendError as exc:
            return _problem(exc)
        return _json(found)

    @router.get("/api/v1/workflows/{adw_id}/events")
    async def get_events(adw_id: str, request: Request) -> Response:
        try:
            service.authorize(request.headers.get("authorization"), write=False)
            after_seq = _int_param(request, "after_seq", -1, -1)
            limit = _int_param(request, "limit", 100, 1, 1000)
            after_epoch = (
                _int_param(request, "after_epoch", 0, 0)
                if "after_epoch" in request.query_params
                else None
            )
            await service.start()
            found = await anyio.to_thread.run_sync(
                lambda: service.store.events(
                    adw_id, after_seq=after_seq, after_epoch=after_epoch, limit=limit
                )
            )
        except BackendError as exc:
            return _problem(exc)
        return _json({"events": found})

    @router.delete("/api/v1/workflows/{adw_id}")
    async def delete_workflow(adw_id: str, request: Request) -> Response:
        try:
            service.authorize(request.headers.get("authorization"), write=True)
            await service.delete(adw_id)
        except BackendError as exc:
            return _problem(exc)
        return _json({"deleted": adw_id})

    @router.get("/healthz")
    async def healthz() -> Response:
        try:
            await service.start()
            await anyio.to_thread.run_sync(service.store.ping)
        except DatabaseUnavailable as exc:
            return _json(
                {"detail": str(exc), "database": "down", "listening": _listening(service)},
                exc.status,
                {"Retry-After": "1"},
            )
        return _json(
            {
                "status": "ok",
                "database": "up",
                "ws_clients": service.hub.clients,
                "listening": _listening(service),
            }
        )

    @router.get("/", response_model=None)
    async def page() -> Response:
        index = STATIC / "index.html"
        if not index.is_file():
            return _json({"detail": "the live page is not installed"}, 404)
        return FileResponse(index, media_type="text/html")

    @router.websocket("/ws/workflows")
    async def ws_workflows(websocket: WebSocket) -> None:
        await _serve_ws(service, websocket)

    return router


def _listening(service: Service) -> bool | None:
    """None without PostgreSQL; false while this replica cannot hear the others."""
    listener = service.listener
    return None if listener is None else listener.ready.is_set()


async def _serve_ws(service: Service, websocket: WebSocket) -> None:
    """Snapshot first, then every applied event, until the client leaves or falls behind.

    Browsers cannot set headers on a WebSocket, so the token may also come as ``?token=``.
    """
    header = websocket.headers.get("authorization")
    if header is None and "token" in websocket.query_params:
        header = f"Bearer {websocket.query_params['token']}"
    try:
        service.authorize(header, write=False)
    except Unauthorized as exc:
        with contextlib.suppress(RuntimeError):
            await websocket.send_denial_response(_problem(exc))
            return
        await websocket.close(code=1008)
        return
    await service.start()
    await websocket.accept()
    # Registered before the snapshot is read, so no event falls between the two.
    client = service.hub.add()
    try:
        try:
            snapshot = await service.snapshot_text()
        except DatabaseUnavailable:
            await websocket.close(code=UNAVAILABLE, reason="database unavailable")
            return
        await websocket.send_text(snapshot)

        async def pump() -> tuple[int, str]:
            while True:
                item = await client.next()
                if item is None:
                    return client.close_code, (
                        "fell behind" if client.close_code == BEHIND else "server stopping"
                    )
                if isinstance(item, Resync):
                    try:
                        # Shielded: the read is shared, and this client leaving must not
                        # cancel it for the others.
                        text = await asyncio.shield(item.snapshot)
                    except Exception:  # the read failed; the store logged why
                        return UNAVAILABLE, "database unavailable"
                else:
                    text = item
                await websocket.send_text(text)

        async def listen() -> None:
            # Clients have nothing to say; reading only notices that they left.
            while (await websocket.receive())["type"] != "websocket.disconnect":
                pass

        sender = asyncio.create_task(pump())
        tasks = [sender, asyncio.create_task(listen())]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        # A failed send or receive means the client is gone: nothing to close, nothing to log.
        failed = [task for task in done if task.exception() is not None]
        if sender in done and sender not in failed:
            code, reason = sender.result()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(websocket.close(code=code, reason=reason), timeout=1.0)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        service.hub.remove(client)
