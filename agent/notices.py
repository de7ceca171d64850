"""Warnings about run-directory files: once per problem per file, and few per file in any case.

A file that is unreadable, then fine, then unreadable again is warned about again each time it
turns bad; a writer rewriting it many times a second would then fill the log. So on top of
"once per problem until the file reads fine again", each file gets at most ``burst`` warnings
per ``window`` seconds. The ones held back are counted and the count is added to the next
warning that is let through.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

#: Files whose warnings are remembered; names come from the run directory.
MAX_FILES = 4096
BURST = 3
WINDOW = 60.0


@dataclass
class _File:
    problems: set[str] = field(default_factory=set)
    recent: deque[float] = field(default_factory=deque)  # when warnings were let through
    held_back: int = 0


class FileWarnings:
    """Warn once per problem per file, until the file reads fine again; at most ``burst``
    warnings per file per ``window`` seconds.

    At most ``limit`` files are remembered; beyond that the oldest is forgotten and may be
    warned about again.
    """

    def __init__(
        self,
        log: logging.Logger,
        limit: int = MAX_FILES,
        burst: int = BURST,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._files: dict[Hashable, _File] = {}
        self._limit = limit
        self._burst = burst
        self._window = window
        self._clock = clock

    def _file(self, file: Hashable) -> _File:
        entry = self._files.get(file)
        if entry is None:
            if len(self._files) >= self._limit:
                del self._files[next(iter(self._files))]
            entry = self._files[file] = _File()
        return entry

    def warn(self, file: Hashable, problem: str, message: str, *args: object, path: str) -> None:
        entry = self._file(file)
        if problem in entry.problems:
            return
        entry.problems.add(problem)
        now = self._clock()
        while entry.recent and now - entry.recent[0] >= self._window:
            entry.recent.popleft()
        if len(entry.recent) >= self._burst:
            entry.held_back += 1
            return
        entry.recent.append(now)
        extra: dict[str, object] = {"path": path}
        if entry.held_back:
            extra["held_back"] = entry.held_back
            message += " (%d more warnings about this file held back)"
            args = (*args, entry.held_back)
            entry.held_back = 0
        self._log.warning(message, *args, extra=extra)

    def ok(self, file: Hashable) -> None:
        """The file read fine: its problems may be warned about again (rate permitting)."""
        entry = self._files.get(file)
        if entry is not None:
            entry.problems.clear()

    def problems(self, file: Hashable) -> set[str] | None:
        entry = self._files.get(file)
        return None if entry is None or not entry.problems else set(entry.problems)

    def restore(self, file: Hashable, problems: set[str] | None) -> None:
        entry = self._file(file)
        entry.problems = set(problems) if problems else set()
