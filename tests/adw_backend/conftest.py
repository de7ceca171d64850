"""Real parts for the backend's tests: ``adw-agent serve`` as a process, and a throwaway
PostgreSQL cluster started from Debian's binaries.

The API suite is parametrised over ``database``: ``sqlite`` and ``postgresql``. Without the
PostgreSQL binaries the PostgreSQL cases skip locally, and fail under CI (``CI=true``) so that a
missing package cannot pass unnoticed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.harness import ROOT

START_TIMEOUT = 30.0


class ServeProcess:
    """``python -m agent serve --port 0`` with its URL read from the first line of stdout."""

    def __init__(
        self,
        database: str,
        log: Path,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.database = database
        self.log = log
        self.args = args or []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, wait_healthy: bool = True) -> ServeProcess:
        command = [sys.executable, "-m", "agent", "serve", "--port", "0"]
        command += ["--database", self.database, *self.args]
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=err
            )
        assert self.proc.stdout is not None
        lines: queue.Queue[bytes] = queue.Queue()
        stdout = self.proc.stdout
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            first = lines.get(timeout=START_TIMEOUT).decode().strip()
        except queue.Empty:
            self.kill()
            raise AssertionError(f"serve printed no URL; stderr: {self.stderr()}") from None
        assert first.startswith("http://127.0.0.1:"), (first, self.stderr())
        self.url = first
        if wait_healthy:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Poll /healthz (a condition, not a fixed sleep) until the database answers."""
        done = threading.Event()
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while not done.wait(0.05):
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/healthz").status_code == 200:
                        return
                timeout -= 0.05
                if timeout <= 0:
                    break
        raise AssertionError(f"serve never became healthy; stderr: {self.stderr()}")

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until this replica LISTENs for the others' notices (PostgreSQL only)."""
        ticker = threading.Event()
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while timeout > 0:
                if client.get("/healthz").json().get("listening") is True:
                    return
                ticker.wait(0.05)
                timeout -= 0.05
        raise AssertionError(f"the replica never listened; stderr: {self.stderr()}")

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, timeout=30.0, headers=headers)

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws/workflows"


# -- PostgreSQL ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class PgCluster:
    """A cluster in a temporary directory, owned by an unprivileged user when run as root."""

    bindir: Path
    root: Path
    port: int
    user: str
    prefix: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def run(self, *args: str) -> None:
        subprocess.run(
            [*self.prefix, *args], check=True, capture_output=True, timeout=120, cwd=self.root
        )

    def start(self) -> None:
        self.run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self.start_server()

    @property
    def options(self) -> str:
        return (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c max_connections=200"
        )

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self.run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")

    def start_server(self) -> None:
        """Start the server on the cluster's port and data (again, after :meth:`stop`)."""
        self.run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            self.options,
            "-l",
            str(self.root / "log"),
            "-w",
            "-t",
            "60",
            "start",
        )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg  # noqa: PLC0415

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


def _pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[PgCluster]:
    """A new cluster, stopped and removed on exit; skips (fails under CI) without binaries."""
    bindir = _pg_bindir()
    if bindir is None:
        reason = "PostgreSQL binaries (Debian's postgresql package) are not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="adw-pg-"))
    prefix: list[str] = []
    user = pwd.getpwuid(os.getuid()).pw_name
    if os.getuid() == 0:
        # initdb refuses to run as root: hand the directory to an unprivileged user.
        owner = pwd.getpwnam("postgres") if _has_user("postgres") else pwd.getpwnam("nobody")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        user = owner.pw_name
        prefix = [
            "setpriv",
            f"--reuid={owner.pw_uid}",
            f"--regid={owner.pw_gid}",
            "--clear-groups",
        ]
    cluster = PgCluster(bindir, root, _free_port(), user, prefix)
    try:
        cluster.start()
    except subprocess.CalledProcessError as exc:
        log = (root / "log").read_text(errors="replace") if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"cannot start PostgreSQL: {exc.stderr!r} {log[-2000:]}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    with throwaway_cluster() as cluster:
        yield cluster


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database URL of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'backend.db'}"
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    return cluster.create_database()


@pytest.fixture
def start_serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Start ``serve`` processes; every one is stopped at the end of the test."""
    started: list[ServeProcess] = []

    def start(
        database: str,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        wait_healthy: bool = True,
    ) -> ServeProcess:
        log = tmp_path / f"serve-{len(started)}.log"
        server = ServeProcess(database, log, args, env).start(wait_healthy)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()
