"""Tests for agent.account.prices: the bundled table, model matching and overrides."""

from __future__ import annotations

import pytest

from agent.account import (
    Prices,
    PriceTable,
    Tokens,
    family_key,
)
from agent.config import CostSection
from tests.account.common import (
    HAIKU45,
    OPUS45,
    SONNET45,
)

# ---------------------------------------------------------------------------
# Prices and model matching


@pytest.mark.parametrize(
    ("model", "family", "input_price"),
    [
        (SONNET45, "sonnet-4.5", 3.0),
        ("claude-sonnet-4-20250514", "sonnet-4", 3.0),
        ("claude-sonnet-4-6", "sonnet-4.6", 3.0),
        ("claude-sonnet-5", "sonnet-5", 2.0),
        (OPUS45, "opus-4.5", 5.0),
        ("claude-opus-4-6", "opus-4.6", 5.0),
        ("claude-opus-4-7", "opus-4.7", 5.0),
        ("claude-opus-4-8", "opus-4.8", 5.0),
        ("claude-opus-5", "opus-5", 5.0),
        ("claude-opus-4-20250514", "opus-4", 15.0),
        ("claude-opus-4-1-20250805", "opus-4.1", 15.0),
        ("us.anthropic.claude-opus-4-1-20250805-v1:0", "opus-4.1", 15.0),
        ("claude-sonnet-4-5@20250929", "sonnet-4.5", 3.0),
        (HAIKU45, "haiku-4.5", 1.0),
        ("claude-3-5-haiku-20241022", "haiku-3.5", 0.8),
    ],
)
def test_model_family_matching(model: str, family: str, input_price: float) -> None:
    assert family_key(model) == family
    prices, known = PriceTable().lookup(model, 0)
    assert known
    assert prices.input == input_price


def test_bundled_price_rows() -> None:
    table = PriceTable()
    assert table.lookup(OPUS45, 0)[0] == Prices(5, 6.25, 10, 0.5, 25)
    assert table.lookup("claude-opus-4-1", 0)[0] == Prices(15, 18.75, 30, 1.5, 75)
    assert table.lookup(SONNET45, 0)[0] == Prices(3, 3.75, 6, 0.3, 15)
    assert table.lookup(SONNET45, 200_001)[0] == Prices(6, 7.5, 12, 0.6, 22.5)
    assert table.lookup("claude-sonnet-5", 0)[0] == Prices(2, 2.5, 4, 0.2, 10)
    assert table.lookup(HAIKU45, 0)[0] == Prices(1, 1.25, 2, 0.1, 5)
    assert table.lookup("claude-3-5-haiku-20241022", 0)[0] == Prices(0.8, 1, 1.6, 0.08, 4)


@pytest.mark.parametrize(
    ("model", "tiered"),
    [
        (SONNET45, True),
        ("claude-sonnet-4-20250514", True),
        ("claude-sonnet-4-6", False),
        ("claude-sonnet-5", False),
        (OPUS45, False),
    ],
)
def test_long_context_tier_only_for_sonnet_4_and_4_5(model: str, tiered: bool) -> None:
    table = PriceTable()
    base, _ = table.lookup(model, 200_000)
    above, _ = table.lookup(model, 200_001)
    assert (above != base) is tiered


@pytest.mark.parametrize("model", ["<synthetic>", "claude-3-7-sonnet-20250219", "gpt-4o", ""])
def test_unknown_models_get_the_fallback(model: str) -> None:
    fallback = Prices(1, 2, 3, 4, 5)
    assert PriceTable(fallback=fallback).lookup(model, 0) == (fallback, False)


def test_default_fallback_is_sonnet_4_5() -> None:
    assert PriceTable().fallback == Prices(3, 3.75, 6, 0.3, 15)


def test_price_table_from_the_cost_section() -> None:
    rates = {"input": 1, "cache_write_5m": 2, "cache_write_1h": 3, "cache_read": 4, "output": 5}
    section = CostSection.model_validate(
        {"prices": {"claude-sonnet-4-5": rates}, "fallback": {**rates, "input": 9}}
    )
    table = PriceTable.from_config(section)
    assert table.lookup(SONNET45, 0) == (Prices(1, 2, 3, 4, 5), True)
    assert table.lookup("mystery", 0) == (Prices(9, 2, 3, 4, 5), False)
    assert PriceTable.from_config(CostSection()).lookup(OPUS45, 0) == PriceTable().lookup(OPUS45, 0)


def test_overrides_take_precedence_and_match_carefully() -> None:
    family = Prices(1, 1, 1, 1, 1)
    prefix = Prices(2, 2, 2, 2, 2)
    exact = Prices(3, 3, 3, 3, 3)
    custom = Prices(4, 4, 4, 4, 4)
    table = PriceTable(
        {
            "claude-opus-4": family,
            "claude-sonnet-4-5-2025": prefix,
            "claude-sonnet-4-5-20250929": exact,
            "my-model": custom,
        }
    )
    assert table.lookup("claude-opus-4-20250514", 0) == (family, True)
    # "claude-opus-4" names Opus 4 only, never Opus 4.5 or 4.1.
    assert table.lookup(OPUS45, 0)[0].input == 5.0
    assert table.lookup("claude-opus-4-1-20250805", 0)[0].input == 15.0
    assert table.lookup("claude-sonnet-4-5-20250929", 0) == (exact, True)
    assert table.lookup("claude-sonnet-4-5-20251111", 0) == (prefix, True)
    # An overridden model has no long-context tier.
    assert table.lookup("claude-sonnet-4-5-20251111", 500_000) == (prefix, True)
    assert table.lookup("my-model-large", 0) == (custom, True)
    assert table.lookup("claude-sonnet-4-6", 0)[0].input == 3.0


def test_family_override_without_claude_prefix() -> None:
    cheap = Prices(0.5, 0.5, 0.5, 0.5, 0.5)
    table = PriceTable({"haiku-4-5": cheap})
    assert table.lookup(HAIKU45, 0) == (cheap, True)
    assert table.lookup("claude-3-5-haiku-20241022", 0)[0].input == 0.8


def test_tokens_add() -> None:
    assert Tokens(1, 2, 3, 4) + Tokens(10, 20, 30, 40) == Tokens(11, 22, 33, 44)
