"""Logging: one JSON object per line on stderr, with the token scrubbed from every line.

The tokens to scrub are kept for the whole process: every token the agent was configured with,
at start or by a reload, because a request sent with an old one may still be answered.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_OWN = frozenset({"ts", "level", "logger", "message"})
_secrets: list[str] = []


def add_secret(secret: str) -> None:
    """Redact ``secret`` from every later log line and :func:`redact` result."""
    if secret and secret not in _secrets:
        _secrets.append(secret)


def redact(text: str) -> str:
    """``text`` with every known secret replaced by ``<redacted>``."""
    for secret in _secrets:
        text = text.replace(secret, "<redacted>")
    return text


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extra fields}``, secrets redacted."""

    def __init__(self, adw_id: str | None = None) -> None:
        super().__init__()
        self.adw_id = adw_id

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line, whatever the record holds: a message whose arguments do not fit it,
        values that do not serialise or whose ``str()`` raises, file names that are not UTF-8
        (escaped as ``\\xNN``). A log line must never be lost, nor become a traceback."""
        try:
            return self._format(record)
        except Exception:
            return self._fallback(record)

    def _format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.adw_id:
            entry["adw_id"] = self.adw_id
        for key, value in record.__dict__.items():
            # An extra field never hides what every line must tell.
            if key not in _STANDARD and not key.startswith("_") and key not in _OWN:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        try:
            raw = orjson.dumps(entry, default=_text, option=orjson.OPT_NON_STR_KEYS)
        except (TypeError, orjson.JSONEncodeError):
            raw = orjson.dumps(_plain(entry))
        return redact(raw.decode())

    def _fallback(self, record: logging.LogRecord) -> str:
        """The record as far as it can be told: its level, logger and unformatted message."""
        entry = {
            "ts": _text(getattr(record, "created", "")),
            "level": _text(getattr(record, "levelname", "")).lower(),
            "logger": _text(getattr(record, "name", "")),
            "message": _text(getattr(record, "msg", "")),
            "args": _text(getattr(record, "args", "")),
            "log_error": "this record could not be formatted in full",
        }
        if self.adw_id:
            entry["adw_id"] = _text(self.adw_id)
        return redact(orjson.dumps(entry).decode())


_MAX_DEPTH = 16


def _text(value: object) -> str:
    """``str(value)`` as valid UTF-8, never raising: undecodable bytes of a file name (which
    Python keeps as lone surrogates) become ``\\xNN``."""
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:
        try:
            text = object.__repr__(value)
        except Exception:
            return "<unprintable>"
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _plain(value: object, depth: int = 0) -> object:
    """``value`` as JSON data orjson can always serialise."""
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else _text(value)
    if depth >= _MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, dict):
        return {_text(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, depth + 1) for v in value]
    return _text(value)


def setup(level: str, adw_id: str | None = None, secret: str | None = None) -> None:
    """Route every ``adw_agent.*`` logger to stderr as JSON lines."""
    if secret:
        add_secret(secret)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(adw_id))
    root = logging.getLogger("adw_agent")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
