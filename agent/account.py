"""Exact running cost of Claude Code stream-json transcripts.

A transcript holds one or more *attempts* (the orchestrator truncates the file
for each retry). Within an attempt the ``result`` line's ``total_cost_usd`` is
the only complete figure: assistant lines carry placeholder output counts and
never show helper-model calls. So an attempt costs the total of its last
trusted ``result`` line plus a priced estimate of the messages that came after
it; an attempt without a result line is priced from its messages alone.

One API response appears as several assistant lines sharing ``message.id``,
each repeating the usage snapshot, so each id is counted once with its largest
snapshot. Only the most recent ids are remembered, which bounds memory.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import math
import os
import re
import stat
import tomllib
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.read import TRANSCRIPT
from agent.transcript import Chunk, TranscriptReader, parse_line

if TYPE_CHECKING:
    from agent.config import CostSection

__all__ = [
    "MAX_COUNT",
    "MAX_NAME",
    "MAX_RESULT_USD",
    "MAX_TOKEN_TOTAL",
    "OTHER",
    "UNATTRIBUTED",
    "WEB_SEARCH_USD",
    "PriceTable",
    "Prices",
    "Tokens",
    "TranscriptCost",
    "TranscriptLedger",
    "cost_of_path",
    "family_key",
    "fold_key",
    "relevant",
]

_log = logging.getLogger(__name__)

#: USD per web search request ($10 per 1000).
WEB_SEARCH_USD = 0.01

#: The largest token (or web search) count one usage field may hold (about 10^12); a larger
#: value is malformed. Real messages stay below 10^7, and sums of such counts stay far from the
#: 64-bit integers JSON encoders accept.
MAX_COUNT = 1 << 40
#: Token totals stop growing here (2^53 - 1, the largest integer a JSON number holds exactly
#: for every consumer), so no amount of input can overflow them.
MAX_TOKEN_TOTAL = (1 << 53) - 1
#: A result's ``total_cost_usd`` (or a ``modelUsage`` ``costUSD``) at or above this is not
#: trusted: one Claude Code session does not cost a million dollars.
MAX_RESULT_USD = 1e6
#: Breakdown keys (model and phase names) longer than this are folded into :data:`OTHER`.
MAX_NAME = 128
#: The breakdown key that stands for every name beyond a breakdown's bound.
OTHER = "other"
#: Distinct models one transcript's ``by_model`` names before the rest fold into :data:`OTHER`.
_MAX_MODELS = 32


def _warn_to_log(message: str) -> None:
    _log.warning(message)


# ---------------------------------------------------------------------------
# Prices


@dataclass(frozen=True, slots=True)
class Prices:
    """USD per million tokens for each kind of token one request can use."""

    input: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float
    output: float


# A model id is split on these characters; versions are the small numbers that
# follow the family word (new style, "claude-opus-4-1-20250805") or precede it
# (old style, "claude-3-5-haiku-20241022"). Dates have 8 digits, so they never
# pass for a version.
_SPLIT = re.compile(r"[-_.@:/\[\]\s]+")
_FAMILIES = frozenset({"opus", "sonnet", "haiku"})
_NOISE = frozenset({"claude", "anthropic"})


def _is_version_part(token: str) -> bool:
    return len(token) <= 2 and token.isascii() and token.isdigit()


def _version(tokens: list[str]) -> list[str]:
    out: list[str] = []
    for token in tokens[:2]:
        if not _is_version_part(token):
            break
        out.append(str(int(token)))
    if len(out) == 2 and out[1] == "0":
        # "opus-4-0" names the same model as "opus-4".
        out.pop()
    return out


def _parse_model(model: str) -> tuple[str, int] | None:
    """Return ``(family key, tokens used)`` for a model id, or None if none is named."""
    tokens = [t for t in _SPLIT.split(model.lower()) if t]
    for i, token in enumerate(tokens):
        if token not in _FAMILIES:
            continue
        after = _version(tokens[i + 1 :])
        if after:
            return f"{token}-{'.'.join(after)}", 1 + len(after)
        # Old style: the version sits right before the family word.
        before: list[str] = []
        j = i - 1
        while j >= 0 and len(before) < 2 and _is_version_part(tokens[j]):
            before.insert(0, tokens[j])
            j -= 1
        version = _version(before)
        if version:
            return f"{token}-{'.'.join(version)}", 1 + len(before)
        return None
    return None


def family_key(model: str) -> str | None:
    """The family and version a model id names, e.g. ``"sonnet-4.5"``; None if unknown.

    ``"claude-opus-4-5-20251101"`` gives ``"opus-4.5"`` and ``"claude-opus-4-20250514"``
    gives ``"opus-4"``, so the two are never confused.
    """
    parsed = _parse_model(model)
    return parsed[0] if parsed else None


def _is_pure_family(key: str) -> bool:
    """Whether an override key names only a family ("claude-sonnet-4-5"), no date or suffix."""
    parsed = _parse_model(key)
    if parsed is None:
        return False
    extra = [t for t in _SPLIT.split(key.lower()) if t and t not in _NOISE]
    return len(extra) == parsed[1]


@dataclass(frozen=True, slots=True)
class _Rate:
    """How one model id resolves: base prices, optional long-context tier, known or not."""

    base: Prices
    tier: Prices | None
    above: int
    known: bool


def _prices_from(table: Mapping[str, Any]) -> Prices:
    """Prices from a mapping with the five per-million rates (the bundle or a config section)."""
    return Prices(
        input=float(table["input"]),
        cache_write_5m=float(table["cache_write_5m"]),
        cache_write_1h=float(table["cache_write_1h"]),
        cache_read=float(table["cache_read"]),
        output=float(table["output"]),
    )


@functools.cache
def _bundle() -> dict[str, _Rate]:
    """Load the bundled price data once per process."""
    text = importlib.resources.files("agent").joinpath("prices.toml").read_text("utf-8")
    data = tomllib.loads(text)
    rates: dict[str, _Rate] = {}
    for family in data["family"]:
        base = _prices_from(family)
        long_context = family.get("long_context")
        tier = _prices_from(long_context) if long_context else None
        above = int(long_context["above"]) if long_context else 0
        for version in family["versions"]:
            rates[f"{family['name']}-{version}"] = _Rate(base, tier, above, True)
    return rates


_MAX_CACHED_MODELS = 1024


class PriceTable:
    """Resolves a model id to prices: config overrides, then the bundle, then a fallback.

    Override keys are matched in this order: the exact model id; the longest key
    that is a prefix of the model id (keys with a date or other suffix, or ones
    that name no family); a key naming just a family such as ``"claude-opus-4-5"``
    or ``"sonnet-4"``, which matches that family and version only. Overridden
    models have no long-context tier. Unknown models get ``fallback`` (default:
    Sonnet 4.5 base prices) and are reported as not known.
    """

    __slots__ = ("_cache", "_exact", "_fallback", "_family", "_prefix")

    def __init__(
        self, overrides: Mapping[str, Prices] | None = None, fallback: Prices | None = None
    ) -> None:
        self._fallback = fallback if fallback is not None else _bundle()["sonnet-4.5"].base
        self._exact: dict[str, Prices] = {}
        self._family: dict[str, Prices] = {}
        prefix: list[tuple[str, Prices]] = []
        for key, prices in (overrides or {}).items():
            lowered = key.lower()
            self._exact[lowered] = prices
            if _is_pure_family(lowered):
                self._family[family_key(lowered) or ""] = prices
            else:
                prefix.append((lowered, prices))
        # Longest first, so the most specific prefix wins.
        self._prefix = sorted(prefix, key=lambda item: len(item[0]), reverse=True)
        self._cache: dict[str, _Rate] = {}

    @classmethod
    def from_config(cls, cost: CostSection) -> PriceTable:
        """The bundled prices with the ``[cost]`` section's overrides and fallback applied."""
        overrides = {name: _prices_from(p.model_dump()) for name, p in cost.prices.items()}
        fallback = _prices_from(cost.fallback.model_dump()) if cost.fallback else None
        return cls(overrides, fallback)

    @property
    def fallback(self) -> Prices:
        """Prices used for models the table does not know."""
        return self._fallback

    def _resolve(self, model: str) -> _Rate:
        lowered = model.lower()
        exact = self._exact.get(lowered)
        if exact is not None:
            return _Rate(exact, None, 0, True)
        for key, prices in self._prefix:
            if lowered.startswith(key):
                return _Rate(prices, None, 0, True)
        family = family_key(lowered)
        if family is not None:
            if family in self._family:
                return _Rate(self._family[family], None, 0, True)
            bundled = _bundle().get(family)
            if bundled is not None:
                return bundled
        return _Rate(self._fallback, None, 0, False)

    def lookup(self, model: str, context_tokens: int) -> tuple[Prices, bool]:
        """Prices for one request of ``model`` with this many prompt tokens; bool = known.

        ``context_tokens`` is input + cache writes + cache reads of the request;
        above a family's long-context threshold the tier prices apply to all of it.
        """
        rate = self._cache.get(model)
        if rate is None:
            if len(self._cache) >= _MAX_CACHED_MODELS:
                # Model ids come from files; do not let odd input grow this forever.
                self._cache.clear()
            rate = self._cache[model] = self._resolve(model)
        if rate.tier is not None and context_tokens > rate.above:
            return rate.tier, rate.known
        return rate.base, rate.known


