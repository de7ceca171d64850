"""Logging: one JSON object per line on stderr, with the token scrubbed from every line.

The tokens to scrub are kept for the whole process: every token the agent was configured with,
at start or by a reload, because a request sent with an old one may still be answered.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_OWN = frozenset({"ts", "level", "logger", "message"})
_secrets: list[str] = []
# Each secret in any form a backend may echo it in: as is, JSON-escaped (``\/``, ``\u0041``,
# with the backslashes doubled once more when the echo itself is logged as JSON) or
# percent-encoded, in any mix of these, character by character.
_patterns: list[re.Pattern[str]] = []
_ESCAPED = re.compile(r"\\+u([0-9a-fA-F]{4})|\\+(/)|%([0-9a-fA-F]{2})")
# An escape cut off by the end of an excerpt: ``%4``, ``\u00``, a lone backslash.
_CUT_ESCAPE = re.compile(r"(?:\\+u[0-9a-fA-F]{0,3}|\\+|%[0-9a-fA-F]?)\Z")
#: A prefix of a secret this long or longer at the very end of an excerpt is redacted too.
MIN_PREFIX = 8
REDACTED = "<redacted>"


def _hex(code: int, digits: int) -> str:
    return "".join(f"[{h}{h.upper()}]" if h.isalpha() else h for h in f"{code:0{digits}x}")


def _any_form(char: str) -> str:
    forms = [re.escape(char), r"\\+u" + _hex(ord(char), 4)]
    if ord(char) < 0x80:
        forms.append("%" + _hex(ord(char), 2))
    if char == "/":
        forms.append(r"\\+/")
    return "(?:" + "|".join(forms) + ")"


def add_secret(secret: str) -> None:
    """Redact ``secret`` from every later log line and :func:`redact` result."""
    if secret and secret not in _secrets:
        # Longest first: a secret that contains another is redacted whole.
        _secrets.append(secret)
        _secrets.sort(key=len, reverse=True)
        _patterns[:] = [re.compile("".join(_any_form(c) for c in s)) for s in _secrets]


def redact(text: str) -> str:
    """``text`` with every known secret, in any encoded form, replaced by ``<redacted>``."""
    for secret, pattern in zip(_secrets, _patterns, strict=True):
        text = text.replace(secret, REDACTED)
        if "\\" in text or "%" in text:
            text = pattern.sub(REDACTED, text)
    return text


def _decode(text: str) -> str:
    return _ESCAPED.sub(lambda m: chr(int(m[1] or m[3], 16)) if m[1] or m[3] else "/", text)


def redact_excerpt(text: str) -> str:
    """:func:`redact`, and a secret cut off by the end of the excerpt: a prefix of it of at
    least :data:`MIN_PREFIX` characters (in any encoded form) that ends the text."""
    text = redact(text)
    for secret in _secrets:
        if len(secret) < MIN_PREFIX:
            continue
        # An encoded character takes at most a few escape characters (more with doubled
        # backslashes): look no further back than that.
        start = max(0, len(text) - 12 * len(secret))
        for i in range(start, len(text) - MIN_PREFIX + 1):
            if text[i] not in (secret[0], "\\", "%"):
                continue
            tail = _decode(_CUT_ESCAPE.sub("", text[i:]))
            if len(tail) >= MIN_PREFIX and secret.startswith(tail):
                text = text[:i] + REDACTED
                break
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
