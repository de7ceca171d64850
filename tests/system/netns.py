"""Hosts made of network namespaces: one for the backend, one per build host, one for a viewer.

Every host is joined to the backend namespace by its own veth pair, with a /24 of its own:
the backend end is ``10.231.N.1``, the host end ``10.231.N.2``. Every address lives inside
the namespaces made here (and their loopback), so nothing is added to the machine's own network
and two suites running at once cannot collide. Cutting a host takes its end of the pair down:
its agent's connections stall or fail exactly as on a pulled cable, and its files go on
being written.

Namespaces are named ``adwsys-<pid>-…``; ones left by a suite whose process is gone (a
``kill -9`` of the suite itself) are removed at the next start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass

PREFIX = "adwsys-"
#: The viewer's link number (hosts are 1…n).
VIEWER = 200


class NetnsUnavailable(RuntimeError):
    """``ip netns`` cannot be used here (not root, or no iproute2)."""


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def available() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Delete namespaces left by suites whose process no longer exists."""
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(PREFIX):
            continue
        owner = name[len(PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            _delete(name)


def _delete(name: str) -> None:
    with contextlib.suppress(RuntimeError):
        for pid in _ip("netns", "pids", name).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    with contextlib.suppress(RuntimeError):
        _ip("netns", "delete", name)


@dataclass(frozen=True)
class Link:
    """One host's side of the network: its namespace and the two ends' addresses."""

    namespace: str
    number: int

    @property
    def backend_address(self) -> str:
        """The backend namespace's address on this host's link (what the host connects to)."""
        return f"10.231.{self.number}.1"

    @property
    def host_address(self) -> str:
        return f"10.231.{self.number}.2"

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace]


class Network:
    """The namespaces of one suite: made by :meth:`up`, removed by :meth:`down`."""

    def __init__(self, hosts: int) -> None:
        self.base = f"{PREFIX}{os.getpid()}"
        self.backend = f"{self.base}-be"
        self.hosts = [Link(f"{self.base}-h{n}", n) for n in range(1, hosts + 1)]
        self.viewer = Link(f"{self.base}-vw", VIEWER)
        self._made: list[str] = []

    def backend_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.backend]

    def up(self) -> Network:
        remove_stale()
        self._add(self.backend)
        for link in [*self.hosts, self.viewer]:
            self._add(link.namespace)
            # Both ends are created straight in their namespaces: nothing in the machine's own.
            _ip(
                "link", "add", "eth0", "netns", link.namespace, "type", "veth",
                "peer", "name", f"l{link.number}", "netns", self.backend,
            )  # fmt: skip
            _ip("-n", self.backend, "addr", "add", f"{link.backend_address}/24",
                "dev", f"l{link.number}")  # fmt: skip
            _ip("-n", self.backend, "link", "set", f"l{link.number}", "up")
            _ip("-n", link.namespace, "addr", "add", f"{link.host_address}/24", "dev", "eth0")
            _ip("-n", link.namespace, "link", "set", "eth0", "up")
        return self

    def _add(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def cut(self, link: Link) -> None:
        """Take the host's end of its link down: nothing reaches the backend any more."""
        _ip("-n", link.namespace, "link", "set", "eth0", "down")

    def restore(self, link: Link) -> None:
        _ip("-n", link.namespace, "link", "set", "eth0", "up")

    def down(self) -> None:
        for name in reversed(self._made):
            _delete(name)
        self._made.clear()
