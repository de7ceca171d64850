"""The reconnecting viewer as a real process against real ``serve`` processes: it follows the
snapshot and the events, dumps on SIGUSR1, and converges again after its server is killed."""

from __future__ import annotations

import queue
import random
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.adw_backend.conftest import PgCluster, ServeProcess, pg_cluster, start_serve
from tests.adw_backend.factory import cost_update, workflow_update
from tests.harness import ROOT
from tests.system.test_proxy import ProxyProcess, short_dir, start_proxy
from tests.system.viewer import apply

__all__ = ["pg_cluster", "short_dir", "start_proxy", "start_serve"]  # fixtures, used by name

WAIT = 30.0
WRITE_TOKEN = "write-token-for-the-viewer-test"
READ_TOKEN = "read-token-for-the-viewer-test"

Start = Callable[..., ServeProcess]


class ViewerProcess:
    """``python -m tests.system.viewer``; its stdout lines are collected by a thread."""

    def __init__(self, urls: list[str], token_file: Path, out: Path, log: Path) -> None:
        command = [sys.executable, "-m", "tests.system.viewer"]
        for url in urls:
            command += ["--url", url]
        command += ["--token-file", str(token_file), "--out", str(out)]
        self.out = out
        self.log = log
        self.lines: queue.Queue[str] = queue.Queue()
        self.dumps = 0
        with log.open("ab") as err:
            self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.decode().strip())

    def wait_connected(self, url: str) -> None:
        """Wait for the line ``connected URL`` (skipping connections to other URLs)."""
        while True:
            try:
                line = self.lines.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(f"never connected to {url}; {self.stderr()}") from None
            if line == f"connected {url}":
                return

    def dump(self) -> dict[str, Any]:
        """Ask for a dump and wait until the file holds it."""
        self.dumps += 1
        self.proc.send_signal(signal.SIGUSR1)
        ticker = threading.Event()
        for _ in range(int(WAIT / 0.02)):
            if self.out.exists():
                found: dict[str, Any] = orjson.loads(self.out.read_bytes())
                if found["dump"] == self.dumps:
                    return found
            ticker.wait(0.02)
        raise AssertionError(f"dump {self.dumps} never written; {self.stderr()}")

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_stderr(self, text: str) -> None:
        ticker = threading.Event()
        for _ in range(int(WAIT / 0.05)):
            if text in self.stderr():
                return
            assert self.proc.poll() is None, self.stderr()
            ticker.wait(0.05)
        raise AssertionError(f"{text!r} never logged; {self.stderr()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def start_viewer(tmp_path: Path) -> Iterator[Callable[..., ViewerProcess]]:
    started: list[ViewerProcess] = []

    def start(urls: list[str], token: str = READ_TOKEN) -> ViewerProcess:
        n = len(started)
        token_file = tmp_path / f"viewer-{n}.token"
        token_file.write_text(f"{token}\n")
        viewer = ViewerProcess(
            urls, token_file, tmp_path / f"view-{n}.json", tmp_path / f"viewer-{n}.log"
        )
        started.append(viewer)
        return viewer

    yield start
    for viewer in started:
        viewer.kill()


@pytest.fixture
def token_args(tmp_path: Path) -> list[str]:
    (tmp_path / "write.tokens").write_text(f"{WRITE_TOKEN}\n")
    (tmp_path / "read.tokens").write_text(f"{READ_TOKEN}\n")
    return [
        "--token-file",
        str(tmp_path / "write.tokens"),
        "--read-token-file",
        str(tmp_path / "read.tokens"),
    ]


def post(server: ServeProcess, *events: dict[str, Any]) -> None:
    with server.client(WRITE_TOKEN) as client:
        for ev in events:
            response = client.post(f"/api/v1/event/{ev['type']}", content=orjson.dumps(ev))
            assert response.status_code == 200, response.text


def converge(viewer: ViewerProcess, server: ServeProcess, adw_ids: list[str]) -> dict[str, Any]:
    """Dump until the view equals what the server answers for ``adw_ids`` (and nothing else)."""
    expected: dict[str, Any] = {}
    with server.client(READ_TOKEN) as client:
        for adw_id in adw_ids:
            response = client.get(f"/api/v1/workflows/{adw_id}")
            assert response.status_code == 200, response.text
            expected[adw_id] = response.json()
    ticker = threading.Event()
    for _ in range(int(WAIT / 0.05)):
        dumped = viewer.dump()
        if dumped["workflows"] == expected:
            return dumped
        ticker.wait(0.05)
    raise AssertionError(f"never converged: {dumped['workflows']} != {expected}")


def dead_ws_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"ws://127.0.0.1:{sock.getsockname()[1]}/ws/workflows"


def test_follows_snapshot_events_and_deletes(
    start_serve: Start,
    start_viewer: Callable[..., ViewerProcess],
    token_args: list[str],
    tmp_path: Path,
) -> None:
    server = start_serve(f"sqlite:///{tmp_path / 'backend.db'}", token_args)
    post(server, workflow_update("v1", 1, branch_name="feat-one"))
    post(server, workflow_update("gone", 1, branch_name="feat-gone"))
    viewer = start_viewer([server.ws_url])
    viewer.wait_connected(server.ws_url)
    dumped = converge(viewer, server, ["v1", "gone"])  # from the snapshot
    assert dumped["connections"] == 1
    assert dumped["messages"] >= 1
    assert dumped["connected"] is True
    assert dumped["url"] == server.ws_url

    post(server, cost_update("v1", 2, 0.5), workflow_update("v2", 1, branch_name="feat-two"))
    with server.client(WRITE_TOKEN) as client:
        assert client.delete("/api/v1/workflows/gone").status_code == 200
    dumped = converge(viewer, server, ["v1", "v2"])
    assert dumped["workflows"]["v1"]["cost"]["current_cost"] == 0.5
    assert dumped["messages"] >= 4

    viewer.proc.send_signal(signal.SIGTERM)
    assert viewer.proc.wait(WAIT) == 0
    last = orjson.loads(viewer.out.read_bytes())
    assert last["dump"] == viewer.dumps + 1
    assert last["workflows"] == dumped["workflows"]
    assert "Traceback" not in viewer.stderr()


def test_wrong_token_is_retried_quietly_and_never_shown(
    start_serve: Start,
    start_viewer: Callable[..., ViewerProcess],
    token_args: list[str],
    tmp_path: Path,
) -> None:
    server = start_serve(f"sqlite:///{tmp_path / 'backend.db'}", token_args)
    wrong = "not-the-token-but-still-secret"
    viewer = start_viewer([server.ws_url], token=wrong)
    viewer.wait_stderr("no URL answers")
    dumped = viewer.dump()
    assert (dumped["connections"], dumped["connected"], dumped["url"]) == (0, False, None)
    assert "401" in viewer.stderr()
    assert wrong not in viewer.stderr()
    assert wrong not in viewer.out.read_text()


def test_reconnects_after_kill_9_and_converges(
    start_serve: Start,
    start_viewer: Callable[..., ViewerProcess],
    token_args: list[str],
    tmp_path: Path,
) -> None:
    """One SQLite serve, killed and restarted on the same port; a dead URL first in the list
    makes the viewer go round the list."""
    database = f"sqlite:///{tmp_path / 'backend.db'}"
    server = start_serve(database, token_args)
    port = server.url.rpartition(":")[2]
    post(server, workflow_update("k1", 1, branch_name="feat-kill"))
    viewer = start_viewer([dead_ws_url(), server.ws_url])
    viewer.wait_connected(server.ws_url)
    converge(viewer, server, ["k1"])

    server.kill()
    dumped = viewer.dump()  # meanwhile it may or may not have noticed: both are fine
    assert dumped["connections"] == 1
    restarted = start_serve(database, [*token_args, "--port", port])
    assert restarted.ws_url == server.ws_url
    post(restarted, cost_update("k1", 2, 1.25), workflow_update("k2", 1, branch_name="feat-2"))
    viewer.wait_connected(server.ws_url)
    dumped = converge(viewer, restarted, ["k1", "k2"])
    assert dumped["connections"] == 2
    assert dumped["workflows"]["k1"]["cost"]["current_cost"] == 1.25
    assert "Traceback" not in viewer.stderr()


def test_fails_over_between_replicas_on_postgresql(
    start_serve: Start,
    start_viewer: Callable[..., ViewerProcess],
    pg_cluster: PgCluster,
    token_args: list[str],
) -> None:
    database = pg_cluster.create_database()
    a = start_serve(database, token_args)
    b = start_serve(database, token_args)
    post(a, workflow_update("r1", 1, branch_name="feat-replica"))
    viewer = start_viewer([a.ws_url, b.ws_url])
    viewer.wait_connected(a.ws_url)
    converge(viewer, a, ["r1"])

    a.kill()
    viewer.wait_connected(b.ws_url)
    post(b, cost_update("r1", 2, 2.5), workflow_update("r2", 1, branch_name="feat-b"))
    dumped = converge(viewer, b, ["r1", "r2"])
    assert dumped["connections"] == 2
    assert dumped["url"] == b.ws_url

    # B goes too; A comes back on its port: the viewer goes round to it.
    b.kill()
    back = start_serve(database, [*token_args, "--port", a.url.rpartition(":")[2]])
    viewer.wait_connected(a.ws_url)
    post(back, cost_update("r2", 2, 0.25))
    dumped = converge(viewer, back, ["r1", "r2"])
    assert dumped["connections"] == 3


def test_through_the_proxy_failover_and_503(
    start_serve: Start,
    start_viewer: Callable[..., ViewerProcess],
    start_proxy: Callable[..., ProxyProcess],
    pg_cluster: PgCluster,
    token_args: list[str],
) -> None:
    """The two programs together, as the fault suite uses them: one URL, the proxy's."""
    database = pg_cluster.create_database()
    a = start_serve(database, token_args)
    b = start_serve(database, token_args)
    proxy = start_proxy([a.url.removeprefix("http://"), b.url.removeprefix("http://")])
    url = f"ws://{proxy.address}/ws/workflows"
    post(a, workflow_update("p1", 1, branch_name="feat-proxy"))
    viewer = start_viewer([url])
    viewer.wait_connected(url)
    converge(viewer, a, ["p1"])

    assert proxy.control("use 1") == "ok"
    viewer.wait_connected(url)
    post(b, cost_update("p1", 2, 3.5))
    dumped = converge(viewer, b, ["p1"])
    assert dumped["connections"] == 2

    assert proxy.control("503 on") == "ok"
    viewer.wait_stderr("no URL answers")
    assert "503" in viewer.stderr()
    assert viewer.dump()["connected"] is False
    post(b, workflow_update("p2", 1, branch_name="feat-after-503"))
    assert proxy.control("503 off") == "ok"
    viewer.wait_connected(url)
    dumped = converge(viewer, b, ["p1", "p2"])
    assert dumped["connections"] == 3


def test_bad_token_file_exits_78_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    command = [sys.executable, "-m", "tests.system.viewer", "--url", "ws://127.0.0.1:1/ws"]
    command += ["--token-file", str(tmp_path / "empty"), "--out", str(tmp_path / "v.json")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=WAIT, check=False)
    assert done.returncode == 78
    assert done.stderr.decode().strip().splitlines() == [
        f"viewer: --token-file {tmp_path / 'empty'}: no token in the file"
    ]


# -- the view's rules, on their own -------------------------------------------------------------


def message(adw_id: str, revision: int | None, tag: str = "") -> dict[str, Any]:
    workflow: dict[str, Any] = {"adw_id": adw_id, "tag": tag}
    if revision is not None:
        workflow["revision"] = revision
    return {"type": "workflow_update", "data": {"adw_id": adw_id, "workflow": workflow}}


def test_a_lower_revision_is_ignored_and_a_missing_one_is_taken() -> None:
    view: dict[str, Any] = {}
    assert apply(view, message("a", 5, "five")) is None
    apply(view, message("a", 4, "four"))
    assert view["a"]["tag"] == "five"
    apply(view, message("a", 5, "five again"))
    assert view["a"]["tag"] == "five again"
    apply(view, message("a", None, "no revision"))
    assert view["a"]["tag"] == "no revision"
    apply(view, message("a", 1, "one"))  # the held projection has no revision: taken
    assert view["a"]["tag"] == "one"
    apply(view, {"type": "workflow_deleted", "data": {"adw_id": "a"}})
    assert view == {}
    apply(view, message("b", 1))
    snapshot = {"type": "workflows_snapshot", "data": {"workflows": [{"adw_id": "c"}]}}
    assert apply(view, snapshot) is None
    assert view == {"c": {"adw_id": "c"}}
    assert apply(view, [1, 2]) is not None
    assert apply(view, {"type": "cost_update", "data": {"adw_id": "c"}}) is not None
    assert view == {"c": {"adw_id": "c"}}


@given(st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=30), st.randoms())
def test_out_of_order_revisions_leave_the_highest(revisions: list[int], rnd: random.Random) -> None:
    shuffled = list(revisions)
    rnd.shuffle(shuffled)
    view: dict[str, Any] = {}
    for revision in shuffled:
        apply(view, message("a", revision))
    assert view["a"]["revision"] == max(revisions)
