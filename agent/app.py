"""The agent's lifecycle: startup → main loop → shutdown, in the manner of uvicorn's server.

Startup opens the store, starts watching *before* taking the first snapshot (so no change can
slip between the two), queues the snapshot and starts the sender. The main loop waits for
changes, debounces them, hands them to the pipeline, and runs the periodic work: heartbeat,
reconciliation rescan, optional resync, parse retries, systemd watchdog pings. Signal handlers
only set flags. Shutdown is ordered and bounded: stop watching, read what is pending, queue a
last status, drain the outbox, close; everything up to the end of the drain happens within
``delivery.drain_timeout`` of the stop request being seen, except that the last batch of pending
changes is never cut short (see :meth:`Agent.shutdown`).

The supervisor (:class:`Agent`) decides when things happen: startup, the main loop, shutdown,
signals and the systemd notifications. What the process shares (the lock, the store, the runs,
the HTTP clients and the sender) is made and released by :class:`~agent.app_parts.Parts`; a
reload is carried out by :class:`~agent.app_reload.Reload`; the status and heartbeat are
:mod:`agent.status`. What belongs to the run directory (its watcher, batches, pipeline and
retries) is a :class:`~agent.run.RunUnit`.

The agent holds an exclusive lock on ``storage.dir`` for its lifetime (see
:func:`agent.outbox.lock_storage`). Exit codes: 0 after a clean stop, 78 for a configuration
error (a second agent on the same ``storage.dir`` is one), 1 when startup fails otherwise or the
sender task ends by itself: that is a bug, and exiting lets the service manager restart the agent
instead of leaving it up without delivering.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from agent import __version__
from agent.app_parts import Parts
from agent.app_reload import Reload
from agent.config import Config
from agent.errors import AgentError, ConfigError, StorageError
from agent.health import StoreHealth
from agent.notify import Notifier
from agent.status import AgentState, Heartbeat

log = logging.getLogger("adw_agent.app")

# How often an idle sender looks for rows it was not told about: dead letters requeued by
# ``adw-agent dead-letters`` from another process. One indexed SELECT, so idle cost stays nil.
_OUTBOX_POLL = 1.0


class _Periodic:
    """The main loop's periodic work, and when each part is next due (monotonic seconds):
    the resync, the heartbeat, the look at the outbox and the watchdog ping."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self.heartbeat = 0.0
        self.resync = 0.0
        self.watchdog = 0.0
        self.outbox = 0.0

    def start(self, config: Config, now: float) -> None:
        self.heartbeat = now + config.intervals.heartbeat
        self.resync = now + config.intervals.resync if config.intervals.resync else float("inf")
        self.watchdog = now
        self.outbox = now + _OUTBOX_POLL

    def reschedule(self, old: Config, new: Config) -> None:
        """Changed intervals count from now, not from the last tick of the old ones."""
        now = time.monotonic()
        if new.intervals.heartbeat != old.intervals.heartbeat:
            self.heartbeat = now + new.intervals.heartbeat
        if new.intervals.resync != old.intervals.resync:
            self.resync = now + new.intervals.resync if new.intervals.resync else float("inf")

    def next_due(self) -> float:
        deadlines = [self.heartbeat, self.resync, self.outbox]
        if self._agent.notifier.watchdog_interval is not None:
            deadlines.append(self.watchdog)
        return min(deadlines)

    def run_due(self, now: float) -> None:
        agent = self._agent
        config, runs, sender, notifier = (
            agent.config,
            agent.parts.runs,
            agent.parts.sender,
            agent.notifier,
        )
        if now >= self.resync:
            self.resync = now + config.intervals.resync
            runs.sync()
        if now >= self.heartbeat:
            self.heartbeat = now + config.intervals.heartbeat
            agent.heartbeat.queue("running")
        if now >= self.outbox:
            self.outbox = now + _OUTBOX_POLL
            sender.wake()
            sender.check_progress()
        if notifier.watchdog_interval is not None and now >= self.watchdog:
            self.watchdog = now + notifier.watchdog_interval
            watching = runs.watch.healthy()
            task = agent.sender_task
            sending = task is not None and not task.done()
            if watching and sending and not sender.check_progress():
                notifier.send("WATCHDOG=1", agent.heartbeat.line())
            else:
                log.error("watcher or sender is not running; withholding the watchdog ping")


