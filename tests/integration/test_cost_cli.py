"""``adw-agent cost`` as a user runs it: a process, on real transcripts."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.harness import FIXTURES, run_cli

WITH_RESULT = sorted(
    p
    for p in [
        *FIXTURES.joinpath("real").glob("*.jsonl"),
        *FIXTURES.joinpath("claude_stream").glob("*.jsonl"),
    ]
    if b'"type":"result"' in p.read_bytes().replace(b" ", b"")
)


def last_result_cost(path: Path) -> float:
    results = [
        json.loads(line)
        for line in path.read_bytes().splitlines()
        if b'"type":"result"' in line.replace(b" ", b"")
    ]
    return float(results[-1]["total_cost_usd"])


def test_there_are_fixtures_with_result_lines() -> None:
    assert len(WITH_RESULT) >= 8


@pytest.mark.parametrize("path", WITH_RESULT, ids=lambda p: p.name)
def test_cost_of_a_finished_transcript_equals_its_total_cost_usd(path: Path) -> None:
    done = run_cli("cost", str(path), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert math.isclose(report["current_cost"], last_result_cost(path), abs_tol=1e-9)
    assert report["final"] is True
    assert [t["final"] for t in report["transcripts"]] == [True]


def test_cost_of_a_run_directory_sums_its_transcripts(tmp_path: Path) -> None:
    run_dir = tmp_path / "agents" / "55b761f6"
    picks = {
        "sdlc_planner": FIXTURES
        / "real"
        / "tac7iso_raw_output_55b761f6_sdlc_planner_cli2022.jsonl",
        "issue_classifier": FIXTURES
        / "real"
        / "tac7iso_raw_output_55b761f6_issue_classifier.jsonl",
        "branch_generator": FIXTURES
        / "real"
        / "tac6_raw_output_b5b9b7d5_branch_generator_no_result_line.jsonl",
        "pr_creator": FIXTURES
        / "real"
        / "tac6_raw_output_e9906e09_issue_classifier_empty_0bytes.jsonl",
    }
    for agent, source in picks.items():
        (run_dir / agent).mkdir(parents=True)
        shutil.copy(source, run_dir / agent / "raw_output.jsonl")
    done = run_cli("cost", str(run_dir), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    expected = last_result_cost(picks["sdlc_planner"]) + last_result_cost(picks["issue_classifier"])
    assert math.isclose(report["current_cost"], expected, abs_tol=1e-9)
    by_agent = {t["agent"]: t for t in report["transcripts"]}
    assert set(by_agent) == set(picks)
    # A killed run (no result line) and an empty transcript are not final, so neither is the ADW.
    assert by_agent["branch_generator"]["final"] is False
    assert report["final"] is False

    table = run_cli("cost", str(run_dir))
    assert table.returncode == 0
    assert "sdlc_planner" in table.stdout
    assert f"{expected:.6f}" in table.stdout


def test_cost_of_a_missing_path_is_one_clear_line(tmp_path: Path) -> None:
    done = run_cli("cost", str(tmp_path / "nope"))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "no such file" in done.stderr
    assert "Traceback" not in done.stderr


def test_poisoned_lines_are_counted_and_never_a_traceback(tmp_path: Path) -> None:
    def nested(depth: int) -> bytes:
        return b'{"a":' * depth + b"1" + b"}" * depth

    path = tmp_path / "raw_output.jsonl"
    path.write_bytes(
        b'{"type":"assistant","message":{"id":"m","usage":' + nested(1000) + b"}}\n"
        b'{"type":"result","total_cost_usd":' + nested(1000) + b"}\n"
        b'{"type":"result","total_cost_usd":' + nested(5000) + b"}\n"
        b'{"type":"assistant","message":{"id":"m2","model":"claude-sonnet-4-5",'
        b'"usage":{"input_tokens":1000}}}\n'
        b'{"type":"result","total_cost_usd":5.0}\n'
    )
    done = run_cli("cost", str(path), "--json")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    report = json.loads(done.stdout)
    assert report["current_cost"] == 5.0
    [transcript] = report["transcripts"]
    # The two results that cannot be trusted; a usage object without any known count is
    # an empty one, as everywhere else.
    assert transcript["bad_lines"] == 2


def test_several_runs_appended_to_one_file_are_summed() -> None:
    path = FIXTURES / "multi_run" / "gymnastics_rundown_system_4runs.jsonl"
    done = run_cli("cost", str(path), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    settled = math.fsum(
        json.loads(line)["total_cost_usd"]
        for line in path.read_bytes().splitlines()
        if b'"type":"result"' in line
    )
    # Three settled runs and the estimate of the fourth, which has no result line yet.
    assert report["current_cost"] > settled
    assert report["settled_cost"] == pytest.approx(settled, abs=1e-9)
    assert report["final"] is False
    [transcript] = report["transcripts"]
    assert transcript["attempts"] == 4
