"""Tests for agent.transcript: the incremental, crash-safe transcript reader."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.account import PriceTable, TranscriptLedger
from agent.errors import AgentError, ReadError
from agent.transcript import (
    Chunk,
    Position,
    TranscriptError,
    TranscriptReader,
    UnsafeFile,
    parse_line,
)

FIXTURES = Path(__file__).parent / "fixtures"


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def rewrite(path: Path, data: bytes) -> None:
    """Truncate in place, as the orchestrator's open(..., "w") does (same inode)."""
    with path.open("wb") as f:
        f.write(data)


def drain(reader: TranscriptReader, budget: int = 64 << 20) -> list[Chunk]:
    chunks = [reader.read(budget)]
    while chunks[-1].more_pending:
        chunks.append(reader.read(budget))
    return chunks


def lines_of(chunks: list[Chunk]) -> list[bytes]:
    return [line for chunk in chunks for line in chunk.lines]


@pytest.fixture
def transcript(tmp_path: Path) -> Path:
    path = tmp_path / "raw_output.jsonl"
    path.write_bytes(b"")
    return path


def test_partial_line_is_held_until_its_newline(transcript: Path) -> None:
    append(transcript, b'{"a":1}\n{"b"')
    reader = TranscriptReader(transcript, None)
    chunk = reader.read()
    assert chunk.lines == [b'{"a":1}']
    assert not chunk.restarted
    assert chunk.position.offset == 8
    assert reader.read().lines == []
    append(transcript, b":2}")
    assert reader.read().lines == []
    append(transcript, b"\n")
    chunk = reader.read()
    assert chunk.lines == [b'{"b":2}']
    assert chunk.position.offset == transcript.stat().st_size


def test_crash_resume_rereads_the_partial_line_only(transcript: Path) -> None:
    append(transcript, b"one\ntw")
    first = TranscriptReader(transcript, None)
    assert first.read().lines == [b"one"]
    saved = Position.load(first.position.dump())
    # The process dies; the writer finishes the line meanwhile.
    append(transcript, b"o\nthree\n")
    resumed = TranscriptReader(transcript, saved)
    chunk = resumed.read()
    assert chunk.lines == [b"two", b"three"]
    assert not chunk.restarted


def test_position_round_trip_resumes_without_repeats(transcript: Path) -> None:
    append(transcript, b"a\nb\n")
    reader = TranscriptReader(transcript, None)
    assert reader.read().lines == [b"a", b"b"]
    position = reader.position
    assert position.fingerprint is not None
    assert Position.load(position.dump()) == position
    append(transcript, b"c\n")
    resumed = TranscriptReader(transcript, Position.load(position.dump()))
    chunk = resumed.read()
    assert chunk.lines == [b"c"]
    assert not chunk.restarted
    assert resumed.read().lines == []


@pytest.mark.parametrize(
    "data",
    [
        {"dev": 1, "ino": 2, "offset": -1, "fingerprint": None},
        {"dev": 1, "ino": 2, "offset": 3, "fingerprint": 7},
        {"dev": 1, "ino": 2, "offset": "3", "fingerprint": None},
        {"dev": 1, "ino": 2},
    ],
)
def test_position_load_rejects_garbage(data: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="position"):
        Position.load(data)


def test_truncation_is_detected(transcript: Path) -> None:
    append(transcript, b"first attempt line 1\nfirst attempt line 2\n")
    reader = TranscriptReader(transcript, None)
    assert len(reader.read().lines) == 2
    rewrite(transcript, b"retry\n")
    chunk = reader.read()
    assert chunk.restarted
    assert chunk.lines == [b"retry"]
    assert chunk.position.offset == 6
    assert not reader.read().restarted


def test_truncation_to_the_same_first_line_is_detected(transcript: Path) -> None:
    append(transcript, b"init\nline 1\nline 2\n")
    reader = TranscriptReader(transcript, None)
    assert len(reader.read().lines) == 3
    # Same first line, so only the shrunken size gives the truncation away.
    rewrite(transcript, b"init\n")
    chunk = reader.read()
    assert chunk.restarted
    assert chunk.lines == [b"init"]


def test_truncation_discards_the_held_partial(transcript: Path) -> None:
    append(transcript, b"done\nhalf-writ")
    reader = TranscriptReader(transcript, None)
    assert reader.read().lines == [b"done"]
    rewrite(transcript, b"new\n")
    chunk = reader.read()
    assert chunk.restarted
    assert chunk.lines == [b"new"]


def test_rewrite_of_an_unfinished_first_line_is_detected(transcript: Path) -> None:
    append(transcript, b"abc")
    reader = TranscriptReader(transcript, None)
    assert reader.read().lines == []
    rewrite(transcript, b"xyzw\nmore\n")
    chunk = reader.read()
    assert chunk.restarted
    assert chunk.lines == [b"xyzw", b"more"]


