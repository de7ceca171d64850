"""The bench's receiver: a small asyncio HTTP/1.1 server on 127.0.0.1, run as its own process.

It answers every ``POST`` with 200 (a batch of events too) and records ``time.time()`` the moment a
request's body has been read, with the path and the raw body. ``GET /_records?since=N`` returns the
records from index N on as JSON lines (the arrival time, the path, then the body), which is how the
bench process reads them. Living in its own process keeps the bench's writer threads from delaying
the arrival timestamps (the GIL), and a hand-rolled keep-alive server keeps the receiver far faster
than the agent, so that it never bounds what is measured.

``python -m bench.receiver [--port N]`` prints the port it listens on as its first line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

_OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
_MAX_HEAD = 64 * 1024


class Recorder:
    """Keeps (arrival time, path, body) for every POST."""

    def __init__(self) -> None:
        self.records: list[tuple[float, str, bytes]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                close = False
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value)
                    elif name == "connection" and value.strip().lower() == "close":
                        close = True
                body = await reader.readexactly(length) if length else b""
                at = time.time()
                if method == "POST":
                    self.records.append((at, path, body))
                    writer.write(_OK)
                elif method == "GET" and path.startswith("/_records"):
                    since = int(path.partition("since=")[2] or 0)
                    out = b"".join(
                        orjson.dumps([t, p]) + b"\t" + b + b"\n" for t, p, b in self.records[since:]
                    )
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                        + str(len(out)).encode()
                        + b"\r\n\r\n"
                        + out
                    )
                else:
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            # CancelledError: the receiver is stopping; end quietly.
            return
        finally:
            writer.close()


async def _serve(port: int) -> None:
    recorder = Recorder()
    server = await asyncio.start_server(recorder.handle, "127.0.0.1", port, limit=_MAX_HEAD)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(_serve(args.port))


# -- the bench side ------------------------------------------------------------------------


class Record:
    """One request the receiver got."""

    __slots__ = ("at", "body", "path")

    def __init__(self, at: float, path: str, body: Any) -> None:
        self.at = at
        self.path = path
        self.body = body


class ReceiverProcess:
    """Starts ``python -m bench.receiver`` and reads what it recorded."""

    def __init__(self, root: Path, port: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.receiver", "--port", str(port)],
            cwd=root,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}"
        self.records: list[Record] = []
        self._requests = 0  # requests fetched so far; a batch is one request, many records

    def fetch(self) -> list[Record]:
        """Pull the new records; returns only those not fetched before."""
        url = f"{self.url}/_records?since={self._requests}"
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
        new: list[Record] = []
        lines = data.splitlines()
        self._requests += len(lines)
        for line in lines:
            meta, _, raw = line.partition(b"\t")
            at, path = orjson.loads(meta)
            body: Any = None
            with contextlib.suppress(orjson.JSONDecodeError):
                body = orjson.loads(raw)
            if isinstance(body, list):
                # A batch: one record per event, as if each had come on its own route.
                base = path.rsplit("/", 1)[0]
                new += [Record(at, f"{base}/event/{e.get('type')}", e) for e in body]
            else:
                new.append(Record(at, path, body))
        self.records += new
        return new

    def wait(self, predicate: Any, timeout: float, interval: float = 0.05) -> bool:
        """Fetch until ``predicate(all records)`` holds; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self.fetch()
            if predicate(self.records):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


if __name__ == "__main__":
    main()
