"""``adw-agent healthcheck`` as a process, on a store whose last heartbeat is judged by the
monotonic clock: a wall clock stepped back must not make a hung agent look healthy, and an age
that cannot be known is not healthy."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from agent import liveness
from agent.outbox import Store
from tests.harness import run_cli, write_config


@pytest.fixture
def config(tmp_path: Path, run_dir: Path) -> Path:
    return write_config(
        tmp_path / "agent.toml", run_dir, tmp_path / "storage", "http://127.0.0.1:9"
    )


def stored_beat(tmp_path: Path, beat: dict[str, Any]) -> None:
    store = Store(tmp_path / "storage", "55b761f6", "full")
    try:
        store.set_meta("heartbeat", beat)
    finally:
        store.close()


def healthcheck(config: Path) -> tuple[int, str]:
    result = run_cli("healthcheck", "--config", str(config))
    return result.returncode, result.stdout.strip()


def test_a_hung_agent_is_unhealthy_after_the_wall_clock_was_stepped_back(
    tmp_path: Path, config: Path
) -> None:
    # Written 1000 s ago by the monotonic clock; the wall clock has since gone back an hour,
    # so by the wall clock the heartbeat is an hour in the future.
    stored_beat(
        tmp_path,
        {
            "at": time.time() + 3600,
            "mono": time.monotonic() - 1000,
            "boot_id": liveness.boot_id(),
            "pid": 1,
            "state": "running",
        },
    )
    code, out = healthcheck(config)
    assert code == 1
    assert out.startswith("unhealthy: no heartbeat within")


@pytest.mark.parametrize("case", ["negative age", "another boot", "old stamp from the future"])
def test_an_age_that_cannot_be_known_is_not_healthy(
    tmp_path: Path, config: Path, case: str
) -> None:
    beat: dict[str, Any] = {"at": time.time(), "pid": 1, "state": "running"}
    if case == "negative age":
        beat |= {"mono": time.monotonic() + 3600, "boot_id": liveness.boot_id()}
    elif case == "another boot":
        beat |= {"mono": time.monotonic(), "boot_id": "00000000-0000-0000-0000-000000000000"}
    else:
        beat["at"] = time.time() + 3600
    stored_beat(tmp_path, beat)
    code, out = healthcheck(config)
    assert code == 1
    assert "unhealthy" in out
    assert "unknown" in out


def test_a_fresh_heartbeat_is_healthy(tmp_path: Path, config: Path) -> None:
    stored_beat(tmp_path, dict(liveness.stamp("running")))
    assert healthcheck(config) == (0, "healthy")