def test_replacement_with_a_new_inode_is_detected(transcript: Path) -> None:
    append(transcript, b"old 1\nold 2\n")
    reader = TranscriptReader(transcript, None)
    assert reader.read().lines == [b"old 1", b"old 2"]
    replacement = transcript.with_name("tmp")
    # Longer than before, so neither size nor (by luck) content gives it away.
    replacement.write_bytes(b"old 1\nold 2\nnew 3\n")
    os.replace(replacement, transcript)
    chunk = reader.read()
    assert chunk.restarted
    assert chunk.lines == [b"old 1", b"old 2", b"new 3"]


def test_regrowth_past_the_offset_while_down_is_detected(transcript: Path) -> None:
    append(transcript, b'{"session":"A"}\n{"n":1}\n')
    first = TranscriptReader(transcript, None)
    assert len(first.read().lines) == 2
    saved = first.position
    # While the agent is down, a retry truncates the file and writes more than before.
    rewrite(transcript, b'{"session":"B"}\n{"n":1}\n{"n":2}\n{"n":3}\n')
    assert transcript.stat().st_ino == saved.ino
    assert transcript.stat().st_size > saved.offset
    resumed = TranscriptReader(transcript, saved)
    chunk = resumed.read()
    assert chunk.restarted
    assert chunk.lines == [b'{"session":"B"}', b'{"n":1}', b'{"n":2}', b'{"n":3}']


def test_regrowth_is_detected_by_a_live_reader_too(transcript: Path) -> None:
    append(transcript, b"session A\nx\n")
    reader = TranscriptReader(transcript, None)
    reader.read()
    rewrite(transcript, b"session B\nx\ny\nz\n")
    chunk = reader.read()
    assert chunk.restarted
    assert chunk.lines == [b"session B", b"x", b"y", b"z"]


def test_long_first_line_fingerprint_uses_its_first_4096_bytes(transcript: Path) -> None:
    head = b"h" * 5000
    append(transcript, head + b"\nnext\n")
    reader = TranscriptReader(transcript, None)
    assert reader.read().lines == [head, b"next"]
    saved = reader.position
    append(transcript, b"later\n")
    assert TranscriptReader(transcript, saved).read().lines == [b"later"]
    rewrite(transcript, b"h" * 4096 + b"X" * 904 + b"\nnext\nlater\n")
    # Same first 4096 bytes: indistinguishable by design, so not restarted.
    assert not TranscriptReader(transcript, saved).read().restarted
    rewrite(transcript, b"g" + b"h" * 4999 + b"\nnext\nlater\n")
    assert TranscriptReader(transcript, saved).read().restarted


def test_device_renumbering_with_same_content_is_not_a_restart(transcript: Path) -> None:
    append(transcript, b"init\none\n")
    reader = TranscriptReader(transcript, None)
    reader.read()
    saved = reader.position
    moved = Position(saved.dev + 1, saved.ino, saved.offset, saved.fingerprint)
    append(transcript, b"two\n")
    chunk = TranscriptReader(transcript, moved).read()
    assert not chunk.restarted
    assert chunk.lines == [b"two"]
    assert chunk.position.dev == saved.dev


def test_over_cap_line_is_skipped_and_the_next_line_read(transcript: Path) -> None:
    warnings: list[str] = []
    append(transcript, b"short\n" + b"x" * 50 + b"\nnext\n")
    reader = TranscriptReader(transcript, None, max_line_bytes=10, on_warning=warnings.append)
    chunk = reader.read()
    assert chunk.lines == [b"short", b"next"]
    assert chunk.skipped == 1
    assert len(warnings) == 1
    assert str(transcript) in warnings[0]


@pytest.mark.parametrize("read_size", [1, 3, 7, 16])
def test_over_cap_line_spanning_reads_is_never_buffered(transcript: Path, read_size: int) -> None:
    warnings: list[str] = []
    reader = TranscriptReader(
        transcript, None, max_line_bytes=10, read_size=read_size, on_warning=warnings.append
    )
    append(transcript, b"short\n" + b"y" * 30)
    chunk = reader.read()
    assert chunk.lines == [b"short"]
    assert chunk.skipped == 1
    # Nothing of the skipped line is held, and the resumable offset is past what was thrown
    # away, marked as inside that line.
    assert chunk.position.offset == 36
    assert chunk.position.skipping
    saved = Position.load(chunk.position.dump())
    append(transcript, b"y" * 30 + b"\n0123456789\n")
    chunk = reader.read()
    assert chunk.lines == [b"0123456789"]
    assert chunk.skipped == 0
    assert len(warnings) == 1
    assert not chunk.position.skipping
    # A restart goes on from the saved position: the rest of the line is still skipped.
    resumed = TranscriptReader(transcript, saved, max_line_bytes=10, read_size=read_size)
    chunk = resumed.read()
    assert chunk.lines == [b"0123456789"]
    assert chunk.skipped == 0
    assert not chunk.restarted


