"""``adw-agent serve``: the standalone backend under uvicorn.

The listening socket is bound here, before uvicorn starts, so that ``--port 0`` can print the
real URL as the first line of standard output (tests and scripts read it); uvicorn's own
messages go to standard error.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import signal
import socket
import sys
from collections.abc import Iterator

import uvicorn

from adw_backend.app import create_app
from adw_backend.errors import SettingsError
from adw_backend.settings import Settings


class _Server(uvicorn.Server):
    """Uvicorn re-raises SIGTERM after a graceful shutdown, so the process would end "killed by
    SIGTERM"; a stop that was asked for and carried out is a success (exit 0) here."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle_exit)
        yield


def _ws_protocol() -> str:
    """uvicorn's sans-I/O websockets protocol where available: about an eighth less CPU per
    message sent than the legacy one, which matters when each event goes to every client."""
    module = "uvicorn.protocols.websockets.websockets_sansio_impl"
    return "websockets-sansio" if importlib.util.find_spec(module) is not None else "auto"


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # The protocol must be spelled out: asyncio turns Nagle off (TCP_NODELAY) only on sockets
    # whose proto is IPPROTO_TCP, and with Nagle on every answer (headers, then body) waits
    # about 40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SettingsError(f"--host/--port {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _tune_gc() -> None:
    """Keep the cyclic garbage collector off what lives as long as the process.

    A batch of 1,000 events allocates tens of thousands of containers, which triggers
    collections; each full one walks every object alive, and most of those are the modules
    (FastAPI, SQLAlchemy, pydantic) loaded at start. Freezing them leaves only the request's
    own objects to scan (measured: parsing a batch takes about half the time), and a larger
    first threshold makes a batch trigger fewer collections; memory stays bounded, as
    reference counting frees nearly everything and collections still run.
    """
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(10_000, gen1, gen2)


def run(settings: Settings, host: str, port: int, log_level: str = "warning") -> int:
    """Serve until interrupted; returns the exit code."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    sock = bind(host, port)
    sys.stdout.write(url_of(sock) + "\n")
    sys.stdout.flush()
    config = uvicorn.Config(
        create_app(settings=settings),
        log_level=log_level,
        access_log=False,
        lifespan="on",
        # Keep-alive connections from agents are long-lived; ping so dead peers go away.
        ws_ping_interval=20.0,
        # A message is serialised once for every client; per-message deflate would compress
        # it again for each one (and keep a zlib context per connection): CPU and memory
        # that grow with the clients, for a few kB saved per message.
        ws_per_message_deflate=False,
        ws=_ws_protocol(),
    )
    server = _Server(config)
    _tune_gc()
    server.run(sockets=[sock])
    return 0