# ---------------------------------------------------------------------------
# Ledger


@dataclass(frozen=True, slots=True)
class Tokens:
    """Token counts; ``cache_creation`` is 5-minute plus 1-hour cache writes."""

    input: int = 0
    output: int = 0
    cache_creation: int = 0
    cache_read: int = 0

    def __add__(self, other: Tokens) -> Tokens:
        """The sum, each count saturating at :data:`MAX_TOKEN_TOTAL`."""
        if not isinstance(other, Tokens):
            return NotImplemented
        return Tokens(
            min(self.input + other.input, MAX_TOKEN_TOTAL),
            min(self.output + other.output, MAX_TOKEN_TOTAL),
            min(self.cache_creation + other.cache_creation, MAX_TOKEN_TOTAL),
            min(self.cache_read + other.cache_read, MAX_TOKEN_TOTAL),
        )


def fold_key(name: str, known: Collection[str], limit: int) -> str:
    """``name`` as a key of a bounded breakdown that already holds ``known``.

    A name already there stays itself; a new one is admitted while fewer than ``limit`` keys
    exist and it is at most :data:`MAX_NAME` characters long; anything else is :data:`OTHER`.
    Names come from files, so this keeps a breakdown (and every event and saved state that
    carries it) bounded whatever the input. Once folded, a name stays folded, as the breakdown
    only grows.
    """
    if name in known:
        return name
    if len(name) > MAX_NAME or len(known) >= limit:
        return OTHER
    return name


