"""The WebSocket stream through a real ``serve`` process: snapshot, messages, slow clients."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.adw_backend.conftest import ServeProcess
from tests.adw_backend.factory import cost_update, failed, workflow_update

Start = Callable[..., ServeProcess]
WAIT = 30.0


async def receive(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), WAIT))
    return message


async def apost(client: httpx.AsyncClient, ev: dict[str, Any]) -> None:
    response = await client.post(f"/api/v1/event/{ev['type']}", content=orjson.dumps(ev))
    assert response.status_code == 200, response.text


def test_snapshot_then_one_message_per_applied_event(start_serve: Start, database: str) -> None:
    server = start_serve(database)

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url) as client:
            await apost(client, workflow_update("a1", 1, branch_name="feat-a"))
            async with websockets.connect(server.ws_url) as ws:
                snapshot = await receive(ws)
                assert snapshot["type"] == "workflows_snapshot"
                assert snapshot["source"] == "backend"
                assert [w["adw_id"] for w in snapshot["data"]["workflows"]] == ["a1"]
                ev = cost_update("a1", 2, 0.75, "Plan")
                await apost(client, ev)
                await apost(client, ev)  # a duplicate is not broadcast
                await apost(client, failed("a1", 3))
                message = await receive(ws)
                assert message["type"] == "cost_update"
                assert message["timestamp"] == ev["timestamp"]
                assert message["source"] == "event"
                data = message["data"]
                assert (data["adw_id"], data["seq"], data["epoch"]) == ("a1", 2, 0)
                assert data["current_cost"] == 0.75
                assert data["workflow"]["cost"]["current_cost"] == 0.75
                assert data["workflow"]["state"]["branch_name"] == "feat-a"
                message = await receive(ws)
                assert message["type"] == "workflow_failed"
                assert message["data"]["workflow"]["status"] == "failed"
                assert (await client.delete("/api/v1/workflows/a1")).status_code == 200
                message = await receive(ws)
                assert message["type"] == "workflow_deleted"
                assert message["data"] == {"adw_id": "a1"}

    asyncio.run(scenario())


def test_ws_auth(start_serve: Start, tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("write-token\n")
    (tmp_path / "read").write_text("read-token\n")
    server = start_serve(
        f"sqlite:///{tmp_path / 'b.db'}",
        ["--token-file", str(tmp_path / "tokens"), "--read-token-file", str(tmp_path / "read")],
    )

    async def scenario() -> None:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(server.ws_url):
                pass
        assert refused.value.response.status_code == 401
        headers = {"Authorization": "Bearer read-token"}
        async with websockets.connect(server.ws_url, additional_headers=headers) as ws:
            assert (await receive(ws))["type"] == "workflows_snapshot"
        async with websockets.connect(server.ws_url + "?token=write-token") as ws:
            assert (await receive(ws))["type"] == "workflows_snapshot"
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(server.ws_url + "?token=wrong"):
                pass

    asyncio.run(scenario())


def _stalled_client(server: ServeProcess) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads again, with a
    small receive buffer so that the server's writes back up quickly."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = server.url.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws/workflows HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "the server closed the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def test_slow_client_is_dropped_and_others_keep_up(start_serve: Start, tmp_path: Path) -> None:
    server = start_serve(f"sqlite:///{tmp_path / 'b.db'}", env={"ADW_BACKEND_WS_QUEUE": "32"})
    stalled = _stalled_client(server)
    # Big messages fill the socket buffers and then the stalled client's queue quickly.
    filler = "x" * 60_000
    count, size = 150, 10
    events = [workflow_update("a1", s, branch=f"b{s}", log=filler) for s in range(1, count + 1)]

    async def scenario() -> None:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=60) as client,
            websockets.connect(server.ws_url, max_size=None, max_queue=None) as fast,
        ):
            assert (await receive(fast))["type"] == "workflows_snapshot"
            seen: list[int] = []
            # The reading client keeps pace (each batch read before the next is sent) while
            # the stalled one falls further behind with every batch.
            for start in range(0, count, size):
                response = await client.post(
                    "/api/v1/events", content=orjson.dumps(events[start : start + size])
                )
                assert response.json()["accepted"] == size
                seen += [(await receive(fast))["data"]["seq"] for _ in range(size)]
            assert seen == list(range(1, count + 1))
            # The stalled client was dropped: only the reading one is still counted.
            health = (await client.get("/healthz")).json()
            assert health["ws_clients"] == 1

    try:
        asyncio.run(scenario())
    finally:
        stalled.close()
    assert "dropped a WebSocket client" in server.stderr()
