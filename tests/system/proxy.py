"""A switching TCP proxy for the system fault suite, run as its own process.

    python -m tests.system.proxy --listen HOST:PORT --upstream HOST:PORT [--upstream ...]
        --control PATH

Every accepted connection is piped to the current upstream (the first one at start). The first
line on stdout is ``listening HOST:PORT`` with the real port. A Unix socket at PATH (a file, so
it is reachable from another network namespace) takes one request per line and answers one
line:

- ``use N``: new connections go to upstream N; the open ones are closed at once, the way a
  load balancer fails over abruptly.
- ``503 on`` / ``503 off``: while on, every new connection has its HTTP request head read and
  is answered ``503 Service Unavailable`` with ``Retry-After: 1``; the open connections are
  closed when the mode starts.
- ``status``: a JSON line with the upstream index, the 503 mode, the open connections and the
  connections served.

Answers are ``ok``, the JSON line, or ``error: reason``. Bad arguments exit 78 with one line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypedDict

import orjson

#: sysexits' EX_CONFIG: what the project's programs exit with on a bad configuration.
EX_CONFIG = 78
CHUNK = 64 * 1024
#: The request head read in 503 mode, at most (bytes, seconds).
HEAD_LIMIT = 64 * 1024
HEAD_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
LINGER_LIMIT = 1024 * 1024
#: TCP keepalive (idle, interval, probes in seconds/count) and the user timeout (ms): a peer
#: behind a partition never sends FIN or RST, and without them its connection would stay open
#: here for hours (idle) or minutes (unacknowledged data).
KEEPALIVE = (5, 1, 3)
USER_TIMEOUT_MS = 10_000
#: A control request is a short line; a longer one is refused, not buffered.
CONTROL_LIMIT = 1024

BODY_503 = orjson.dumps(
    {"error": "service_unavailable", "reason": "the proxy is answering 503 to every request"}
)
RESPONSE_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Retry-After: 1\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(BODY_503)).encode() + b"\r\n"
    b"Connection: close\r\n"
    b"\r\n" + BODY_503
)


class Status(TypedDict):
    upstream: int
    mode_503: bool
    open: int
    served: int


Address = tuple[str, int]


def parse_address(text: str, option: str) -> Address:
    """``HOST:PORT`` (``[v6]:PORT`` too) or exit 78 naming the option."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        config_error(f"{option} {text!r}: expected HOST:PORT")
    return host, int(port)


def config_error(message: str) -> NoReturn:
    print(f"proxy: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EX_CONFIG)


def shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(eq=False)
class Connection:
    """One client connection, with its upstream once connected."""

    task: asyncio.Task[None]
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None

    def abort(self) -> None:
        """Reset both sides at once, dropping what is not sent yet."""
        self.client.transport.abort()
        if self.upstream is not None:
            self.upstream.transport.abort()

    def close(self) -> None:
        """Close both sides once what is buffered is sent."""
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()


@dataclass
class Proxy:
    upstreams: list[Address]
    current: int = 0
    mode_503: bool = False
    served: int = 0
    connections: set[Connection] = field(default_factory=set)
    unreachable: set[Address] = field(default_factory=set)

    def status(self) -> Status:
        return {
            "upstream": self.current,
            "mode_503": self.mode_503,
            "open": len(self.connections),
            "served": self.served,
        }

    async def close_all(self) -> None:
        """Close every open connection and wait until their handlers are done."""
        tasks = []
        for conn in list(self.connections):
            conn.abort()
            conn.task.cancel()
            tasks.append(conn.task)
        if tasks:
            await asyncio.wait(tasks)
        # Lets the aborted transports close their sockets before the caller answers.
        await asyncio.sleep(0)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = Connection(task, writer)
        keepalive(writer)
        self.connections.add(conn)
        self.served += 1
        finished = False
        try:
            if self.mode_503:
                await answer_503(reader, writer)
            else:
                await self.pipe_to_upstream(conn, reader)
            finished = True
        except asyncio.CancelledError:
            # Cancelled by ``use``, ``503 on`` or shutdown, which close the connection: the
            # handler is the root of its task, so there is no one to propagate to.
            pass
        except OSError:
            pass
        finally:
            self.connections.discard(conn)
            if finished:
                conn.close()
            else:
                conn.abort()

    async def pipe_to_upstream(self, conn: Connection, reader: asyncio.StreamReader) -> None:
        host, port = self.upstreams[self.current]
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=CHUNK), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            # Said once per outage of an upstream, not once per client.
            if (host, port) not in self.unreachable:
                self.unreachable.add((host, port))
                reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
                log(f"upstream {shown(host, port)} unreachable ({reason}): closing its clients")
            conn.client.close()
            return
        if (host, port) in self.unreachable:
            self.unreachable.discard((host, port))
            log(f"upstream {shown(host, port)} answers again")
        conn.upstream = up_writer
        keepalive(up_writer)
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, conn.client))


