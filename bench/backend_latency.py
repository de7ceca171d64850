"""Backend scenario (a): a file write reaches a WebSocket client of the backend.

A real agent watches a realistic run directory and delivers to a real ``adw-agent serve``;
a WebSocket client in its own process (:mod:`bench.backend_wsclients`) listens on
``/ws/workflows``. ``adw_state.json`` is rewritten in place at a steady rate, each write with
a counter (``bench_n``). Latency is ``time.time()`` just before the write to the client's
``time.time()`` when the first message whose ``bench_n`` is at least that write's arrives (a
coalesced snapshot also delivers it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from bench.backend_common import Serve, WsClients
from bench.common import (
    Agent,
    base_state,
    first_at_least,
    populate_run_dir,
    sleep_until,
    summary_ms,
    write_state,
)

ADW = "a1b2c3d4"


def _wait(what: str, condition: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def run(work: Path, database: str, count: int, rate: float) -> dict[str, Any]:
    run_dir = work / "agents" / ADW
    populate_run_dir(run_dir)
    with Serve(work, database) as serve, httpx.Client(base_url=serve.url, timeout=10) as http:
        clients = WsClients(serve.proc.ws_url, work / "ws.json", 1)
        agent = Agent(work, run_dir, serve.url).start()
        try:

            def workflow() -> dict[str, Any] | None:
                answer = http.get(f"/api/v1/workflows/{ADW}")
                return answer.json() if answer.status_code == 200 else None

            # Settled: the start-up snapshot (five transcripts' cost) has been applied.
            _wait(
                "the agent's first events",
                lambda: (w := workflow()) and (w["cost"]["current_cost"] or 0) > 0,
            )
            time.sleep(1.0)
            state = base_state()
            path = run_dir / "adw_state.json"
            writes: list[tuple[float, float]] = []
            start = time.monotonic() + 0.05
            for i in range(count):
                sleep_until(start + i / rate)
                state["bench_n"] = i + 1
                written_at = time.time()
                write_state(path, state)
                writes.append((written_at, float(i + 1)))
            _wait(
                "the last write",
                lambda: (w := workflow()) and w["state"].get("bench_n") == count,
            )
            time.sleep(0.3)
            recorded = clients.results()
        finally:
            clients.kill()
            agent.stop()
    arrivals = sorted((t, float(n)) for n, t in recorded["clients"][0])
    return {
        "count": count,
        "rate_per_s": rate,
        "write_to_ws": summary_ms(first_at_least(arrivals, writes), count),
    }
