"""Noticing changes in the run directory: inotify through watchdog, or polling as a fallback.

The watcher only reports *which* paths changed; reading them is the pipeline's job. Callbacks run
on watchdog's thread, so the caller hands them to its event loop. Opens and non-writing closes
are filtered out at the source: the agent's own reads would otherwise wake it up again.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from agent.config import WatchMode

log = logging.getLogger("adw_agent.watch")

_EVENTS = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]
_EXHAUSTED = {errno.ENOSPC, errno.EMFILE, errno.ENFILE, errno.ENOMEM}


class _Handler(FileSystemEventHandler):
    def __init__(
        self, on_change: Callable[[str], None], on_closed: Callable[[str], None] | None
    ) -> None:
        self._on_change = on_change
        self._on_closed = on_closed

    def on_any_event(self, event: FileSystemEvent) -> None:
        if self._on_closed is not None and isinstance(event, FileClosedEvent):
            self._on_closed(_text(event.src_path))
            return
        self._on_change(_text(event.src_path))
        dest = getattr(event, "dest_path", "")
        if dest:
            self._on_change(_text(dest))


def _text(path: str | bytes) -> str:
    return path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path


def _polling_observer(interval: float) -> BaseObserver:
    """A poller that never follows a symbolic link: ``lstat`` and ``scandir`` see the link
    itself. Following them, ``a -> .`` and ``b -> .`` make a snapshot that never ends, and a
    link to ``/`` walks the whole filesystem on every poll. The agent reads no file through
    a link anyway."""
    return PollingObserverVFS(os.lstat, os.scandir, polling_interval=interval)


def _inotify_observer() -> BaseObserver:
    from watchdog.observers.inotify import InotifyObserver  # noqa: PLC0415  (Linux only)

    return InotifyObserver()


class Watcher:
    """Watches ``root`` recursively and calls ``on_change(path)`` for every relevant event.

    With ``on_closed``, a file closed after writing (inotify's IN_CLOSE_WRITE) is reported there
    instead: its writer is done with it, so it can be read at once. Polling never reports it.
    """

    def __init__(
        self,
        root: Path,
        mode: WatchMode,
        poll_interval: float,
        on_change: Callable[[str], None],
        on_closed: Callable[[str], None] | None = None,
    ) -> None:
        self.root = root
        self.mode = mode
        self.poll_interval = poll_interval
        self._on_change = on_change
        self._on_closed = on_closed
        self._observer: BaseObserver | None = None
        #: The mechanism actually in use: "inotify" or "poll".
        self.active: Literal["inotify", "poll"] | None = None

    def start(self) -> None:
        """Start watching. In ``auto`` mode an exhausted inotify falls back to polling."""
        if self.mode != "poll":
            try:
                self._start(_inotify_observer(), "inotify")
                return
            except OSError as exc:
                if self.mode == "inotify" or exc.errno not in _EXHAUSTED | {errno.ENOSYS}:
                    raise
                log.warning(
                    "inotify is unavailable (%s); falling back to polling every %.1fs. "
                    "Raise fs.inotify.max_user_watches / fs.inotify.max_user_instances "
                    "(sysctl) to get millisecond latency back",
                    exc.strerror,
                    self.poll_interval,
                    extra={"path": str(self.root)},
                )
        self._start(_polling_observer(self.poll_interval), "poll")

    def _start(self, observer: BaseObserver, kind: Literal["inotify", "poll"]) -> None:
        observer.schedule(
            _Handler(self._on_change, self._on_closed),
            str(self.root),
            recursive=True,
            event_filter=_EVENTS,
        )
        observer.daemon = True
        try:
            observer.start()
        except BaseException:
            observer.stop()
            raise
        self._observer = observer
        self.active = kind

    def alive(self) -> bool:
        """Whether changes are still reported. When the watched directory itself is deleted,
        watchdog stops its emitter but not the observer thread: both must be running."""
        observer = self._observer
        if observer is None or not observer.is_alive():
            return False
        emitters = list(observer.emitters)
        return bool(emitters) and all(emitter.is_alive() for emitter in emitters)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop watching; wait at most ``timeout`` for the observer's thread to end.

        Blocking: watchdog joins its emitter threads, without a time limit. Call it from a
        thread other than the event loop's (see ``Agent._stop_watcher``).
        """
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=timeout)