def keepalive(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    idle, interval, count = KEEPALIVE
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until end of file, then half-close the sink; ``drain`` keeps memory bounded."""
    try:
        while data := await source.read(CHUNK):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof() and not sink.is_closing():
            sink.write_eof()
    except OSError:
        # One side reset: the other goes too, as a real connection through a proxy would.
        sink.transport.abort()


async def answer_503(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the request head (bounded in bytes and time), then answer 503 and close."""
    with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
    writer.write(RESPONSE_503)
    await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
    # A lingering close: closing with a request body still unread would reset the connection,
    # and the client could lose the answer. What is left is read and dropped, bounded.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(HEAD_TIMEOUT):
            left = LINGER_LIMIT
            while left > 0 and (data := await reader.read(CHUNK)):
                left -= len(data)


def log(message: str) -> None:
    print(f"proxy: {message}", file=sys.stderr, flush=True)


async def control(proxy: Proxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                if not exc.partial.strip():
                    return
                line = exc.partial
            except asyncio.LimitOverrunError:
                writer.write(b"error: request too long\n")
                await writer.drain()
                return
            answer = await command(proxy, line.decode(errors="replace").strip())
            writer.write(answer.encode() + b"\n")
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def command(proxy: Proxy, request: str) -> str:
    words = request.split()
    match words:
        case ["use", index]:
            if not index.isdigit() or int(index) >= len(proxy.upstreams):
                return f"error: no upstream {index} (there are {len(proxy.upstreams)})"
            proxy.current = int(index)
            await proxy.close_all()
            return "ok"
        case ["503", "on"]:
            proxy.mode_503 = True
            await proxy.close_all()
            return "ok"
        case ["503", "off"]:
            proxy.mode_503 = False
            return "ok"
        case ["status"]:
            return orjson.dumps(proxy.status()).decode()
        case _:
            return f"error: unknown request {request[:80]!r}"


def remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        config_error(f"--control {path}: exists and is not a socket")
    path.unlink()


async def serve(listen: Address, upstreams: list[Address], control_path: Path) -> int:
    proxy = Proxy(upstreams)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    remove_stale_socket(control_path)
    try:
        server = await asyncio.start_server(proxy.handle, listen[0], listen[1], limit=HEAD_LIMIT)
    except OSError as exc:
        # asyncio rewords the error: the plain reason comes from its errno.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        config_error(f"--listen {shown(*listen)}: {reason}")
    try:
        controller = await asyncio.start_unix_server(
            lambda r, w: control(proxy, r, w), str(control_path), limit=CONTROL_LIMIT
        )
    except OSError as exc:
        config_error(f"--control {control_path}: {exc.strerror or exc}")
    sockname = server.sockets[0].getsockname()
    print(f"listening {shown(sockname[0], sockname[1])}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        controller.close()
        await proxy.close_all()
        with contextlib.suppress(FileNotFoundError):
            control_path.unlink()
    return 0


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        config_error(message)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m tests.system.proxy", description="A switching TCP proxy")
    parser.add_argument("--listen", required=True, help="HOST:PORT (PORT may be 0)")
    parser.add_argument("--upstream", action="append", required=True, help="HOST:PORT, repeated")
    parser.add_argument("--control", required=True, type=Path, help="Unix socket path")
    args = parser.parse_args(argv)
    listen = parse_address(args.listen, "--listen")
    upstreams = [parse_address(text, "--upstream") for text in args.upstream]
    if len(os.fsencode(args.control)) >= 100:
        config_error(f"--control {args.control}: too long for a Unix socket path")
    # asyncio sets SO_REUSEADDR on the listening socket: a restart after kill -9 takes the same
    # port at once.
    return asyncio.run(serve(listen, upstreams, args.control))


if __name__ == "__main__":
    sys.exit(main())
