"""Which directories under a root are ADW run directories (host mode).

tac-webbuilder names a run directory by its ADW id, in one of two formats: eight lowercase hex
characters (most runs), or ``adw-`` and eight more (runs started by its backend's queue).
Anything else under the root is not a run and is never looked into: other folders, files,
symbolic links (a link could lead anywhere), and hidden entries such as ``.gh-config/``, which
holds a GitHub token.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Final

_RUN_ID: Final = re.compile(r"(?:adw-)?[0-9a-f]{8}")


def is_run_id(name: str) -> bool:
    """Whether ``name`` is an ADW id, in either format."""
    return _RUN_ID.fullmatch(name) is not None


class RunDirs:
    """The run directories under one root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def run_of(self, path: str) -> str | None:
        """The ADW id of the run directory ``path`` is in (or is), else None."""
        try:
            parts = Path(path).relative_to(self.root).parts
        except ValueError:
            return None
        if not parts or not is_run_id(parts[0]):
            return None
        return parts[0]

    def path(self, adw_id: str) -> Path:
        return self.root / adw_id

    def exists(self, adw_id: str) -> bool:
        """Whether the run directory is there, as a real directory."""
        try:
            return stat.S_ISDIR(os.lstat(self.root / adw_id).st_mode)
        except OSError:
            return False

    def scan(self) -> list[str]:
        """The ADW ids of every run directory now under the root, in name order.

        Only names are read, and one ``lstat`` per run-like name: the cost stays small with
        thousands of past runs. An unreadable root lists nothing.
        """
        found: list[str] = []
        try:
            with os.scandir(self.root) as entries:
                for entry in entries:
                    if is_run_id(entry.name) and entry.is_dir(follow_symlinks=False):
                        found.append(entry.name)
        except OSError:
            return []
        return sorted(found)
