"""Backend scenarios (c) and (d): fan-out to many WebSocket clients, and the backend's RSS.

``clients`` WebSocket clients (one child process, :mod:`bench.backend_wsclients`) follow
``/ws/workflows`` while the bench POSTs ``workflow_update`` events at ``rate`` per second over
10 ADWs, each carrying a counter (``bench_n``). For each event, the latency to the last client is
``max`` over the clients of their arrival ``time.time()`` minus the ``time.time()`` just before
its POST; the median client's figure is given too. The run is repeated with one more client
that connects with a tiny receive buffer and never reads: the backend must drop it (bounded
queue per client) and the others' latency must not rise. The backend's RSS is read idle (no
client, empty store), with the clients connected, and its peak (VmHWM) after the load.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.backend_common import Serve, WsClients
from bench.common import sleep_until, summary_ms
from bench.procstat import sample
from tests.adw_backend import factory

ADWS = 10


def _load(
    serve: Serve, work: Path, clients: int, rate: float, seconds: float, stalled: bool
) -> dict[str, Any]:
    ws = WsClients(serve.proc.ws_url, work / f"ws-{clients}-{stalled}.json", clients, stalled)
    try:
        rss_connected = serve.sample().rss_mb
        # CPU seconds over the load tell which side bounds the figures on a small machine.
        serve_cpu = serve.sample().cpu_s
        clients_cpu = sample(ws.proc.pid).cpu_s
        count = int(rate * seconds)
        seqs: dict[str, int] = {}
        events = []
        for n in range(1, count + 1):
            # ADWs of their own per run: a seq seen before would be stale and not broadcast.
            adw = f"{'s' if stalled else 'p'}{n % ADWS:03d}"
            seq = seqs[adw] = seqs.get(adw, 0) + 1
            events.append(factory.workflow_update(adw, seq, issue_number="42", bench_n=n))
        sent: dict[int, float] = {}
        with httpx.Client(base_url=serve.url, timeout=30) as http:
            start = time.monotonic() + 0.1
            for i, event in enumerate(events):
                sleep_until(start + i / rate)
                body = orjson.dumps(event)
                sent[i + 1] = time.time()
                answer = http.post(
                    "/api/v1/event/workflow_update",
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
                answer.raise_for_status()
            time.sleep(1.0)
            ws_clients = http.get("/healthz").json().get("ws_clients")
        serve_cpu = serve.sample().cpu_s - serve_cpu
        clients_cpu = sample(ws.proc.pid).cpu_s - clients_cpu
        recorded = ws.results()
    finally:
        ws.kill()
    per_client = [dict(c) for c in recorded["clients"]]
    last: list[float] = []
    median_client: list[float] = []
    missed = 0
    for n, at in sent.items():
        arrivals = [c[n] for c in per_client if n in c]
        if len(arrivals) < clients:
            missed += 1
            continue
        last.append(max(arrivals) - at)
        median_client.append(statistics.median(arrivals) - at)
    return {
        "clients": clients,
        "stalled_client": stalled,
        "events": count,
        "rate_per_s": rate,
        "to_last_client": summary_ms(last, count),
        "to_median_client": summary_ms(median_client, count),
        "events_missing_somewhere": missed,
        "clients_closed": recorded["closed"],
        # With a stalled client: ``clients`` means it was dropped, ``clients + 1`` that it was not.
        "ws_clients_at_end": ws_clients,
        "rss_mb_connected": rss_connected,
        "serve_cpu_s": round(serve_cpu, 2),
        "clients_cpu_s": round(clients_cpu, 2),
        "load_s": round(seconds + 1.0, 1),
        "rss_mb_after": serve.sample().rss_mb,
        "hwm_mb": serve.sample().hwm_mb,
    }


def run(work: Path, database: str, clients: int, rate: float, seconds: float) -> dict[str, Any]:
    with Serve(work, database) as serve:
        time.sleep(1.0)
        idle = serve.sample()
        plain = _load(serve, work, clients, rate, seconds, stalled=False)
        with_stalled = _load(serve, work, clients, rate, seconds, stalled=True)
        return {
            "rss_mb_idle": idle.rss_mb,
            "plain": plain,
            "with_stalled": with_stalled,
            "hwm_mb": serve.sample().hwm_mb,
        }
