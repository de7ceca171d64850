"""Tests for agent.layout: the typed file keys and the run directory's layout.

The layout only lists and classifies, so these run on pyfakefs: many folders and odd entries
cost nothing. Reading and watching real files is tested in test_pipeline and test_watch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyfakefs.fake_filesystem import FakeFilesystem

from agent.layout import ERRORLOG, PHASES, RESCAN, STATE, FileKey, RunLayout, files_of

RUN = Path("/srv/agents/55b761f6")


@given(st.sampled_from(["state", "phases", "errorlog"]) | st.text().map("transcript:".__add__))
def test_a_key_is_stored_under_its_text_and_read_back(text: str) -> None:
    key = FileKey.parse(text)
    assert str(key) == text
    assert FileKey.parse(str(key)) == key


@pytest.mark.parametrize("text", ["", "transcript", "cost", "agent:x", "rescan", "State"])
def test_text_that_names_no_file_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a file key"):
        FileKey.parse(text)


def test_paths_of_keys() -> None:
    layout = RunLayout(RUN)
    assert layout.path(STATE) == RUN / "adw_state.json"
    assert layout.path(PHASES) == RUN / "completed_phases.json"
    assert layout.path(ERRORLOG) == RUN / "error.log"
    assert layout.path(FileKey.transcript("sdlc_planner")) == (
        RUN / "sdlc_planner" / "raw_output.jsonl"
    )


def test_present_lists_real_folders_only(fs: FakeFilesystem) -> None:
    fs.create_dir(RUN / "planner")
    fs.create_file(RUN / "notes.txt")
    fs.create_dir("/elsewhere")
    fs.create_symlink(RUN / "linked", "/elsewhere")
    for i in range(2000):
        fs.create_dir(RUN / f"agent{i:04}")
    present = RunLayout(RUN).present()
    transcripts = {k.agent for k in present if k.is_transcript}
    assert "planner" in transcripts
    assert "linked" not in transcripts  # never followed out of the run directory
    assert "notes.txt" not in transcripts
    assert len(transcripts) == 2001
    assert {STATE, PHASES, ERRORLOG} <= present


def test_a_missing_run_directory_still_names_its_top_files(fs: FakeFilesystem) -> None:
    assert RunLayout(RUN).present() == {STATE, PHASES, ERRORLOG}


def test_files_of_leaves_out_rescans() -> None:
    assert files_of({RESCAN, STATE}) == {STATE}
