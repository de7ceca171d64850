"""The switching proxy as a real process between real sockets: piping, switching, 503 mode,
a dead upstream, kill -9 and restart."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.adw_backend.conftest import ServeProcess, start_serve
from tests.adw_backend.factory import workflow_update
from tests.harness import ROOT

__all__ = ["start_serve"]  # a fixture, used by name

WAIT = 30.0


class ProxyProcess:
    """``python -m tests.system.proxy`` with its address read from its first line."""

    def __init__(self, upstreams: list[str], control: Path, log: Path) -> None:
        self.upstreams = upstreams
        self.control_path = control
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self, listen: str = "127.0.0.1:0") -> ProxyProcess:
        command = [sys.executable, "-m", "tests.system.proxy", "--listen", listen]
        for upstream in self.upstreams:
            command += ["--upstream", upstream]
        command += ["--control", str(self.control_path)]
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
        first = read_line(self.proc)
        assert first.startswith("listening 127.0.0.1:"), (first, self.stderr())
        self.address = first.removeprefix("listening ")
        return self

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def control(self, request: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(WAIT)
            sock.connect(str(self.control_path))
            sock.sendall(request.encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = sock.recv(4096)
                assert chunk, f"the control socket closed without answering {request!r}"
                answer += chunk
        return answer.decode().strip()

    def status(self) -> dict[str, Any]:
        found: dict[str, Any] = orjson.loads(self.control("status"))
        return found

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def read_line(proc: subprocess.Popen[bytes]) -> str:
    """The process's next stdout line, waited for in a thread so a silent process fails."""
    assert proc.stdout is not None
    lines: queue.Queue[bytes] = queue.Queue()
    stdout = proc.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=WAIT).decode().strip()
    except queue.Empty:
        proc.kill()
        raise AssertionError("the process printed nothing") from None


class Greeter(socketserver.BaseRequestHandler):
    """Says its server's name on a line, then echoes; half-closes after the client does."""

    server: NamedServer

    def handle(self) -> None:
        self.request.sendall(self.server.name.encode() + b"\n")
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)
            self.request.shutdown(socket.SHUT_WR)


class NamedServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str, handler: type[socketserver.BaseRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.name = name

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


BLOB = os.urandom(8 * 1024 * 1024)


class Blob(socketserver.BaseRequestHandler):
    """Sends a blob and closes at once, whether the client has read it yet or not."""

    server: NamedServer

    def handle(self) -> None:
        self.request.sendall(BLOB)
        self.request.close()


class Sink(socketserver.BaseRequestHandler):
    """Accepts and never reads: a client writing to it through the proxy must be held back."""

    server: NamedServer

    def handle(self) -> None:
        self.request.recv(0)
        threading.Event().wait(WAIT)


@contextlib.contextmanager
def running(name: str, handler: type[socketserver.BaseRequestHandler]) -> Iterator[NamedServer]:
    server = NamedServer(name, handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> str:
    """An address where nothing listens (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths are limited to ~100 bytes: pytest's tmp_path can be longer."""
    with tempfile.TemporaryDirectory(prefix="px-") as name:
        yield Path(name)


@pytest.fixture
def start_proxy(short_dir: Path) -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def start(upstreams: list[str], listen: str = "127.0.0.1:0") -> ProxyProcess:
        proxy = ProxyProcess(upstreams, short_dir / "control", short_dir / "proxy.log")
        started.append(proxy.start(listen))
        return proxy

    yield start
    for proxy in started:
        proxy.kill()


def greeting(sock: socket.socket) -> str:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, "closed before the greeting"
        line += chunk
    return line.decode().strip()


def receive_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def is_closed(sock: socket.socket) -> bool:
    """True once the peer closed or reset the connection (blocks until something arrives)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_pipes_bytes_both_ways_and_half_closes(start_proxy: Callable[..., ProxyProcess]) -> None:
    payload = os.urandom(4 * 1024 * 1024)
    with running("zero", Greeter) as zero, running("one", Greeter) as one:
        proxy = start_proxy([zero.address, one.address])
        with proxy.connect() as sock:
            assert greeting(sock) == "zero"

            # Sent from a thread while this one reads: both directions are busy at once.
            def send() -> None:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send)
            sender.start()
            echoed = receive_all(sock)
            sender.join()
        assert echoed == payload
        status = proxy.status()
        assert status["upstream"] == 0
        assert status["mode_503"] is False
        assert status["served"] == 1


def test_an_upstream_that_closes_right_after_sending_loses_nothing(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """An upstream that sends and closes at once: a slow client (a small receive buffer)
    still gets every byte, then the end of file."""
    with running("blob", Blob) as blob:
        proxy = start_proxy([blob.address])
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(WAIT)
            sock.connect(("127.0.0.1", proxy.port))
            sock.shutdown(socket.SHUT_WR)
            assert receive_all(sock) == BLOB


def test_use_switches_and_closes_the_open_connections(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    with running("zero", Greeter) as zero, running("one", Greeter) as one:
        proxy = start_proxy([zero.address, one.address])
        with proxy.connect() as old:
            assert greeting(old) == "zero"
            assert proxy.status()["open"] == 1
            assert proxy.control("use 1") == "ok"
            assert is_closed(old)
        with proxy.connect() as new:
            assert greeting(new) == "one"
            new.sendall(b"ping")
            assert new.recv(4) == b"ping"
            status = proxy.status()
            assert (status["upstream"], status["open"], status["served"]) == (1, 1, 2)
        assert proxy.control("use 2").startswith("error: ")
        assert proxy.control("use x").startswith("error: ")
        assert proxy.control("dance").startswith("error: ")
        assert proxy.status()["upstream"] == 1


def test_503_mode_answers_real_503s_then_resumes(
    start_serve: Callable[..., ServeProcess],
    start_proxy: Callable[..., ProxyProcess],
    tmp_path: Path,
) -> None:
    server = start_serve(f"sqlite:///{tmp_path / 'backend.db'}")
    proxy = start_proxy([server.url.removeprefix("http://")])
    base = f"http://{proxy.address}"
    ev = workflow_update("p1", 1, branch_name="feat-proxy")
    with httpx.Client(base_url=base, timeout=WAIT) as client:
        response = client.post("/api/v1/event/workflow_update", content=orjson.dumps(ev))
        assert response.status_code == 200, response.text
        assert client.get("/api/v1/workflows/p1").json()["state"]["branch_name"] == "feat-proxy"
        # A keep-alive connection is open through the proxy; 503 mode closes it.
        assert proxy.status()["open"] == 1
        assert proxy.control("503 on") == "ok"
        assert proxy.status()["open"] == 0
        for _ in range(2):
            refused = client.post("/api/v1/event/workflow_update", content=orjson.dumps(ev))
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.headers["content-type"] == "application/json"
            assert refused.headers["connection"] == "close"
            assert refused.json()["reason"]
        assert proxy.status()["mode_503"] is True
        assert proxy.control("503 off") == "ok"
        assert client.get("/healthz").status_code == 200
        response = client.post("/api/v1/event/workflow_update", content=orjson.dumps(ev))
        assert response.json() == {"accepted": 0, "duplicates": 1}


def test_a_dead_upstream_closes_the_client(start_proxy: Callable[..., ProxyProcess]) -> None:
    with running("zero", Greeter) as zero:
        proxy = start_proxy([zero.address, closed_port()])
        assert proxy.control("use 1") == "ok"
        with proxy.connect() as sock:
            assert is_closed(sock)
        assert "unreachable" in proxy.stderr()
        assert proxy.control("use 0") == "ok"
        with proxy.connect() as sock:
            assert greeting(sock) == "zero"


def test_an_upstream_that_never_answers_times_out_and_closes_the_client(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """A listening socket with a full backlog drops SYNs: the connect hangs, as to a host
    behind a partition."""
    with socket.socket() as blackhole, socket.socket() as filler:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        filler.connect(blackhole.getsockname())  # fills the accept queue; never accepted
        port = blackhole.getsockname()[1]
        proxy = start_proxy([f"127.0.0.1:{port}"])
        with proxy.connect() as sock:
            assert is_closed(sock)
        assert "unreachable (timed out)" in proxy.stderr()
        assert proxy.status()["open"] == 0


def test_a_client_that_writes_to_a_stalled_upstream_is_held_back(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """Flow control: the proxy stops reading when the upstream stops, rather than buffering.
    The client's sends stall well before the bound (kernel buffers are a few MiB)."""
    bound = 256 * 1024 * 1024
    chunk = b"x" * (1024 * 1024)
    with running("sink", Sink) as sink:
        proxy = start_proxy([sink.address])
        with proxy.connect() as sock:
            sock.settimeout(2.0)
            sent = 0
            with contextlib.suppress(TimeoutError):
                while sent < bound:
                    sent += sock.send(chunk)
        assert sent < bound / 4, sent


def test_kill_9_and_restart_on_the_same_port(start_proxy: Callable[..., ProxyProcess]) -> None:
    with running("zero", Greeter) as zero:
        first = start_proxy([zero.address])
        with first.connect() as sock:
            assert greeting(sock) == "zero"
        first.kill()
        assert first.control_path.exists()  # left behind by kill -9
        second = start_proxy([zero.address], listen=f"127.0.0.1:{first.port}")
        assert second.port == first.port
        with second.connect() as sock:
            assert greeting(sock) == "zero"
        assert second.status()["served"] == 1


def test_sigterm_exits_0_and_removes_the_control_socket(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    with running("zero", Greeter) as zero:
        proxy = start_proxy([zero.address])
        with proxy.connect() as sock:
            assert greeting(sock) == "zero"
            assert proxy.proc is not None
            proxy.proc.send_signal(signal.SIGTERM)
            assert proxy.proc.wait(WAIT) == 0
            assert is_closed(sock)
        assert not proxy.control_path.exists()
        assert "Traceback" not in proxy.stderr()


def test_bad_arguments_exit_78_with_one_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tests.system.proxy", "--listen", "nowhere"]
    command += ["--upstream", "127.0.0.1:1", "--control", str(tmp_path / "c")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=WAIT, check=False)
    assert done.returncode == 78
    assert done.stderr.decode().strip().splitlines() == [
        "proxy: --listen 'nowhere': expected HOST:PORT"
    ]


def test_a_port_in_use_exits_78_naming_the_option(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "tests.system.proxy", "--listen", f"127.0.0.1:{port}"]
        command += ["--upstream", "127.0.0.1:1", "--control", str(tmp_path / "c")]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=WAIT, check=False)
    assert done.returncode == 78
    assert done.stderr.decode().strip().splitlines() == [
        f"proxy: --listen 127.0.0.1:{port}: Address already in use"
    ]