class Agent:
    """The supervisor: startup, the main loop and shutdown, signals, and what the runs tell it."""

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
        self._periodic = _Periodic(self)
        self.health = StoreHealth()
        self.heartbeat = Heartbeat(self)
        self._exit_code = 0
        # Made by startup; whatever exists is closed by _close.
        self.parts = Parts()
        self._reloader = Reload(self.parts)
        self.sender_task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT. Returns the process exit code."""
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
        self.parts.open(cfg, self.health, self)
        self.parts.runs.start_watching(asyncio.get_running_loop())
        self.heartbeat.queue("starting")
        # A full disk must not stop the agent from starting: the snapshot waits for the store.
        self.parts.runs.sync()
        self.sender_task = asyncio.create_task(self.parts.sender.run(), name="sender")
        self.sender_task.add_done_callback(self._sender_ended)
        self.parts.sender.wake()
        self._periodic.start(cfg, time.monotonic())
        self.notifier.send("READY=1", self.heartbeat.line())
        log.info(
            "agent started",
            extra={
                "version": __version__,
                "watching": str(cfg.watched),
                "watch": self.parts.runs.watch.watcher.active,
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
        if self.parts.runs_started:
            await self.parts.runs.watch.stop(deadline)
            try:
                self.parts.runs.flush()
                self.heartbeat.queue("stopping")
            except AgentError as exc:
                log.error("could not record the last changes: %s", exc)
        task = self.sender_task
        if task is not None:
            self.parts.sender.wake()
            while not task.done() and time.monotonic() < deadline and not self._drained():
                await asyncio.sleep(0.02)
            # The last status could only be sent directly (the store is not writable).
            await self.heartbeat.wait_direct(deadline)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            try:
                left = self.parts.store.queue.depth()
            except StorageError as exc:
                log.error("cannot tell what is left undelivered: %s", exc)
                left = 0
            if left:
                log.warning("stopped with %d events undelivered; they are sent on next start", left)
        await self._close()

    async def _close(self) -> None:
        """Release whatever startup made, also after a startup that failed half way."""
        await self.heartbeat.close()
        await self.parts.close()
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
            return self.parts.sender.idle()
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
        if self.parts.runs_started:
            self.parts.runs.wake()

    async def _apply_reload(self) -> None:
        """Re-read the config file (SIGHUP), see :class:`~agent.app_reload.Reload`."""
        self._reload = False
        if self.config.source is None:
            return
        self.notifier.reloading()
        try:
            await self._reloader.apply(self.config, self._commit)
        finally:
            # Whatever happened, systemd must not be left thinking the agent is reloading.
            self.notifier.send("READY=1", self.heartbeat.line())

    def _commit(self, new: Config) -> None:
        """A reload put ``new`` in force."""
        self._periodic.reschedule(self.config, new)
        self.config = new

    # -- the loop ---------------------------------------------------------------------------

    def _next_deadline(self) -> float:
        deadlines = [self._periodic.next_due(), self.parts.runs.next_deadline()]
        if self.health.retry_due is not None:
            deadlines.append(self.health.retry_due)
        return min(deadlines)

    async def _wait(self, deadline: float) -> None:
        timeout = max(0.0, deadline - time.monotonic())
        changed = self.parts.runs.changed
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
        runs = self.parts.runs
        now = time.monotonic()
        if self.health.due(now):
            # Pending changes are the first write that tries it; else a status, below.
            log.debug("trying the store again")
        runs.step(now)
        now = time.monotonic()
        if self.health.due(now):
            # Only a real write proves the store is back: try to queue a status.
            self.heartbeat.queue("running", direct=False)
            runs.step(now)
        if runs.rescan_due(now):
            await runs.reconcile(now)
        self._periodic.run_due(now)

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
            self.parts.runs.sync_pending()
            self.heartbeat.queue("running")  # tells the backend it is over

    def queued(self) -> None:
        self.parts.sender.wake()


async def serve(config: Config, early_signals: list[int] | None = None) -> int:
    return await Agent(config, early_signals=early_signals).run()


def run(config: Config, early_signals: list[int] | None = None) -> int:
    """Run the agent to completion in a fresh event loop.

    ``early_signals`` collects stop signals caught before the loop existed; if it is not empty
    when the loop starts, the agent starts up and shuts down at once, cleanly.
    """
    return asyncio.run(serve(config, early_signals))
