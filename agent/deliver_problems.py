"""What keeps delivery from progressing, as the sender reports it.

A redirect, refused credentials, a sender that has stopped making progress: each is logged
once when it starts, not on every retry, and a redirect or a stall is kept in the store's meta
``sender`` for ``status`` and ``healthcheck`` until the backend gives a verdict again. Other
retryable failures are logged on the first attempt and every tenth.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time

from agent.deliver_http import Redirected, event_fields
from agent.errors import RetryableDelivery, StorageError
from agent.outbox import Store
from agent.outbox_queue import Queued

log = logging.getLogger("adw_agent.deliver")

# Slack on top of an exchange or wait before the sender counts as stalled: the store writes
# around an exchange, a busy event loop.
_GRACE = 5.0


class Problems:
    """The sender's trouble: its last error, its problem, and whether it is stalled."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._auth_warned = False
        self._redirect_logged: str | None = None
        # By when (monotonic) the current exchange or wait must be over; None while idle.
        self._due: float | None = None
        self.last_error: str | None = None
        #: Why delivery cannot make progress on its own (a redirect, a stalled sender), or
        #: None. Also kept in the store's meta ``sender`` for ``status`` and ``healthcheck``.
        self.problem: str | None = None
        with contextlib.suppress(sqlite3.Error):
            # A problem recorded before a restart stays reported until delivery succeeds.
            saved = store.meta("sender")
            if isinstance(saved, dict) and isinstance(saved.get("problem"), str):
                self.problem = saved["problem"]
        self.stalled = False

    def busy(self, seconds: float) -> None:
        """An exchange or a wait of at most ``seconds`` starts now."""
        self._due = time.monotonic() + seconds + _GRACE

    def idle(self) -> None:
        """Nothing to send: waiting for events is not a stall."""
        self._due = None

    def check_progress(self, now: float | None = None) -> bool:
        """Whether the sender is stalled: busy past the longest an exchange plus the wait
        after it may take. Logged and recorded once when it starts; called by the main loop,
        which then withholds the watchdog ping."""
        now = time.monotonic() if now is None else now
        stalled = self._due is not None and now > self._due
        if stalled and not self.stalled:
            overdue = now - (self._due or now)
            log.error(
                "the sender has made no progress for longer than an exchange and its retry "
                "wait may take (%.0fs overdue)",
                overdue,
            )
            self._set_problem("the sender has stopped making progress")
        elif not stalled and self.stalled:
            self._set_problem(None)
        self.stalled = stalled
        return stalled

    def acknowledged(self) -> None:
        """The backend accepted events."""
        self._auth_warned = False
        self.last_error = None
        self.verdict()

    def failed(
        self, batch: list[Queued], exc: BaseException | None, attempt: int, wait: float
    ) -> str:
        """An attempt failed and is retried in ``wait`` seconds; returns what went wrong."""
        message = str(exc)
        self.last_error = message
        fields = event_fields(batch[0], attempt=attempt, retry_in=round(wait, 3))
        if len(batch) > 1:
            fields["events"] = len(batch)
        if isinstance(exc, Redirected):
            if self._redirect_logged != exc.location:
                self._redirect_logged = exc.location
                log.error(
                    "backend answered %s redirecting to %s; redirects are not followed: "
                    "check backend.url. Events are kept and retried",
                    exc.status,
                    exc.location,
                    extra=fields,
                )
                self._set_problem(f"backend redirects to {exc.location} ({exc.status})")
        elif isinstance(exc, RetryableDelivery) and exc.status in (401, 403):
            if not self._auth_warned:
                self._auth_warned = True
                log.error(
                    "backend refused the credentials (%s); check the token "
                    "(backend.token_file, ADW_AGENT_TOKEN or the adw-token credential). "
                    "Events are kept and retried",
                    exc.status,
                    extra=fields,
                )
        elif attempt == 1 or attempt % 10 == 0:
            log.warning("delivery failed, will retry: %s", message, extra=fields)
        return message

    def verdict(self) -> None:
        """The backend gave a verdict: whatever kept delivery from progressing is over."""
        self._redirect_logged = None
        if self.problem is not None and not self.stalled:
            self._set_problem(None)

    def _set_problem(self, problem: str | None) -> None:
        self.problem = problem
        try:
            self._store.set_meta("sender", {"problem": problem, "since": time.time()})
        except StorageError as exc:
            log.error("cannot record the sender's state: %s", exc)
