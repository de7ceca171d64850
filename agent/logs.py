"""Logging: one JSON object per line on stderr, with the token scrubbed from every line."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, ClassVar

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extra fields}``."""

    secrets: ClassVar[list[str]] = []

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
        line = orjson.dumps(entry, default=str).decode()
        for secret in self.secrets:
            line = line.replace(secret, "<redacted>")
        return line


def setup(level: str, adw_id: str | None = None, secret: str | None = None) -> None:
    """Route every ``adw_agent.*`` logger to stderr as JSON lines."""
    JsonFormatter.secrets = [secret] if secret else []
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(adw_id))
    root = logging.getLogger("adw_agent")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
