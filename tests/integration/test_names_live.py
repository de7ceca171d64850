"""Agent directory names that are not UTF-8, through a real agent process: the transcript is
counted, its name is escaped (``\\xNN``) in events and logs, and every log line stays JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness import AdwWriter, AgentProcess, Backend, run_cli

StartAgent = Callable[..., AgentProcess]
Events = list[dict[str, Any]]
AGENT = os.fsdecode(b"sdlc_planner\xff\xfe")
ESCAPED = "sdlc_planner\\xff\\xfe"
LINKED = os.fsdecode(b"linked\xe9")


def result_line(cost: float) -> dict[str, Any]:
    return {
        "type": "result",
        "subtype": "success",
        "is_error": False,
        "total_cost_usd": cost,
        "usage": {"input_tokens": 5, "output_tokens": 900},
        "modelUsage": {"claude-sonnet-4-5-20250929": {"costUSD": cost}},
    }


def cost_is(usd: float) -> Callable[[Events], bool]:
    def check(events: Events) -> bool:
        return any(e["type"] == "cost_update" and e["data"]["current_cost"] == usd for e in events)

    return check


def test_a_non_utf8_agent_directory_is_counted_and_escaped(
    backend: Backend, writer: AdwWriter, start_agent: StartAgent
) -> None:
    agent = start_agent()
    agent.wait_started()
    writer.start_attempt(AGENT)
    writer.append(AGENT, result_line(0.25))
    writer.start_attempt("sdlc_implementor")
    writer.append("sdlc_implementor", result_line(0.5))
    outside = writer.run_dir.parent / "outside"
    outside.mkdir()
    (writer.run_dir / LINKED).symlink_to(outside, target_is_directory=True)
    events = backend.wait_for(cost_is(0.75))
    [update] = [e for e in events if cost_is(0.75)([e])]
    assert update["data"]["breakdown"]["by_agent"] == {ESCAPED: 0.25, "sdlc_implementor": 0.5}
    agent.wait_log(lambda entry: entry.get("message") == "not following symlinked directory")
    assert agent.stop() == 0

    # Restarted, it finds its saved position under the escaped name: nothing counted twice.
    agent = start_agent()
    agent.wait_started()
    # A retry: the transcript is opened with "w" again, and the first attempt still counts.
    writer.start_attempt(AGENT)
    writer.append(AGENT, result_line(0.125))
    backend.wait_for(cost_is(0.875))
    assert agent.stop() == 0

    raw = agent.log.read_bytes().decode("utf-8")  # valid UTF-8 throughout
    assert "Logging error" not in raw
    lines = [json.loads(line) for line in raw.splitlines()]  # every line is JSON
    [warning] = [
        e
        for e in lines
        if e.get("message") == "not following symlinked directory"
        and e["path"].endswith("linked\\xe9")
    ][:1]
    assert warning["level"] == "warning"
    costs = [e["data"]["current_cost"] for e in backend.events("cost_update")]
    assert max(costs) == 0.875


def test_offline_cost_counts_and_escapes_a_non_utf8_agent_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "agents" / "55b761f6"
    (run_dir / AGENT).mkdir(parents=True)
    (run_dir / AGENT / "raw_output.jsonl").write_text(json.dumps(result_line(0.25)) + "\n")
    table = run_cli("cost", str(run_dir))
    assert table.returncode == 0, table.stderr
    assert ESCAPED in table.stdout
    done = run_cli("cost", str(run_dir), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["current_cost"] == 0.25
    assert [t["agent"] for t in report["transcripts"]] == [ESCAPED]
