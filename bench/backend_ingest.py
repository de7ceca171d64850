"""Backend scenario (b): how many events ``adw-agent serve`` stores per second.

Events are built in advance (a realistic mix over 100 ADWs, each ADW's in seq order:
cost_update, workflow_update, phase_update, agent_status), then sent over one keep-alive
connection: one event per ``POST /api/v1/event/{type}`` (what the agent does today, one request
at a time), the same from several connections at once (several agents), and as
``POST /api/v1/events`` batches of 100 and of 1,000. Every answer is checked: each event must be
accepted once.
"""

from __future__ import annotations

import http.client
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import orjson

from bench.backend_common import Serve
from bench.common import summary_ms
from tests.adw_backend import factory

ADWS = 100


def build(count: int, tag: str) -> list[dict[str, Any]]:
    """``count`` events round-robin over ``ADWS`` ADWs, each ADW's seq increasing."""
    out: list[dict[str, Any]] = []
    seqs: dict[str, int] = {}
    cost: dict[str, float] = {}
    for i in range(count):
        adw = f"{tag}{i % ADWS:04d}"
        seq = seqs[adw] = seqs.get(adw, 0) + 1
        kind = i // ADWS % 10
        if kind < 5:
            cost[adw] = cost.get(adw, 0.0) + 0.0123
            out.append(factory.cost_update(adw, seq, round(cost[adw], 6)))
        elif kind < 8:
            out.append(
                factory.workflow_update(
                    adw, seq, issue_number="42", branch_name=f"feature-{adw}", bench_n=seq
                )
            )
        elif kind == 8:
            out.append(factory.phase_update(adw, seq, "Build", ["Plan"], "Plan", 0.05))
        else:
            out.append(factory.agent_status(adw, seq))
    return out


class _Conn:
    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        assert parsed.hostname is not None
        assert parsed.port is not None
        self.conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)

    def post(self, path: str, body: bytes) -> bytes:
        self.conn.request("POST", path, body, {"Content-Type": "application/json"})
        answer = self.conn.getresponse()
        data = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"{path}: {answer.status} {data[:200]!r}")
        return data


def singles(url: str, events: list[dict[str, Any]], connections: int) -> dict[str, Any]:
    """Each event in its own POST; ``connections`` senders, each with its own ADWs."""
    bodies = [(f"/api/v1/event/{e['type']}", orjson.dumps(e), e["adw_id"]) for e in events]
    shares: list[list[tuple[str, bytes]]] = [[] for _ in range(connections)]
    for path, body, adw in bodies:
        shares[int(adw[-4:]) % connections].append((path, body))
    latencies: list[float] = []
    lock = threading.Lock()

    def send(share: list[tuple[str, bytes]]) -> None:
        conn = _Conn(url)
        mine = []
        for path, body in share:
            t0 = time.perf_counter()
            conn.post(path, body)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=send, args=(s,)) for s in shares]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {
        "events": len(events),
        "connections": connections,
        "events_per_s": round(len(events) / elapsed),
        "request": summary_ms(latencies, len(events)),
    }


def batches(url: str, events: list[dict[str, Any]], size: int) -> dict[str, Any]:
    bodies = [orjson.dumps(events[i : i + size]) for i in range(0, len(events), size)]
    conn = _Conn(url)
    latencies = []
    accepted = duplicates = 0
    started = time.perf_counter()
    for body in bodies:
        t0 = time.perf_counter()
        answer = orjson.loads(conn.post("/api/v1/events", body))
        latencies.append(time.perf_counter() - t0)
        accepted += answer["accepted"]
        duplicates += answer["duplicates"]
    elapsed = time.perf_counter() - started
    if accepted != len(events) or duplicates:
        raise RuntimeError(f"accepted {accepted} of {len(events)}, {duplicates} duplicates")
    return {
        "events": len(events),
        "batch": size,
        "events_per_s": round(len(events) / elapsed),
        "request": summary_ms(latencies, len(bodies)),
        "body_kb": round(sum(len(b) for b in bodies) / len(bodies) / 1024, 1),
    }


def run(work: Path, databases: Any, kind: str, singles_n: int, batch_n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    plans: list[tuple[str, Any]] = [
        ("single_1conn", lambda url: singles(url, build(singles_n, "s"), 1)),
        ("single_8conn", lambda url: singles(url, build(singles_n, "m"), 8)),
        ("batch_100", lambda url: batches(url, build(batch_n, "b"), 100)),
        ("batch_1000", lambda url: batches(url, build(batch_n, "k"), 1000)),
    ]
    for name, measure in plans:
        # A fresh database for each, so each starts from the same empty store.
        with Serve(work / name, databases.fresh(kind)) as serve:
            out[name] = measure(serve.url)
            out[name]["rss_mb_after"] = serve.sample().rss_mb
    return out
