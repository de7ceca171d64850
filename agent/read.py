"""Reading the run directory's files safely, into typed models.

The writers (the ADW orchestrator and the backend) rewrite ``adw_state.json`` and
``completed_phases.json`` in place, without a temporary file, so a read can see an empty or
half-written file. Every parse failure is a :class:`ReadError`; the caller retries shortly and
keeps the last good state. Files are opened with ``O_NOFOLLOW`` and must be regular files, so a
symlink can never lead the agent out of the run directory, and every read is bounded in size.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import ReadError

STATE_FILE = "adw_state.json"
PHASES_FILE = "completed_phases.json"
ERROR_LOG = "error.log"
TRANSCRIPT = "raw_output.jsonl"
#: The logs a failed run leaves: each ADW script's ``adw_*/execution.log`` and, for runs the
#: backend started, ``subprocess.log``. Nothing else in the run directory is read for a failure
#: (``.gh-config/`` holds a GitHub token).
SCRIPT_LOG = "execution.log"
SCRIPT_DIR_PREFIX = "adw_"
SUBPROCESS_LOG = "subprocess.log"
#: Script folders looked at for their execution.log; a run has a handful.
_MAX_SCRIPT_DIRS = 256

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class AdwState(BaseModel):
    """``adw_state.json``: the union of the orchestrator's and the backend's fields.

    Every field is optional (runs of older workflows carry only five) and unknown keys are kept.
    """

    model_config = ConfigDict(extra="allow")

    adw_id: str | None = None
    issue_number: str | int | None = None
    github_url: str | None = None
    nl_input: str | None = None
    branch_name: str | None = None
    plan_file: str | None = None
    issue_class: str | None = Field(default=None, description="/chore, /bug, /feature, /patch")
    integration_checklist: Any = None
    external_build_results: Any = None
    external_test_results: Any = None
    external_lint_results: Any = None
    review_results: Any = None
    status: str | None = None
    current_phase: str | None = None
    start_time: str | None = None
    end_time: str | None = None
    current_cost: float | None = None
    estimated_cost_total: float | None = None
    estimated_cost_breakdown: Any = None
    worktree_path: str | None = None
    backend_port: int | None = None
    frontend_port: int | None = None
    model_used: str | None = None
    model_set: str | None = None
    all_adws: list[str] | None = None
    workflow_template: str | None = None


class CompletedPhases(BaseModel):
    """``completed_phases.json``."""

    model_config = ConfigDict(extra="allow")

    completed: list[str] = Field(default_factory=list)
    current: str | None = None
    last_updated: str | None = None


def open_nofollow(path: Path) -> int:
    """Open ``path`` read-only, refusing a symlink as the file *or* as its directory.

    The directory is opened first with ``O_NOFOLLOW`` and the file relative to it, so swapping
    an agent directory for a symlink between a check and the open cannot lead outside the run
    directory. Raises ``OSError`` (``ELOOP`` for a symlink) like ``os.open``.
    """
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.open(path.name, _OPEN_FLAGS, dir_fd=parent)
    finally:
        os.close(parent)


@contextlib.contextmanager
def open_regular(
    path: Path, *, allow_hardlinks: bool = False
) -> Iterator[tuple[int, os.stat_result]]:
    """Open ``path`` for reading without following a symlink; it must be a regular file.

    A file with more than one hard link is refused too, unless ``allow_hardlinks``: a hard link
    placed in the run directory could otherwise ship the content of a file from elsewhere.
    """
    try:
        fd = open_nofollow(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ReadError(str(path), "is a symlink, or under one (not followed)") from None
        raise ReadError(str(path), exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ReadError(str(path), "is not a regular file")
        if st.st_nlink > 1 and not allow_hardlinks:
            raise ReadError(
                str(path),
                f"has {st.st_nlink} hard links, refused (set watch.allow_hardlinks = true "
                "to read it)",
            )
        yield fd, st
    finally:
        os.close(fd)


def read_bounded(path: Path, limit: int, *, allow_hardlinks: bool = False) -> bytes:
    """The whole file, refusing one larger than ``limit`` bytes without reading it."""
    with open_regular(path, allow_hardlinks=allow_hardlinks) as (fd, st):
        if st.st_size > limit:
            raise ReadError(str(path), f"is {st.st_size} bytes, over the {limit}-byte limit")
        chunks = []
        remaining = limit + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
    if len(data) > limit:
        raise ReadError(str(path), f"grew over the {limit}-byte limit while being read")
    return data


def _parse(path: Path, limit: int, allow_hardlinks: bool) -> dict[str, Any]:
    raw = read_bounded(path, limit, allow_hardlinks=allow_hardlinks)
    if not raw.strip():
        raise ReadError(str(path), "is empty")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ReadError(str(path), f"is not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ReadError(str(path), "is not a JSON object")
    return value


def _problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"field {where}: {err['msg']}"


def read_state(path: Path, limit: int, *, allow_hardlinks: bool = False) -> dict[str, Any]:
    """The state as plain JSON data, keeping unknown keys. Raises ReadError."""
    data = _parse(path, limit, allow_hardlinks)
    try:
        model = AdwState.model_validate(data)
    except ValidationError as exc:
        raise ReadError(str(path), _problem(exc)) from None
    return {k: v for k, v in model.model_dump(mode="json").items() if k in data}


def read_phases(path: Path, limit: int, *, allow_hardlinks: bool = False) -> CompletedPhases:
    """The completed phases as a model, keeping unknown keys. Raises ReadError."""
    data = _parse(path, limit, allow_hardlinks)
    try:
        return CompletedPhases.model_validate(data)
    except ValidationError as exc:
        raise ReadError(str(path), _problem(exc)) from None


@dataclass(frozen=True, slots=True)
class LogTail:
    """What error.log looks like now: identity, size, and its last bytes."""

    ino: int
    size: int
    excerpt: str


def read_tail(path: Path, limit: int, *, allow_hardlinks: bool = False) -> LogTail:
    """The last ``limit`` bytes of a file, cut to whole lines where possible."""
    with open_regular(path, allow_hardlinks=allow_hardlinks) as (fd, st):
        start = max(0, st.st_size - limit)
        data = os.pread(fd, limit, start)
    if start > 0 and b"\n" in data[:-1]:
        data = data[data.index(b"\n") + 1 :]
    text = data.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    return LogTail(st.st_ino, st.st_size, text.rstrip("\n"))


def safe_subdir(run_dir: Path, name: str) -> Path | None:
    """``run_dir/name`` if it is a real directory (not a symlink), else None."""
    path = run_dir / name
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return path if stat.S_ISDIR(st.st_mode) else None


def _mtime_ns(directory: Path, name: str) -> int | None:
    """The modification time of the regular file ``directory/name``, following no symlink."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return None
    finally:
        os.close(fd)
    return st.st_mtime_ns if stat.S_ISREG(st.st_mode) else None


