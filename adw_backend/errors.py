"""The backend's own exceptions: each one maps to one HTTP answer at one place (the router).

Nothing below the router raises HTTP errors, and nothing above the store sees a database
driver's exception: :meth:`adw_backend.store_schema.Database.begin` translates those into
:class:`DatabaseUnavailable`.
"""

from __future__ import annotations


class BackendError(Exception):
    """Base class; ``status`` is the HTTP status the router answers with."""

    status = 500


class BadInput(BackendError):
    """The request cannot be accepted as sent; sending it again will not help."""

    status = 400


class TooLarge(BadInput):
    """The body is over the configured size limit."""

    status = 413


class InvalidEvent(BadInput):
    """A well-formed body whose envelope or data does not fit the contract."""

    status = 422


class Unauthorized(BackendError):
    """No token, or one that is not configured (or a read token on a write route)."""

    status = 401


class NotFound(BackendError):
    status = 404


class DatabaseUnavailable(BackendError):
    """The database did not answer; the agent retries a 503, so nothing is lost."""

    status = 503


class CommitUnknown(DatabaseUnavailable):
    """The connection failed while the transaction was committing: it may have committed.

    Sending again is still right (a committed event comes back as a duplicate), but what this
    process would have published after the commit was not published.
    """


class SettingsError(BackendError):
    """A setting that cannot be used: ``serve`` exits 78 with this one line."""
