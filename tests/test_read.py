"""Tests for agent.read: bounded, symlink-safe readers of the run directory's files."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from agent import read
from agent.errors import ReadError
from agent.read import (
    open_nofollow,
    read_bounded,
    read_phases,
    read_state,
    read_tail,
    safe_subdir,
)

FIXTURES = Path(__file__).parent / "fixtures" / "real"
LIMIT = 1 << 20


def test_real_states_parse_and_keep_only_their_own_keys() -> None:
    for name in (
        "tac6_adw_state_af87dd64_feature_complete.json",
        "tac6_adw_state_e9906e09_initial_nulls.json",
        "tac6_adw_state_efbb4240_bug.json",
        "tac7iso_adw_state_55b761f6_after_plan_EXTRACTED_from_execution_log.json",
    ):
        path = FIXTURES / name
        assert read_state(path, LIMIT) == json.loads(path.read_text()), name


def test_unknown_state_keys_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "adw_state.json"
    path.write_text(json.dumps({"adw_id": "x", "provider": "other", "issue_number": "manual"}))
    assert read_state(path, LIMIT) == {"adw_id": "x", "provider": "other", "issue_number": "manual"}


def test_in_place_half_written_state_is_a_read_error(tmp_path: Path) -> None:
    path = tmp_path / "adw_state.json"
    text = (FIXTURES / "tac6_adw_state_af87dd64_feature_complete.json").read_text()
    with path.open("w") as f:  # the writer truncates in place, then writes
        f.flush()
        with pytest.raises(ReadError, match="is empty"):
            read_state(path, LIMIT)
        f.write(text[: len(text) // 2])
        f.flush()
        with pytest.raises(ReadError, match="is not valid JSON") as info:
            read_state(path, LIMIT)
        assert info.value.path == str(path)
        f.write(text[len(text) // 2 :])
    assert read_state(path, LIMIT)["adw_id"] == "af87dd64"


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("   \n", "is empty"),
        ("[1, 2]", "is not a JSON object"),
        ('{"backend_port": "not a port"}', "field backend_port"),
        ('{"all_adws": "adw_plan"}', "field all_adws"),
        ("\xff", "is not valid JSON"),
    ],
)
def test_malformed_state(tmp_path: Path, content: str, words: str) -> None:
    path = tmp_path / "adw_state.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(ReadError, match=words):
        read_state(path, LIMIT)


def test_phases(tmp_path: Path) -> None:
    path = tmp_path / "completed_phases.json"
    path.write_text(json.dumps({"completed": ["plan"], "current": "build", "extra": 1}))
    phases = read_phases(path, LIMIT)
    assert (phases.completed, phases.current) == (["plan"], "build")
    path.write_text(json.dumps({"completed": "plan"}))
    with pytest.raises(ReadError, match="field completed"):
        read_phases(path, LIMIT)


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_state(tmp_path / "adw_state.json", LIMIT)


def test_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "secret.json"
    outside.write_text('{"adw_id": "leak"}')
    link = tmp_path / "adw_state.json"
    link.symlink_to(outside)
    with pytest.raises(ReadError, match="is a symlink"):
        read_state(link, LIMIT)
    with pytest.raises(ReadError, match="symlink"):
        read_tail(link, 100)


def test_a_symlinked_directory_is_not_followed_to_the_file_below_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "raw_output.jsonl").write_text('{"type":"system"}\n')
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "planner").symlink_to(outside)
    with pytest.raises(OSError, match=r"Not a directory|Too many levels") as caught:
        open_nofollow(run_dir / "planner" / "raw_output.jsonl")
    assert caught.value.errno in (errno.ELOOP, errno.ENOTDIR)
    with pytest.raises(ReadError, match="symlink"):
        read_tail(run_dir / "planner" / "raw_output.jsonl", 100)


def test_non_regular_files_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "adw_state.json"
    os.mkfifo(fifo)
    # O_NONBLOCK: opening a FIFO with no writer must not hang the agent.
    with pytest.raises(ReadError, match="not a regular file"):
        read_state(fifo, LIMIT)
    directory = tmp_path / "error.log"
    directory.mkdir()
    with pytest.raises(ReadError, match="not a regular file"):
        read_tail(directory, 100)


def test_oversize_file_is_refused_without_reading_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "adw_state.json"
    with path.open("wb") as f:
        f.truncate(64 << 20)  # sparse: large on paper, cheap on disk
    reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        reads.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", counting_read)
    with pytest.raises(ReadError, match="67108864 bytes, over the 1048576-byte limit"):
        read_bounded(path, LIMIT)
    assert reads == []


def test_bounded_read_at_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1024)
    assert read_bounded(path, 1024) == b"x" * 1024
    with pytest.raises(ReadError, match="over the 1023-byte limit"):
        read_bounded(path, 1023)


def test_tail_of_a_small_file_is_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "error.log"
    path.write_text("Traceback (most recent call last):\n  boom\nValueError: x\n")
    tail = read_tail(path, 4096)
    assert tail.excerpt == "Traceback (most recent call last):\n  boom\nValueError: x"
    assert tail.size == path.stat().st_size
    assert tail.ino == path.stat().st_ino


def test_tail_is_bounded_and_cut_to_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "error.log"
    lines = [f"line {i:04d} " + "é" * 20 for i in range(2000)]
    path.write_text("\n".join(lines) + "\n")
    tail = read_tail(path, 500)
    assert len(tail.excerpt.encode()) <= 500
    got = tail.excerpt.split("\n")
    assert got == lines[-len(got) :]
    assert len(got) >= 5


def test_tail_of_one_long_line_is_still_bounded(tmp_path: Path) -> None:
    path = tmp_path / "error.log"
    path.write_bytes(b"a" * 10_000 + b"\x00end\n")
    tail = read_tail(path, 100)
    assert len(tail.excerpt) <= 100
    assert tail.excerpt.endswith("\ufffdend")


def test_safe_subdir(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("")
    assert safe_subdir(tmp_path, "real") == tmp_path / "real"
    assert safe_subdir(tmp_path, "link") is None
    assert safe_subdir(tmp_path, "file") is None
    assert safe_subdir(tmp_path, "absent") is None


def test_file_names() -> None:
    assert (read.STATE_FILE, read.PHASES_FILE, read.ERROR_LOG, read.TRANSCRIPT) == (
        "adw_state.json",
        "completed_phases.json",
        "error.log",
        "raw_output.jsonl",
    )


# -- failure logs and hard links ----------------------------------------------------------


def _log(path: Path, text: str, mtime_ns: int) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_the_failure_excerpt_is_the_tail_of_the_log_written_last(tmp_path: Path) -> None:
    base = 1_700_000_000 * 10**9
    _log(tmp_path / "adw_plan_iso" / "execution.log", "plan ok\n", base)
    _log(tmp_path / "adw_build_iso" / "execution.log", "x\n" * 100 + "build broke\n", base + 2)
    _log(tmp_path / "subprocess.log", "started\n", base + 1)
    assert read.failure_logs(tmp_path)[0] == tmp_path / "adw_build_iso" / "execution.log"
    excerpt = read.latest_failure_tail(tmp_path, 64)
    assert excerpt.endswith("build broke")
    assert len(excerpt.encode()) <= 64
    _log(tmp_path / "adw_sdlc_complete_iso" / "execution.log", "Build phase failed\n", base + 3)
    assert read.latest_failure_tail(tmp_path, 64) == "Build phase failed"
    _log(tmp_path / "subprocess.log", "Traceback: boom\n", base + 4)
    assert read.latest_failure_tail(tmp_path, 64) == "Traceback: boom"


def test_failure_logs_read_nothing_else(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    _log(outside / "execution.log", "secret from elsewhere\n", 2 * 10**18)
    run = tmp_path / "run"
    run.mkdir()
    (run / "adw_evil_iso").symlink_to(outside)
    _log(run / ".gh-config" / "execution.log", "token\n", 2 * 10**18)
    _log(run / "sdlc_planner" / "execution.log", "not a script folder\n", 2 * 10**18)
    (run / "adw_linked").mkdir()
    (run / "adw_linked" / "execution.log").symlink_to(outside / "execution.log")
    assert read.failure_logs(run) == []
    assert read.latest_failure_tail(run, 4096) == ""


def test_a_hard_linked_failure_log_is_skipped_unless_allowed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.log"
    outside.write_text("content from elsewhere\n")
    run = tmp_path / "run"
    (run / "adw_build_iso").mkdir(parents=True)
    os.link(outside, run / "adw_build_iso" / "execution.log")
    assert read.latest_failure_tail(run, 4096) == ""
    assert read.latest_failure_tail(run, 4096, allow_hardlinks=True) == "content from elsewhere"


def test_hard_linked_state_is_refused_unless_allowed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"adw_id": "x"}')
    os.link(elsewhere, tmp_path / "adw_state.json")
    with pytest.raises(ReadError, match="hard links"):
        read_state(tmp_path / "adw_state.json", LIMIT)
    assert read_state(tmp_path / "adw_state.json", LIMIT, allow_hardlinks=True) == {"adw_id": "x"}
