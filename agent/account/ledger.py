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
the models those messages named. A ratio of such sums, bounded to
[:data:`~agent.account.figures.MIN_RATIO`, :data:`~agent.account.figures.MAX_RATIO`] and 1
until :data:`~agent.account.figures.MIN_EVIDENCE_USD` of estimates have settled, scales
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

import logging
from collections.abc import Callable, Mapping
from typing import Any

from agent.account import state
from agent.account.attempts import Attempts
from agent.account.estimates import Estimator
from agent.account.figures import (
    MAX_COUNT,
    MAX_NAME,
    Calibration,
    Figure,
    Tokens,
)
from agent.account.intake import (
    BadLines,
    Usage,
    brief,
    read_assistant,
    relevant,
    usage_total,
    valid_cost,
    version,
)
from agent.account.prices import PriceTable
from agent.account.window import DedupWindow, Msg, WindowBudget
from agent.transcript import Chunk, parse_line

__all__ = ["TranscriptLedger"]

_log = logging.getLogger("agent.account")


def _warn_to_log(message: str) -> None:
    _log.warning(message)


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

    The jobs are the parts': :mod:`~agent.account.intake` reads lines,
    :mod:`~agent.account.window` deduplicates messages, :mod:`~agent.account.estimates`
    prices them, :mod:`~agent.account.attempts` keeps attempts and settles them and
    :mod:`~agent.account.state` saves and restores them; this class routes lines between them.
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
        warn = on_warning or _warn_to_log
        self._estimator = Estimator(prices, warn)
        self._bad = BadLines(warn)
        self._window = DedupWindow(window, budget)
        self._book = Attempts()

    # -- reading ---------------------------------------------------------

    @property
    def calibration(self) -> Calibration:
        """This transcript's settled-versus-estimated evidence (summed over a run by callers)."""
        return self._book.calibration

    def figure(self, ratio: float | None = None) -> Figure:
        """The cost with unsettled estimates scaled by ``ratio`` (default: this file's own)."""
        return self._book.figure(self._book.calibration.ratio if ratio is None else ratio)

    @property
    def cost(self) -> float:
        """Transcript cost in USD over all attempts, calibrated by this file alone."""
        return self.figure().cost

    @property
    def settled(self) -> float:
        """USD from result lines only."""
        return self._book.settled

    @property
    def final(self) -> bool:
        """Whether the latest attempt has a trusted result line."""
        return self._book.current.settled is not None

    @property
    def estimate_complete(self) -> bool:
        """False if any estimated (not result-covered) message was priced at the fallback.

        Messages that a trusted result line covers do not count: that figure is
        authoritative whatever the table knows.
        """
        return not (self._book.closed_incomplete or self._book.current.open_fallback)

    @property
    def tokens(self) -> Tokens:
        """Deduplicated per-message token sums over all attempts (output as reported)."""
        return Tokens(*self._book.tokens)

    @property
    def by_model(self) -> dict[str, float]:
        """USD per model: ``modelUsage`` costs for result-covered parts, estimates otherwise."""
        return self.figure().by_model

    @property
    def attempts(self) -> int:
        """Attempts that fed at least one assistant or result line."""
        return self._book.closed + (1 if self._book.current.started else 0)

    @property
    def bad_lines(self) -> int:
        """Accounting lines that could not be used (malformed usage, untrusted result)."""
        return self._bad.count

    @property
    def remembered(self) -> int:
        """Message ids held for deduplication right now."""
        return len(self._window)

    # -- feeding ---------------------------------------------------------

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
        bad = self._bad
        before = bad.count
        bad.count += chunk.skipped
        feed = self.feed
        for raw in chunk.lines:
            line = parse_line(raw)
            if line is not None:
                changed |= feed(line)
            elif relevant(raw):
                bad.add("json", lambda: "skipping a transcript line that is not a JSON object")
        return changed, bad.count - before

    def feed(self, line: Mapping[str, Any]) -> bool:
        """Account for one parsed JSON line; True if cost, tokens or finality changed.

        Never raises: a line that breaks an assumption this code did not foresee is counted
        as one bad line and otherwise ignored.
        """
        bad_before = self._bad.count
        try:
            return self._feed(line)
        except Exception:  # one odd line must never stop a transcript's cost
            if self._bad.count == bad_before:
                self._bad.add("unusable", lambda: "skipping a transcript line that cannot be used")
            return False

    def _feed(self, line: Mapping[str, Any]) -> bool:
        kind = line.get("type")
        session = line.get("session_id")
        if not isinstance(session, str) or len(session) > MAX_NAME:
            session = None
        cur = self._book.current
        changed = False
        if kind == "system" and line.get("subtype") == "init":
            if not (cur.started and session is not None and session == cur.session):
                changed = self._begin(session, version(line.get("claude_code_version")))
            elif cur.settled is not None:
                # The same session after its result line: a process resumed with --resume.
                changed = self._begin(session, version(line.get("claude_code_version")))
            # Otherwise the same process announced a new turn (newer CLIs do so for background
            # task notifications) before any result: it is still the same attempt.
        elif session is not None and session != cur.session:
            if cur.session is None:
                cur.session = session
            else:
                changed = self._begin(session, cur.cli)
        if kind == "assistant":
            return self._feed_assistant(line) or changed
        if kind == "result":
            return self._feed_result(line) or changed
        return changed

    def _begin(self, session: str | None, cli: tuple[int, ...] | None) -> bool:
        """Start the attempt of a new process (or session) named by an init or session line."""
        changed = self._book.current.started
        self.new_attempt()
        self._book.open(session, cli)
        return changed

    def _feed_assistant(self, line: Mapping[str, Any]) -> bool:
        read = read_assistant(line, self._bad)
        if read is None:
            return False
        msg_id, model, usage, chars = read
        cur = self._book.current
        cur.started = True
        if usage_total(usage):
            # Zero-usage lines (model "<synthetic>") are not the attempt's model.
            cur.last_model = model
        if msg_id is None:
            # Nothing to deduplicate on: the line is a message of its own.
            return self._apply(None, model, usage, chars)
        known = self._window.find(msg_id)
        if known is None:
            return self._apply(msg_id, model, usage, chars)
        old = known.usage
        # Keep the snapshot with the most tokens; a later one with the same total only wins
        # if it reports more web searches. Each line brings its own content block.
        bigger = (usage_total(usage), usage[5]) > (usage_total(old), old[5])
        if not bigger and not chars:
            return False
        new_usage = usage if bigger else old
        new_chars = min(known.chars + chars, MAX_COUNT)
        # Only a result line may lower the figure, so a message is never worth less than
        # before, even if its largest snapshot moved tokens to a cheaper kind.
        estimate = max(self._estimate(known.model, new_usage, new_chars), known.estimate)
        self._book.recount(known.model, estimate - known.estimate, usage if bigger else None, old)
        known.usage = new_usage
        known.chars = new_chars
        changed = estimate != known.estimate or bigger
        known.estimate = estimate
        return changed

    def _apply(self, msg_id: str | None, model: str, usage: Usage, chars: int) -> bool:
        estimate = self._estimate(model, usage, chars)
        if msg_id is not None:
            self._window.remember(msg_id, Msg(model, usage, chars, estimate))
        if not any(usage) and not estimate:
            return False
        self._book.count(model, usage, estimate)
        return True

    def _estimate(self, model: str, usage: Usage, chars: int) -> float:
        estimate, fallback = self._estimator.estimate(model, usage, chars)
        if fallback:
            self._book.current.open_fallback = True
        return estimate

    def _feed_result(self, line: Mapping[str, Any]) -> bool:
        reported = valid_cost(line.get("total_cost_usd"))
        if reported is None:
            value = line.get("total_cost_usd")
            self._bad.add(
                "result",
                lambda: (
                    f"result line with untrusted total_cost_usd {brief(value)[:80]}"
                    "; keeping the estimate"
                ),
            )
            return False
        changed = self._book.settle(reported, line.get("modelUsage"))
        # A result frees the ids of the messages it covers.
        self._window.forget()
        return changed

    def new_attempt(self) -> None:
        """Close the current attempt: a new process started, or the file was truncated.

        Its cost stays spent: settled as its result said, or estimated. Does nothing but
        forget the attempt's session if it has not started, so a double restart does not
        create empty attempts.
        """
        self._book.close()
        self._window.forget()

    # -- persistence -----------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """JSON-able state; :meth:`load` restores it exactly."""
        return state.dump(self._window, self._book, self._bad, self._estimator)

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
            data = state.current(data)
            size = int(data["window_size"]) if window is None else window
            ledger = cls(prices, on_warning, size, budget)
            state.restore(data, ledger._window, ledger._book, ledger._bad, ledger._estimator)
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ValueError(f"invalid ledger state: {exc}") from exc
        return ledger
