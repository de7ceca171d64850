"""The agent's lifecycle: startup → main loop → shutdown, in the manner of uvicorn's server.

Startup opens the store, starts watching *before* taking the first snapshot (so no change can
slip between the two), queues the snapshot and starts the sender. The main loop waits for
changes, debounces them, hands them to the pipeline, and runs the periodic work: heartbeat,
reconciliation rescan, optional resync, parse retries, systemd watchdog pings. Signal handlers
only set flags. Shutdown is ordered and bounded: stop watching, read what is pending, queue a
last status, drain the outbox, close; everything up to the end of the drain happens within
``delivery.drain_timeout`` of the stop request being seen, except that the last batch of pending
changes is never cut short (see :meth:`Agent.shutdown`).

The agent holds an exclusive lock on ``storage.dir`` for its lifetime (see
:func:`agent.outbox.lock_storage`). Exit codes: 0 after a clean stop, 78 for a configuration
error (a second agent on the same ``storage.dir`` is one), 1 when startup fails otherwise or the
sender task ends by itself: that is a bug, and exiting lets the service manager restart the agent
instead of leaving it up without delivering.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import ssl
import threading
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import httpx

from agent import __version__
from agent import config as config_module
from agent.config import Config
from agent.deliver import Sender, build_client
from agent.errors import AgentError, ConfigError, StorageError
from agent.layout import RESCAN, Change, FileKey
from agent.notify import Notifier
from agent.outbox import STORAGE_RETRY, Store, lock_storage
from agent.pipeline import Outcome, Pipeline
from agent.watch import Watcher

log = logging.getLogger("adw_agent.app")

_MISSING_DIR_POLL = 1.0
# The longest the agent waits for a stopped watcher's threads to end.
_WATCHER_STOP = 2.0
# How often an idle sender looks for rows it was not told about: dead letters requeued by
# ``adw-agent dead-letters`` from another process. One indexed SELECT, so idle cost stays nil.
_OUTBOX_POLL = 1.0


@dataclass
class _Retry:
    due: float
    attempts: int = 0


@dataclass
class _Timers:
    heartbeat: float = 0.0
    rescan: float = 0.0
    resync: float = 0.0
    watchdog: float = 0.0
    outbox: float = 0.0
    retries: dict[FileKey | Literal["storage"], _Retry] = field(default_factory=dict)


_T = TypeVar("_T")


def _started(part: _T | None) -> _T:
    if part is None:
        raise RuntimeError("the agent has not started")
    return part


class Agent:
    """One agent for one run directory."""

    def __init__(
        self,
        config: Config,
        notifier: Notifier | None = None,
        early_signals: list[int] | None = None,
    ) -> None:
        self.config = config
        self._early_signals = early_signals if early_signals is not None else []
        self.notifier = notifier or Notifier()
        self.should_exit = asyncio.Event()
        self._reload = False
        self._changed = asyncio.Event()
        self._pending: set[Change] = set()
        # Pending keys whose last event was their writer closing them (see _debounce).
        self._closed: set[Change] = set()
        self._noted = asyncio.Event()
        self._last_change = 0.0
        self._timers = _Timers()
        self._storage_error: str | None = None
        # While the store cannot be written: an agent_status sent directly, and whether the
        # startup snapshot still has to be queued.
        self._direct: asyncio.Task[bool] | None = None
        self._sync_pending = False
        self._dir_ino: int | None = None
        # True while the agent deliberately is not watching (run directory gone, watcher could
        # not start): the main loop is handling it, so the watchdog keeps being fed.
        self._watch_paused = False
        # Clients replaced by a reload, closed once a request in flight on them has ended.
        self._retired: list[tuple[httpx.AsyncClient, asyncio.Task[None]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit_code = 0
        # Made by startup, in this order; whatever exists is closed by _close.
        self._lock: int | None = None
        self._store: Store | None = None
        self._pipeline: Pipeline | None = None
        self.client: httpx.AsyncClient | None = None
        self._sender: Sender | None = None
        self._watcher: Watcher | None = None
        self.sender_task: asyncio.Task[None] | None = None

    @property
    def store(self) -> Store:
        """The agent's store (from startup on)."""
        return _started(self._store)

    @property
    def pipeline(self) -> Pipeline:
        """The agent's pipeline (from startup on)."""
        return _started(self._pipeline)

    @property
    def sender(self) -> Sender:
        """The agent's sender (from startup on)."""
        return _started(self._sender)

    @property
    def watcher(self) -> Watcher:
        """The agent's current watcher (from startup on; a reload may replace it)."""
        return _started(self._watcher)

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT. Returns the process exit code."""
        self._loop = asyncio.get_running_loop()
        self._install_signal_handlers()
        if self._early_signals:
            self._stop()
        try:
            await self.startup()
        except AgentError as exc:
            log.error("startup failed: %s", exc)
            await self._close()
            return 78 if isinstance(exc, ConfigError) else 1
        except Exception:
            log.exception("startup failed")
            await self._close()
            return 1
        try:
            await self.main_loop()
        finally:
            await self.shutdown()
        return self._exit_code

    async def startup(self) -> None:
        cfg = self.config
        # Before the store is opened: a second agent must not touch it at all.
        self._lock = lock_storage(cfg.storage.dir)
        self._store = Store(cfg.storage.dir, cfg.adw_id, cfg.storage.synchronous)
        self._pipeline = Pipeline(cfg, self._store)
        self.client = build_client(cfg)
        self._sender = Sender(cfg, self._store, self.client)
        self._watcher = self._new_watcher(cfg)
        self._start_watcher()
        self._status("starting")
        # A full disk must not stop the agent from starting: the snapshot waits for the store.
        self._sync()
        self.sender_task = asyncio.create_task(self.sender.run(), name="sender")
        self.sender_task.add_done_callback(self._sender_ended)
        self.sender.wake()
        now = time.monotonic()
        self._timers.heartbeat = now + cfg.intervals.heartbeat
        self._timers.rescan = now + cfg.watch.rescan_interval
        self._timers.resync = now + cfg.intervals.resync if cfg.intervals.resync else float("inf")
        self._timers.watchdog = now
        self._timers.outbox = now + _OUTBOX_POLL
        self.notifier.send("READY=1", self._status_line())
        log.info(
            "agent started",
            extra={
                "version": __version__,
                "run_dir": str(cfg.adw.dir),
                "watch": self.watcher.active,
                "backend": cfg.backend.url,
            },
        )

    async def main_loop(self) -> None:
        while not self.should_exit.is_set():
            await self._wait(self._next_deadline())
            if self.should_exit.is_set():
                break
            try:
                await self._tick()
            except AgentError as exc:
                log.error("error in the main loop: %s", exc)
            except Exception:
                log.exception("unexpected error in the main loop; continuing")
                await asyncio.sleep(0.1)

    async def shutdown(self) -> None:
        """Stop watching, record what is pending, queue a last status, drain, close.

        Bounded: the drain ends ``delivery.drain_timeout`` after shutdown starts, and the steps
        before it (stopping the watcher, at most 2 s) count against that time. Only the last
        batch of pending changes may run past it, as it is never cut short (milliseconds; a
        store another process holds locked makes it wait up to SQLite's 5 s busy timeout).
        After the drain come cancelling the request in flight and closing the connection and
        the store, which take milliseconds.
        """
        drain = self.config.delivery.drain_timeout
        deadline = time.monotonic() + drain
        log.info("shutting down", extra={"drain_timeout": drain})
        self.notifier.send("STOPPING=1", "STATUS=stopping")
        if self._watcher is not None:
            await self._stop_watcher(self._watcher, deadline)
        if self._pipeline is not None:
            try:
                if self._pending:
                    self._process(self._take_pending())
                self._status("stopping")
            except AgentError as exc:
                log.error("could not record the last changes: %s", exc)
        task = self.sender_task
        if task is not None:
            self.sender.wake()
            while not task.done() and time.monotonic() < deadline and not self._drained():
                await asyncio.sleep(0.02)
            if self._direct is not None and not self._direct.done():
                # The last status could only be sent directly (the store is not writable).
                await asyncio.wait({self._direct}, timeout=max(0.0, deadline - time.monotonic()))
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            try:
                left = self.store.depth()
            except StorageError as exc:
                log.error("cannot tell what is left undelivered: %s", exc)
                left = 0
            if left:
                log.warning("stopped with %d events undelivered; they are sent on next start", left)
        await self._close()

    async def _close(self) -> None:
        """Release whatever startup made, also after a startup that failed half way."""
        if self._direct is not None:
            self._direct.cancel()
            await asyncio.gather(self._direct, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()
        for old, closer in self._retired:
            closer.cancel()
            await old.aclose()
        self._retired.clear()
        if self._store is not None:
            self._store.close()
        if self._lock is not None:
            os.close(self._lock)  # releases storage.dir for the next agent
            self._lock = None
        self.notifier.close()

    def _sender_ended(self, task: asyncio.Task[None]) -> None:
        """The sender only ends when shutdown cancels it. Ending by itself is a bug: rather
        than stay up without delivering (heartbeats would still be written, so the
        healthcheck would stay green), the agent stops and exits with 1, and systemd
        (``Restart=on-failure``) or the container runtime starts it again."""
        if task.cancelled():
            return
        exc = task.exception()
        log.error(
            "the sender stopped unexpectedly; stopping the agent (exit code 1) to be restarted",
            exc_info=exc,
        )
        self._exit_code = 1
        self._stop()

    def _drained(self) -> bool:
        try:
            return self.sender.idle()
        except StorageError:
            return False

    # -- signals and reload -----------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)

    def _stop(self) -> None:
        self.should_exit.set()
        self._noted.set()  # a debounce in progress ends at once

    def _request_reload(self) -> None:
        self._reload = True
        self._changed.set()

    async def _apply_reload(self) -> None:
        """Re-read the config file (SIGHUP). Queued events stay queued; a config that fails
        validation is logged and the running one kept, entirely."""
        self._reload = False
        source = self.config.source
        if source is None:
            return
        self.notifier.reloading()
        try:
            await self._reconfigure(config_module.load(source))
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
        finally:
            # Whatever happened, systemd must not be left thinking the agent is reloading.
            self.notifier.send("READY=1", self._status_line())

    async def _reconfigure(self, new: Config) -> None:
        """Everything that can fail is built and checked first, while the running
        configuration is untouched; only then is it swapped in."""
        old = self.config
        fixed = {"adw": old.adw, "storage": old.storage, "cost": old.cost}
        if any(getattr(new, name) != value for name, value in fixed.items()) or (
            new.watch.mode != old.watch.mode
        ):
            log.warning(
                "adw.*, storage.*, cost.* and watch.mode changes take effect only on restart"
            )
            fixed["watch"] = new.watch.model_copy(update={"mode": old.watch.mode})
            new = new.model_copy(update=fixed)
        try:
            client = build_client(new)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{new.source}: backend.ca_bundle: {exc}") from None
        watcher: Watcher | None = None
        running = self.watcher.alive()
        ino = self._dir_ino
        if new.watch.poll_interval != old.watch.poll_interval:
            # The poll interval is fixed when an observer starts: a new one replaces it.
            watcher = self._new_watcher(new)
            if running:
                try:
                    ino = os.stat(new.adw.dir).st_ino
                    watcher.start()
                except OSError as exc:
                    await client.aclose()
                    raise ConfigError(self._watch_failure(new, exc)) from None
        # Commit: nothing below can fail.
        self._retire(self.sender.replace_client(new, client), old)
        self.client = client
        self.config = new
        self.pipeline.config = new
        self._reschedule(old, new)
        if watcher is not None:
            previous, self._watcher, self._dir_ino = self.watcher, watcher, ino
            await self._stop_watcher(previous, time.monotonic() + _WATCHER_STOP)
            if running:
                self._process({RESCAN})  # what changed between the two watchers
        if new.log.level != old.log.level:
            logging.getLogger("adw_agent").setLevel(new.log.level.upper())
        # A new backend or token deserves a fresh attempt; anything queued goes there.
        self.sender.wake()
        log.info("configuration reloaded", extra={"backend": new.backend.url})

    def _reschedule(self, old: Config, new: Config) -> None:
        """Changed intervals count from now, not from the last tick of the old ones."""
        now = time.monotonic()
        t = self._timers
        if new.intervals.heartbeat != old.intervals.heartbeat:
            t.heartbeat = now + new.intervals.heartbeat
        if new.watch.rescan_interval != old.watch.rescan_interval:
            t.rescan = now + new.watch.rescan_interval
        if new.intervals.resync != old.intervals.resync:
            t.resync = now + new.intervals.resync if new.intervals.resync else float("inf")

    def _retire(self, client: httpx.AsyncClient, old: Config) -> None:
        """Close a replaced client once a request still in flight on it must have ended, so
        a reload does not cut a delivery off half way (it would only be sent again)."""
        grace = old.backend.connect_timeout + old.backend.timeout + 1.0

        async def close_later() -> None:
            await asyncio.sleep(grace)
            await client.aclose()

        self._retired = [(c, task) for c, task in self._retired if not task.done()]
        self._retired.append((client, asyncio.create_task(close_later(), name="close-client")))

    # -- the loop ---------------------------------------------------------------------------

    def _notice(self, path: str, closed: bool = False) -> None:
        """Called on watchdog's thread for every relevant filesystem event; ``closed`` when
        the writer of the file has just closed it."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._note, path, closed)

    def _note(self, path: str, closed: bool = False) -> None:
        key = self.pipeline.layout.classify(path)
        if key is None:
            return
        self._pending.add(key)
        if closed:
            self._closed.add(key)
        else:
            self._closed.discard(key)
        self._last_change = time.monotonic()
        self._changed.set()
        self._noted.set()

    def _next_deadline(self) -> float:
        t = self._timers
        deadlines = [t.heartbeat, t.rescan, t.resync, t.outbox]
        deadlines += [self._retry_at(key) for key in t.retries]
        if self.notifier.watchdog_interval is not None:
            deadlines.append(t.watchdog)
        return min(deadlines)

    async def _wait(self, deadline: float) -> None:
        timeout = max(0.0, deadline - time.monotonic())
        if self._changed.is_set():
            return
        waiters = [
            asyncio.create_task(self._changed.wait()),
            asyncio.create_task(self.should_exit.wait()),
        ]
        _, pending = await asyncio.wait(waiters, timeout=timeout, return_when="FIRST_COMPLETED")
        for task in pending:
            task.cancel()

    async def _debounce(self) -> None:
        """Wait until changes pause for ``watch.debounce_ms`` (at most 20 windows), so that a
        write is read once it is complete. A file whose writer closed it is complete already:
        when every pending file is, there is nothing to wait for (an in-place rewrite of the
        state is then read at once instead of a window later)."""
        window = self.config.watch.debounce_ms / 1000
        if window <= 0:
            return
        give_up = time.monotonic() + window * 20
        while not self._pending <= self._closed and not self.should_exit.is_set():
            quiet_at = self._last_change + window
            now = time.monotonic()
            if now >= quiet_at or now >= give_up:
                return
            self._noted.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._noted.wait(), min(quiet_at, give_up) - now)

    def _take_pending(self) -> set[Change]:
        keys, self._pending = self._pending, set()
        self._closed.clear()
        self._changed.clear()
        return keys

    async def _tick(self) -> None:
        if self._reload:
            await self._apply_reload()
        storage = self._timers.retries.get("storage")
        if storage is not None and storage.due <= time.monotonic():
            # Pending changes are the first write that tries it; else a status, below.
            log.debug("trying the store again")
        if self._pending:
            await self._debounce()
            self._process(self._take_pending())
        else:
            self._changed.clear()
        now = time.monotonic()
        t = self._timers
        due = {key for key in t.retries if self._retry_at(key) <= now}
        if "storage" in due:
            # Only a real write proves the store is back: try to queue a status.
            due.discard("storage")
            self._status("running", direct=False)
        if due:
            self._process({key for key in due if isinstance(key, FileKey)})
        # A watcher that stopped by itself (its directory was deleted) is healed at once,
        # not at the next rescan.
        if now >= t.rescan or not (self._watch_paused or self.watcher.alive()):
            t.rescan = now + self.config.watch.rescan_interval
            await self._reconcile()
        if now >= t.resync:
            t.resync = now + self.config.intervals.resync
            self._sync()
        if now >= t.heartbeat:
            t.heartbeat = now + self.config.intervals.heartbeat
            self._status("running")
        if now >= t.outbox:
            t.outbox = now + _OUTBOX_POLL
            self.sender.wake()
        if self.notifier.watchdog_interval is not None and now >= t.watchdog:
            t.watchdog = now + self.notifier.watchdog_interval
            watching = self._watch_paused or self.watcher.alive()
            if watching and self.sender_task is not None and not self.sender_task.done():
                self.notifier.send("WATCHDOG=1", self._status_line())
            else:
                log.error("watcher or sender is not running; withholding the watchdog ping")

    def _process(self, keys: set[Change]) -> None:
        if self._storage_blocked():
            # It would fail again at once: read these when the store is tried next.
            self._pending |= keys
            return
        before = self.store.total_changes
        try:
            outcome = self.pipeline.process(keys)
        except StorageError as exc:
            log.debug(
                "batch not recorded: the store cannot be written", extra={"keys": sorted(keys)}
            )
            self._storage_failed(exc, keys)
            return
        self._handle(keys, outcome, self.store.total_changes > before)

    def _sync(self) -> None:
        try:
            outcome = self.pipeline.snapshot()
        except StorageError as exc:
            self._sync_pending = True
            self._storage_failed(exc, {RESCAN})
            return
        self._sync_pending = False
        self._handle(self.pipeline.all_keys(), outcome, wrote=True)

    def _handle(self, keys: AbstractSet[Change], outcome: Outcome, wrote: bool) -> None:
        """Schedule parse retries and follow-up reads after a successful batch."""
        if wrote or self._storage_error is None:
            # A batch that wrote nothing proves nothing about a failing store.
            self._storage_ok()
        retries = self._timers.retries
        now = time.monotonic()
        # A rescan (or a new agent directory) stands for the files it read: those that read
        # fine need no retry any more.
        for key in self.pipeline.expand(keys):
            if key not in outcome.retry:
                retries.pop(key, None)
        for key in outcome.retry:
            entry = retries.setdefault(key, _Retry(now))
            entry.attempts += 1
            if entry.attempts > self.config.watch.parse_retries:
                self.pipeline.report_unreadable(key)
                retries.pop(key)
            else:
                entry.due = now + self.config.watch.parse_retry_ms / 1000
        if outcome.more:
            self._pending |= outcome.more
            self._changed.set()
        if outcome.emitted:
            self.sender.wake()

    # -- storage health ---------------------------------------------------------------------

    def _storage_failed(self, exc: StorageError, keys: set[Change], state: str = "running") -> None:
        first = self._storage_error is None
        self._storage_error = str(exc)
        if first:
            log.error(
                "cannot write the store under %s: %s. Changes are kept and read again when "
                "it recovers",
                self.config.storage.dir,
                exc,
            )
            self._send_status_directly(state)
        self._pending |= keys
        # The store is tried again once a second, however many writes fail meanwhile.
        now = time.monotonic()
        retry = self._timers.retries.get("storage")
        if retry is None or retry.due <= now:
            self._timers.retries["storage"] = _Retry(now + STORAGE_RETRY)

    def _storage_blocked(self) -> bool:
        """True while the store failed and is not to be tried again yet."""
        retry = self._timers.retries.get("storage")
        return retry is not None and retry.due > time.monotonic()

    def _retry_at(self, key: FileKey | Literal["storage"]) -> float:
        """When a retry is due. While the store is failing, none is due before the store is
        tried again: each would fail at once (and the main loop would spin on it)."""
        retries = self._timers.retries
        due = retries[key].due
        storage = retries.get("storage")
        return due if storage is None or key == "storage" else max(due, storage.due)

    def _storage_ok(self) -> None:
        self._timers.retries.pop("storage", None)
        if self._storage_error is not None:
            log.warning("the store is writable again")
            self._storage_error = None
            if self._sync_pending:
                self._sync()
            self._status("running")  # tells the backend it is over

    def _send_status_directly(self, state: str) -> None:
        """The backend must hear about a store that cannot be written, and the status cannot
        be queued: send it outside the outbox (best effort, ``seq`` 0), one at a time."""
        if self._direct is not None and not self._direct.done():
            return
        try:
            data = self._status_data(state)
        except Exception as exc:  # the store cannot even be read: say what we know
            log.debug("no outbox statistics for the direct status: %s", exc)
            data = self._status_data(state, {})
        self._direct = asyncio.create_task(
            self.sender.send_direct("agent_status", data), name="direct-status"
        )

    # -- periodic work ----------------------------------------------------------------------

    async def _reconcile(self) -> None:
        """Catch what inotify missed (overflow, a replaced run directory) and heal the watcher."""
        run_dir = self.config.adw.dir
        try:
            ino: int | None = os.stat(run_dir).st_ino
        except OSError:
            ino = None
        if ino is None:
            # The watcher may already have stopped by itself (watchdog ends the emitter when
            # the watched directory is deleted): warn once per disappearance either way.
            if not self._watch_paused:
                log.warning(
                    "the run directory is gone; waiting for it", extra={"path": str(run_dir)}
                )
            await self._stop_watcher(self.watcher, time.monotonic() + _WATCHER_STOP)
            self._watch_paused = True
            self._timers.rescan = time.monotonic() + _MISSING_DIR_POLL
            return
        if ino != self._dir_ino or not self.watcher.alive():
            log.info("watching the run directory again", extra={"path": str(run_dir)})
            await self._stop_watcher(self.watcher, time.monotonic() + _WATCHER_STOP)
            self._start_watcher()
        self._process({RESCAN})

    def _new_watcher(self, config: Config) -> Watcher:
        return Watcher(
            config.adw.dir,
            config.watch.mode,
            config.watch.poll_interval,
            self._notice,
            functools.partial(self._notice, closed=True),
        )

    def _start_watcher(self) -> None:
        try:
            self._dir_ino = os.stat(self.config.adw.dir).st_ino
            self.watcher.start()
            self._watch_paused = False
        except OSError as exc:
            if self.config.watch.mode == "inotify":
                raise ConfigError(self._watch_failure(self.config, exc)) from None
            log.error("cannot watch %s: %s", self.config.adw.dir, exc)
            self._watch_paused = True
            self._timers.rescan = time.monotonic() + _MISSING_DIR_POLL

    @staticmethod
    def _watch_failure(config: Config, exc: OSError) -> str:
        if config.watch.mode == "inotify":
            return f"watch.mode = 'inotify' but inotify failed: {exc}"
        return f"cannot watch {config.adw.dir}: {exc}"

    async def _stop_watcher(self, watcher: Watcher, deadline: float) -> None:
        """Stop ``watcher`` without blocking the event loop, waiting until ``deadline`` at most.

        Stopping joins watchdog's threads, and its emitters are joined without a time limit.
        So it runs on a daemon thread of its own rather than in asyncio's executor, whose
        threads are waited for at exit: one that does not end in time is left behind, and
        it cannot keep the process from exiting.
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

    def _status_data(self, state: str, stats: dict[str, Any] | None = None) -> dict[str, Any]:
        stats = self.store.stats() if stats is None else stats
        return {
            "state": state,
            "version": __version__,
            "adw_id": self.config.adw_id,
            "outbox_depth": stats.get("outbox_depth", 0),
            "oldest_undelivered_age": stats.get("oldest_undelivered_age"),
            "last_delivery_error": self.sender.last_error,
            "storage_error": self._storage_error,
            "dead_letters": stats.get("dead_letters", 0),
        }

    def _status(self, state: str, direct: bool = True) -> bool:
        """Queue an agent_status; True if it was written. When the store cannot be written
        and ``direct``, it goes to the backend directly instead."""
        stats = self.store.stats()
        data = self._status_data(state, stats)
        try:
            with self.store.transaction() as tx:
                tx.emit("agent_status", data, "event")
                # What `adw-agent healthcheck` judges liveness by; "stopping" marks a clean
                # stop. In the same transaction: the two must never disagree.
                tx.set_meta("heartbeat", {"at": time.time(), "pid": os.getpid(), "state": state})
        except StorageError as exc:
            if direct and self._storage_error is not None:
                # Still failing: the heartbeat goes out directly instead.
                log.warning("agent status could not be queued; sending it directly")
                self._send_status_directly(state)
            self._storage_failed(exc, set(), state)
            return False
        finally:
            self.notifier.send(self._status_line(state, stats))
        self.sender.wake()
        if self._storage_error is not None and state != "stopping":
            self._storage_ok()  # a real write: the store is back
        return True

    def _status_line(self, state: str | None = None, stats: dict[str, Any] | None = None) -> str:
        """One ``STATUS=`` line for ``systemctl status``: what the agent does, and its backlog."""
        try:
            stats = stats or self.store.stats()
            backlog = f"outbox depth {stats['outbox_depth']}, dead letters {stats['dead_letters']}"
        except Exception:
            backlog = "outbox depth unknown (store unreadable)"
        if state is None:
            state = "waiting for the run directory" if self._watch_paused else "running"
        line = f"STATUS={state}: {self.config.adw_id}, {backlog}"
        if self._storage_error:
            line += "; storage failing"
        elif self.sender.last_error:
            line += f"; delivery failing: {self.sender.last_error}"
        return line


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def serve(config: Config, early_signals: list[int] | None = None) -> int:
    return await Agent(config, early_signals=early_signals).run()


def run(config: Config, early_signals: list[int] | None = None) -> int:
    """Run the agent to completion in a fresh event loop.

    ``early_signals`` collects stop signals caught before the loop existed; if it is not empty
    when the loop starts, the agent starts up and shuts down at once, cleanly.
    """
    return asyncio.run(serve(config, early_signals))
