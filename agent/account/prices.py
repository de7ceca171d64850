"""Prices: the bundled list-price table, model-id matching and ``[cost]`` overrides.

A model id such as ``claude-sonnet-4-5-20250929`` is reduced to a family and version
(``sonnet-4.5``) before lookup, so dates and provider prefixes or suffixes do not matter.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.config import CostSection

__all__ = ["WEB_SEARCH_USD", "PriceTable", "Prices", "family_key"]

#: USD per web search request ($10 per 1000).
WEB_SEARCH_USD = 0.01


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
    text = importlib.resources.files("agent.account").joinpath("prices.toml").read_text("utf-8")
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
