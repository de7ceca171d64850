"""The agent's exceptions, and what each one means for the event it concerns.

::

    AgentError
    ├── ConfigError          bad configuration; the CLI exits 78 (EX_CONFIG) with one line
    │   └── DamagedStore     the store under storage.dir is corrupt: 78 too, naming the file
    │                        and ``adw-agent recover-store`` (restarting would not help)
    ├── StorageError         the durable store cannot be written (disk full, read-only, locked);
    │                        nothing is acknowledged, the change is read again later
    ├── ReadError            a run-directory file is unreadable or malformed right now;
    │   │                    retried shortly, then a warning, and the last good state stays
    │   └── TranscriptError  a transcript cannot be read safely (agent.transcript)
    │       └── UnsafeFile   it is a symlink, under one, or not a regular file: refused
    └── DeliveryError        one POST of one event or one batch failed
        ├── RetryableDelivery    connection error, timeout, 401/403, 408, 425, 429, 5xx:
        │   │                    retried with backoff for ever, the events stay queued
        │   └── Redirected       a 3xx (agent.deliver_http): backend.url is wrong; retried
        │                        likewise, and reported until the backend accepts events
        └── PermanentDelivery    any other non-2xx: a batch is split; one event is
                                 dead-lettered with the response and delivery of later
                                 events continues

Loop boundaries (the main loop, the sender) catch ``AgentError``, and any other ``Exception`` as
unexpected, log it with context and carry on. Only startup turns an error into an exit code, and
a sender task that ends by itself all the same (exit 1, see :mod:`agent.app`).
"""

from __future__ import annotations


class AgentError(Exception):
    """Base class of every error the agent expects and handles."""


class ConfigError(AgentError):
    """The configuration is invalid. ``str()`` is the one line shown to the user."""


class DamagedStore(ConfigError):
    """The store's database file is corrupt or not a database at all."""


class StorageError(AgentError):
    """The durable store under ``storage.dir`` cannot be written."""


class ReadError(AgentError):
    """A file of the run directory cannot be read or parsed at the moment."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class DeliveryError(AgentError):
    """A delivery attempt failed; ``status`` is the HTTP status, or None without a response."""

    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class RetryableDelivery(DeliveryError):
    """The backend may accept the event later; ``retry_after`` is its hint in seconds."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        body: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status, body)
        self.retry_after = retry_after


class PermanentDelivery(DeliveryError):
    """The backend rejected this event for good."""
