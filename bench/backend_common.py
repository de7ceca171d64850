"""Shared parts of the backend benchmarks: the service, a PostgreSQL cluster, WebSocket clients.

The service is ``adw-agent serve`` as a real process (the tests' :class:`ServeProcess`), the
PostgreSQL cluster is the tests' throwaway cluster (``initdb`` and ``pg_ctl`` in a temporary
directory), and the WebSocket clients live in a child process of their own
(:mod:`bench.backend_wsclients`) so that their work never delays the writer's timestamps.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from bench.procstat import Sample, sample
from tests.adw_backend.conftest import PgCluster, ServeProcess, _free_port, _has_user, _pg_bindir
from tests.harness import ROOT

DATABASES = ("sqlite", "postgresql")


@contextlib.contextmanager
def pg_cluster() -> Iterator[PgCluster]:
    """A throwaway cluster, run by an unprivileged user when the bench runs as root."""
    bindir = _pg_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL binaries (Debian's postgresql package) are not installed")
    root = Path(tempfile.mkdtemp(prefix="adw-bench-pg-"))
    prefix: list[str] = []
    user = pwd.getpwuid(os.getuid()).pw_name
    if os.getuid() == 0:
        owner = pwd.getpwnam("postgres" if _has_user("postgres") else "nobody")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        user = owner.pw_name
        prefix = ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--clear-groups"]
    cluster = PgCluster(bindir, root, _free_port(), user, prefix)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


class Databases:
    """A fresh database of each kind asked for; the cluster starts only if PostgreSQL is."""

    def __init__(self, work: Path, kinds: tuple[str, ...]) -> None:
        self.work = work
        self.kinds = kinds
        self._stack = contextlib.ExitStack()
        self._cluster: PgCluster | None = None
        self._n = 0

    def __enter__(self) -> Databases:
        if "postgresql" in self.kinds:
            self._cluster = self._stack.enter_context(pg_cluster())
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def fresh(self, kind: str) -> str:
        self._n += 1
        if kind == "sqlite":
            return f"sqlite:///{self.work / f'backend-{self._n}.db'}"
        assert self._cluster is not None
        return self._cluster.create_database()


class Serve:
    """``adw-agent serve`` on a free port, with its RSS at hand."""

    def __init__(self, work: Path, database: str, name: str = "serve") -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.proc = ServeProcess(database, work / f"{name}.log")

    def __enter__(self) -> Serve:
        self.proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stop()

    @property
    def url(self) -> str:
        return self.proc.url

    def sample(self) -> Sample:
        assert self.proc.proc is not None
        return sample(self.proc.proc.pid)


class WsClients:
    """:mod:`bench.backend_wsclients` as a child process: ``n`` clients (plus one that never
    reads, if ``stalled``) record when each message carrying a ``bench_n`` arrives."""

    def __init__(self, ws_url: str, out: Path, n: int = 1, stalled: bool = False) -> None:
        self.out = out
        args = [sys.executable, "-m", "bench.backend_wsclients", ws_url, str(out), str(n)]
        if stalled:
            args.append("--stalled")
        self.proc = subprocess.Popen(
            args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline().strip()
        if ready != "ready":
            self.proc.kill()
            raise RuntimeError(f"the WebSocket clients did not connect: {ready!r}")

    def results(self, timeout: float = 120.0) -> dict[str, Any]:
        """Stop the clients (closing their stdin) and read what they recorded."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout)
        found: dict[str, Any] = orjson.loads(self.out.read_bytes())
        return found

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
