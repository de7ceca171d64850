"""Tests for agent.discover: which entries under a root are run directories.

On pyfakefs: thousands of entries and odd names cost nothing here. Watching a real root is
tested in tests/integration/test_host_live.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyfakefs.fake_filesystem import FakeFilesystem

from agent.discover import RunDirs, is_run_id

ROOT = Path("/srv/app/agents")


@pytest.mark.parametrize("name", ["55b761f6", "adw-0a1b2c3d", "00000000", "adw-ffffffff"])
def test_both_id_formats_are_runs(name: str) -> None:
    assert is_run_id(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "55B761F6",  # tac-webbuilder's ids are lowercase
        "55b761f",
        "55b761f6a",
        "adw-55b761f",
        "ADW-55b761f6",
        "adw_55b761f6",
        ".gh-config",
        ".55b761f6",
        "55b761f6\n",
        "notes",
        "zzzzzzzz",
    ],
)
def test_other_names_are_not(name: str) -> None:
    assert not is_run_id(name)


@given(st.text(alphabet="0123456789abcdefABCDEF-adw.\n/", max_size=14))
def test_only_the_two_formats_are_runs(name: str) -> None:
    expected = (len(name) == 8 and set(name) <= set("0123456789abcdef")) or (
        name.startswith("adw-") and is_run_id(name[4:]) and not name[4:].startswith("adw-")
    )
    assert is_run_id(name) == expected


def test_scan_finds_run_directories_among_thousands_of_entries(fs: FakeFilesystem) -> None:
    for i in range(3000):
        fs.create_dir(ROOT / f"{i:08x}")
    for i in range(500):
        fs.create_dir(ROOT / f"adw-{i:08x}")
    fs.create_dir(ROOT / "notes")
    fs.create_dir(ROOT / ".gh-config")
    fs.create_file(ROOT / "deadbeef")  # a file with a run's name
    fs.create_dir("/elsewhere/cafebabe")
    fs.create_symlink(ROOT / "cafebabe", "/elsewhere/cafebabe")  # never followed
    found = RunDirs(ROOT).scan()
    assert len(found) == 3500
    assert "notes" not in found
    assert "deadbeef" not in found
    assert "cafebabe" not in found
    assert found == sorted(found)


def test_an_unreadable_or_missing_root_lists_nothing(fs: FakeFilesystem) -> None:
    assert RunDirs(ROOT).scan() == []


def test_run_of_a_changed_path(fs: FakeFilesystem) -> None:
    dirs = RunDirs(ROOT)
    assert dirs.run_of(str(ROOT / "55b761f6")) == "55b761f6"
    assert dirs.run_of(str(ROOT / "adw-0a1b2c3d" / "planner" / "raw_output.jsonl")) == (
        "adw-0a1b2c3d"
    )
    assert dirs.run_of(str(ROOT)) is None
    assert dirs.run_of(str(ROOT / "notes" / "adw_state.json")) is None
    assert dirs.run_of("/elsewhere/55b761f6/adw_state.json") is None


def test_exists_only_for_a_real_directory(fs: FakeFilesystem) -> None:
    fs.create_dir(ROOT / "55b761f6")
    fs.create_file(ROOT / "deadbeef")
    fs.create_dir("/elsewhere/cafebabe")
    fs.create_symlink(ROOT / "cafebabe", "/elsewhere/cafebabe")
    dirs = RunDirs(ROOT)
    assert dirs.exists("55b761f6")
    assert not dirs.exists("deadbeef")
    assert not dirs.exists("cafebabe")
    assert not dirs.exists("0123abcd")
