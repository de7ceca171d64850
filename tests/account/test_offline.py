"""Tests for agent.account.offline: ``cost_of_path`` over files and run directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.account import (
    UNATTRIBUTED,
    PriceTable,
    TranscriptCost,
    cost_of_path,
)
from agent.transcript import UnsafeFile
from tests.account.common import (
    REAL,
    STREAM,
)

# ---------------------------------------------------------------------------
# cost_of_path


def test_cost_of_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    sources = {
        "planner": STREAM / "pricehawk_v2.0.55_planner_sonnet45_3models.jsonl",
        "builder": STREAM / "pricehawk_v2.0.57_builder_sonnet45_13turns.jsonl",
        "classifier": REAL / "tac6_raw_output_e9906e09_issue_classifier_empty_0bytes.jsonl",
    }
    for agent, source in sources.items():
        (run / agent).mkdir()
        (run / agent / "raw_output.jsonl").write_bytes(source.read_bytes())
    (run / "raw_output.jsonl").write_bytes(
        (STREAM / "gleam_v2.1.7_basic_query_golden.jsonl").read_bytes()
    )
    (run / "empty_dir").mkdir()
    (run / "deeper" / "nested").mkdir(parents=True)
    (run / "deeper" / "nested" / "raw_output.jsonl").write_bytes(b"")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "raw_output.jsonl").write_bytes(sources["planner"].read_bytes())
    os.symlink(outside, run / "linked_dir")
    (run / "linked_file").mkdir()
    os.symlink(outside / "raw_output.jsonl", run / "linked_file" / "raw_output.jsonl")

    costs = cost_of_path(run, PriceTable())
    by_agent = {c.agent: c for c in costs}
    assert [c.agent for c in costs] == ["run", "builder", "classifier", "planner"]
    assert by_agent["planner"].cost == pytest.approx(0.2171574, abs=1e-9)
    assert by_agent["builder"].cost == pytest.approx(0.15027535, abs=1e-9)
    assert by_agent["classifier"].cost == 0.0
    assert by_agent["run"].cost == pytest.approx(0.1354875, abs=1e-9)
    assert all(isinstance(c, TranscriptCost) for c in costs)


def test_cost_of_symlinked_file_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "raw_output.jsonl"
    os.symlink(STREAM / "gleam_v2.1.7_basic_query_golden.jsonl", link)
    with pytest.raises(UnsafeFile):
        cost_of_path(link, PriceTable())


def test_cost_of_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        cost_of_path(tmp_path / "nope.jsonl", PriceTable())


def test_cost_of_path_counts_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "raw_output.jsonl"
    good = (STREAM / "gleam_v2.1.7_basic_query_golden.jsonl").read_bytes()
    body = good.replace(
        b"\n",
        b'\n{"type":"assistant","usage" broken\n' + b'{"usage":"' + b"x" * 5000 + b'"}\n',
        1,
    )
    path.write_bytes(body + b'{"type":"result","total_cost_usd":-1}\n{"type":"result"')
    [cost] = cost_of_path(path, PriceTable(), max_line_bytes=2000)
    # Broken JSON, an over-long line and an untrusted result; the last line is
    # half-written and not counted at all.
    assert cost.bad_lines == 3
    assert cost.lines == 6
    assert cost.cost == pytest.approx(0.1354875, abs=1e-9)
    assert cost.final


def test_cost_of_path_reports_unattributed_when_no_model_is_known(tmp_path: Path) -> None:
    path = tmp_path / "raw_output.jsonl"
    path.write_bytes(b'{"type":"result","total_cost_usd":0.5}\n')
    [cost] = cost_of_path(path, PriceTable())
    assert cost.by_model == {UNATTRIBUTED: 0.5}
