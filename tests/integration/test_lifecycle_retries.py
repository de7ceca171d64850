"""Parse retries end when a file reads fine, also when a rescan read it: a retry left behind
counted its old attempts against the next half-written version of the file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.faults import reap_agents  # noqa: F401  (autouse fixture)
from tests.harness import AdwWriter, AgentProcess, Backend

ADW = "55b761f6"
RETRIES = 3


def test_a_rescan_that_reads_a_file_fine_ends_its_retries(
    backend: Backend,
    writer: AdwWriter,
    run_dir: Path,
    start_agent: Callable[..., AgentProcess],
) -> None:
    writer.state({"adw_id": ADW, "issue_number": "1", "issue_class": None})
    agent = start_agent(
        # No watch events (one poll an hour): only rescans read the file, every 0.2 s, and
        # only they count attempts (a scheduled retry is a minute away).
        watch={
            "mode": "poll",
            "poll_interval": 3600.0,
            "rescan_interval": 0.2,
            "parse_retries": RETRIES,
            "parse_retry_ms": 60_000,
        },
    ).wait_started()
    backend.wait_for(lambda evs: any(e["type"] == "workflow_update" for e in evs))
    state = run_dir / "adw_state.json"

    def unreadable(entry: dict[str, object]) -> bool:
        return str(entry.get("message", "")).startswith("cannot read yet")

    state.write_text('{"adw_id": "55b7')  # half written: a rescan schedules a retry
    agent.wait_log(unreadable)
    writer.state({"adw_id": ADW, "issue_number": "1", "issue_class": "/bug"})
    backend.wait_for(lambda evs: any(e["data"].get("issue_class") == "/bug" for e in evs))

    # Half written again: a fresh start, RETRIES more attempts before the warning.
    mark = len(agent.logs())
    state.write_text('{"adw_id": "55b7')
    agent.wait_log(lambda e: str(e.get("message", "")).startswith("ignoring unreadable file"))
    after = agent.logs()[mark:]
    warning = next(
        i for i, e in enumerate(after) if str(e["message"]).startswith("ignoring unreadable")
    )
    assert sum(map(unreadable, after[:warning])) == RETRIES + 1
    assert agent.stop() == 0