def test_empty_file_has_no_lines(transcript: Path) -> None:
    chunk = TranscriptReader(transcript, None).read()
    assert chunk.lines == []
    assert not chunk.restarted
    assert chunk.skipped == 0
    assert not chunk.more_pending
    assert chunk.position.offset == 0
    assert chunk.position.fingerprint is None


def test_empty_and_blank_lines_are_ignored(transcript: Path) -> None:
    append(transcript, b"\n\na\n  \r\n\tb\n")
    assert TranscriptReader(transcript, None).read().lines == [b"a", b"\tb"]


def test_symlink_is_refused(tmp_path: Path, transcript: Path) -> None:
    append(transcript, b"a\n")
    link = tmp_path / "link.jsonl"
    os.symlink(transcript, link)
    with pytest.raises(UnsafeFile):
        TranscriptReader(link, None).read()


def test_refusals_are_read_errors_with_the_path(tmp_path: Path, transcript: Path) -> None:
    link = tmp_path / "link.jsonl"
    os.symlink(transcript, link)
    with pytest.raises(UnsafeFile) as caught:
        TranscriptReader(link, None).read()
    assert isinstance(caught.value, TranscriptError)
    assert isinstance(caught.value, ReadError)
    assert isinstance(caught.value, AgentError)
    assert caught.value.path == str(link)
    assert "symlink" in caught.value.reason
    with pytest.raises(UnsafeFile) as caught:
        TranscriptReader(tmp_path, None).read()
    assert caught.value.path == str(tmp_path)
    assert caught.value.reason == "is not a regular file"


def test_fifo_and_directory_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeFile):
        TranscriptReader(fifo, None).read()
    with pytest.raises(UnsafeFile):
        TranscriptReader(tmp_path, None).read()


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        TranscriptReader(tmp_path / "missing.jsonl", None).read()


def test_budget_splits_reading_without_losing_lines(transcript: Path) -> None:
    lines = [b"line %d" % i for i in range(100)]
    append(transcript, b"\n".join(lines) + b"\n")
    reader = TranscriptReader(transcript, None, read_size=64)
    chunks = drain(reader, budget=100)
    assert len(chunks) > 5
    assert all(chunk.more_pending for chunk in chunks[:-1])
    assert lines_of(chunks) == lines
    assert reader.position.offset == transcript.stat().st_size


def test_parse_line() -> None:
    assert parse_line(b'{"type":"user"}') == {"type": "user"}
    assert parse_line(b"[1,2]") is None
    assert parse_line(b'"text"') is None
    assert parse_line(b"{broken") is None
    assert parse_line(b'{"a":"\xff"}') is None
    assert parse_line(b"") is None


def test_reader_reads_real_fixtures_line_for_line() -> None:
    for path in sorted(FIXTURES.glob("*/*.jsonl")):
        expected = [line for line in path.read_bytes().split(b"\n") if line.strip()]
        reader = TranscriptReader(path, None, read_size=4096)
        assert lines_of(drain(reader, budget=8192)) == expected, path.name


# ---------------------------------------------------------------------------
# Property: any split of the byte stream gives the same lines and the same cost


def _short_fixture_lines() -> list[bytes]:
    out: list[bytes] = []
    for path in sorted(FIXTURES.glob("*/*.jsonl")):
        out.extend(line for line in path.read_bytes().split(b"\n") if 0 < len(line) < 3000)
    return out


FIXTURE_LINES = _short_fixture_lines()

line_strategy = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from(FIXTURE_LINES),
)


def _whole_file_cost(data: bytes) -> float:
    ledger = TranscriptLedger(PriceTable(), lambda _m: None)
    complete = data[: data.rfind(b"\n") + 1]
    for raw in complete.split(b"\n"):
        parsed = parse_line(raw)
        if parsed is not None:
            ledger.feed(parsed)
    return ledger.cost


@settings(max_examples=100, deadline=None)
@given(
    lines=st.lists(line_strategy, max_size=30),
    trailing_newline=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12),
    read_size=st.sampled_from([1, 5, 64, 4096, 1 << 20]),
)
def test_any_write_split_yields_the_original_lines_and_cost(
    lines: list[bytes], trailing_newline: bool, cuts: list[int], read_size: int
) -> None:
    data = b"\n".join(lines) + (b"\n" if trailing_newline and lines else b"")
    complete = lines if trailing_newline else lines[:-1]
    expected = [line for line in complete if line.strip()]
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})

    ledger = TranscriptLedger(PriceTable(), lambda _m: None)
    got: list[bytes] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "raw_output.jsonl"
        path.write_bytes(b"")
        reader = TranscriptReader(path, None, read_size=read_size)
        for start, end in itertools.pairwise(points):
            append(path, data[start:end])
            for chunk in drain(reader, budget=max(read_size, 256)):
                assert not chunk.restarted
                got.extend(chunk.lines)
                ledger.feed_chunk(chunk)
        for chunk in drain(reader):
            got.extend(chunk.lines)

    assert got == expected
    assert ledger.cost == _whole_file_cost(data)
