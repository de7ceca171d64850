"""Reading hostile transcript lines: every value checked, bounded, or refused.

Nothing here raises on input: a malformed count, cost or version reads as ``None`` (or -1 for
a count), and the ledger counts the line as bad through :class:`BadLines`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import orjson

from agent.account.figures import MAX_COUNT, MAX_NAME, MAX_RESULT_USD, OTHER

#: Content blocks of one line that are measured; the rest are ignored.
_MAX_BLOCKS = 4096

#: One message's usage: input, output, 5m cache writes, 1h cache writes, cache reads,
#: web search requests.
Usage = tuple[int, int, int, int, int, int]


def relevant(line: bytes) -> bool:
    """Whether a raw line that is not a JSON object could have affected accounting.

    Every line is parsed (orjson is faster than any prefilter: see BENCHMARKS.md); this only
    decides whether a line that does not parse counts as a bad line, worth a warning, or is
    noise such as a truncated log message. Usage and costs live under the keys ``usage`` and
    ``total_cost_usd``, result lines contain ``"result"`` and the lines that start an attempt
    ``"init"``. JSON can spell any of these with
    ``\\u`` escapes, and as they are ASCII every such escape starts ``\\u00``: a line with one
    counts too, so no line that could have mattered is dropped silently.
    """
    return (
        b'"usage"' in line
        or b"total_cost_usd" in line
        or b'"result"' in line
        or b'"init"' in line
        or b"\\u00" in line
    )


class BadLines:
    """The count of unusable accounting lines, warned about once per kind of problem."""

    __slots__ = ("count", "warn", "warned")

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.warn = warn
        self.count = 0
        # Kinds of bad line already warned about; the rest are only counted.
        self.warned: set[str] = set()

    def add(self, kind: str, message: Callable[[], str]) -> None:
        """Count one bad line; warn (building the message only then) if its kind is new."""
        self.count += 1
        if kind not in self.warned:
            self.warned.add(kind)
            self.warn(f"{message()} (later lines like it are only counted)")


class Message(NamedTuple):
    """What an assistant line says about its message, every field checked."""

    #: None when the line names no sane id: it then counts as a message of its own.
    msg_id: str | None
    model: str
    usage: Usage
    chars: int


def read_assistant(line: Mapping[str, Any], bad: BadLines) -> Message | None:
    """The message of an assistant line; None (counted in ``bad`` if malformed) if it has none."""
    message = line.get("message")
    if not isinstance(message, Mapping):
        return None
    raw_usage = message.get("usage")
    if not isinstance(raw_usage, Mapping):
        return None
    usage = parse_usage(raw_usage)
    if usage is None:
        bad.add("usage", lambda: f"assistant line with malformed usage: {brief(raw_usage)}")
        return None
    model = message.get("model")
    if not isinstance(model, str):
        model = ""
    elif len(model) > MAX_NAME:
        # Not a model id anyone uses: priced as unknown, and never kept at this length.
        model = OTHER
    chars = content_chars(message.get("content"))
    msg_id = message.get("id")
    if not isinstance(msg_id, str) or len(msg_id) > MAX_NAME:
        # Nothing (sane) to deduplicate on. The window keeps ids, so an unbounded one must
        # never get there.
        msg_id = None
    return Message(msg_id, model, usage, chars)


def _count(value: object) -> int:
    """A token count: an int (not a bool) in 0..MAX_COUNT, or 0 when absent; -1 when malformed."""
    if value is None:
        return 0
    if type(value) is int and 0 <= value <= MAX_COUNT:
        return value
    return -1


def parse_usage(usage: Mapping[str, Any]) -> Usage | None:
    """Read one usage object; None if any count is malformed."""
    inp = _count(usage.get("input_tokens"))
    out = _count(usage.get("output_tokens"))
    created = _count(usage.get("cache_creation_input_tokens"))
    read = _count(usage.get("cache_read_input_tokens"))
    m5 = h1 = 0
    split = usage.get("cache_creation")
    if isinstance(split, Mapping):
        m5 = _count(split.get("ephemeral_5m_input_tokens"))
        h1 = _count(split.get("ephemeral_1h_input_tokens"))
    web = 0
    server = usage.get("server_tool_use")
    if isinstance(server, Mapping):
        web = _count(server.get("web_search_requests"))
    if min(inp, out, created, read, m5, h1, web) < 0:
        return None
    # Without a split every write is priced at the 5-minute rate; if the total
    # and the split disagree, whatever the split does not explain is too.
    total = max(created, m5 + h1)
    return inp, out, total - h1, h1, read, web


def content_chars(content: object) -> int:
    """Characters of output in one line's content: text, thinking and tool inputs (as JSON)."""
    if not isinstance(content, list):
        return 0
    chars = 0
    for block in content[:_MAX_BLOCKS]:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "tool_use":
            # A tool input nested too deep for orjson is no real one: it counts nothing.
            with contextlib.suppress(orjson.JSONEncodeError):
                chars += len(orjson.dumps(block.get("input")))
            continue
        value = block.get("text") if kind == "text" else block.get("thinking")
        if kind in ("text", "thinking") and isinstance(value, str):
            chars += len(value)
    return chars


def brief(value: object) -> str:
    """At most 300 characters describing ``value``, whatever its depth or size."""
    try:
        return orjson.dumps(value)[:300].decode("utf-8", "replace")
    except (orjson.JSONEncodeError, TypeError):
        return f"<{type(value).__name__}>"


def usage_total(usage: Usage) -> int:
    """The tokens of one usage, every kind together (web searches are not tokens)."""
    return usage[0] + usage[1] + usage[2] + usage[3] + usage[4]


def token_parts(usage: Usage) -> tuple[int, int, int, int]:
    """One usage as :class:`~agent.account.figures.Tokens` fields (cache writes together)."""
    return usage[0], usage[1], usage[2] + usage[3], usage[4]


def valid_cost(value: object) -> float | None:
    """A trustworthy USD figure: an int or float (not a bool) in 0 <= x < MAX_RESULT_USD."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        cost = float(value)
    except OverflowError:  # an int too large for a float
        return None
    if not math.isfinite(cost) or not 0 <= cost < MAX_RESULT_USD:
        return None
    return cost


def version(value: object) -> tuple[int, ...] | None:
    """``"2.1.277"`` as ``(2, 1, 277)``; None when absent or not a dotted version."""
    if not isinstance(value, str) or len(value) > 32:
        return None
    parts = value.split(".")
    if not all(p.isascii() and p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)
