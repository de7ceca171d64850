"""Chaos: the agent is killed with SIGKILL 30+ times during a realistic run while the backend
answers 503, resets connections, loses answers and goes away for ~10 s. Everything must arrive.

The seed is printed; rerun a failing round with ``FAULTS_SEED=<seed> pytest ...``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from tests.faults import (
    reap_agents,  # noqa: F401  (autouse fixture)
    run_chaos,
)


def test_chaos_kill9_and_flapping_backend_lose_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("FAULTS_SEED") or random.SystemRandom().randrange(2**31))
    print(f"\nchaos seed {seed} (FAULTS_SEED={seed} reproduces the schedule)")
    result = run_chaos(tmp_path, seed, kills=30, run_seconds=60.0, outage_seconds=10.0)
    v = result.verdict
    print(
        f"chaos: {result.kills} kill -9 survived ({result.in_flight_kills} with a request in "
        f"flight) and {result.terms} SIGTERM, {result.outages} outage, {v.summary()}, "
        f"{result.seconds:.0f}s"
    )
    v.assert_ok()
    assert result.kills >= 30
    assert result.outages == 1
    assert v.duplicates == v.collapsed
