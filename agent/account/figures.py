"""The figures a ledger reports, and the bounds every value taken from a transcript obeys."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

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
#: Bounds on the calibration ratio, and the settled estimates it needs before it departs from 1.
MIN_RATIO = 0.5
MAX_RATIO = 3.0
MIN_EVIDENCE_USD = 0.01


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


def add(into: dict[str, float], key: str, amount: float) -> None:
    """Add ``amount`` to ``into[key]``, which starts at 0."""
    into[key] = into.get(key, 0.0) + amount