def relevant(line: bytes) -> bool:
    """Whether a raw line that is not a JSON object could have affected accounting.

    Every line is parsed (orjson is faster than any prefilter: see BENCHMARKS.md); this only
    decides whether a line that does not parse counts as a bad line, worth a warning, or is
    noise such as a truncated log message. Usage and costs live under the keys ``usage`` and
    ``total_cost_usd``, and result lines contain ``"result"``. JSON can spell any of these with
    ``\\u`` escapes, and as they are ASCII every such escape starts ``\\u00``: a line with one
    counts too, so no line that could have mattered is dropped silently.
    """
    return (
        b'"usage"' in line or b"total_cost_usd" in line or b'"result"' in line or b"\\u00" in line
    )


#: One message's usage: input, output, 5m cache writes, 1h cache writes, cache reads,
#: web search requests.
_Usage = tuple[int, int, int, int, int, int]


class _Msg:
    """The largest usage snapshot seen for one message id, and its estimate."""

    __slots__ = ("estimate", "model", "usage")

    def __init__(self, model: str, usage: _Usage, estimate: float) -> None:
        self.model = model
        self.usage = usage
        self.estimate = estimate


def _count(value: object) -> int:
    """A token count: an int (not a bool) in 0..MAX_COUNT, or 0 when absent; -1 when malformed."""
    if value is None:
        return 0
    if type(value) is int and 0 <= value <= MAX_COUNT:
        return value
    return -1


def _parse_usage(usage: Mapping[str, Any]) -> _Usage | None:
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


def _total(usage: _Usage) -> int:
    return usage[0] + usage[1] + usage[2] + usage[3] + usage[4]


def _valid_cost(value: object) -> float | None:
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


