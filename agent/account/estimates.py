"""Pricing unsettled messages, and calibrating those estimates across one run's transcripts."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

from agent.account.figures import MAX_NAME, Calibration, Figure
from agent.account.intake import Usage
from agent.account.prices import WEB_SEARCH_USD, PriceTable

#: Characters of content per output token when the reported count is a placeholder.
CHARS_PER_TOKEN = 3.5
#: Unknown models warned about per transcript; the rest are priced at fallback rates silently.
_MAX_WARNED = 256


class Estimator:
    """Prices one message from its usage and content; warns once per unknown model."""

    __slots__ = ("prices", "warn", "warned")

    def __init__(self, prices: PriceTable, warn: Callable[[str], None]) -> None:
        self.prices = prices
        self.warn = warn
        # Unknown models already warned about.
        self.warned: set[str] = set()

    def estimate(self, model: str, usage: Usage, chars: int) -> tuple[float, bool]:
        """The message's USD, and whether it was priced at the fallback rates."""
        inp, out, m5, h1, read, web = usage
        searches = web * WEB_SEARCH_USD
        if not (inp or out or m5 or h1 or read):
            # Zero-token lines (e.g. model "<synthetic>") cost nothing whatever the model.
            return searches, False
        out = max(out, math.ceil(chars / CHARS_PER_TOKEN))
        prices, known = self.prices.lookup(model, inp + m5 + h1 + read)
        if not known and model not in self.warned and len(self.warned) < _MAX_WARNED:
            self.warned.add(model)
            self.warn(f"unknown model {model[:MAX_NAME]!r}: priced at fallback rates")
        tokens_usd = (
            inp * prices.input
            + out * prices.output
            + m5 * prices.cache_write_5m
            + h1 * prices.cache_write_1h
            + read * prices.cache_read
        ) / 1e6
        return tokens_usd + searches, not known


class Calibrated(Protocol):
    """What :func:`run_figures` needs of a ledger."""

    @property
    def calibration(self) -> Calibration: ...

    def figure(self, ratio: float | None = None) -> Figure: ...


_K = TypeVar("_K")


def run_figures(ledgers: Mapping[_K, Calibrated]) -> dict[_K, Figure]:
    """The figure of every transcript of one run, each calibrated as agent.account.ledger says."""
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
