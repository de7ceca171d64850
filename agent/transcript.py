"""Incremental, crash-safe reading of one Claude Code ``raw_output.jsonl``.

The orchestrator appends one JSON object per line while the CLI runs, and it
reopens the file with ``"w"`` for every retry, so the file can shrink to zero
and grow again at any moment. :class:`TranscriptReader` hands out each complete
line exactly once and reports when the file was truncated or replaced, so the
caller can open a new cost attempt before feeding the new lines.

Crash safety comes from :class:`Position`: its ``offset`` is the end of the last
complete line handed out, never the end of a half-written line, so a caller that
persists the position after processing a chunk resumes exactly where it stopped.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from agent.errors import ReadError
from agent.read import open_nofollow

__all__ = [
    "FINGERPRINT_BYTES",
    "Chunk",
    "Position",
    "TranscriptError",
    "TranscriptReader",
    "UnsafeFile",
    "parse_line",
]

_log = logging.getLogger(__name__)

#: How much of the first line identifies an attempt. Claude Code's first line is
#: ``system/init`` with the session id near the start, so this is unique per attempt.
FINGERPRINT_BYTES = 4096


class TranscriptError(ReadError):
    """A transcript cannot be read safely (the caller decides how to report it)."""


class UnsafeFile(TranscriptError):
    """The path is a symlink (or under one) or not a regular file, so it is refused."""


def _fingerprint(head: bytes) -> str:
    """Hash the first line within ``head`` (the file's first bytes).

    ``head`` must hold either the first newline or :data:`FINGERPRINT_BYTES` bytes,
    which is true whenever the first line is complete, so two calls on the same
    file content always agree.
    """
    newline = head.find(b"\n")
    first = head if newline < 0 else head[:newline]
    return hashlib.blake2b(first, digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class Position:
    """Where reading stopped, in a form that survives a restart of the process.

    ``offset`` is the end of the last complete line consumed. ``fingerprint`` is the
    blake2b hex digest of the first line's first bytes once that line is complete;
    it tells a file that was truncated and regrew past ``offset`` from the original.
    ``skipping``: ``offset`` is inside an over-long line whose bytes up to there were thrown
    away, so that a restart goes on from there instead of reading that line again (a sparse
    file of gigabytes without a newline would otherwise be scanned from 0 on every start).
    """

    dev: int
    ino: int
    offset: int
    fingerprint: str | None
    skipping: bool = False

    def dump(self) -> dict[str, Any]:
        """Return a JSON-able form for the durable store."""
        return {
            "dev": self.dev,
            "ino": self.ino,
            "offset": self.offset,
            "fingerprint": self.fingerprint,
            # Only when set, so positions saved by earlier versions read back unchanged.
            **({"skipping": True} if self.skipping else {}),
        }

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> Position:
        """Rebuild a position from :meth:`dump` output; raise ``ValueError`` if malformed."""
        try:
            dev, ino, offset, fingerprint = (
                data["dev"],
                data["ino"],
                data["offset"],
                data["fingerprint"],
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"invalid transcript position: {data!r}") from exc
        for value in (dev, ino, offset):
            if type(value) is not int or value < 0:
                raise ValueError(f"invalid transcript position: {data!r}")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise ValueError(f"invalid transcript position: {data!r}")
        skipping = data.get("skipping", False)
        if type(skipping) is not bool:
            raise ValueError(f"invalid transcript position: {data!r}")
        return cls(dev, ino, offset, fingerprint, skipping)


@dataclass(slots=True)
class Chunk:
    """The result of one :meth:`TranscriptReader.read` call.

    When ``restarted`` is true the file was truncated or replaced since the last
    read: the caller must close its current attempt *before* feeding ``lines``,
    which then start from the beginning of the new content.
    """

    lines: list[bytes]
    restarted: bool
    position: Position
    skipped: int
    more_pending: bool = False


def parse_line(raw: bytes) -> dict[str, Any] | None:
    """Parse one transcript line; ``None`` if it is not a JSON object (a bad line)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class TranscriptReader:
    """Hands out new complete lines of one transcript, each exactly once.

    The file is opened for every :meth:`read` and closed again, so thousands of
    idle transcripts hold no descriptors and a replaced file is seen at once.
    """

    __slots__ = (
        "_allow_hardlinks",
        "_dev",
        "_fingerprint",
        "_head",
        "_ino",
        "_known",
        "_max_line",
        "_offset",
        "_on_warning",
        "_partial",
        "_path",
        "_read_pos",
        "_read_size",
        "_skipping",
    )

    def __init__(
        self,
        path: Path,
        position: Position | None,
        max_line_bytes: int = 8 * 1024 * 1024,
        read_size: int = 1 << 20,
        on_warning: Callable[[str], None] | None = None,
        *,
        allow_hardlinks: bool = False,
    ) -> None:
        if max_line_bytes < 1 or read_size < 1:
            raise ValueError("max_line_bytes and read_size must be positive")
        self._path = path
        self._max_line = max_line_bytes
        self._read_size = read_size
        self._on_warning = on_warning
        self._allow_hardlinks = allow_hardlinks
        # Without a saved position the first file seen is taken as-is.
        self._known = position is not None
        pos = position or Position(0, 0, 0, None)
        self._dev = pos.dev
        self._ino = pos.ino
        self._offset = pos.offset
        self._fingerprint = pos.fingerprint
        # Bytes [offset, read_pos) are the trailing partial line, held in _partial,
        # or, while _skipping, the part of an over-long line already thrown away.
        self._read_pos = pos.offset
        # A bytearray, so a long line arriving in many small appends is not
        # copied again on every read.
        self._partial = bytearray()
        self._skipping = pos.skipping
        # The file's first bytes as read by this reader, kept only until the
        # fingerprint is known: they let a rewrite be noticed before that.
        self._head = b""

    @property
    def path(self) -> Path:
        """The transcript file this reader follows."""
        return self._path

    @property
    def position(self) -> Position:
        """The resumable position: the end of the last complete line handed out."""
        return Position(self._dev, self._ino, self._offset, self._fingerprint, self._skipping)

    def read(self, budget: int = 64 << 20) -> Chunk:
        """Read new complete lines, about ``budget`` bytes at most.

        Call again while ``more_pending`` is true. Raises :class:`UnsafeFile` for a
        symlink or non-regular file; ``FileNotFoundError`` propagates.
        """
        fd = self._open()
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeFile(str(self._path), "is not a regular file")
            if st.st_nlink > 1 and not self._allow_hardlinks:
                # A hard link to a file elsewhere would ship that file's content.
                raise UnsafeFile(
                    str(self._path),
                    f"has {st.st_nlink} hard links, refused (watch.allow_hardlinks is off)",
                )
            restarted = self._must_restart(fd, st)
            if restarted:
                self._restart()
            if not self._known:
                self._known = True
            self._dev, self._ino = st.st_dev, st.st_ino

            lines: list[bytes] = []
            skipped = 0
            consumed = 0
            more_pending = False
            while True:
                if consumed >= budget:
                    more_pending = os.fstat(fd).st_size > self._read_pos
                    break
                start = self._read_pos
                data = os.pread(fd, self._read_size, start)
                if not data:
                    break
                self._read_pos = start + len(data)
                consumed += len(data)
                if self._fingerprint is None and start == len(self._head) < FINGERPRINT_BYTES:
                    self._head += data[: FINGERPRINT_BYTES - start]
                skipped += self._consume(data, start, lines)

            if self._fingerprint is None and self._offset > 0:
                if len(self._head) < FINGERPRINT_BYTES and b"\n" not in self._head:
                    # Only possible when resuming a position saved without a
                    # fingerprint: this reader never saw the file's first bytes.
                    self._head = os.pread(fd, FINGERPRINT_BYTES, 0)
                # Past an over-long first line that is still short of FINGERPRINT_BYTES (a
                # small max_line_bytes), the first line is not known yet: fingerprint later.
                if len(self._head) >= FINGERPRINT_BYTES or b"\n" in self._head:
                    self._fingerprint = _fingerprint(self._head)
                    self._head = b""
        finally:
            os.close(fd)
        return Chunk(lines, restarted, self.position, skipped, more_pending)

    def _open(self) -> int:
        try:
            return open_nofollow(self._path)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeFile(
                    str(self._path), "is a symlink, or under one (not followed)"
                ) from exc
            raise

    def _must_restart(self, fd: int, st: os.stat_result) -> bool:
        """Whether the file is no longer the content this reader has consumed."""
        if not self._known:
            return False
        if st.st_ino != self._ino:
            return True
        if st.st_size < self._read_pos:
            return True
        if st.st_dev != self._dev and self._fingerprint is None:
            # A new device with nothing to compare: take it as a new file.
            return True
        if self._fingerprint is not None:
            # Same inode and long enough, but the orchestrator may have truncated
            # it and written past our offset while we were not looking.
            head = os.pread(fd, FINGERPRINT_BYTES, 0)
            return _fingerprint(head) != self._fingerprint
        if self._head:
            return os.pread(fd, len(self._head), 0) != self._head
        return False

    def _restart(self) -> None:
        self._offset = 0
        self._read_pos = 0
        self._fingerprint = None
        self._partial.clear()
        self._skipping = False
        self._head = b""

    def _skip(self, line_start: int) -> int:
        """Report one over-long line; returns 1 so callers can count it."""
        message = (
            f"skipping a line over {self._max_line} bytes at offset {line_start} of {self._path}"
        )
        if self._on_warning is not None:
            self._on_warning(message)
        else:
            _log.warning(message)
        return 1

    def _consume(self, data: bytes, start: int, lines: list[bytes]) -> int:
        """Split ``data`` (read at file offset ``start``) into lines; returns lines skipped."""
        skipped = 0
        pos = 0
        if self._skipping:
            newline = data.find(b"\n")
            if newline < 0:
                # Thrown away for good: the saved position moves past it.
                self._offset = start + len(data)
                return 0
            self._skipping = False
            pos = newline + 1
            self._offset = start + pos

        newline = data.find(b"\n", pos)
        if newline < 0:
            if len(self._partial) + len(data) - pos > self._max_line:
                skipped += self._skip(self._offset)
                self._partial.clear()
                self._skipping = True
                self._offset = start + len(data)
            else:
                self._partial += data[pos:]
            return skipped

        if self._partial:
            self._partial += data[pos:newline]
            first = bytes(self._partial)
            self._partial.clear()
        else:
            first = data[pos:newline]
        last = data.rfind(b"\n")
        complete = [first]
        if last > newline:
            complete += data[newline + 1 : last].split(b"\n")
        line_start = self._offset
        max_line = self._max_line
        for line in complete:
            if len(line) > max_line:
                skipped += self._skip(line_start)
            elif line and not line.isspace():
                lines.append(line)
            line_start += len(line) + 1
        self._offset = start + last + 1

        if len(data) - last - 1 > max_line:
            skipped += self._skip(self._offset)
            self._skipping = True
            self._offset = start + len(data)
        else:
            self._partial += data[last + 1 :]
        return skipped