def failure_logs(run_dir: Path) -> list[Path]:
    """The failure logs that exist now: ``adw_*/execution.log`` and ``subprocess.log``, the one
    written last first. Script folders that are symlinks are skipped, and at most a few hundred
    folders are looked at, whatever the run directory holds."""
    found: list[tuple[int, str, Path]] = []
    mtime = _mtime_ns(run_dir, SUBPROCESS_LOG)
    if mtime is not None:
        found.append((mtime, SUBPROCESS_LOG, run_dir / SUBPROCESS_LOG))
    try:
        with os.scandir(run_dir) as entries:
            seen = 0
            for entry in entries:
                if not entry.name.startswith(SCRIPT_DIR_PREFIX):
                    continue
                seen += 1
                if seen > _MAX_SCRIPT_DIRS:
                    break
                if not entry.is_dir(follow_symlinks=False):
                    continue
                mtime = _mtime_ns(Path(entry.path), SCRIPT_LOG)
                if mtime is not None:
                    found.append((mtime, entry.name, Path(entry.path) / SCRIPT_LOG))
    except OSError:
        pass
    found.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [path for _, _, path in found]


def latest_failure_tail(run_dir: Path, limit: int, *, allow_hardlinks: bool = False) -> str:
    """The bounded tail of the failure log written last (see :func:`failure_logs`), or "" when
    there is none that can be read."""
    for path in failure_logs(run_dir):
        try:
            return read_tail(path, limit, allow_hardlinks=allow_hardlinks).excerpt
        except (OSError, ReadError):
            continue
    return ""


_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def escape_name(name: str) -> str:
    """A directory name as it appears in events, logs and the store: valid UTF-8 text.

    Python keeps the bytes of a name that is not UTF-8 as lone surrogates, which can be neither
    stored nor sent as JSON. They become ``\\xNN``, and a backslash becomes ``\\\\`` so that the
    escaping can be undone (:func:`unescape_name`); other names are unchanged.
    """
    if "\\" not in name and not any("\udc80" <= ch <= "\udcff" for ch in name):
        return name
    out = []
    for ch in name:
        if ch == "\\":
            out.append("\\\\")
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch)
    return "".join(out)


def unescape_name(text: str) -> str:
    """The directory name :func:`escape_name` made ``text`` from."""
    if "\\" not in text:
        return text
    return _ESCAPE.sub(lambda m: "\\" if m[1] == "\\" else chr(0xDC00 + int(m[1][1:], 16)), text)
