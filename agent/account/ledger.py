"""The per-transcript cost ledger: attempts, deduplication and calibration.

A transcript holds one or more *attempts*. An attempt is one Claude Code process: it begins
with a ``system``/``init`` line, and a line naming a new ``session_id`` or a truncated or
replaced file begins one too. An init line of the attempt's own session before the attempt
has a result line is the same process announcing another turn, not a new attempt. A
``result`` line's ``total_cost_usd`` is the running total of its own process, so a later
result line of the same attempt replaces an earlier one and never touches another attempt.
A transcript's cost is the sum over its attempts:

- the *settled* part: every attempt's last trusted ``total_cost_usd``;
- the *estimated* part: the messages no result line covers yet (those after an attempt's last
  result, or all of an attempt that has none), priced from their usage and scaled by the
  calibration ratio.

Per-message ``output_tokens`` are often the value sent when the message started streaming, so
a message's output is taken as the larger of the reported count and its content's length
(text, thinking and tool inputs) divided by :data:`CHARS_PER_TOKEN`.

Calibration: every result line that settles priced messages records the USD it added, the
message-priced estimate of those messages, and the part of the USD that ``modelUsage`` puts on
the models those messages named. A ratio of such sums, bounded to [:data:`MIN_RATIO`,
:data:`MAX_RATIO`] and 1 until :data:`MIN_EVIDENCE_USD` of estimates have settled, scales
unsettled estimates (:func:`run_figures`). A transcript's ratio pools its own evidence in
full, which covers its helper-model calls and its CLI's prices, with the other transcripts'
evidence counted only for its *shown* part. A CLI's price quirks and hidden calls of the
models the messages name hold for every agent of a run, but helper-model calls are one agent's
habit (a planner may spend a fifth of its bill on them, a builder nothing), and scaling
another agent by them would push its live figure past its bill. Pooling also keeps one small
settled attempt of a transcript (where a helper's fixed cost looms large) from setting the
ratio of its big retry alone. The ratios change only when a result line arrives, so the
figure goes down only when a result line corrects an estimate.

Resumed sessions: each process reports only its own spend (Claude Code's cost-tracking
documentation: "each query() call within a session reports its cost independently"), except
that from Claude Code 2.1.277 a process started with ``--resume`` starts from the totals the
session saved at exit. For those versions, when the same file holds the session's earlier
result, that figure is subtracted from the resumed attempt's results.

One API response appears as several assistant lines sharing ``message.id``, each repeating
the usage snapshot and carrying one content block, so each id is counted once with its
largest snapshot and the content of all its lines. Only the most recent ids of an attempt
that has no result yet are remembered: per transcript at most ``window`` ids, and across
every ledger that shares a :class:`WindowBudget` at most its ``total`` ids beyond
:data:`WindowBudget.floor` per transcript. A result line frees its attempt's ids.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from agent.account.prices import WEB_SEARCH_USD, PriceTable, family_key
from agent.transcript import Chunk, parse_line

__all__ = [
    "CHARS_PER_TOKEN",
    "MAX_COUNT",
    "MAX_NAME",
    "MAX_RESULT_USD",
    "MAX_TOKEN_TOTAL",
    "OTHER",
    "RESUME_CARRIES_TOTALS",
    "UNATTRIBUTED",
    "Calibration",
    "Figure",
    "Tokens",
    "TranscriptLedger",
    "WindowBudget",
    "fold_key",
    "relevant",
    "run_figures",
]

_log = logging.getLogger("agent.account")

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
#: by_model key for result costs that ``modelUsage`` does not attribute to any model
#: and no assistant line of the attempt named a model.
UNATTRIBUTED = "unattributed"
#: Characters of content per output token when the reported count is a placeholder.
CHARS_PER_TOKEN = 3.5
#: The first Claude Code version whose ``--resume`` process starts from the session's totals.
RESUME_CARRIES_TOTALS = (2, 1, 277)
#: Bounds on the calibration ratio, and the settled estimates it needs before it departs from 1.
MIN_RATIO = 0.5
MAX_RATIO = 3.0
MIN_EVIDENCE_USD = 0.01

#: Distinct models one transcript's ``by_model`` names before the rest fold into :data:`OTHER`.
_MAX_MODELS = 32
_MAX_WARNED = 256
#: Sessions of one file remembered for resume baselines.
_MAX_SESSIONS = 64
#: Content blocks of one line that are measured; the rest are ignored.
_MAX_BLOCKS = 4096
_STATE_VERSION = 2


def _warn_to_log(message: str) -> None:
    _log.warning(message)


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


@dataclass(frozen=True, slots=True)
class Calibration:
    """Settled USD and the message-priced estimate of the same messages, summed.

    ``shown`` is the part of ``settled`` that result lines charge to the models the settled
    messages named; the rest went to models no message shows (helper-model calls).
    """

    settled: float = 0.0
    estimate: float = 0.0
    shown: float = 0.0

    def __add__(self, other: Calibration) -> Calibration:
        if not isinstance(other, Calibration):
            return NotImplemented
        return Calibration(
            self.settled + other.settled, self.estimate + other.estimate, self.shown + other.shown
        )

    @property
    def known(self) -> bool:
        """Whether enough estimates have settled to learn from."""
        return self.estimate >= MIN_EVIDENCE_USD

    @property
    def ratio(self) -> float:
        """What an unsettled estimate of the same transcript is multiplied by."""
        return self._bounded(self.settled)

    @property
    def shown_ratio(self) -> float:
        """What scales the estimates of a transcript that has no evidence of its own."""
        return self._bounded(self.shown)

    def _bounded(self, usd: float) -> float:
        if not self.known:
            return 1.0
        return min(max(usd / self.estimate, MIN_RATIO), MAX_RATIO)


@dataclass(frozen=True, slots=True)
class Figure:
    """A transcript's cost under one calibration ratio."""

    cost: float
    settled: float
    by_model: dict[str, float] = field(default_factory=dict)


