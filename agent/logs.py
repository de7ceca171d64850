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
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(orjson.dumps(entry, default=str).decode())


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
