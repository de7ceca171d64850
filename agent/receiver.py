"""A small, real event receiver for local use, the demo and tests: ``adw-agent receive``.

It accepts ``POST .../event/{type}`` with one event and ``POST .../events`` with a JSON array of
up to 1,000 events (a batch), answers 200, deduplicates by ``event_id`` (a re-sent event is
acknowledged again but recorded once), prints one readable line per new event and appends each
new event to a JSON-lines file. A batch, like one event, is answered ``{"accepted": n,
"duplicates": m}``; one that is not an array of events is refused whole with 400.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import orjson

MAX_BODY = 16 * 1024 * 1024
MAX_BATCH = 1000


def describe(event: dict[str, Any]) -> str:
    """One human line for an event."""
    data = event.get("data") or {}
    kind = event.get("type", "?")
    if kind == "workflow_update":
        changed = ", ".join(data.get("changed", [])) or "no change"
        detail = f"changed: {changed}"
        if "status" in data:
            detail += f" (status={data['status']})"
    elif kind == "phase_update":
        detail = (
            f"{data.get('status')} current={data.get('current_phase')} "
            f"done={data.get('completed_phases')}"
        )
        if data.get("completed_phase"):
            detail += f" completed {data['completed_phase']} for ${data.get('phase_cost') or 0:.4f}"
    elif kind == "cost_update":
        detail = (
            f"${data.get('current_cost', 0):.6f} (delta {data.get('cost_delta', 0):+.6f}, "
            f"final={data.get('final')}, phase={data.get('current_phase')})"
        )
    elif kind == "workflow_failed":
        excerpt = (data.get("error_excerpt") or "").strip().splitlines()
        detail = f"{data.get('reason')}: {excerpt[-1] if excerpt else ''}"
    elif kind == "workflow_completed":
        detail = (
            f"${data.get('final_cost') or 0:.6f} done={data.get('completed_phases')} "
            f"in {data.get('duration_s')}s"
        )
    elif kind == "agent_status":
        detail = f"{data.get('state')} outbox={data.get('outbox_depth')}"
    else:
        detail = ""
    return f"#{event.get('seq', '?'):<4} {event.get('source', '?'):<5} {kind:<16} {detail}"


class Receiver:
    """A threaded HTTP server that records events; ``port=0`` picks a free port."""

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        out: Path | None = None,
        echo: IO[str] | None = sys.stdout,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.events: list[dict[str, Any]] = []
        self.duplicates = 0
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._out = out.open("ab") if out is not None else None
        self._echo = echo
        self._on_event = on_event
        self.server = ThreadingHTTPServer((host, port), self._handler())
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def record(self, event: dict[str, Any]) -> bool:
        """Keep a new event; False for one already seen."""
        return self.record_many([event]) == 1

    def record_many(self, events: list[dict[str, Any]]) -> int:
        """Keep the new ones of ``events``, in order; returns how many were new."""
        new: list[dict[str, Any]] = []
        with self._lock:
            for event in events:
                event_id = str(event.get("event_id"))
                if event_id in self._seen:
                    self.duplicates += 1
                    continue
                self._seen.add(event_id)
                self.events.append(event)
                new.append(event)
            if self._out is not None and new:
                self._out.write(b"".join(orjson.dumps(event) + b"\n" for event in new))
                self._out.flush()
            if self._echo is not None and new:
                print("\n".join(describe(event) for event in new), file=self._echo, flush=True)
        if self._on_event is not None:
            for event in new:
                self._on_event(event)
        return len(new)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The head and the body of an answer go out in two writes: with Nagle's algorithm
            # on, each answer would wait ~40 ms for the client's delayed ACK.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                path = self.path.split("?", 1)[0]
                batch = path.endswith("/events")
                if not (batch or "/event/" in path) or not 0 < length <= MAX_BODY:
                    self._answer(400, b'{"error":"bad request"}')
                    return
                try:
                    data = orjson.loads(self.rfile.read(length))
                except orjson.JSONDecodeError:
                    self._answer(400, b'{"error":"not json"}')
                    return
                events = data if batch and isinstance(data, list) else [data]
                if (
                    not events
                    or len(events) > MAX_BATCH
                    or not all(isinstance(e, dict) and "event_id" in e for e in events)
                ):
                    self._answer(400, b'{"error":"not an event"}')
                    return
                new = receiver.record_many(events)
                answer = {"accepted": new, "duplicates": len(events) - new}
                self._answer(200, orjson.dumps(answer))

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def start(self) -> Receiver:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._out is not None:
            self._out.close()
