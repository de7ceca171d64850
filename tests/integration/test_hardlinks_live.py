"""Hard links through a real agent process: a file in the run directory that is a hard link
(to a file that may live anywhere on the same file system) is refused with a warning naming
it, unless ``watch.allow_hardlinks = true``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness import AdwWriter, AgentProcess, Backend

StartAgent = Callable[..., AgentProcess]
Events = list[dict[str, Any]]
RESULT = {
    "type": "result",
    "subtype": "success",
    "is_error": False,
    "total_cost_usd": 0.5,
    "usage": {"input_tokens": 5, "output_tokens": 900},
    "modelUsage": {"claude-sonnet-4-5-20250929": {"costUSD": 0.5}},
}


def linked_transcript(writer: AdwWriter) -> Path:
    """A transcript elsewhere, hard-linked into an agent folder of the run directory."""
    elsewhere = writer.run_dir.parent.parent / "elsewhere.jsonl"
    elsewhere.write_text(json.dumps(RESULT) + "\n")
    target = writer.transcript("sdlc_planner")
    os.link(elsewhere, target)
    return target


def costs(events: Events) -> list[float]:
    return [e["data"]["current_cost"] for e in events if e["type"] == "cost_update"]


def test_a_hard_linked_transcript_is_refused_with_a_warning(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    agent = start_agent()
    agent.wait_started()
    target = linked_transcript(writer)
    entry = agent.wait_log(lambda e: str(e.get("message")).startswith("cannot read transcript"))
    assert entry["path"] == str(target)
    assert "hard links" in entry["message"]
    writer.state({"adw_id": "55b761f6", "issue_number": "1"})
    backend.wait_for(lambda events: any(e["type"] == "workflow_update" for e in events))
    assert agent.stop() == 0
    assert all(c == 0 for c in costs(backend.events()))


def test_a_hard_linked_state_file_is_refused(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    agent = start_agent(watch={"parse_retries": 0})
    agent.wait_started()
    elsewhere = writer.run_dir.parent.parent / "elsewhere.json"
    elsewhere.write_text(json.dumps({"adw_id": "55b761f6", "issue_number": "from elsewhere"}))
    os.link(elsewhere, writer.run_dir / "adw_state.json")
    entry = agent.wait_log(lambda e: str(e.get("message")).startswith("ignoring unreadable"))
    assert "hard links" in entry["message"]
    assert agent.stop() == 0
    assert not [e for e in backend.events() if e["type"] == "workflow_update"]


def test_hard_links_are_read_when_allowed(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    agent = start_agent(watch={"allow_hardlinks": True})
    agent.wait_started()
    linked_transcript(writer)
    backend.wait_for(lambda events: 0.5 in costs(events))
    assert agent.stop() == 0
