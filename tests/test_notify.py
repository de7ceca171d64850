"""The sd_notify client against a real AF_UNIX datagram socket bound by the test."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.notify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket in tmp_path, as systemd binds for ``$NOTIFY_SOCKET``."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield str(path), sock
    finally:
        sock.close()


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_sends_one_datagram_per_message_with_all_lines(
    listener: tuple[str, socket.socket],
) -> None:
    address, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": address})
    notifier.send("READY=1", "STATUS=running: 55b761f6, outbox depth 0, dead letters 0")
    notifier.send("STOPPING=1")
    assert receive(sock) == ["READY=1", "STATUS=running: 55b761f6, outbox depth 0, dead letters 0"]
    assert receive(sock) == ["STOPPING=1"]
    notifier.close()


def test_abstract_namespace_address() -> None:
    name = f"adw-agent-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).send("WATCHDOG=1")
        assert receive(sock) == ["WATCHDOG=1"]
    finally:
        sock.close()


def test_reloading_carries_a_monotonic_timestamp(listener: tuple[str, socket.socket]) -> None:
    address, sock = listener
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier({"NOTIFY_SOCKET": address}).reloading()
    lines = receive(sock)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert before <= int(lines[1].removeprefix("MONOTONIC_USEC=")) <= after


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier({})
    assert notifier.watchdog_interval is None
    notifier.send("READY=1")
    notifier.reloading()
    notifier.close()


def test_a_vanished_socket_never_raises(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    notifier.send("READY=1")
    notifier.send("WATCHDOG=1")
    notifier.close()


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "400000"}, 0.2),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_this_process(
    environ: dict[str, str], interval: float | None
) -> None:
    assert Notifier(environ).watchdog_interval == interval
