"""A rewrite storm through a real agent process: adw_state.json alternates between a broken and
a valid write 50 times in a few seconds. Each broken write is warned about at first, then the
warnings for that file are held back, so the log does not get 50 lines."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

from tests.harness import AdwWriter, AgentProcess, Backend

StartAgent = Callable[..., AgentProcess]
ROUNDS = 50


def has_issue(number: str, events: list[dict[str, Any]]) -> bool:
    return any(
        e["type"] == "workflow_update" and e["data"].get("issue_number") == number for e in events
    )


def count(agent: AgentProcess, prefix: str) -> int:
    return sum(1 for e in agent.logs() if str(e.get("message", "")).startswith(prefix))


def wait_count(agent: AgentProcess, prefix: str, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while count(agent, prefix) < n:
        assert time.monotonic() < deadline, f"fewer than {n} log lines {prefix!r}"
        assert agent.running()
        time.sleep(0.01)  # polling the log file for a condition


def test_a_rewrite_storm_logs_a_few_warnings_not_fifty(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    # No retries: every broken read is reported at once, the worst case for the log.
    agent = start_agent(watch={"parse_retries": 0, "parse_retry_ms": 1})
    agent.wait_started()
    state = writer.run_dir / "adw_state.json"
    for n in range(1, ROUNDS + 1):
        state.write_text('{"adw_id": "55b761f6", "issue_number": ')  # cut short
        wait_count(agent, "cannot read yet", n)  # the agent has read the broken write
        writer.state({"adw_id": "55b761f6", "issue_number": str(n)})
        backend.wait_for(partial(has_issue, str(n)))
    assert agent.stop() == 0
    warned = [e for e in agent.logs() if str(e.get("message")).startswith("ignoring unreadable")]
    assert 1 <= len(warned) <= 3
    assert all(e["path"] == str(state) for e in warned)
