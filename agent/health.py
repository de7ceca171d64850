"""Whether the store can be written, and when to try it again after it could not.

A full disk or a store locked by another process fails every write until it is over. Rather
than fail each batch at once (and spin on it), the agent tries the store again once a second
(``STORAGE_RETRY``), keeps the changes it could not record, and reports the failure to the
backend directly. Only a real write proves the store is back.
"""

from __future__ import annotations

import time

from agent.outbox import STORAGE_RETRY


class StoreHealth:
    """The store's failure, if any, and when it is due to be tried again."""

    def __init__(self) -> None:
        #: The last storage error, or None while the store can be written.
        self.error: str | None = None
        #: When the failing store is to be tried again (monotonic), or None.
        self.retry_due: float | None = None

    def failed(self, exc: Exception) -> bool:
        """Record a failed write; True if the store was fine until now."""
        first = self.error is None
        self.error = str(exc)
        # Tried again once a second, however many writes fail meanwhile.
        now = time.monotonic()
        if self.retry_due is None or self.retry_due <= now:
            self.retry_due = now + STORAGE_RETRY
        return first

    def blocked(self) -> bool:
        """True while the store failed and is not to be tried again yet."""
        return self.retry_due is not None and self.retry_due > time.monotonic()

    def due(self, now: float) -> bool:
        """Whether a failing store is to be tried again now."""
        return self.retry_due is not None and self.retry_due <= now

    def not_before(self, due: float) -> float:
        """When a retry due at ``due`` may run: not before the store is tried again, as it
        would fail at once."""
        return due if self.retry_due is None else max(due, self.retry_due)

    def recovered(self) -> bool:
        """A write succeeded; True if the store had been failing until now."""
        self.retry_due = None
        was_failing, self.error = self.error is not None, None
        return was_failing
