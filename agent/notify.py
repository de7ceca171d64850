"""systemd's notify protocol: one datagram to ``$NOTIFY_SOCKET`` per message, no dependency.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op. The agent sends ``READY=1`` once
its first snapshot is queued, ``WATCHDOG=1`` from its main loop while the watcher and the sender
are alive, ``RELOADING=1`` … ``READY=1`` around a reload, ``STOPPING=1`` on shutdown, and a
``STATUS=`` line (outbox depth, dead letters) with each of these and every heartbeat.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    """Sends ``READY=1``, ``WATCHDOG=1``, ``STATUS=...`` and ``STOPPING=1`` to systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace socket
        self._address = address or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process systemd expects pings from; a child that inherited
        # the environment must not ping on its parent's behalf. 0 means "no watchdog".
        watchdog = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        #: Seconds between WATCHDOG=1 pings (half the timeout systemd enforces), or None.
        self.watchdog_interval: float | None = int(usec) / 2e6 if watchdog else None
        self._sock: socket.socket | None = None

    def send(self, *lines: str) -> None:
        """Best effort: a notify failure must never take the agent down."""
        if self._address is None:
            return
        with contextlib.suppress(OSError):
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self._address)

    def reloading(self) -> None:
        """``RELOADING=1`` with the timestamp ``Type=notify-reload`` asks for; end with ready."""
        self.send(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
