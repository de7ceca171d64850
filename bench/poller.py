"""A faithful stand-in for how the backend watches a run today: poll every N seconds.

Every ``--interval`` seconds it reads every file of the run directory (``adw_state.json``,
``completed_phases.json``, ``error.log`` and each ``*/raw_output.jsonl``), JSON-parses them
(every transcript line, to total its tokens and cost), compares each with the previous poll and
POSTs what changed to the receiver, under ``/poll/<name>/<kind>``. A half-written JSON file is
skipped until the next poll, as a poller must. It runs as its own process so that its CPU time
can be read from /proc.

``python -m bench.poller --dir RUN_DIR --interval 2 --url http://127.0.0.1:PORT --name poll2``
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

_JSON_FILES = {"adw_state.json": "state", "completed_phases.json": "phases"}


def _usage_tokens(usage: dict[str, Any]) -> int:
    created = usage.get("cache_creation_input_tokens") or 0
    split = usage.get("cache_creation") or {}
    writes = max(
        created,
        (split.get("ephemeral_5m_input_tokens") or 0)
        + (split.get("ephemeral_1h_input_tokens") or 0),
    )
    return (
        (usage.get("input_tokens") or 0)
        + (usage.get("output_tokens") or 0)
        + writes
        + (usage.get("cache_read_input_tokens") or 0)
    )


def transcript_summary(path: Path) -> dict[str, Any]:
    """Parse every line of a transcript: its tokens (per message id) and its result cost."""
    per_message: dict[str, int] = {}
    cost = None
    lines = 0
    with path.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # a line still being written
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            lines += 1
            if line.get("type") == "assistant":
                message = line.get("message") or {}
                usage = message.get("usage")
                if isinstance(usage, dict):
                    key = str(message.get("id", lines))
                    per_message[key] = max(per_message.get(key, 0), _usage_tokens(usage))
            elif line.get("type") == "result":
                cost = line.get("total_cost_usd")
    return {"lines": lines, "tokens": sum(per_message.values()), "result_cost": cost}


class Poster:
    """POSTs JSON to the receiver over one keep-alive connection."""

    def __init__(self, url: str, name: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.name = name
        self.conn: http.client.HTTPConnection | None = None

    def post(self, kind: str, data: Any) -> None:
        body = json.dumps({"kind": kind, "data": data}).encode()
        for _ in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
            try:
                self.conn.request(
                    "POST",
                    f"/poll/{self.name}/{kind}",
                    body,
                    {"Content-Type": "application/json"},
                )
                self.conn.getresponse().read()
                return
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None


def poll_once(run_dir: Path, previous: dict[str, Any], poster: Poster) -> None:
    """One poll: read everything, post what differs from ``previous`` (updated in place)."""
    current: dict[str, Any] = {}
    for name, kind in _JSON_FILES.items():
        try:
            current[kind] = json.loads((run_dir / name).read_text())
        except FileNotFoundError:
            current[kind] = None
        except ValueError:
            current[kind] = previous.get(kind)  # half-written: try again next time
    try:
        current["errorlog"] = (run_dir / "error.log").read_text(errors="replace")
    except FileNotFoundError:
        current["errorlog"] = None
    try:
        subdirs = sorted(p for p in run_dir.iterdir() if p.is_dir())
    except FileNotFoundError:
        subdirs = []
    for sub in subdirs:
        path = sub / "raw_output.jsonl"
        try:
            current[f"transcript:{sub.name}"] = transcript_summary(path)
        except FileNotFoundError:
            continue
    for kind, value in current.items():
        if value is not None and previous.get(kind) != value:
            poster.post(kind.partition(":")[0], {"file": kind, "value": value})
        previous[kind] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--interval", type=float, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()

    def on_term(*_: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    run_dir = Path(args.dir)
    poster = Poster(args.url, args.name)
    previous: dict[str, Any] = {}
    poll_once(run_dir, previous, poster)
    poster.post("ready", {})
    due = time.monotonic() + args.interval
    while True:
        time.sleep(max(0.0, due - time.monotonic()))
        poll_once(run_dir, previous, poster)
        due += args.interval


if __name__ == "__main__":
    main()
