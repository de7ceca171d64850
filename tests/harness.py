"""Real parts for integration tests: a scriptable backend, the agent as a process, an ADW writer.

Nothing here mocks the agent. The backend is a real HTTP server on 127.0.0.1 (port 0) that can
answer any status, send ``Retry-After``, hang, reset the connection or answer slowly. The agent
runs as ``python -m agent run`` in its own process. The writer changes files the way
tac-webbuilder does: in place (``open(path, "w")``), sometimes in two halves, transcripts
appended line by line and truncated on retry.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


# -- backend ----------------------------------------------------------------------------------


@dataclass
class Reply:
    """How the backend answers one request."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b'{"ok":true}'
    delay: float = 0.0  # answer after this many seconds ("slow" or, past the timeout, "hang")
    reset: bool = False  # close the connection with RST instead of answering
    # Store a 2xx event *before* the delay/reset/answer, like a backend that commits and then
    # answers: if the answer is lost (reset, client killed or gone) the agent sends it again.
    commit: bool = False
    # Send the answer one byte every ``drip`` seconds (status line, headers and body).
    drip: float = 0.0
    # Send "102 Processing" every 0.2 s for this many seconds before the answer.
    processing: float = 0.0


Policy = Callable[[dict[str, Any]], Reply]


@dataclass
class Received:
    event: dict[str, Any]
    headers: dict[str, str]
    path: str
    at: float  # time.time() when the request was read
    status: int
    batch: int = 0  # the number of events in the request if it was a batch, else 0


