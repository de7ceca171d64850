"""Noticing changes in the run directory: inotify through watchdog, or polling as a fallback.

The watcher only reports *which* paths changed; reading them is the pipeline's job. Callbacks run
on watchdog's thread, so the caller hands them to its event loop. Opens and non-writing closes
are filtered out at the source: the agent's own reads would otherwise wake it up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
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

from agent.config import Config, WatchMode
from agent.errors import ConfigError

log = logging.getLogger("adw_agent.watch")

# A recursive inotify watch registers every directory under the root. One the agent may not
# enter (a run's private .gh-config/, which holds a GitHub token) fails to register, and
# watchdog then warns on stderr, outside the agent's JSON log, with that directory's full
# path. The agent reads nothing under hidden directories; the warning would only put their
# names in the log.
warnings.filterwarnings(
    "ignore", message="Callback with id", category=RuntimeWarning, module=r"watchdog\."
)

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
        thread other than the event loop's (see :func:`stop_off_loop`).
        """
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=timeout)


async def stop_off_loop(watcher: Watcher, deadline: float) -> None:
    """Stop ``watcher`` without blocking the event loop, waiting until ``deadline`` at most.

    Stopping joins watchdog's threads, and its emitters are joined without a time limit. So it
    runs on a daemon thread of its own rather than in asyncio's executor, whose threads are
    waited for at exit: one that does not end in time is left behind, and it cannot keep the
    process from exiting.
    """
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def stop() -> None:
        try:
            watcher.stop(max(0.0, deadline - time.monotonic()))
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(_resolve, done)

    threading.Thread(target=stop, name="stop-watcher", daemon=True).start()
    await asyncio.wait({done}, timeout=max(0.0, deadline - time.monotonic()))
    if not done.done():
        log.debug("the watcher did not stop in time; leaving its threads to end by themselves")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


#: The longest the agent waits for a stopped watcher's threads to end.
WATCHER_STOP = 2.0

#: What a reconciliation found: the directory gone (nothing to read), watching it paused
#: (read it, and try to watch it again soon), or watching.
Reconciled = Literal["gone", "paused", "watching"]


@dataclass(frozen=True, slots=True)
class Replacement:
    """A watcher built (and started, if the old one was running) for a new configuration."""

    watcher: Watcher
    ino: int | None
    running: bool


class RunWatch:
    """Keeps one run directory watched: starts the watcher, heals it when it stopped or the
    directory was replaced, pauses while the directory is gone, and replaces it on reload."""

    def __init__(
        self, config: Config, on_change: Callable[[str], None], on_closed: Callable[[str], None]
    ) -> None:
        self.run_dir = config.watched
        self._on_change = on_change
        self._on_closed = on_closed
        self.watcher = self._new(config)
        self._mode = config.watch.mode
        self._ino: int | None = None
        #: True while deliberately not watching (directory gone, watcher could not start):
        #: the main loop is handling it, so the watchdog keeps being fed.
        self.paused = False

    def _new(self, config: Config) -> Watcher:
        return Watcher(
            config.watched,
            config.watch.mode,
            config.watch.poll_interval,
            self._on_change,
            self._on_closed,
        )

    def healthy(self) -> bool:
        """Watching, or deliberately paused."""
        return self.paused or self.watcher.alive()

    def start(self) -> bool:
        """Start watching; False (paused, to be retried) when the directory cannot be watched.

        Raises :class:`~agent.errors.ConfigError` when ``watch.mode = 'inotify'`` and inotify
        fails: that setting asks for no fallback.
        """
        try:
            self._ino = os.stat(self.run_dir).st_ino
            self.watcher.start()
        except OSError as exc:
            if self._mode == "inotify":
                raise ConfigError(_failure(self._mode, self.run_dir, exc)) from None
            log.error("cannot watch %s: %s", self.run_dir, exc)
            self.paused = True
            return False
        self.paused = False
        return True

    async def stop(self, deadline: float) -> None:
        await stop_off_loop(self.watcher, deadline)

    async def reconcile(self) -> Reconciled:
        """Heal what inotify cannot report: a run directory deleted or replaced, a watcher
        that stopped by itself."""
        try:
            ino: int | None = os.stat(self.run_dir).st_ino
        except OSError:
            ino = None
        if ino is None:
            # The watcher may already have stopped by itself (watchdog ends the emitter when
            # the watched directory is deleted): warn once per disappearance either way.
            if not self.paused:
                log.warning(
                    "the run directory is gone; waiting for it", extra={"path": str(self.run_dir)}
                )
            await self.stop(time.monotonic() + WATCHER_STOP)
            self.paused = True
            return "gone"
        if ino != self._ino or not self.watcher.alive():
            log.info("watching the run directory again", extra={"path": str(self.run_dir)})
            await self.stop(time.monotonic() + WATCHER_STOP)
            return "watching" if self.start() else "paused"
        return "watching"

    def prepare(self, old: Config, new: Config) -> Replacement | None:
        """A watcher for ``new`` if it needs one, started if the running one is: the poll
        interval is fixed when an observer starts. Raises ConfigError, changing nothing."""
        if new.watch.poll_interval == old.watch.poll_interval:
            return None
        watcher = self._new(new)
        running = self.watcher.alive()
        ino = self._ino
        if running:
            try:
                ino = os.stat(new.watched).st_ino
                watcher.start()
            except OSError as exc:
                raise ConfigError(_failure(new.watch.mode, new.watched, exc)) from None
        return Replacement(watcher, ino, running)

    async def swap(self, new: Replacement) -> None:
        """Put a prepared watcher in place of the running one."""
        previous, self.watcher, self._ino = self.watcher, new.watcher, new.ino
        await stop_off_loop(previous, time.monotonic() + WATCHER_STOP)


def _failure(mode: WatchMode, run_dir: Path, exc: OSError) -> str:
    if mode == "inotify":
        return f"watch.mode = 'inotify' but inotify failed: {exc}"
    return f"cannot watch {run_dir}: {exc}"
