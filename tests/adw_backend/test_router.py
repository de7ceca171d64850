"""The router mounted in a host FastAPI app with one ``include_router`` call, as
tac-webbuilder would: the host's own lifespan and routes keep working, and ``on_applied``
receives each new projection."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI

from adw_backend import Settings, create_router
from adw_backend.projection import Projection
from tests.adw_backend.factory import cost_update, workflow_update


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """The app under uvicorn on 127.0.0.1, port 0, in a thread; stopped on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    ticker = threading.Event()
    while not server.started and thread.is_alive():
        ticker.wait(0.01)
    assert server.started, "the host app did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_host_app_mounts_the_router_and_gets_the_callback(tmp_path: Path, kind: str) -> None:
    got: list[Projection] = []
    arrived = threading.Event()
    host_lifespan: list[str] = []

    def on_applied(projection: Projection) -> None:
        got.append(projection)
        arrived.set()

    async def on_applied_async(projection: Projection) -> None:
        await asyncio.sleep(0)
        on_applied(projection)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        host_lifespan.append("started")
        yield
        host_lifespan.append("stopped")

    app = FastAPI(lifespan=lifespan)

    @app.get("/api/host")
    async def host_route() -> dict[str, str]:
        return {"host": "ok"}

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'host.db'}")
    callback = on_applied if kind == "sync" else on_applied_async
    app.include_router(create_router(settings=settings, on_applied=callback), prefix="/adw")

    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/api/host").json() == {"host": "ok"}
        assert client.get("/adw/healthz").status_code == 200
        ev = workflow_update("a1", 1, branch_name="feat-host")
        assert (
            client.post("/adw/api/v1/event/workflow_update", content=orjson.dumps(ev)).json()[
                "accepted"
            ]
            == 1
        )
        assert arrived.wait(30)
        assert got[-1]["adw_id"] == "a1"
        assert got[-1]["state"]["branch_name"] == "feat-host"
        arrived.clear()
        batch = [cost_update("a1", 2, 0.25), cost_update("a1", 3, 0.5)]
        assert client.post("/adw/api/v1/events", content=orjson.dumps(batch)).status_code == 200
        assert arrived.wait(30)
        assert [p["cost"]["current_cost"] for p in got[1:]] == [0.25, 0.5]
        # A duplicate is not applied, so the host hears nothing about it.
        client.post("/adw/api/v1/event/workflow_update", content=orjson.dumps(ev))
        assert len(got) == 3
    assert host_lifespan == ["started", "stopped"]


def test_a_failing_callback_does_not_fail_the_event(tmp_path: Path) -> None:
    calls: list[str] = []

    def on_applied(projection: Projection) -> None:
        calls.append(projection["adw_id"])
        raise RuntimeError("the host's own table is locked")

    app = FastAPI()
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'host.db'}")
    app.include_router(create_router(settings=settings, on_applied=on_applied))
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        ev = workflow_update("a1", 1, branch_name="feat-host")
        response = client.post("/api/v1/event/workflow_update", content=orjson.dumps(ev))
        assert response.json() == {"accepted": 1, "duplicates": 0}
        assert client.get("/api/v1/workflows/a1").json()["state"]["branch_name"] == "feat-host"
        # Re-sent by the agent: stored once, so the host is not called again.
        response = client.post("/api/v1/event/workflow_update", content=orjson.dumps(ev))
        assert response.json() == {"accepted": 0, "duplicates": 1}
    assert calls == ["a1"]
