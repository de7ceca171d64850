"""The agent's lifecycle: startup → main loop → shutdown, in the manner of uvicorn's server.

Startup opens the store, starts watching *before* taking the first snapshot (so no change can
slip between the two), queues the snapshot and starts the sender. The main loop waits for
changes, debounces them, hands them to the pipeline, and runs the periodic work: heartbeat,
reconciliation rescan, optional resync, parse retries, systemd watchdog pings. Signal handlers
only set flags. Shutdown is ordered and bounded: stop watching, read what is pending, queue a
last status, drain the outbox, close; everything up to the end of the drain happens within
``delivery.drain_timeout`` of the stop request being seen, except that the last batch of pending
changes is never cut short (see :meth:`Agent.shutdown`).

The supervisor (:class:`Agent`) owns what the process shares: the store and its health, the HTTP
client and the sender, signals, reload and the systemd notifications. What belongs to the run
directory (its watcher, batches, pipeline and retries) is a :class:`~agent.run.RunUnit`.

The agent holds an exclusive lock on ``storage.dir`` for its lifetime (see
:func:`agent.outbox.lock_storage`). Exit codes: 0 after a clean stop, 78 for a configuration
error (a second agent on the same ``storage.dir`` is one), 1 when startup fails otherwise or the
sender task ends by itself: that is a bug, and exiting lets the service manager restart the agent
instead of leaving it up without delivering.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from dataclasses import dataclass
from typing import TypeVar

import httpx

from agent import __version__, claims
from agent import config as config_module
from agent.config import Config
from agent.deliver import Sender
from agent.deliver_http import build_client
from agent.errors import AgentError, ConfigError, StorageError
from agent.health import StoreHealth
from agent.notify import Notifier
from agent.outbox import Store, lock_storage
from agent.runs import Runs
from agent.status import AgentState, Heartbeat

log = logging.getLogger("adw_agent.app")

# How often an idle sender looks for rows it was not told about: dead letters requeued by
# ``adw-agent dead-letters`` from another process. One indexed SELECT, so idle cost stays nil.
_OUTBOX_POLL = 1.0


@dataclass
class _Timers:
    heartbeat: float = 0.0
    resync: float = 0.0
    watchdog: float = 0.0
    outbox: float = 0.0


_T = TypeVar("_T")


def _started(part: _T | None) -> _T:
    if part is None:
        raise RuntimeError("the agent has not started")
    return part


class Agent:
    """The process: lifecycle, signals, reload, the shared store and sender, and its run."""

    def __init__(
        self,
        config: Config,
        notifier: Notifier | None = None,
        *,
        early_signals: list[int] | None = None,
    ) -> None:
        self.config = config
        self._early_signals = early_signals if early_signals is not None else []
        self.notifier = notifier or Notifier()
        self.should_exit = asyncio.Event()
        self._reload = False
        self._timers = _Timers()
        self.health = StoreHealth()
        self.heartbeat = Heartbeat(self)
        # Clients replaced by a reload, closed once a request in flight on them has ended.
        self._retired: list[tuple[httpx.AsyncClient, asyncio.Task[None]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit_code = 0
        # Made by startup, in this order; whatever exists is closed by _close.
        self._lock: int | None = None
        self._claim: claims.Claim | None = None
        self._store: Store | None = None
        self._runs: Runs | None = None
        self.client: httpx.AsyncClient | None = None
        self._sender: Sender | None = None
        self.sender_task: asyncio.Task[None] | None = None

    @property
    def store(self) -> Store:
        """The agent's store (from startup on)."""
        return _started(self._store)

    @property
    def runs(self) -> Runs:
        """The runs the agent reports on (from startup on)."""
        return _started(self._runs)

    @property
    def runs_started(self) -> bool:
        return self._runs is not None

    @property
    def sender(self) -> Sender:
        """The agent's sender (from startup on)."""
        return _started(self._sender)

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT. Returns the process exit code."""
        self._loop = asyncio.get_running_loop()
        self._install_signal_handlers()
        # Signals caught before the loop existed (see agent.boot): a stop starts and stops
        # cleanly; a reload re-reads the config, which may have changed since it was loaded.
        if any(sig != signal.SIGHUP for sig in self._early_signals):
            self._stop()
        elif self._early_signals:
            self._request_reload()
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
        # Before the store is opened: a second agent must not touch it at all, and no two
        # agents may report one run directory.
        self._lock = lock_storage(cfg.storage.dir)
        lock_root = claims.lock_dir(cfg.storage.lock_dir)
        if lock_root is None:
            log.warning(
                "no writable lock directory: a second agent on the same run directory will not "
                "be refused, nor a replaced store detected; set storage.lock_dir"
            )
        else:
            key = "adw.root" if cfg.host_mode else "adw.dir"
            self._claim = claims.claim(lock_root, cfg.watched, key=key)
        home = None if cfg.host_mode else cfg.adw_id
        self._store = Store(cfg.storage.dir, home, cfg.storage.synchronous)
        self._runs = Runs(
            cfg,
            self._store,
            health=self.health,
            events=self,
            claims=lock_root,
            claim=None if cfg.host_mode else self._claim,
        )
        self.client = build_client(cfg)
        self._sender = Sender(cfg, self._store, self.client)
        self.runs.start_watching(asyncio.get_running_loop())
        self.heartbeat.queue("starting")
        # A full disk must not stop the agent from starting: the snapshot waits for the store.
        self.runs.sync()
        self.sender_task = asyncio.create_task(self.sender.run(), name="sender")
        self.sender_task.add_done_callback(self._sender_ended)
        self.sender.wake()
        now = time.monotonic()
        self._timers.heartbeat = now + cfg.intervals.heartbeat
        self._timers.resync = now + cfg.intervals.resync if cfg.intervals.resync else float("inf")
        self._timers.watchdog = now
        self._timers.outbox = now + _OUTBOX_POLL
        self.notifier.send("READY=1", self.heartbeat.line())
        log.info(
            "agent started",
            extra={
                "version": __version__,
                "watching": str(cfg.watched),
                "watch": self.runs.watch.watcher.active,
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
            # A backlog keeps the runs' event set, so _wait returns without yielding: let the
            # signal handlers and the sender run between its bounded steps.
            await asyncio.sleep(0)

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
        if self._runs is not None:
            await self._runs.watch.stop(deadline)
            try:
                self._runs.flush()
                self.heartbeat.queue("stopping")
            except AgentError as exc:
                log.error("could not record the last changes: %s", exc)
        task = self.sender_task
        if task is not None:
            self.sender.wake()
            while not task.done() and time.monotonic() < deadline and not self._drained():
                await asyncio.sleep(0.02)
            # The last status could only be sent directly (the store is not writable).
            await self.heartbeat.wait_direct(deadline)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            try:
                left = self.store.queue.depth()
            except StorageError as exc:
                log.error("cannot tell what is left undelivered: %s", exc)
                left = 0
            if left:
                log.warning("stopped with %d events undelivered; they are sent on next start", left)
        await self._close()

    async def _close(self) -> None:
        """Release whatever startup made, also after a startup that failed half way."""
        await self.heartbeat.close()
        if self.client is not None:
            await self.client.aclose()
        for old, closer in self._retired:
            closer.cancel()
            await old.aclose()
        self._retired.clear()
        if self._runs is not None:
            self._runs.close()
        if self._store is not None:
            self._store.close()
        if self._lock is not None:
            os.close(self._lock)  # releases storage.dir for the next agent
            self._lock = None
        if self._claim is not None:
            self._claim.release()
            self._claim = None
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

    def _request_reload(self) -> None:
        self._reload = True
        if self._runs is not None:
            self._runs.wake()

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
            self.notifier.send("READY=1", self.heartbeat.line())

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
        try:
            replacement = self.runs.watch.prepare(old, new)
        except ConfigError:
            await client.aclose()
            raise
        # Commit: nothing below can fail.
        self._retire(self.sender.replace_client(new, client), old)
        self.client = client
        self.config = new
        self.runs.reconfigure(new)
        self._reschedule(old, new)
        if replacement is not None:
            await self.runs.watch.swap(replacement)
            if replacement.running:
                self.runs.rescan()  # what changed between the two watchers
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

    def _next_deadline(self) -> float:
        t = self._timers
        deadlines = [t.heartbeat, t.resync, t.outbox, self.runs.next_deadline()]
        if self.health.retry_due is not None:
            deadlines.append(self.health.retry_due)
        if self.notifier.watchdog_interval is not None:
            deadlines.append(t.watchdog)
        return min(deadlines)

    async def _wait(self, deadline: float) -> None:
        timeout = max(0.0, deadline - time.monotonic())
        changed = self.runs.changed
        if changed.is_set():
            return
        waiters = [
            asyncio.create_task(changed.wait()),
            asyncio.create_task(self.should_exit.wait()),
        ]
        _, pending = await asyncio.wait(waiters, timeout=timeout, return_when="FIRST_COMPLETED")
        for task in pending:
            task.cancel()

    async def _tick(self) -> None:
        if self._reload:
            await self._apply_reload()
        runs = self.runs
        now = time.monotonic()
        if self.health.due(now):
            # Pending changes are the first write that tries it; else a status, below.
            log.debug("trying the store again")
        runs.step(now)
        now = time.monotonic()
        t = self._timers
        if self.health.due(now):
            # Only a real write proves the store is back: try to queue a status.
            self.heartbeat.queue("running", direct=False)
            runs.step(now)
        if runs.rescan_due(now):
            await runs.reconcile(now)
        if now >= t.resync:
            t.resync = now + self.config.intervals.resync
            runs.sync()
        if now >= t.heartbeat:
            t.heartbeat = now + self.config.intervals.heartbeat
            self.heartbeat.queue("running")
        if now >= t.outbox:
            t.outbox = now + _OUTBOX_POLL
            self.sender.wake()
            self.sender.check_progress()
        if self.notifier.watchdog_interval is not None and now >= t.watchdog:
            t.watchdog = now + self.notifier.watchdog_interval
            watching = runs.watch.healthy()
            sending = self.sender_task is not None and not self.sender_task.done()
            if watching and sending and not self.sender.check_progress():
                self.notifier.send("WATCHDOG=1", self.heartbeat.line())
            else:
                log.error("watcher or sender is not running; withholding the watchdog ping")

    # -- what the run tells the process (agent.run.RunEvents) -------------------------------

    def store_failed(self, exc: StorageError, state: AgentState = "running") -> None:
        if self.health.failed(exc):
            log.error(
                "cannot write the store under %s: %s. Changes are kept and read again when "
                "it recovers",
                self.config.storage.dir,
                exc,
            )
            self.heartbeat.send_directly(state)

    def store_ok(self) -> None:
        if self.health.recovered():
            log.warning("the store is writable again")
            self.runs.sync_pending()
            self.heartbeat.queue("running")  # tells the backend it is over

    def queued(self) -> None:
        self.sender.wake()


async def serve(config: Config, early_signals: list[int] | None = None) -> int:
    return await Agent(config, early_signals=early_signals).run()


def run(config: Config, early_signals: list[int] | None = None) -> int:
    """Run the agent to completion in a fresh event loop.

    ``early_signals`` collects stop signals caught before the loop existed; if it is not empty
    when the loop starts, the agent starts up and shuts down at once, cleanly.
    """
    return asyncio.run(serve(config, early_signals))
