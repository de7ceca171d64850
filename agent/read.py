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
def open_regular(path: Path) -> Iterator[tuple[int, os.stat_result]]:
    """Open ``path`` for reading without following a symlink; it must be a regular file."""
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
        yield fd, st
    finally:
        os.close(fd)


def read_bounded(path: Path, limit: int) -> bytes:
    """The whole file, refusing one larger than ``limit`` bytes without reading it."""
    with open_regular(path) as (fd, st):
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


def _parse(path: Path, limit: int) -> dict[str, Any]:
    raw = read_bounded(path, limit)
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


def read_state(path: Path, limit: int) -> dict[str, Any]:
    """The state as plain JSON data, keeping unknown keys. Raises ReadError."""
    data = _parse(path, limit)
    try:
        model = AdwState.model_validate(data)
    except ValidationError as exc:
        raise ReadError(str(path), _problem(exc)) from None
    return {k: v for k, v in model.model_dump(mode="json").items() if k in data}


def read_phases(path: Path, limit: int) -> CompletedPhases:
    """The completed phases as a model, keeping unknown keys. Raises ReadError."""
    data = _parse(path, limit)
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


def read_tail(path: Path, limit: int) -> LogTail:
    """The last ``limit`` bytes of a file, cut to whole lines where possible."""
    with open_regular(path) as (fd, st):
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
