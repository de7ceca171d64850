"""The run directory's layout: which files the agent reads, and the typed keys that name them.

A run directory holds ``adw_state.json``, ``completed_phases.json``, ``error.log`` and one folder
per agent with its ``raw_output.jsonl`` transcript. Everything else in it is ignored, hidden
folders (``.gh-config/`` holds a GitHub token) are never looked into, and no file is ever read
through a symbolic link. :class:`RunLayout` is the one place that maps a
changed path to the file it belongs to and a file back to its path; the rest of the agent
speaks in :class:`FileKey` values.

An agent's folder name that is not UTF-8 is kept in its key escaped (see
:func:`agent.read.escape_name`), as keys end up in the store, in events and in logs; the layout
turns it back into the bytes on the file system.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, get_args

from agent.read import (
    ERROR_LOG,
    PHASES_FILE,
    STATE_FILE,
    TRANSCRIPT,
    escape_name,
    safe_subdir,
    unescape_name,
)

FileKind = Literal["state", "phases", "errorlog", "transcript"]
#: Not a file: "look at every file again" (the run directory itself changed, or a timer).
Rescan = Literal["rescan"]
RESCAN: Final[Rescan] = "rescan"

_TOP_FILES: Final[dict[str, FileKind]] = {
    STATE_FILE: "state",
    PHASES_FILE: "phases",
    ERROR_LOG: "errorlog",
}
_NAMES: Final[dict[FileKind, str]] = {kind: name for name, kind in _TOP_FILES.items()}
_TRANSCRIPT_PREFIX = "transcript:"


@dataclass(frozen=True, slots=True, order=True)
class FileKey:
    """One file of a run directory: a top-level file, or the transcript of one agent (whose
    folder name is held escaped, see the module docstring)."""

    kind: FileKind
    agent: str = ""

    @classmethod
    def transcript(cls, agent: str) -> FileKey:
        return cls("transcript", agent)

    @classmethod
    def parse(cls, text: str) -> FileKey:
        """The key whose :meth:`__str__` is ``text`` (the form the store keeps it under)."""
        if text.startswith(_TRANSCRIPT_PREFIX):
            return cls.transcript(text.removeprefix(_TRANSCRIPT_PREFIX))
        if text in get_args(FileKind) and text != "transcript":
            return cls(text)  # type: ignore[arg-type]  # checked just above
        raise ValueError(f"not a file key: {text!r}")

    @property
    def is_transcript(self) -> bool:
        return self.kind == "transcript"

    def __str__(self) -> str:
        # Stable: stores written by earlier versions keep their rows under these names.
        return f"{_TRANSCRIPT_PREFIX}{self.agent}" if self.is_transcript else self.kind


STATE: Final = FileKey("state")
PHASES: Final = FileKey("phases")
ERRORLOG: Final = FileKey("errorlog")
TOP_FILES: Final = frozenset({STATE, PHASES, ERRORLOG})

#: What a batch of changes names: files, or a full rescan.
Change = FileKey | Rescan


class RunLayout:
    """Where the files of one run directory are, and which of them a changed path is."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def classify(self, path: str) -> Change | None:
        """The file a changed path belongs to, :data:`RESCAN`, or None if it is not ours.

        A directory appearing directly under the run directory is an agent's folder: its
        transcript may follow. A change of the run directory itself, or of one above it, may
        have replaced everything: that is a rescan.
        """
        try:
            parts = Path(path).relative_to(self.run_dir).parts
        except ValueError:
            return RESCAN if Path(path) in self.run_dir.parents else None
        if not parts:
            return RESCAN
        if parts[0].startswith("."):
            return None  # hidden: .gh-config/ holds a GitHub token, and no agent is hidden
        if len(parts) == 1:
            kind = _TOP_FILES.get(parts[0])
            if kind is not None:
                return FileKey(kind)
            return FileKey.transcript(escape_name(parts[0]))
        if len(parts) == 2 and parts[1] == TRANSCRIPT:
            return FileKey.transcript(escape_name(parts[0]))
        return None

    def path(self, key: FileKey) -> Path:
        if key.is_transcript:
            return self.run_dir / unescape_name(key.agent) / TRANSCRIPT
        return self.run_dir / _NAMES[key.kind]

    def agent_dir(self, agent: str) -> Path | None:
        """The agent's folder (``agent`` as held in its key) if it is a real directory (not a
        symlink), else None."""
        return safe_subdir(self.run_dir, unescape_name(agent))

    def present(self) -> set[FileKey]:
        """Every file that may exist now: the top-level files and one transcript per folder."""
        keys = set(TOP_FILES)
        try:
            names = [p.name for p in self.run_dir.iterdir()]
        except OSError:
            return keys
        for name in names:
            if not name.startswith(".") and safe_subdir(self.run_dir, name) is not None:
                keys.add(FileKey.transcript(escape_name(name)))
        return keys


#: What a run directory looked like: each present file's identity, size and modification time.
Fingerprint = frozenset[tuple[FileKey, int, int, int]]


def fingerprint(layout: RunLayout, known: Iterable[FileKey]) -> Fingerprint:
    """A cheap picture of the run directory (one ``lstat`` per file, nothing read): equal
    pictures mean nothing was written in between."""
    seen: set[tuple[FileKey, int, int, int]] = set()
    for key in layout.present() | set(known):
        try:
            st = os.lstat(layout.path(key))
        except OSError:
            continue
        seen.add((key, st.st_ino, st.st_size, st.st_mtime_ns))
    return frozenset(seen)


def files_of(changes: Iterable[Change]) -> set[FileKey]:
    """The files named in ``changes``, leaving out rescans."""
    return {c for c in changes if isinstance(c, FileKey)}