class WindowBudget:
    """The number of message ids that every ledger sharing this budget may remember.

    A ledger always keeps up to ``floor`` ids of its open attempt, so split lines of one
    message are still recognised; beyond that it takes ids only while fewer than ``total``
    are held in all, and otherwise forgets its own oldest. Ledgers give their ids back when a
    result line settles an attempt, and when they are freed.
    """

    __slots__ = ("floor", "total", "used")

    def __init__(self, total: int, floor: int = 8) -> None:
        if total < 0 or floor < 1:
            raise ValueError("total must be >= 0 and floor >= 1")
        self.total = total
        self.floor = floor
        self.used = 0


_K = TypeVar("_K")


def run_figures(ledgers: Mapping[_K, TranscriptLedger]) -> dict[_K, Figure]:
    """The figure of every transcript of one run, each calibrated as the module docstring says."""
    run = Calibration()
    for led in ledgers.values():
        run = run + led.calibration
    figures: dict[_K, Figure] = {}
    for key, led in ledgers.items():
        own = led.calibration
        # The other transcripts' evidence, without their helper-model calls. Subtracted from
        # the run's sums rather than summed again, so a batch stays linear in transcripts.
        others_shown = max(run.shown - own.shown, 0.0)
        others_estimate = max(run.estimate - own.estimate, 0.0)
        evidence = Calibration(own.settled + others_shown, own.estimate + others_estimate)
        figures[key] = led.figure(evidence.ratio)
    return figures


def _release(budget: WindowBudget, window: OrderedDict[str, _Msg]) -> None:
    budget.used -= len(window)


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


#: One message's usage: input, output, 5m cache writes, 1h cache writes, cache reads,
#: web search requests.
_Usage = tuple[int, int, int, int, int, int]


class _Msg:
    """The largest usage snapshot seen for one message id, its content length and estimate."""

    __slots__ = ("chars", "estimate", "model", "usage")

    def __init__(self, model: str, usage: _Usage, chars: int, estimate: float) -> None:
        self.model = model
        self.usage = usage
        self.chars = chars
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


def _content_chars(content: object) -> int:
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


def _brief(value: object) -> str:
    """At most 300 characters describing ``value``, whatever its depth or size."""
    try:
        return orjson.dumps(value)[:300].decode("utf-8", "replace")
    except (orjson.JSONEncodeError, TypeError):
        return f"<{type(value).__name__}>"


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


