"""WebSocket clients of the backend, in a process of their own, for the backend benchmarks.

``python -m bench.backend_wsclients WS_URL OUT N [--stalled]`` opens ``N`` clients of
``/ws/workflows``, reads each one's snapshot, prints ``ready`` and then records, per client, the
``time.time()`` at which each message carrying a ``"bench_n"`` arrived (the first arrival of
each value). With ``--stalled`` one more client connects with a tiny receive buffer and never
reads: the backend must drop it without slowing the others. When standard input closes, the
recordings are written to ``OUT`` as JSON: ``{"clients": [[[n, t], ...], ...], "closed": k}``,
where ``k`` counts the reading clients whose connection ended early.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from urllib.parse import urlparse

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

MARK = '"bench_n":'


def _bench_n(text: str) -> int | None:
    at = text.find(MARK)
    if at < 0:
        return None
    start = at + len(MARK)
    end = start
    while end < len(text) and (text[end].isdigit() or text[end] == "-"):
        end += 1
    try:
        return int(text[start:end])
    except ValueError:
        return None


async def _reader(ws: ClientConnection, seen: dict[int, float], closed: list[int]) -> None:
    try:
        async for raw in ws:
            at = time.time()
            n = _bench_n(raw if isinstance(raw, str) else raw.decode())
            if n is not None and n not in seen:
                seen[n] = at
    except ConnectionClosed:
        closed.append(1)


async def _stalled(url: str) -> ClientConnection:
    """A client that never reads, with buffers small enough that the backend notices soon."""
    parsed = urlparse(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (parsed.hostname, parsed.port))
    return await connect(url, sock=sock, max_size=None, max_queue=1)


async def main(url: str, out: str, n: int, stalled: bool) -> None:
    clients = [await connect(url, max_size=None, compression=None) for _ in range(n)]
    for ws in clients:
        await ws.recv()  # the snapshot
    hold = await _stalled(url) if stalled else None
    seen: list[dict[int, float]] = [{} for _ in clients]
    closed: list[int] = []
    readers = [
        asyncio.create_task(_reader(ws, s, closed)) for ws, s in zip(clients, seen, strict=True)
    ]
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    result = {"clients": [sorted(s.items()) for s in seen], "closed": len(closed)}
    with open(out, "wb") as f:
        f.write(orjson.dumps(result))
    if hold is not None:
        hold.transport.abort()
    for ws in clients:
        ws.transport.abort()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("out")
    p.add_argument("n", type=int)
    p.add_argument("--stalled", action="store_true")
    args = p.parse_args()
    asyncio.run(main(args.url, args.out, args.n, args.stalled))
