"""The parts of the system as real processes: PostgreSQL, two ``serve`` replicas, the switching
proxy, one host-mode agent per build host and a WebSocket viewer.

Every process can be killed with ``kill -9`` and started again with the same addresses, ports
and files, as a supervisor would. Each part keeps its kill count and the peak resident memory
(``VmHWM``) seen over all its lifetimes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tests.adw_backend.conftest import PgCluster
from tests.harness import ROOT
from tests.system.netns import Link

Kind = Literal["agent", "replica", "proxy", "viewer", "postgresql"]
TOKEN = "system-write-token"
READ_TOKEN = "system-read-token"
START_TIMEOUT = 60.0


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM) in MiB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class Part:
    """One restartable process."""

    name: str
    kind: Kind
    command: list[str]
    log: Path
    first_line: bool = False
    kills: int = 0
    starts: int = 0
    peak_mb: float = 0.0
    proc: subprocess.Popen[bytes] | None = None
    line: str = ""

    def start(self) -> Part:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.first_line else subprocess.DEVNULL,
                stderr=err,
            )
        self.starts += 1
        if self.first_line:
            self.line = self._read_first_line()
        return self

    def _read_first_line(self) -> str:
        assert self.proc is not None
        assert self.proc.stdout is not None
        out = self.proc.stdout
        lines: queue.Queue[bytes] = queue.Queue()

        def pump() -> None:
            # The first line is the address; the rest is drained so the pipe never fills.
            for raw in out:
                lines.put(raw)

        threading.Thread(target=pump, daemon=True).start()
        try:
            return lines.get(timeout=START_TIMEOUT).decode().strip()
        except queue.Empty:
            self.kill9(count=False)
            raise AssertionError(f"{self.name} printed nothing; log: {self.tail()}") from None

    def sample(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.peak_mb = max(self.peak_mb, peak_rss_mb(self.proc.pid))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self, *, count: bool = True) -> None:
        if self.proc is None:
            return
        self.sample()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            if count:
                self.kills += 1
        self.proc.wait(30)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        self.sample()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None

    def tail(self, size: int = 3000) -> str:
        if not self.log.exists():
            return ""
        with self.log.open("rb") as f:
            f.seek(max(0, self.log.stat().st_size - size))
            return f.read().decode(errors="replace")


def free_port() -> int:
    """A port free on every namespace's loopback alike: asked of this one, then kept."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def replica(name: str, prefix: list[str], port: int, database: str, work: Path) -> Part:
    command = [
        *prefix, sys.executable, "-m", "agent", "serve", "--host", "0.0.0.0",
        "--port", str(port), "--database", database,
        "--token-file", str(work / "tokens"), "--read-token-file", str(work / "read-tokens"),
    ]  # fmt: skip
    return Part(name, "replica", command, work / f"{name}.log", first_line=True)


def proxy(prefix: list[str], port: int, upstreams: list[int], control: Path, work: Path) -> Part:
    command = [*prefix, sys.executable, "-m", "tests.system.proxy", "--listen", f"0.0.0.0:{port}"]
    for upstream in upstreams:
        command += ["--upstream", f"127.0.0.1:{upstream}"]
    command += ["--control", str(control)]
    return Part("proxy", "proxy", command, work / "proxy.log", first_line=True)


def viewer(link: Link, urls: list[str], out: Path, work: Path) -> Part:
    command = [*link.exec_prefix(), sys.executable, "-m", "tests.system.viewer"]
    for url in urls:
        command += ["--url", url]
    command += ["--token-file", str(work / "read-tokens"), "--out", str(out)]
    return Part("viewer", "viewer", command, work / "viewer.log", first_line=True)


@dataclass
class Host:
    """A build host: its namespace, its ``agents/`` root, its agent and the agent's storage on
    a small file system of its own (so that it can be filled)."""

    number: int
    link: Link
    root: Path
    disk: Path
    backend_url: str
    agent: Part = field(init=False)

    @property
    def storage(self) -> Path:
        return self.disk / "store"

    @property
    def status_id(self) -> str:
        return f"host-h{self.number}"

    @property
    def config(self) -> Path:
        return self.root.parent / "agent.toml"

    def setup(self, size_mb: int) -> None:
        self.root.mkdir(parents=True)
        self.disk.mkdir(parents=True)
        mount = ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs"]
        subprocess.run([*mount, str(self.disk)], check=True, capture_output=True, timeout=30)
        self.storage.mkdir()
        lines: dict[str, dict[str, object]] = {
            # Namespaces share the machine's host name: each host names its status itself.
            "adw": {"root": str(self.root), "id": self.status_id},
            "backend": {
                "url": self.backend_url,
                "token_file": str(self.root.parent / "token"),
                "connect_timeout": 2.0,
                "timeout": 5.0,
                # Plain http with a token, on the suite's own private links.
                "allow_insecure": True,
            },
            "storage": {"dir": str(self.storage)},
            "delivery": {"backoff_initial": 0.05, "backoff_max": 1.0, "drain_timeout": 2.0},
            "intervals": {"heartbeat": 5.0},
            "log": {"level": "info"},
        }
        (self.root.parent / "token").write_text(TOKEN + "\n")
        text = []
        for section, values in lines.items():
            text.append(f"[{section}]")
            text += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        self.config.write_text("\n".join(text) + "\n")
        command = [*self.link.exec_prefix(), sys.executable, "-m", "agent", "run",
                   "--config", str(self.config)]  # fmt: skip
        self.agent = Part(f"agent-h{self.number}", "agent", command, self.root.parent / "agent.log")

    def fill_disk(self) -> None:
        """Fill the storage's file system to the last byte."""
        with (self.disk / "filler").open("ab", buffering=0) as f:
            for chunk in (1 << 20, 1 << 12, 1):
                block = b"\0" * chunk
                while True:
                    try:
                        f.write(block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break

    def free_disk(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.disk / "filler").unlink()

    def teardown(self) -> None:
        subprocess.run(
            ["umount", "-l", str(self.disk)], capture_output=True, timeout=30, check=False
        )


def restart_pg(cluster: PgCluster, down: float, stop: threading.Event) -> None:
    cluster.stop()
    stop.wait(down)
    cluster.start_server()


def wait_for(predicate: Callable[[], bool], what: str, timeout: float, tick: float = 0.1) -> float:
    """Poll ``predicate`` until true; the seconds it took."""
    started = time.monotonic()
    ticker = threading.Event()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        ticker.wait(tick)
    return time.monotonic() - started