class Backend:
    """A real HTTP backend that records every request and answers as ``policy`` says.

    With ``ssl_context`` it serves HTTPS. :meth:`go_down` / :meth:`go_up` take the listener away
    and back on the same port (connections are refused meanwhile, open ones are cut).
    """

    def __init__(self, port: int = 0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.requests: list[Received] = []
        self.accepted: dict[str, dict[str, Any]] = {}  # event_id -> event (2xx answered)
        self.order: list[str] = []  # event_ids in first-accepted order
        # Every 2xx the backend stored, repeats included: (event_id, seq, raw body).
        self.deliveries: list[tuple[str, int, bytes]] = []
        self.policy: Policy = lambda event: Reply()
        # A backend without the batch route answers this status to every batch, e.g. 404.
        self.batch_status: int | None = None
        self._cond = threading.Condition()
        self._ssl = ssl_context
        self._conns: set[socket.socket] = set()
        self.server: ThreadingHTTPServer | None = self._listen(port)
        self._port = int(self.server.server_address[1])

    def _listen(self, port: int) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        server.daemon_threads = True
        if self._ssl is not None:
            server.socket = self._ssl.wrap_socket(server.socket, server_side=True)
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return server

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def up(self) -> bool:
        return self.server is not None

    def go_down(self) -> None:
        """Stop listening and cut every open connection: the agent sees connection errors."""
        server, self.server = self.server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._cond:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def go_up(self) -> None:
        """Listen again on the same port."""
        if self.server is None:
            self.server = self._listen(self._port)

    def close(self) -> None:
        self.go_down()

    # what the tests look at

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Accepted events, deduplicated by event_id, in the order first accepted."""
        with self._cond:
            out = [self.accepted[i] for i in self.order]
        return [e for e in out if kind is None or e["type"] == kind]

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 20.0
    ) -> list[dict[str, Any]]:
        """Block until ``predicate(accepted events)`` holds; fail the test on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                events = [self.accepted[i] for i in self.order]
                if predicate(events):
                    return events
                left = deadline - time.monotonic()
                if left <= 0:
                    kinds = [(e["seq"], e["type"]) for e in events]
                    raise AssertionError(f"timed out waiting; accepted so far: {kinds}")
                self._cond.wait(left)

    def wait_requests(self, n: int, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out: {len(self.requests)} of {n} requests")
                self._cond.wait(left)
            return list(self.requests)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The status line and headers go out in one write and the body in another: with
            # Nagle's algorithm on, each answer would wait ~40 ms for the client's delayed ACK.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with backend._cond:
                    backend._conns.add(self.connection)

            def finish(self) -> None:
                with backend._cond:
                    backend._conns.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def _store(self, event: dict[str, Any], body: bytes) -> None:
                with backend._cond:
                    backend.deliveries.append((event["event_id"], event.get("seq", -1), body))
                    if event["event_id"] not in backend.accepted:
                        backend.accepted[event["event_id"]] = event
                        backend.order.append(event["event_id"])
                    backend._cond.notify_all()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                try:
                    data = json.loads(body)
                except ValueError:
                    # The client died half way through sending: nothing to answer.
                    self.close_connection = True
                    return
                batch = isinstance(data, list)
                events: list[dict[str, Any]] = data if batch else [data]
                if batch and backend.batch_status is not None:
                    reply = Reply(backend.batch_status, body=b'{"detail":"Not Found"}')
                else:
                    # A batch is one transaction: the first refusal among its events is the
                    # answer to all of them, and nothing of it is stored.
                    replies = [backend.policy(event) for event in events]
                    refused = [r for r in replies if not 200 <= r.status < 300]
                    reply = refused[0] if refused else max(replies, key=lambda r: r.delay)
                    if batch and not refused:
                        # Like the real backend: the events it already holds are duplicates.
                        with backend._cond:
                            held = sum(e["event_id"] in backend.accepted for e in events)
                        counts = {"accepted": len(events) - held, "duplicates": held}
                        reply = Reply(
                            reply.status,
                            reply.headers,
                            json.dumps(counts).encode(),
                            reply.delay,
                            reply.reset,
                            reply.commit,
                            reply.drip,
                            reply.processing,
                        )
                with backend._cond:
                    for event in events:
                        backend.requests.append(
                            Received(
                                event,
                                dict(self.headers),
                                self.path,
                                time.time(),
                                reply.status,
                                len(events) if batch else 0,
                            )
                        )
                    backend._cond.notify_all()
                ok = 200 <= reply.status < 300
                raw = [json.dumps(e).encode() for e in events] if batch else [body]
                if ok and reply.commit:
                    self._store_all(events, raw)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.reset:
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                    self.close_connection = True
                    return
                try:
                    self._interim(reply.processing)
                    head = [f"HTTP/1.1 {reply.status} {self.responses.get(reply.status, ('',))[0]}"]
                    head += [f"{k}: {v}" for k, v in reply.headers.items()]
                    head += [f"Content-Length: {len(reply.body)}", "", ""]
                    answer = "\r\n".join(head).encode("latin-1") + reply.body
                    if reply.drip:
                        for i in range(len(answer)):
                            self.wfile.write(answer[i : i + 1])
                            self.wfile.flush()
                            time.sleep(reply.drip)
                    else:
                        self.wfile.write(answer)
                except OSError:
                    self.close_connection = True
                    return  # the client gave up (timeout): nothing was accepted
                if ok and not reply.commit:
                    self._store_all(events, raw)

            def _interim(self, seconds: float) -> None:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    self.wfile.write(b"HTTP/1.1 102 Processing\r\n\r\n")
                    self.wfile.flush()
                    time.sleep(0.2)

            def _store_all(self, events: list[dict[str, Any]], raw: list[bytes]) -> None:
                for event, body in zip(events, raw, strict=True):
                    self._store(event, body)

        return Handler


# -- the agent as a process ----------------------------------------------------------------


def write_config(
    path: Path, run_dir: Path, storage: Path, url: str, **sections: dict[str, Any]
) -> Path:
    """A TOML config; ``sections`` adds or overrides keys, e.g. ``watch={"debounce_ms": 0}``."""
    data: dict[str, dict[str, Any]] = {
        "adw": {"dir": str(run_dir)},
        "backend": {"url": url},
        "storage": {"dir": str(storage)},
        "delivery": {"backoff_initial": 0.05, "backoff_max": 1.0, "drain_timeout": 2.0},
        "log": {"level": "debug"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    lines = []
    for name, values in data.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


class AgentProcess:
    """``python -m agent run --config F`` as a child process, its stderr kept in a file."""

    def __init__(
        self,
        config: Path,
        log: Path,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # A command the agent runs under, e.g. ``setpriv`` to drop privileges (it must exec).
        self.prefix = prefix or []
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self) -> AgentProcess:
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "agent", "run", "--config", str(self.config)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=self.env,
            )
        return self

    def wait_started(self, timeout: float = 20.0) -> AgentProcess:
        """Wait until the agent has queued its startup snapshot and handles signals."""
        self.wait_log(lambda entry: entry.get("message") == "agent started", timeout)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> list[dict[str, Any]]:
        """This process's JSON log lines (earlier processes sharing the file are left out)."""
        with self.log.open("rb") as f:
            f.seek(self._log_offset)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def wait_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0
    ) -> dict[str, Any]:
        """Wait for a log line; the agent writes them unbuffered, so this follows the file."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.logs():
                if predicate(entry):
                    return entry
            if not self.running():
                break
            time.sleep(0.02)
        raise AssertionError(f"log line not found; log: {self.log.read_text()[-3000:]}")


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``adw-agent ARGS`` as a process of its own, its output captured."""
    return run_module("agent", *args, env=env, timeout=timeout)


def run_module(
    module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` from the project's root, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


# -- writing an ADW run like tac-webbuilder does ------------------------------------------


class AdwWriter:
    """Writes the files of one run directory the way the orchestrator does."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)

    def write_json(self, name: str, data: Any, halves: bool = False, pause: float = 0.1) -> None:
        """``open(path, "w")`` then ``json.dump(data, f, indent=2)``: in place, no temp file."""
        text = json.dumps(data, indent=2)
        with (self.run_dir / name).open("w") as f:
            if halves:
                f.write(text[: len(text) // 2])
                f.flush()
                time.sleep(pause)
                f.write(text[len(text) // 2 :])
            else:
                f.write(text)

    def state(self, data: dict[str, Any], **kw: Any) -> None:
        self.write_json("adw_state.json", data, **kw)

    def phases(self, completed: list[str], current: str | None) -> None:
        self.write_json(
            "completed_phases.json",
            {"completed": completed, "current": current, "last_updated": "2026-01-01T00:00:00"},
        )

    def error_log(self, text: str) -> None:
        with (self.run_dir / "error.log").open("a") as f:
            f.write(text)

    def transcript(self, agent: str) -> Path:
        (self.run_dir / agent).mkdir(exist_ok=True)
        return self.run_dir / agent / "raw_output.jsonl"

    def start_attempt(self, agent: str) -> None:
        """The orchestrator opens the transcript with "w" for every attempt."""
        self.transcript(agent).write_bytes(b"")

    def append(self, agent: str, *lines: bytes | dict[str, Any]) -> None:
        with self.transcript(agent).open("ab") as f:
            for line in lines:
                raw = line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n"
                f.write(raw)
                f.flush()


def fixture_lines(name: str) -> list[bytes]:
    """The lines (with newlines) of a transcript fixture, found in either fixture folder."""
    for folder in ("real", "claude_stream", "multi_run"):
        path = FIXTURES / folder / name
        if path.exists():
            return path.read_bytes().splitlines(keepends=True)
    raise FileNotFoundError(name)


@contextlib.contextmanager
def running_agent(config: Path, log: Path, **kw: Any) -> Iterator[AgentProcess]:
    agent = AgentProcess(config, log, **kw).start()
    try:
        yield agent
    finally:
        if agent.running():
            agent.proc.kill()  # type: ignore[union-attr]
            agent.proc.wait(10)  # type: ignore[union-attr]