def _add(into: dict[str, float], key: str, amount: float) -> None:
    into[key] = into.get(key, 0.0) + amount


#: by_model key for result costs that ``modelUsage`` does not attribute to any model
#: and no assistant line of the attempt named a model.
UNATTRIBUTED = "unattributed"

_MAX_WARNED = 256
_STATE_VERSION = 1


class TranscriptLedger:
    """Cost state of one transcript across attempts; JSON-serialisable for the durable store.

    Feed it what a :class:`~agent.transcript.TranscriptReader` hands out with
    :meth:`feed_chunk`, which also opens a new attempt when the file was truncated or
    replaced; :meth:`feed` takes one parsed line. Lines that could matter but cannot be used
    are counted in :attr:`bad_lines` and warned about once per kind of problem.

    Everything taken from the input is bounded: counts (:data:`MAX_COUNT`), costs
    (:data:`MAX_RESULT_USD`), model names (:data:`MAX_NAME`, and at most 32 distinct
    ``by_model`` keys before the rest fold into :data:`OTHER`) and message ids.
    """

    def __init__(
        self,
        prices: PriceTable,
        on_warning: Callable[[str], None] | None = None,
        window: int = 1024,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self._prices = prices
        self._warn = on_warning or _warn_to_log
        self._window_size = window
        # Attempts that ended (the file was truncated or replaced).
        self._attempts = 0
        self._closed_cost = 0.0
        self._closed_by_model: dict[str, float] = {}
        self._closed_incomplete = False
        # Deduplicated token sums over every attempt, covered by a result or not.
        self._tokens = [0, 0, 0, 0]
        self._bad_lines = 0
        # Kinds of bad line already warned about; the rest are only counted.
        self._bad_warned: set[str] = set()
        # Unknown models already warned about.
        self._warned: set[str] = set()
        # The by_model keys in use (see fold_key).
        self._models: set[str] = set()
        self._reset_attempt()

    def _reset_attempt(self) -> None:
        self._started = False
        self._result_cost: float | None = None
        self._result_by_model: dict[str, float] = {}
        # Estimates of messages after the last trusted result (or all of them
        # when there is none), including messages evicted from the window.
        self._open_cost = 0.0
        self._open_by_model: dict[str, float] = {}
        self._open_fallback = False
        self._last_model: str | None = None
        self._window: OrderedDict[str, _Msg] = OrderedDict()

    # -- reading ---------------------------------------------------------

    @property
    def cost(self) -> float:
        """Transcript cost in USD over all attempts."""
        result = self._result_cost if self._result_cost is not None else 0.0
        return self._closed_cost + result + self._open_cost

    @property
    def final(self) -> bool:
        """Whether the latest attempt has a trusted result line."""
        return self._result_cost is not None

    @property
    def estimate_complete(self) -> bool:
        """False if any estimated (not result-covered) message was priced at the fallback.

        Messages that a trusted result line covers do not count: that figure is
        authoritative whatever the table knows.
        """
        return not (self._closed_incomplete or self._open_fallback)

    @property
    def tokens(self) -> Tokens:
        """Deduplicated per-message token sums over all attempts."""
        return Tokens(*self._tokens)

    @property
    def by_model(self) -> dict[str, float]:
        """USD per model: ``modelUsage`` costs for result-covered parts, estimates otherwise."""
        out = dict(self._closed_by_model)
        for part in (self._result_by_model, self._open_by_model):
            for model, amount in part.items():
                _add(out, model, amount)
        return out

    @property
    def attempts(self) -> int:
        """Attempts that fed at least one assistant or result line."""
        return self._attempts + (1 if self._started else 0)

    @property
    def bad_lines(self) -> int:
        """Accounting lines that could not be used (malformed usage, untrusted result)."""
        return self._bad_lines

    # -- feeding ---------------------------------------------------------

    def _bad(self, kind: str, message: str) -> None:
        self._bad_lines += 1
        if kind not in self._bad_warned:
            self._bad_warned.add(kind)
            self._warn(f"{message} (later lines like it are only counted)")

    def _add_model(self, into: dict[str, float], model: str, amount: float) -> None:
        key = fold_key(model, self._models, _MAX_MODELS)
        self._models.add(key)
        _add(into, key, amount)

    def feed_chunk(self, chunk: Chunk) -> tuple[bool, int]:
        """Feed one chunk read from the transcript; returns (changed, bad lines in it).

        A restarted file first opens a new attempt. Every line is parsed: orjson parses the
        lines that cannot matter faster than a prefilter scans them (see BENCHMARKS.md). A line
        that is not a JSON object is a bad line if :func:`relevant` says it could have mattered;
        over-long lines the reader skipped (and warned about) are bad lines too. All of them
        are counted here, in :attr:`bad_lines`.
        """
        changed = False
        if chunk.restarted:
            self.new_attempt()
            changed = True
        before = self._bad_lines
        self._bad_lines += chunk.skipped
        feed = self.feed
        for raw in chunk.lines:
            line = parse_line(raw)
            if line is not None:
                changed |= feed(line)
            elif relevant(raw):
                self._bad("json", "skipping a transcript line that is not a JSON object")
        return changed, self._bad_lines - before

    def feed(self, line: Mapping[str, Any]) -> bool:
        """Account for one parsed JSON line; True if cost, tokens or finality changed."""
        kind = line.get("type")
        if kind == "assistant":
            return self._feed_assistant(line)
        if kind == "result":
            return self._feed_result(line)
        return False

    def _feed_assistant(self, line: Mapping[str, Any]) -> bool:
        message = line.get("message")
        if not isinstance(message, Mapping):
            return False
        raw_usage = message.get("usage")
        if not isinstance(raw_usage, Mapping):
            return False
        usage = _parse_usage(raw_usage)
        if usage is None:
            self._bad("usage", f"assistant line with malformed usage: {dict(raw_usage)!r:.300}")
            return False
        model = message.get("model")
        if not isinstance(model, str):
            model = ""
        elif len(model) > MAX_NAME:
            # Not a model id anyone uses: priced as unknown, and never kept at this length.
            model = OTHER
        self._started = True
        if _total(usage):
            # Zero-usage lines (model "<synthetic>") are not the attempt's model.
            self._last_model = model

        msg_id = message.get("id")
        if not isinstance(msg_id, str) or len(msg_id) > MAX_NAME:
            # Nothing (sane) to deduplicate on: count the line as its own message. The window
            # keeps ids, so an unbounded one must never get there.
            return self._apply(None, model, usage)
        known = self._window.get(msg_id)
        if known is None:
            if len(self._window) >= self._window_size:
                # The evicted message's estimate and tokens are already in the
                # running sums; only the ability to deduplicate it is lost.
                self._window.popitem(last=False)
            return self._apply(msg_id, model, usage)
        self._window.move_to_end(msg_id)
        old = known.usage
        # Keep the snapshot with the most tokens; a later one with the same total
        # only wins if it reports more web searches.
        if (_total(usage), usage[5]) <= (_total(old), old[5]):
            return False
        estimate = self._estimate(known.model, usage)
        self._open_cost += estimate - known.estimate
        self._add_model(self._open_by_model, known.model, estimate - known.estimate)
        new_parts, old_parts = _token_parts(usage), _token_parts(old)
        for i in range(4):
            total = self._tokens[i] + new_parts[i] - old_parts[i]
            self._tokens[i] = min(max(total, 0), MAX_TOKEN_TOTAL)
        known.usage = usage
        known.estimate = estimate
        return True

    def _apply(self, msg_id: str | None, model: str, usage: _Usage) -> bool:
        estimate = self._estimate(model, usage)
        if msg_id is not None:
            self._window[msg_id] = _Msg(model, usage, estimate)
        if not any(usage):
            return False
        self._open_cost += estimate
        self._add_model(self._open_by_model, model, estimate)
        for i, part in enumerate(_token_parts(usage)):
            self._tokens[i] = min(self._tokens[i] + part, MAX_TOKEN_TOTAL)
        return True

    def _estimate(self, model: str, usage: _Usage) -> float:
        inp, out, m5, h1, read, web = usage
        searches = web * WEB_SEARCH_USD
        if not (inp or out or m5 or h1 or read):
            # Zero-token lines (e.g. model "<synthetic>") cost nothing whatever the model.
            return searches
        prices, known = self._prices.lookup(model, inp + m5 + h1 + read)
        if not known:
            self._open_fallback = True
            if model not in self._warned and len(self._warned) < _MAX_WARNED:
                self._warned.add(model)
                self._warn(f"unknown model {model!r}: priced at fallback rates")
        tokens_usd = (
            inp * prices.input
            + out * prices.output
            + m5 * prices.cache_write_5m
            + h1 * prices.cache_write_1h
            + read * prices.cache_read
        ) / 1e6
        return tokens_usd + searches

    def _feed_result(self, line: Mapping[str, Any]) -> bool:
        total = _valid_cost(line.get("total_cost_usd"))
        if total is None:
            self._bad(
                "result",
                f"result line with untrusted total_cost_usd {line.get('total_cost_usd')!r:.80}"
                "; keeping the estimate",
            )
            return False
        by_model: dict[str, float] = {}
        model_usage = line.get("modelUsage")
        if isinstance(model_usage, Mapping):
            for model, entry in model_usage.items():
                cost = _valid_cost(entry.get("costUSD")) if isinstance(entry, Mapping) else None
                if isinstance(model, str) and cost is not None:
                    self._add_model(by_model, model, cost)
        remainder = total - math.fsum(by_model.values())
        if abs(remainder) > 1e-9:
            # No (usable) modelUsage: charge the gap to the model this attempt used.
            self._add_model(by_model, self._last_model or UNATTRIBUTED, remainder)
        changed = (
            self._result_cost != total
            or self._open_cost != 0.0
            or self._result_by_model != by_model
        )
        self._started = True
        self._result_cost = total
        self._result_by_model = by_model
        # Everything before a result is covered by it.
        self._open_cost = 0.0
        self._open_by_model = {}
        self._open_fallback = False
        self._window.clear()
        return changed

    def new_attempt(self) -> None:
        """Close the current attempt because the file was truncated or replaced.

        Its cost stays spent. Does nothing if the attempt has not started, so a
        double restart does not create empty attempts.
        """
        if not self._started:
            return
        self._attempts += 1
        self._closed_cost = self.cost
        for part in (self._result_by_model, self._open_by_model):
            for model, amount in part.items():
                _add(self._closed_by_model, model, amount)
        self._closed_incomplete = self._closed_incomplete or self._open_fallback
        self._reset_attempt()

    # -- persistence -----------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """JSON-able state; :meth:`load` restores it exactly."""
        models: dict[str, int] = {}
        window = []
        for msg_id, msg in self._window.items():
            index = models.setdefault(msg.model, len(models))
            window.append([msg_id, index, *msg.usage, msg.estimate])
        return {
            "v": _STATE_VERSION,
            "window_size": self._window_size,
            "attempts": self._attempts,
            "closed_cost": self._closed_cost,
            "closed_by_model": self._closed_by_model,
            "closed_incomplete": self._closed_incomplete,
            "tokens": list(self._tokens),
            "bad_lines": self._bad_lines,
            "warned": sorted(self._warned),
            "model_keys": sorted(self._models),
            "started": self._started,
            "result_cost": self._result_cost,
            "result_by_model": self._result_by_model,
            "open_cost": self._open_cost,
            "open_by_model": self._open_by_model,
            "open_fallback": self._open_fallback,
            "last_model": self._last_model,
            "models": list(models),
            "window": window,
        }

    @classmethod
    def load(
        cls,
        data: Mapping[str, Any],
        prices: PriceTable,
        on_warning: Callable[[str], None] | None = None,
    ) -> TranscriptLedger:
        """Rebuild a ledger from :meth:`dump` output; ``ValueError`` if it is malformed."""
        try:
            if data["v"] != _STATE_VERSION:
                raise ValueError(f"unsupported ledger state version {data['v']!r}")
            ledger = cls(prices, on_warning, int(data["window_size"]))
            ledger._attempts = int(data["attempts"])
            ledger._closed_cost = float(data["closed_cost"])
            ledger._closed_by_model = _float_map(data["closed_by_model"])
            ledger._closed_incomplete = bool(data["closed_incomplete"])
            tokens = [int(t) for t in data["tokens"]]
            if len(tokens) != 4:
                raise ValueError("tokens must have 4 entries")
            ledger._tokens = tokens
            ledger._bad_lines = int(data["bad_lines"])
            ledger._warned = {str(m) for m in data["warned"]}
            for part in ("closed_by_model", "result_by_model", "open_by_model"):
                ledger._models.update(str(m) for m in data[part])
            # Absent from states saved before by_model was bounded.
            ledger._models.update(str(m) for m in data.get("model_keys", ()))
            ledger._started = bool(data["started"])
            result = data["result_cost"]
            ledger._result_cost = None if result is None else float(result)
            ledger._result_by_model = _float_map(data["result_by_model"])
            ledger._open_cost = float(data["open_cost"])
            ledger._open_by_model = _float_map(data["open_by_model"])
            ledger._open_fallback = bool(data["open_fallback"])
            last = data["last_model"]
            ledger._last_model = None if last is None else str(last)
            models = [str(m) for m in data["models"]]
            for entry in data["window"]:
                msg_id, index, *counts, estimate = entry
                if len(counts) != 6:
                    raise ValueError("window entry must have 6 counts")
                i, o, m5, h1, r, w = (int(c) for c in counts)
                msg = _Msg(models[index], (i, o, m5, h1, r, w), float(estimate))
                ledger._window[str(msg_id)] = msg
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ValueError(f"invalid ledger state: {exc}") from exc
        return ledger


def _token_parts(usage: _Usage) -> tuple[int, int, int, int]:
    return usage[0], usage[1], usage[2] + usage[3], usage[4]


def _float_map(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise TypeError("expected a mapping")
    return {str(k): float(v) for k, v in value.items()}


# ---------------------------------------------------------------------------
# One-shot costing for `adw-agent cost`


@dataclass
class TranscriptCost:
    """The cost of one transcript file, as read in one pass."""

    path: str
    agent: str
    cost: float
    final: bool
    estimate_complete: bool
    tokens: Tokens
    by_model: dict[str, float] = field(default_factory=dict)
    attempts: int = 0
    lines: int = 0
    bad_lines: int = 0


def _transcripts(path: Path) -> Iterator[Path]:
    """The transcript files PATH names, never following symlinks."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        # A file (or a symlink, which the reader refuses with UnsafeFile).
        yield path
        return
    direct = path / TRANSCRIPT
    if _is_regular(direct):
        yield direct
    with os.scandir(path) as entries:
        subdirs = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    for name in subdirs:
        candidate = path / name / TRANSCRIPT
        if _is_regular(candidate):
            yield candidate


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _cost_of_file(
    path: Path,
    prices: PriceTable,
    max_line_bytes: int,
    on_warning: Callable[[str], None] | None,
) -> TranscriptCost:
    reader = TranscriptReader(path, None, max_line_bytes=max_line_bytes, on_warning=on_warning)
    ledger = TranscriptLedger(prices, on_warning)
    lines = 0
    while True:
        chunk = reader.read(budget=8 << 20)
        lines += len(chunk.lines) + chunk.skipped
        ledger.feed_chunk(chunk)
        if not chunk.more_pending:
            break
    return TranscriptCost(
        path=str(path),
        agent=path.parent.name,
        cost=ledger.cost,
        final=ledger.final,
        estimate_complete=ledger.estimate_complete,
        tokens=ledger.tokens,
        by_model=ledger.by_model,
        attempts=ledger.attempts,
        lines=lines,
        bad_lines=ledger.bad_lines,
    )


def cost_of_path(
    path: Path,
    prices: PriceTable,
    max_line_bytes: int = 8 << 20,
    on_warning: Callable[[str], None] | None = None,
) -> list[TranscriptCost]:
    """Cost every transcript PATH names, streaming each in constant memory.

    PATH is a transcript file, or a run directory: then ``raw_output.jsonl`` in it
    and in each subdirectory one level down. Symlinks are not followed (a
    symlinked PATH file raises :class:`~agent.transcript.UnsafeFile`).
    ``bad_lines`` counts lines that could matter but could not be used, as
    :meth:`TranscriptLedger.feed_chunk` does for the running agent.
    """
    results = []
    for transcript in _transcripts(path):
        results.append(_cost_of_file(transcript, prices, max_line_bytes, on_warning))
    return results
