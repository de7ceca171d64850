"""Attempts, sessions and settlement: what a transcript has spent, settled or estimated.

An attempt's messages are *open* (estimated) until a result line settles them; a closed
attempt keeps what it had, settled or not. Settling records calibration evidence, and a
session's last reported total, so that a resumed process of a newer CLI is not charged twice.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.account.figures import (
    MAX_TOKEN_TOTAL,
    UNATTRIBUTED,
    Calibration,
    Figure,
    add,
    fold_key,
)
from agent.account.intake import Usage, token_parts, valid_cost
from agent.account.prices import family_key

#: The first Claude Code version whose ``--resume`` process starts from the session's totals.
RESUME_CARRIES_TOTALS = (2, 1, 277)
#: Distinct models one transcript's ``by_model`` names before the rest fold into ``OTHER``.
MAX_MODELS = 32
#: Sessions of one file remembered for resume baselines.
MAX_SESSIONS = 64


@dataclass(slots=True)
class Attempt:
    """The attempt in progress: one Claude Code process."""

    started: bool = False
    session: str | None = None
    cli: tuple[int, ...] | None = None
    # What a resumed process's results restate of the session's earlier spend.
    baseline: float = 0.0
    settled: float | None = None
    settled_by_model: dict[str, float] = field(default_factory=dict)
    # Uncalibrated estimate of the messages after the attempt's last trusted result (or
    # all of them when there is none), including messages evicted from the window.
    open_raw: float = 0.0
    open_by_model: dict[str, float] = field(default_factory=dict)
    open_fallback: bool = False
    last_model: str | None = None


class Attempts:
    """Every attempt of one transcript: the closed ones summed, and the current one."""

    def __init__(self) -> None:
        # Attempts that ended (a new process started, or the file was truncated or replaced).
        self.closed = 0
        self.closed_settled = 0.0
        self.closed_settled_by_model: dict[str, float] = {}
        self.closed_raw = 0.0
        self.closed_raw_by_model: dict[str, float] = {}
        self.closed_incomplete = False
        self.calibration = Calibration()
        # session id -> the last total_cost_usd its results reported in this file.
        self.sessions: OrderedDict[str, float] = OrderedDict()
        # Deduplicated token sums over every attempt, covered by a result or not.
        self.tokens = [0, 0, 0, 0]
        # The by_model keys in use (see fold_key).
        self.models: set[str] = set()
        self.current = Attempt()

    def add_model(self, into: dict[str, float], model: str, amount: float) -> None:
        """Add ``amount`` under ``model``'s key of a bounded breakdown."""
        key = fold_key(model, self.models, MAX_MODELS)
        self.models.add(key)
        add(into, key, amount)

    # -- reading ---------------------------------------------------------

    @property
    def settled(self) -> float:
        """USD from result lines only."""
        return self.closed_settled + (self.current.settled or 0.0)

    def figure(self, ratio: float) -> Figure:
        """The cost with unsettled estimates scaled by ``ratio``."""
        cur = self.current
        settled = self.closed_settled + (cur.settled or 0.0)
        raw = self.closed_raw + cur.open_raw
        by_model = dict(self.closed_settled_by_model)
        for model, amount in cur.settled_by_model.items():
            add(by_model, model, amount)
        for part in (self.closed_raw_by_model, cur.open_by_model):
            for model, amount in part.items():
                add(by_model, model, amount * ratio)
        return Figure(settled + raw * ratio, settled, by_model)

    # -- changing --------------------------------------------------------

    def close(self) -> None:
        """End the current attempt (its cost stays spent) and start an empty one."""
        cur = self.current
        if cur.started:
            self.closed += 1
            self.closed_settled += cur.settled or 0.0
            self.closed_raw += cur.open_raw
            for model, amount in cur.settled_by_model.items():
                add(self.closed_settled_by_model, model, amount)
            for model, amount in cur.open_by_model.items():
                add(self.closed_raw_by_model, model, amount)
            self.closed_incomplete = self.closed_incomplete or cur.open_fallback
        self.current = Attempt()

    def open(self, session: str | None, cli: tuple[int, ...] | None) -> None:
        """Name the (just started) current attempt's session and CLI version."""
        cur = self.current
        cur.session = session
        cur.cli = cli
        if session is not None and cli is not None and cli >= RESUME_CARRIES_TOTALS:
            cur.baseline = self.sessions.get(session, 0.0)

    def count(self, model: str, usage: Usage, estimate: float) -> None:
        """Add a new message to the open estimate and the token sums."""
        cur = self.current
        cur.open_raw += estimate
        self.add_model(cur.open_by_model, model, estimate)
        for i, part in enumerate(token_parts(usage)):
            self.tokens[i] = min(self.tokens[i] + part, MAX_TOKEN_TOTAL)

    def recount(self, model: str, extra: float, new: Usage | None, old: Usage) -> None:
        """A known message grew by ``extra`` USD, and its usage became ``new`` if not None."""
        cur = self.current
        cur.open_raw += extra
        self.add_model(cur.open_by_model, model, extra)
        if new is not None:
            new_parts, old_parts = token_parts(new), token_parts(old)
            for i in range(4):
                total = self.tokens[i] + new_parts[i] - old_parts[i]
                self.tokens[i] = min(max(total, 0), MAX_TOKEN_TOTAL)

    def settle(self, reported: float, model_usage: object) -> bool:
        """Settle the current attempt at a result's ``total_cost_usd``; True if that changed it."""
        cur = self.current
        # A resumed process of a newer CLI restates what the session had spent before it.
        total = max(reported - cur.baseline, 0.0)
        share = total / reported if reported > 0 else 0.0
        by_model: dict[str, float] = {}
        if isinstance(model_usage, Mapping):
            for model, entry in model_usage.items():
                cost = valid_cost(entry.get("costUSD")) if isinstance(entry, Mapping) else None
                if isinstance(model, str) and cost is not None:
                    self.add_model(by_model, model, cost * share)
        remainder = total - math.fsum(by_model.values())
        if abs(remainder) > 1e-9:
            # No (usable) modelUsage: charge the gap to the model this attempt used.
            self.add_model(by_model, cur.last_model or UNATTRIBUTED, remainder)
        added = total - (cur.settled or 0.0)
        if added > 0 and cur.open_raw > 0:
            # modelUsage covers the whole process; the share the messages' models take of it
            # is taken to hold for what this result added.
            shown = math.fsum(v for m, v in by_model.items() if self._named(m))
            fraction = min(max(shown / total, 0.0), 1.0)
            evidence = Calibration(added, cur.open_raw, added * fraction)
            self.calibration = self.calibration + evidence
        changed = cur.settled != total or cur.open_raw != 0.0 or cur.settled_by_model != by_model
        cur.started = True
        cur.settled = total
        cur.settled_by_model = by_model
        # Everything before a result is covered by it.
        cur.open_raw = 0.0
        cur.open_by_model = {}
        cur.open_fallback = False
        if cur.session is not None:
            self.sessions[cur.session] = reported
            self.sessions.move_to_end(cur.session)
            if len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        return changed

    def _named(self, model: str) -> bool:
        """Whether a ``modelUsage`` key is a model the open messages named.

        Compared by family too: a provider may spell the id differently in ``modelUsage``
        (``us.anthropic.…-v1:0``, a ``[1m]`` suffix), and taking the messages' own model for
        a helper would scale every other agent down.
        """
        open_by_model = self.current.open_by_model
        if model in open_by_model:
            return True
        family = family_key(model)
        return family is not None and any(family_key(m) == family for m in open_by_model)