def _version(value: object) -> tuple[int, ...] | None:
    """``"2.1.277"`` as ``(2, 1, 277)``; None when absent or not a dotted version."""
    if not isinstance(value, str) or len(value) > 32:
        return None
    parts = value.split(".")
    if not all(p.isascii() and p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


def _add(into: dict[str, float], key: str, amount: float) -> None:
    into[key] = into.get(key, 0.0) + amount


def _token_parts(usage: _Usage) -> tuple[int, int, int, int]:
    return usage[0], usage[1], usage[2] + usage[3], usage[4]


def _float_map(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise TypeError("expected a mapping")
    return {str(k): float(v) for k, v in value.items()}


class TranscriptLedger:
    """Cost state of one transcript across attempts; JSON-serialisable for the durable store.

    Feed it what a :class:`~agent.transcript.TranscriptReader` hands out with
    :meth:`feed_chunk`, which also opens a new attempt when the file was truncated or
    replaced; :meth:`feed` takes one parsed line. No line makes either raise: lines that could
    matter but cannot be used are counted in :attr:`bad_lines`, once each, and warned about
    once per kind of problem.

    Everything taken from the input is bounded: counts (:data:`MAX_COUNT`), costs
    (:data:`MAX_RESULT_USD`), model names (:data:`MAX_NAME`, and at most 32 distinct
    ``by_model`` keys before the rest fold into :data:`OTHER`), message ids and sessions.
    """

    def __init__(
        self,
        prices: PriceTable,
        on_warning: Callable[[str], None] | None = None,
        window: int = 1024,
        budget: WindowBudget | None = None,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self._prices = prices
        self._warn = on_warning or _warn_to_log
        self._window_size = window
        self._budget = budget
        # One dict for the ledger's life (cleared, never replaced), so the finalizer below
        # gives back exactly what this ledger still holds.
        self._window: OrderedDict[str, _Msg] = OrderedDict()
        if budget is not None:
            weakref.finalize(self, _release, budget, self._window)
        # Attempts that ended (a new process started, or the file was truncated or replaced).
        self._attempts = 0
        self._closed_settled = 0.0
        self._closed_settled_by_model: dict[str, float] = {}
        self._closed_raw = 0.0
        self._closed_raw_by_model: dict[str, float] = {}
        self._closed_incomplete = False
        self._calibration = Calibration()
        # session id -> the last total_cost_usd its results reported in this file.
        self._sessions: OrderedDict[str, float] = OrderedDict()
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
        self._session: str | None = None
        self._cli: tuple[int, ...] | None = None
        self._baseline = 0.0
        self._settled: float | None = None
        self._settled_by_model: dict[str, float] = {}
        # Uncalibrated estimate of the messages after the attempt's last trusted result (or
        # all of them when there is none), including messages evicted from the window.
        self._open_raw = 0.0
        self._open_by_model: dict[str, float] = {}
        self._open_fallback = False
        self._last_model: str | None = None
        self._forget_window()

    def _forget_window(self) -> None:
        if self._budget is not None:
            self._budget.used -= len(self._window)
        self._window.clear()

    # -- reading ---------------------------------------------------------

    @property
    def calibration(self) -> Calibration:
        """This transcript's settled-versus-estimated evidence (summed over a run by callers)."""
        return self._calibration

    def figure(self, ratio: float | None = None) -> Figure:
        """The cost with unsettled estimates scaled by ``ratio`` (default: this file's own)."""
        if ratio is None:
            ratio = self._calibration.ratio
        settled = self._closed_settled + (self._settled or 0.0)
        raw = self._closed_raw + self._open_raw
        by_model = dict(self._closed_settled_by_model)
        for model, amount in self._settled_by_model.items():
            _add(by_model, model, amount)
        for part in (self._closed_raw_by_model, self._open_by_model):
            for model, amount in part.items():
                _add(by_model, model, amount * ratio)
        return Figure(settled + raw * ratio, settled, by_model)

    @property
    def cost(self) -> float:
        """Transcript cost in USD over all attempts, calibrated by this file alone."""
        return self.figure().cost

    @property
    def settled(self) -> float:
        """USD from result lines only."""
        return self._closed_settled + (self._settled or 0.0)

    @property
    def final(self) -> bool:
        """Whether the latest attempt has a trusted result line."""
        return self._settled is not None

    @property
    def estimate_complete(self) -> bool:
        """False if any estimated (not result-covered) message was priced at the fallback.

        Messages that a trusted result line covers do not count: that figure is
        authoritative whatever the table knows.
        """
        return not (self._closed_incomplete or self._open_fallback)

    @property
    def tokens(self) -> Tokens:
        """Deduplicated per-message token sums over all attempts (output as reported)."""
        return Tokens(*self._tokens)

    @property
    def by_model(self) -> dict[str, float]:
        """USD per model: ``modelUsage`` costs for result-covered parts, estimates otherwise."""
        return self.figure().by_model

    @property
    def attempts(self) -> int:
        """Attempts that fed at least one assistant or result line."""
        return self._attempts + (1 if self._started else 0)

    @property
    def bad_lines(self) -> int:
        """Accounting lines that could not be used (malformed usage, untrusted result)."""
        return self._bad_lines

    @property
    def remembered(self) -> int:
        """Message ids held for deduplication right now."""
        return len(self._window)

    # -- feeding ---------------------------------------------------------

    def _bad(self, kind: str, message: Callable[[], str]) -> None:
        self._bad_lines += 1
        if kind not in self._bad_warned:
            self._bad_warned.add(kind)
            self._warn(f"{message()} (later lines like it are only counted)")

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
                self._bad("json", lambda: "skipping a transcript line that is not a JSON object")
        return changed, self._bad_lines - before

    def feed(self, line: Mapping[str, Any]) -> bool:
        """Account for one parsed JSON line; True if cost, tokens or finality changed.

        Never raises: a line that breaks an assumption this code did not foresee is counted
        as one bad line and otherwise ignored.
        """
        bad_before = self._bad_lines
        try:
            return self._feed(line)
        except Exception:  # one odd line must never stop a transcript's cost
            if self._bad_lines == bad_before:
                self._bad("unusable", lambda: "skipping a transcript line that cannot be used")
            return False

    def _feed(self, line: Mapping[str, Any]) -> bool:
        kind = line.get("type")
        session = line.get("session_id")
        if not isinstance(session, str) or len(session) > MAX_NAME:
            session = None
        changed = False
        if kind == "system" and line.get("subtype") == "init":
            if not (self._started and session is not None and session == self._session):
                changed = self._begin(session, _version(line.get("claude_code_version")))
            elif self._settled is not None:
                # The same session after its result line: a process resumed with --resume.
                changed = self._begin(session, _version(line.get("claude_code_version")))
            # Otherwise the same process announced a new turn (newer CLIs do so for background
            # task notifications) before any result: it is still the same attempt.
        elif session is not None and session != self._session:
            if self._session is None:
                self._session = session
            else:
                changed = self._begin(session, self._cli)
        if kind == "assistant":
            return self._feed_assistant(line) or changed
        if kind == "result":
            return self._feed_result(line) or changed
        return changed

    def _begin(self, session: str | None, cli: tuple[int, ...] | None) -> bool:
        """Start the attempt of a new process (or session) named by an init or session line."""
        changed = self._started
        self.new_attempt()
        self._session = session
        self._cli = cli
        if session is not None and cli is not None and cli >= RESUME_CARRIES_TOTALS:
            self._baseline = self._sessions.get(session, 0.0)
        return changed

    def _feed_assistant(self, line: Mapping[str, Any]) -> bool:
        message = line.get("message")
        if not isinstance(message, Mapping):
            return False
        raw_usage = message.get("usage")
        if not isinstance(raw_usage, Mapping):
            return False
        usage = _parse_usage(raw_usage)
        if usage is None:
            self._bad("usage", lambda: f"assistant line with malformed usage: {_brief(raw_usage)}")
            return False
        model = message.get("model")
        if not isinstance(model, str):
            model = ""
        elif len(model) > MAX_NAME:
            # Not a model id anyone uses: priced as unknown, and never kept at this length.
            model = OTHER
        chars = _content_chars(message.get("content"))
        self._started = True
        if _total(usage):
            # Zero-usage lines (model "<synthetic>") are not the attempt's model.
            self._last_model = model

        msg_id = message.get("id")
        if not isinstance(msg_id, str) or len(msg_id) > MAX_NAME:
            # Nothing (sane) to deduplicate on: count the line as its own message. The window
            # keeps ids, so an unbounded one must never get there.
            return self._apply(None, model, usage, chars)
        known = self._window.get(msg_id)
        if known is None:
            return self._apply(msg_id, model, usage, chars)
        self._window.move_to_end(msg_id)
        old = known.usage
        # Keep the snapshot with the most tokens; a later one with the same total only wins
        # if it reports more web searches. Each line brings its own content block.
        bigger = (_total(usage), usage[5]) > (_total(old), old[5])
        if not bigger and not chars:
            return False
        new_usage = usage if bigger else old
        new_chars = min(known.chars + chars, MAX_COUNT)
        # Only a result line may lower the figure, so a message is never worth less than
        # before, even if its largest snapshot moved tokens to a cheaper kind.
        estimate = max(self._estimate(known.model, new_usage, new_chars), known.estimate)
        self._open_raw += estimate - known.estimate
        self._add_model(self._open_by_model, known.model, estimate - known.estimate)
        if bigger:
            new_parts, old_parts = _token_parts(usage), _token_parts(old)
            for i in range(4):
                total = self._tokens[i] + new_parts[i] - old_parts[i]
                self._tokens[i] = min(max(total, 0), MAX_TOKEN_TOTAL)
        known.usage = new_usage
        known.chars = new_chars
        changed = estimate != known.estimate or bigger
        known.estimate = estimate
        return changed

    def _remember(self, msg_id: str, msg: _Msg) -> None:
        window = self._window
        budget = self._budget
        full = len(window) >= self._window_size or (
            budget is not None and budget.used >= budget.total and len(window) >= budget.floor
        )
        if full and window:
            # The evicted message's estimate and tokens are already in the running sums;
            # only the ability to deduplicate it is lost.
            window.popitem(last=False)
        elif budget is not None:
            budget.used += 1
        window[msg_id] = msg

    def _apply(self, msg_id: str | None, model: str, usage: _Usage, chars: int) -> bool:
        estimate = self._estimate(model, usage, chars)
        if msg_id is not None:
            self._remember(msg_id, _Msg(model, usage, chars, estimate))
        if not any(usage) and not estimate:
            return False
        self._open_raw += estimate
        self._add_model(self._open_by_model, model, estimate)
        for i, part in enumerate(_token_parts(usage)):
            self._tokens[i] = min(self._tokens[i] + part, MAX_TOKEN_TOTAL)
        return True

    def _estimate(self, model: str, usage: _Usage, chars: int) -> float:
        inp, out, m5, h1, read, web = usage
        searches = web * WEB_SEARCH_USD
        if not (inp or out or m5 or h1 or read):
            # Zero-token lines (e.g. model "<synthetic>") cost nothing whatever the model.
            return searches
        out = max(out, math.ceil(chars / CHARS_PER_TOKEN))
        prices, known = self._prices.lookup(model, inp + m5 + h1 + read)
        if not known:
            self._open_fallback = True
            if model not in self._warned and len(self._warned) < _MAX_WARNED:
                self._warned.add(model)
                self._warn(f"unknown model {model[:MAX_NAME]!r}: priced at fallback rates")
        tokens_usd = (
            inp * prices.input
            + out * prices.output
            + m5 * prices.cache_write_5m
            + h1 * prices.cache_write_1h
            + read * prices.cache_read
        ) / 1e6
        return tokens_usd + searches

    def _feed_result(self, line: Mapping[str, Any]) -> bool:
        reported = _valid_cost(line.get("total_cost_usd"))
        if reported is None:
            value = line.get("total_cost_usd")
            self._bad(
                "result",
                lambda: (
                    f"result line with untrusted total_cost_usd {_brief(value)[:80]}"
                    "; keeping the estimate"
                ),
            )
            return False
        # A resumed process of a newer CLI restates what the session had spent before it.
        total = max(reported - self._baseline, 0.0)
        share = total / reported if reported > 0 else 0.0
        by_model: dict[str, float] = {}
        model_usage = line.get("modelUsage")
        if isinstance(model_usage, Mapping):
            for model, entry in model_usage.items():
                cost = _valid_cost(entry.get("costUSD")) if isinstance(entry, Mapping) else None
                if isinstance(model, str) and cost is not None:
                    self._add_model(by_model, model, cost * share)
        remainder = total - math.fsum(by_model.values())
        if abs(remainder) > 1e-9:
            # No (usable) modelUsage: charge the gap to the model this attempt used.
            self._add_model(by_model, self._last_model or UNATTRIBUTED, remainder)
        added = total - (self._settled or 0.0)
        if added > 0 and self._open_raw > 0:
            # modelUsage covers the whole process; the share the messages' models take of it
            # is taken to hold for what this result added.
            shown = math.fsum(v for m, v in by_model.items() if self._named(m))
            fraction = min(max(shown / total, 0.0), 1.0)
            evidence = Calibration(added, self._open_raw, added * fraction)
            self._calibration = self._calibration + evidence
        changed = (
            self._settled != total or self._open_raw != 0.0 or self._settled_by_model != by_model
        )
        self._started = True
        self._settled = total
        self._settled_by_model = by_model
        # Everything before a result is covered by it.
        self._open_raw = 0.0
        self._open_by_model = {}
        self._open_fallback = False
        self._forget_window()
        if self._session is not None:
            self._sessions[self._session] = reported
            self._sessions.move_to_end(self._session)
            if len(self._sessions) > _MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return changed

    def _named(self, model: str) -> bool:
        """Whether a ``modelUsage`` key is a model the open messages named.

        Compared by family too: a provider may spell the id differently in ``modelUsage``
        (``us.anthropic.…-v1:0``, a ``[1m]`` suffix), and taking the messages' own model for
        a helper would scale every other agent down.
        """
        if model in self._open_by_model:
            return True
        family = family_key(model)
        return family is not None and any(family_key(m) == family for m in self._open_by_model)

    def new_attempt(self) -> None:
        """Close the current attempt: a new process started, or the file was truncated.

        Its cost stays spent: settled as its result said, or estimated. Does nothing but
        forget the attempt's session if it has not started, so a double restart does not
        create empty attempts.
        """
        if self._started:
            self._attempts += 1
            self._closed_settled += self._settled or 0.0
            self._closed_raw += self._open_raw
            for model, amount in self._settled_by_model.items():
                _add(self._closed_settled_by_model, model, amount)
            for model, amount in self._open_by_model.items():
                _add(self._closed_raw_by_model, model, amount)
            self._closed_incomplete = self._closed_incomplete or self._open_fallback
        self._reset_attempt()

    # -- persistence -----------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """JSON-able state; :meth:`load` restores it exactly."""
        models: dict[str, int] = {}
        window = []
        for msg_id, msg in self._window.items():
            index = models.setdefault(msg.model, len(models))
            window.append([msg_id, index, *msg.usage, msg.chars, msg.estimate])
        return {
            "v": _STATE_VERSION,
            "window_size": self._window_size,
            "attempts": self._attempts,
            "closed_settled": self._closed_settled,
            "closed_settled_by_model": self._closed_settled_by_model,
            "closed_raw": self._closed_raw,
            "closed_raw_by_model": self._closed_raw_by_model,
            "closed_incomplete": self._closed_incomplete,
            "calibration": [
                self._calibration.settled,
                self._calibration.estimate,
                self._calibration.shown,
            ],
            "sessions": [[s, t] for s, t in self._sessions.items()],
            "tokens": list(self._tokens),
            "bad_lines": self._bad_lines,
            "warned": sorted(self._warned),
            "model_keys": sorted(self._models),
            "started": self._started,
            "session": self._session,
            "cli": None if self._cli is None else list(self._cli),
            "baseline": self._baseline,
            "settled": self._settled,
            "settled_by_model": self._settled_by_model,
            "open_raw": self._open_raw,
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
        budget: WindowBudget | None = None,
        window: int | None = None,
    ) -> TranscriptLedger:
        """Rebuild a ledger from :meth:`dump` output; ``ValueError`` if it is malformed.

        ``window`` replaces the saved window size, so a smaller configured one bounds the
        restored ledger too (its newest ids are kept). States saved by the previous version
        (1) load too: what they had closed counts as settled, and their remembered messages as
        having no content.
        """
        try:
            version = data["v"]
            if version not in (1, _STATE_VERSION):
                raise ValueError(f"unsupported ledger state version {version!r}")
            if version == 1:
                data = _upgrade_v1(data)
            size = int(data["window_size"]) if window is None else window
            ledger = cls(prices, on_warning, size, budget)
            ledger._attempts = int(data["attempts"])
            ledger._closed_settled = float(data["closed_settled"])
            ledger._closed_settled_by_model = _float_map(data["closed_settled_by_model"])
            ledger._closed_raw = float(data["closed_raw"])
            ledger._closed_raw_by_model = _float_map(data["closed_raw_by_model"])
            ledger._closed_incomplete = bool(data["closed_incomplete"])
            calibration = [float(x) for x in data["calibration"]]
            if len(calibration) == 2:
                # Saved before helper-model calls were told apart: all of it counts as shown.
                calibration.append(calibration[0])
            cal_settled, cal_estimate, cal_shown = calibration
            ledger._calibration = Calibration(cal_settled, cal_estimate, cal_shown)
            for session, total in data["sessions"][-_MAX_SESSIONS:]:
                ledger._sessions[str(session)] = float(total)
            tokens = [int(t) for t in data["tokens"]]
            if len(tokens) != 4:
                raise ValueError("tokens must have 4 entries")
            ledger._tokens = tokens
            ledger._bad_lines = int(data["bad_lines"])
            ledger._warned = {str(m) for m in data["warned"]}
            for part in (
                "closed_settled_by_model",
                "closed_raw_by_model",
                "settled_by_model",
                "open_by_model",
            ):
                ledger._models.update(str(m) for m in data[part])
            ledger._models.update(str(m) for m in data.get("model_keys", ()))
            ledger._started = bool(data["started"])
            session = data["session"]
            ledger._session = None if session is None else str(session)
            cli = data["cli"]
            ledger._cli = None if cli is None else tuple(int(p) for p in cli)
            ledger._baseline = float(data["baseline"])
            settled = data["settled"]
            ledger._settled = None if settled is None else float(settled)
            ledger._settled_by_model = _float_map(data["settled_by_model"])
            ledger._open_raw = float(data["open_raw"])
            ledger._open_by_model = _float_map(data["open_by_model"])
            ledger._open_fallback = bool(data["open_fallback"])
            last = data["last_model"]
            ledger._last_model = None if last is None else str(last)
            models = [str(m) for m in data["models"]]
            for entry in data["window"]:
                msg_id, index, *counts, chars, estimate = entry
                if len(counts) != 6:
                    raise ValueError("window entry must have 6 counts")
                i, o, m5, h1, r, w = (int(c) for c in counts)
                msg = _Msg(models[index], (i, o, m5, h1, r, w), int(chars), float(estimate))
                ledger._remember(str(msg_id), msg)
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ValueError(f"invalid ledger state: {exc}") from exc
        return ledger


def _upgrade_v1(data: Mapping[str, Any]) -> dict[str, Any]:
    """A version-1 state in the version-2 shape."""
    return {
        "window_size": data["window_size"],
        "attempts": data["attempts"],
        "closed_settled": data["closed_cost"],
        "closed_settled_by_model": data["closed_by_model"],
        "closed_raw": 0.0,
        "closed_raw_by_model": {},
        "closed_incomplete": data["closed_incomplete"],
        "calibration": [0.0, 0.0],
        "sessions": [],
        "tokens": data["tokens"],
        "bad_lines": data["bad_lines"],
        "warned": data["warned"],
        "model_keys": data.get("model_keys", ()),
        "started": data["started"],
        "session": None,
        "cli": None,
        "baseline": 0.0,
        "settled": data["result_cost"],
        "settled_by_model": data["result_by_model"],
        "open_raw": data["open_cost"],
        "open_by_model": data["open_by_model"],
        "open_fallback": data["open_fallback"],
        "last_model": data["last_model"],
        "models": data["models"],
        "window": [[*entry[:-1], 0, entry[-1]] for entry in data["window"]],
    }
