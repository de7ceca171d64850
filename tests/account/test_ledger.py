"""Tests for agent.account.ledger: real fixtures, rules, attempts and bounds."""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.account import (
    MAX_COUNT,
    MAX_NAME,
    MAX_TOKEN_TOTAL,
    OTHER,
    Prices,
    PriceTable,
    Tokens,
    TranscriptLedger,
    WindowBudget,
    cost_of_path,
    relevant,
    run_figures,
)
from agent.transcript import Chunk, Position, parse_line
from tests.account.common import (
    FIXTURES,
    HAIKU45,
    MULTI,
    OPUS45,
    PROVENANCE_TOTALS,
    REAL,
    SONNET45,
    STREAM,
    WITH_RESULT,
    assistant,
    last_result,
    ledger,
    lines_of,
    result,
)

# ---------------------------------------------------------------------------
# Real fixtures


@pytest.mark.parametrize("path", WITH_RESULT, ids=lambda p: p.name)
def test_fixture_cost_equals_last_result(path: Path) -> None:
    expected = last_result(path)["total_cost_usd"]
    assert expected == pytest.approx(PROVENANCE_TOTALS[path.name], abs=1e-9)
    [cost] = cost_of_path(path, PriceTable())
    assert abs(cost.cost - expected) <= 1e-9
    assert cost.final
    assert cost.estimate_complete
    assert cost.bad_lines == 0
    assert cost.attempts == 1
    assert math.fsum(cost.by_model.values()) == pytest.approx(expected, abs=1e-9)


def test_all_result_fixtures_are_covered() -> None:
    assert {p.name for p in WITH_RESULT} == set(PROVENANCE_TOTALS)


def test_fixture_by_model_comes_from_model_usage() -> None:
    path = STREAM / "pricehawk_v2.0.55_planner_sonnet45_3models.jsonl"
    [cost] = cost_of_path(path, PriceTable())
    expected = {m: u["costUSD"] for m, u in last_result(path)["modelUsage"].items()}
    assert cost.by_model == expected


def test_fixture_without_model_usage_attributes_total_to_its_model() -> None:
    # The gleam golden file's result has no modelUsage.
    [cost] = cost_of_path(STREAM / "gleam_v2.1.7_basic_query_golden.jsonl", PriceTable())
    assert cost.by_model == {OPUS45: 0.1354875}


@pytest.mark.parametrize(
    "name",
    [
        "claude_stream/pricehawk_v2.0.57_builder_sonnet45_13turns.jsonl",
        "claude_stream/pricehawk_v2.0.55_planner_sonnet45_3models.jsonl",
        "real/tac7iso_raw_output_55b761f6_sdlc_planner_cli2022.jsonl",
        "real/tac6_raw_output_af87dd64_pr_creator_cli2144.jsonl",
    ],
)
def test_deduplicated_input_and_cache_tokens_equal_result_usage(name: str) -> None:
    path = FIXTURES / name
    usage = last_result(path)["usage"]
    [cost] = cost_of_path(path, PriceTable())
    assert cost.tokens.input == usage["input_tokens"]
    assert cost.tokens.cache_creation == usage["cache_creation_input_tokens"]
    assert cost.tokens.cache_read == usage["cache_read_input_tokens"]


def test_output_tokens_are_per_message_sums_of_placeholders() -> None:
    # PROVENANCE: per-message output sums to 2,247 while the result says 2,405.
    [cost] = cost_of_path(STREAM / "pricehawk_v2.0.57_builder_sonnet45_13turns.jsonl", PriceTable())
    assert cost.tokens.output == 2247


def test_session_file_with_1h_cache_is_estimated_at_twice_input() -> None:
    path = STREAM / "claudeless_v2.1.29_session_compact_1h_cache.jsonl"
    [cost] = cost_of_path(path, PriceTable())
    # Two haiku-4.5 messages, each split over two lines with identical usage (thinking, then
    # text); all writes are 1h. Output is the larger of the reported count and the content's
    # characters / 3.5.
    chars: dict[str, int] = {}
    for line in lines_of(path):
        message = line.get("message")
        if line.get("type") == "assistant" and isinstance(message, dict):
            for block in message["content"]:
                text = block.get("text") or block.get("thinking") or ""
                chars[message["id"]] = chars.get(message["id"], 0) + len(text)
    out1, out2 = (
        max(reported, math.ceil(n / 3.5))
        for reported, n in zip((8, 7), chars.values(), strict=True)
    )
    first = 10 * 1 + 2735 * 2 + 15364 * 0.1 + out1 * 5
    second = 10 * 1 + 2759 * 2 + 15293 * 0.1 + out2 * 5
    assert cost.cost == pytest.approx((first + second) / 1e6, abs=1e-12)
    assert not cost.final
    assert cost.estimate_complete
    assert cost.tokens == Tokens(20, 15, 2735 + 2759, 15364 + 15293)


def test_session_file_without_usage_costs_nothing() -> None:
    path = STREAM / "claudeless_v2.1.29_session_compact_subagent_prompt_suggestion.jsonl"
    [cost] = cost_of_path(path, PriceTable())
    assert cost.cost == 0.0
    assert cost.lines == 2
    assert not cost.final


@pytest.mark.parametrize(
    "name",
    [
        "tac6_raw_output_b5b9b7d5_branch_generator_no_result_line.jsonl",
        "tac6_raw_output_e9906e09_issue_classifier_empty_0bytes.jsonl",
    ],
)
def test_fixture_without_messages_costs_nothing(name: str) -> None:
    [cost] = cost_of_path(REAL / name, PriceTable())
    assert cost.cost == 0.0
    assert not cost.final
    assert cost.attempts == 0


# ---------------------------------------------------------------------------
# Ledger: one hand-computed case per rule


def test_5m_and_1h_cache_writes() -> None:
    led, _ = ledger()
    led.feed(
        assistant(
            "m1",
            input_tokens=100,
            output_tokens=200,
            cache_5m=1000,
            cache_1h=2000,
            cache_read=10_000,
        )
    )
    # 100*3 + 200*15 + 1000*3.75 + 2000*6 + 10000*0.3 = 22050 per MTok
    assert led.cost == pytest.approx(0.02205, abs=1e-15)
    assert led.tokens == Tokens(100, 200, 3000, 10_000)
    assert not led.final


def test_cache_write_without_split_is_5m_rate() -> None:
    led, _ = ledger()
    led.feed(assistant("m1", OPUS45, cache_creation=1000))
    assert led.cost == pytest.approx(1000 * 6.25 / 1e6, abs=1e-15)


def test_cache_write_total_beyond_the_split_is_5m_rate() -> None:
    led, _ = ledger()
    # The split explains only 400 of 1000 written tokens; the rest is priced at 5m.
    led.feed(assistant("m1", HAIKU45, cache_5m=0, cache_1h=400, cache_creation=1000))
    assert led.cost == pytest.approx((600 * 1.25 + 400 * 2) / 1e6, abs=1e-15)
    assert led.tokens.cache_creation == 1000
    # A split without the total still counts every token.
    split_only = assistant("m2", HAIKU45, cache_5m=100, cache_1h=200)
    del split_only["message"]["usage"]["cache_creation_input_tokens"]
    led.feed(split_only)
    assert led.tokens.cache_creation == 1300


def test_long_context_tier_applies_to_the_whole_message() -> None:
    led, _ = ledger()
    led.feed(assistant("m1", input_tokens=1, cache_read=200_000, output_tokens=100))
    # 200,001 prompt tokens: every token at the tier, output included.
    assert led.cost == pytest.approx((1 * 6 + 200_000 * 0.6 + 100 * 22.5) / 1e6, abs=1e-15)

    at_threshold, _ = ledger()
    at_threshold.feed(assistant("m1", cache_read=200_000, output_tokens=100))
    assert at_threshold.cost == pytest.approx((200_000 * 0.3 + 100 * 15) / 1e6, abs=1e-15)


def test_sonnet_4_6_has_no_long_context_tier() -> None:
    led, _ = ledger()
    led.feed(
        assistant("m1", "claude-sonnet-4-6", input_tokens=1, cache_read=200_000, output_tokens=100)
    )
    assert led.cost == pytest.approx((1 * 3 + 200_000 * 0.3 + 100 * 15) / 1e6, abs=1e-15)


def test_web_search_requests() -> None:
    led, _ = ledger()
    led.feed(assistant("m1", HAIKU45, input_tokens=1000, web_search=3))
    assert led.cost == pytest.approx(1000 * 1 / 1e6 + 3 * 0.01, abs=1e-15)


def test_web_search_alone_is_charged() -> None:
    led, _ = ledger()
    assert led.feed(assistant("m1", "<synthetic>", web_search=2))
    assert led.cost == pytest.approx(0.02, abs=1e-15)
    assert led.estimate_complete


def test_unknown_model_uses_fallback_and_warns_once() -> None:
    warnings: list[str] = []
    fallback = Prices(1, 2, 3, 4, 5)
    led = TranscriptLedger(PriceTable(fallback=fallback), warnings.append)
    led.feed(assistant("m1", "claude-mystery-9", input_tokens=1000, output_tokens=10))
    led.feed(assistant("m2", "claude-mystery-9", input_tokens=2000, cache_1h=100))
    assert led.cost == pytest.approx((1000 * 1 + 10 * 5 + 2000 * 1 + 100 * 3) / 1e6, abs=1e-15)
    assert not led.estimate_complete
    assert len(warnings) == 1
    assert "claude-mystery-9" in warnings[0]


def test_zero_usage_synthetic_lines_are_not_unknown_models() -> None:
    led, warnings = ledger()
    assert not led.feed(assistant("s1", "<synthetic>"))
    assert led.estimate_complete
    assert warnings == []


def test_result_covers_fallback_priced_messages() -> None:
    led, _ = ledger()
    led.feed(assistant("m1", "claude-mystery-9", input_tokens=1000))
    assert not led.estimate_complete
    led.feed(result(0.25))
    assert led.estimate_complete
    assert led.cost == 0.25


def test_repeated_message_counted_once_with_largest_usage() -> None:
    led, _ = ledger()
    assert led.feed(assistant("m1", input_tokens=10, output_tokens=1, cache_5m=100))
    assert led.feed(assistant("m2", input_tokens=5))
    # Not adjacent, and output grows from the placeholder.
    assert led.feed(assistant("m1", input_tokens=10, output_tokens=50, cache_5m=100))
    # A smaller, stale snapshot changes nothing.
    assert not led.feed(assistant("m1", input_tokens=10, output_tokens=1, cache_5m=100))
    expected = (10 * 3 + 50 * 15 + 100 * 3.75 + 5 * 3) / 1e6
    assert led.cost == pytest.approx(expected, abs=1e-15)
    assert led.tokens == Tokens(15, 50, 100, 0)


def test_messages_after_a_result_are_added() -> None:
    led, _ = ledger()
    led.feed(assistant("m1", input_tokens=1000))
    led.feed(result(0.5, {SONNET45: 0.5}))
    assert led.cost == 0.5
    assert led.final
    led.feed(assistant("m2", input_tokens=1000, output_tokens=100))
    after = (1000 * 3 + 100 * 15) / 1e6
    assert led.cost == pytest.approx(0.5 + after, abs=1e-15)
    assert led.by_model == {SONNET45: pytest.approx(0.5 + after, abs=1e-15)}
    assert led.tokens == Tokens(2000, 100, 0, 0)
    # A later result covers everything before it.
    led.feed(result(0.75, {SONNET45: 0.7, HAIKU45: 0.05}))
    assert led.cost == 0.75
    assert led.by_model == {SONNET45: 0.7, HAIKU45: 0.05}


UNTRUSTED: list[Any] = [
    -0.01,
    "0.5",
    None,
    math.nan,
    math.inf,
    True,
    False,
    [1.0],
    1e6,
    1e300,
    2**64 - 1,
]


@pytest.mark.parametrize("total", UNTRUSTED, ids=repr)
def test_untrusted_result_is_ignored_and_reported(total: Any) -> None:
    led, warnings = ledger()
    led.feed(assistant("m1", input_tokens=1000))
    estimate = led.cost
    assert not led.feed(result(total))
    assert led.cost == estimate
    assert not led.final
    assert led.bad_lines == 1
    assert len(warnings) == 1
    assert "total_cost_usd" in warnings[0]
    # Messages are still estimated afterwards, since no result covered them.
    led.feed(assistant("m2", input_tokens=1000))
    assert led.cost == pytest.approx(2 * estimate, abs=1e-15)


def test_integer_total_is_trusted() -> None:
    led, _ = ledger()
    led.feed(result(0))
    assert led.final
    assert led.cost == 0.0


def test_malformed_usage_is_a_bad_line() -> None:
    led, warnings = ledger()
    line = assistant("m1", input_tokens=10)
    line["message"]["usage"]["output_tokens"] = "many"
    assert not led.feed(line)
    assert led.cost == 0.0
    assert led.bad_lines == 1
    assert len(warnings) == 1


def test_a_result_below_a_million_dollars_is_trusted() -> None:
    led, _ = ledger()
    assert led.feed(result(999_999.5))
    assert led.cost == 999_999.5


def test_an_absurd_model_usage_cost_is_not_attributed() -> None:
    led, _ = ledger()
    led.feed(assistant("m1", SONNET45, input_tokens=10))
    led.feed(result(0.5, {SONNET45: 0.5, HAIKU45: 1e9}))
    assert led.by_model == {SONNET45: 0.5}


@pytest.mark.parametrize(
    "value",
    [2**63 - 1, MAX_COUNT + 1, -1, True, 1.5, "7"],
    ids=["2^63-1", "2^40+1", "-1", "bool", "float", "str"],
)
@pytest.mark.parametrize("field", ["input_tokens", "web_search_requests"])
def test_a_count_out_of_range_makes_the_line_malformed(field: str, value: Any) -> None:
    led, warnings = ledger()
    line = assistant("m0", input_tokens=10, web_search=1)
    usage = line["message"]["usage"]
    if field == "web_search_requests":
        usage["server_tool_use"][field] = value
    else:
        usage[field] = value
    # Three such lines: together they would overflow a 64-bit integer if they were added up.
    for i in range(3):
        line["message"]["id"] = f"m{i}"
        assert not led.feed(line)
    assert led.cost == 0.0
    assert led.tokens == Tokens()
    assert led.bad_lines == 3
    assert len(warnings) == 1
    assert "malformed usage" in warnings[0]
    orjson.dumps(led.dump())  # still serialisable


def test_the_largest_count_is_accepted() -> None:
    led, _ = ledger()
    assert led.feed(assistant("m0", input_tokens=MAX_COUNT))
    assert led.tokens.input == MAX_COUNT


def test_token_totals_saturate_instead_of_overflowing() -> None:
    assert Tokens(MAX_TOKEN_TOTAL, 1, 0, 0) + Tokens(5, 1, 0, 0) == Tokens(MAX_TOKEN_TOTAL, 2, 0, 0)
    led, _ = ledger()
    for i in range((MAX_TOKEN_TOTAL >> 40) + 2):
        led.feed(assistant(f"m{i}", cache_read=MAX_COUNT))
    assert led.tokens.cache_read == MAX_TOKEN_TOTAL
    assert math.isfinite(led.cost)
    orjson.dumps(led.dump())


def test_a_bigger_but_cheaper_snapshot_does_not_lower_the_figure() -> None:
    led, _ = ledger()
    led.feed(assistant("m1", output_tokens=1000))  # $0.015
    before = led.cost
    # More tokens in all, but cheap ones: the message is not worth less than it was.
    led.feed(assistant("m1", input_tokens=1001))
    assert led.cost >= before
    assert led.tokens.input == 1001


def test_message_without_id_is_counted_per_line() -> None:
    led, _ = ledger()
    led.feed(assistant(None, input_tokens=1000))
    led.feed(assistant(None, input_tokens=1000))
    assert led.cost == pytest.approx(2 * 1000 * 3 / 1e6, abs=1e-15)


def test_other_line_types_are_ignored() -> None:
    led, _ = ledger()
    assert not led.feed({"type": "user", "message": {"usage": {"input_tokens": 5}}})
    assert not led.feed({"type": "system", "subtype": "init"})
    assert not led.feed({"no": "type"})
    assert led.cost == 0.0
    assert led.attempts == 0


# ---------------------------------------------------------------------------
# Names from the input are bounded


def test_a_very_long_model_name_is_other_and_priced_as_unknown() -> None:
    led, warnings = ledger()
    led.feed(assistant("m1", "claude-sonnet-4-5-" + "x" * 10_000, input_tokens=1_000_000))
    assert led.by_model == {OTHER: pytest.approx(3.0)}
    assert not led.estimate_complete
    assert all(len(w) < 500 for w in warnings)
    assert len(orjson.dumps(led.dump())) < 2000


def test_by_model_names_at_most_32_models_and_folds_the_rest() -> None:
    led, _ = ledger()
    for i in range(40):
        led.feed(assistant(f"m{i}", f"claude-sonnet-4-5-v{i}", input_tokens=1000))
    assert len(led.by_model) == 33
    assert led.by_model[OTHER] == pytest.approx(8 * 1000 * 3 / 1e6)
    assert math.fsum(led.by_model.values()) == pytest.approx(led.cost)
    fresh, _ = ledger()
    fresh.feed(result(1.0, {f"model-{i}": 0.01 for i in range(100)}))
    assert len(fresh.by_model) == 33
    assert fresh.by_model[OTHER] == pytest.approx(0.68)
    assert math.fsum(fresh.by_model.values()) == pytest.approx(1.0)


def test_folding_survives_a_dump_and_load() -> None:
    led, warnings = ledger()
    for i in range(33):
        led.feed(assistant(f"m{i}", f"claude-sonnet-4-5-v{i}", input_tokens=1000))
    led.feed(result(1.0, {"claude-sonnet-4-5-v0": 1.0}))  # clears the estimates
    restored = roundtrip(led, warnings)
    for copy in (led, restored):
        copy.feed(assistant("late", "claude-sonnet-4-5-v99", input_tokens=1000))
    assert restored.by_model == led.by_model
    assert OTHER in led.by_model


def test_an_over_long_message_id_is_not_kept() -> None:
    led, _ = ledger()
    for i in range(3):
        led.feed(assistant(f"{i}" + "i" * (MAX_NAME + 1), input_tokens=1000))
    assert led.dump()["window"] == []
    assert led.tokens.input == 3000  # each line counted as its own message


# ---------------------------------------------------------------------------
# Feeding raw chunks: the one place bad lines are counted


def chunk(*lines: bytes, skipped: int = 0, restarted: bool = False) -> Chunk:
    return Chunk(list(lines), restarted, Position(0, 0, 0, None), skipped)


def test_feed_chunk_counts_every_kind_of_bad_line_and_warns_once_per_kind() -> None:
    led, warnings = ledger()
    good = orjson.dumps(assistant("m1", input_tokens=1000))
    bad_usage = orjson.dumps(
        {"type": "assistant", "message": {"id": "m2", "usage": {"input_tokens": "x"}}}
    )
    changed, bad = led.feed_chunk(
        chunk(
            good,
            b'{"type":"assistant","usage" broken',
            b'{"type":"assistant","usage" broken again',
            b"plain log text, not accounting",
            bad_usage,
            bad_usage,
            b'{"type":"result","total_cost_usd":-1}',
            skipped=2,
        )
    )
    assert changed
    assert bad == 2 + 2 + 2 + 1
    assert led.bad_lines == 7
    assert sorted(w.split(" ")[0] for w in warnings) == ["assistant", "result", "skipping"]
    assert all("only counted" in w for w in warnings)
    changed, bad = led.feed_chunk(chunk(b'{"type":"result" broken', skipped=1))
    assert (changed, bad) == (False, 2)
    assert len(warnings) == 3


def test_feed_chunk_opens_a_new_attempt_on_restart() -> None:
    led, _ = ledger()
    led.feed_chunk(chunk(orjson.dumps(result(0.5))))
    changed, _ = led.feed_chunk(chunk(restarted=True))
    assert changed
    assert led.attempts == 1
    assert not led.final
    assert led.cost == 0.5


# ---------------------------------------------------------------------------
# Attempts, persistence and memory bounds


def test_truncation_keeps_earlier_attempts() -> None:
    led, _ = ledger()
    led.feed(assistant("a1", input_tokens=1000))
    led.feed(result(0.4, {SONNET45: 0.4}))
    led.new_attempt()
    assert not led.final
    assert led.cost == 0.4
    led.new_attempt()  # a second restart with nothing in between adds no attempt
    led.feed(assistant("a1", OPUS45, input_tokens=1000))  # ids are per attempt
    second = 1000 * 5 / 1e6
    assert led.cost == pytest.approx(0.4 + second, abs=1e-15)
    assert led.attempts == 2
    assert led.by_model == {SONNET45: 0.4, OPUS45: pytest.approx(second, abs=1e-15)}
    led.feed(result(0.1, {OPUS45: 0.1}))
    assert led.final
    assert led.cost == pytest.approx(0.5, abs=1e-15)
    assert led.tokens == Tokens(2000, 0, 0, 0)


def test_truncated_attempt_without_result_keeps_its_estimate() -> None:
    led, _ = ledger()
    led.feed(assistant("a1", "claude-mystery", input_tokens=1000))
    led.new_attempt()
    led.feed(result(0.2))
    # The earlier attempt's fallback-priced estimate is still part of the cost.
    assert not led.estimate_complete
    assert led.cost == pytest.approx(0.2 + 1000 * 3 / 1e6, abs=1e-15)


def state(led: TranscriptLedger) -> tuple[Any, ...]:
    return (
        led.cost,
        led.tokens,
        led.by_model,
        led.final,
        led.estimate_complete,
        led.attempts,
        led.bad_lines,
    )


def roundtrip(led: TranscriptLedger, warnings: list[str]) -> TranscriptLedger:
    data = orjson.loads(orjson.dumps(led.dump()))
    return TranscriptLedger.load(data, PriceTable(), warnings.append)


def test_dump_load_mid_attempt_continues_identically() -> None:
    lines = lines_of(STREAM / "pricehawk_v2.0.55_builder_opus45_32turns.jsonl")
    # Cut inside a run of repeated message ids, so dedup must survive the round trip.
    cut = next(
        i
        for i in range(1, len(lines))
        if lines[i].get("type") == "assistant"
        and lines[i - 1].get("type") == "assistant"
        and lines[i]["message"]["id"] == lines[i - 1]["message"]["id"]
    )
    first = [
        assistant("x0", "claude-mystery", input_tokens=7),
        result(0.125, {OPUS45: 0.125}),
        assistant("x1", input_tokens=9),
        {"type": "result", "total_cost_usd": "bad"},
    ]
    original, warnings = ledger(window=4)
    for line in first:
        original.feed(line)
    original.new_attempt()
    for line in lines[:cut]:
        original.feed(line)
    restored_warnings: list[str] = []
    restored = roundtrip(original, restored_warnings)
    assert state(restored) == state(original)
    assert restored.dump() == original.dump()
    for line in [*lines[cut:], assistant("late", "claude-mystery", input_tokens=3)]:
        assert restored.feed(line) == original.feed(line)
        assert state(restored) == state(original)
    assert restored.dump() == original.dump()
    # The unknown model was warned about before the dump; not again after it.
    assert sum("claude-mystery" in w for w in warnings) == 1
    assert not any("claude-mystery" in w for w in restored_warnings)


def test_dump_is_small_and_json_able() -> None:
    led, _ = ledger()
    for line in lines_of(STREAM / "pricehawk_v2.0.55_builder_opus45_32turns.jsonl"):
        led.feed(line)
    # After the result the window is empty: the state is a few hundred bytes.
    assert len(orjson.dumps(led.dump())) < 1000


def test_load_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="ledger state"):
        TranscriptLedger.load({"v": 1}, PriceTable())
    with pytest.raises(ValueError, match="ledger state"):
        TranscriptLedger.load({"v": 99}, PriceTable())


def test_window_eviction_folds_estimates() -> None:
    led, _ = ledger(window=2)
    for i in range(5):
        led.feed(assistant(f"m{i}", input_tokens=1000 * (i + 1)))
    expected = sum(1000 * (i + 1) * 3 for i in range(5)) / 1e6
    assert led.cost == pytest.approx(expected, abs=1e-15)
    assert [entry[0] for entry in led.dump()["window"]] == ["m3", "m4"]
    # A repeat of a remembered message still deduplicates.
    led.feed(assistant("m3", input_tokens=4000, output_tokens=10))
    assert led.cost == pytest.approx(expected + 10 * 15 / 1e6, abs=1e-15)
    assert led.tokens == Tokens(15_000, 10, 0, 0)
    # The result covers the evicted messages too.
    led.feed(result(0.05))
    assert led.cost == 0.05
    assert led.dump()["window"] == []


def test_window_keeps_recently_repeated_ids() -> None:
    led, _ = ledger(window=2)
    led.feed(assistant("a", input_tokens=1))
    led.feed(assistant("b", input_tokens=1))
    led.feed(assistant("a", input_tokens=1, output_tokens=1))  # refreshes "a"
    led.feed(assistant("c", input_tokens=1))  # evicts "b", not "a"
    assert [entry[0] for entry in led.dump()["window"]] == ["a", "c"]


# ---------------------------------------------------------------------------
# Prefilter


def all_fixture_lines() -> list[bytes]:
    out: list[bytes] = []
    for path in sorted(FIXTURES.glob("*/*.jsonl")):
        out.extend(line for line in path.read_bytes().split(b"\n") if line)
    return out


def test_relevant_is_sound_on_every_fixture_line() -> None:
    lines = all_fixture_lines()
    skipped = 0
    for raw in lines:
        if relevant(raw):
            continue
        skipped += 1
        parsed = parse_line(raw)
        if parsed is None:
            # Not JSON at all: the banner lines a loop script writes between runs.
            assert not raw.startswith(b"{")
            continue
        led, _ = ledger()
        # The same session: a line naming another one starts an attempt, as it should.
        led.feed({**assistant("m0", input_tokens=5), "session_id": parsed.get("session_id")})
        before = led.dump()
        assert not led.feed(parsed)
        assert led.dump() == before
    # The filter does skip most non-accounting lines (user, system).
    assert skipped > 50


def test_relevant_catches_escaped_keys_and_bad_results() -> None:
    assert relevant(b'{"type":"assistant","message":{"usage":{}}}')
    assert relevant(b'{"type":"result","total_cost_usd":1}')
    assert relevant(b'{"type":"result","subtype":"success"}')
    escaped = b'{"type":"assistant","message":{"id":"m","\\u0075sage":{"input_tokens":5}}}'
    assert relevant(escaped)
    parsed = parse_line(escaped)
    assert parsed is not None
    led, _ = ledger()
    assert led.feed(parsed)
    assert not relevant(b'{"type":"user","message":{"content":"the \\"usage\\" of it"}}')


# ---------------------------------------------------------------------------
# Several runs in one file (real loop logs), resumed sessions, the live figure


def raw_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def results_in(lines: list[bytes]) -> list[float]:
    out = []
    for raw in lines:
        parsed = parse_line(raw)
        if parsed is not None and parsed.get("type") == "result":
            out.append(float(parsed["total_cost_usd"]))
    return out


def fed(lines: list[bytes]) -> TranscriptLedger:
    led, _ = ledger()
    led.feed_chunk(chunk(*(line.rstrip(b"\n") for line in lines)))
    return led


def estimate_alone(lines: list[bytes]) -> float:
    """What lines without a result cost on their own, uncalibrated."""
    return fed(lines).figure(1.0).cost


def runs_of(lines: list[bytes]) -> list[list[bytes]]:
    """The file's JSON lines, split at its init lines (the loop's banner lines are dropped)."""
    runs: list[list[bytes]] = []
    for raw in lines:
        parsed = parse_line(raw)
        if parsed is None:
            continue
        if parsed.get("subtype") == "init" or not runs:
            runs.append([])
        runs[-1].append(raw)
    return runs


@pytest.mark.parametrize(
    ("name", "settled_runs"),
    [("better_use_4runs.jsonl", 3), ("gymnastics_rundown_system_4runs.jsonl", 3)],
)
def test_runs_appended_to_one_file_each_count(name: str, settled_runs: int) -> None:
    lines = raw_lines(MULTI / name)
    totals = results_in(lines)
    assert len(totals) == settled_runs
    led = fed(lines)
    assert led.attempts == settled_runs + 1
    assert led.settled == pytest.approx(math.fsum(totals), abs=1e-9)
    # The last run has no result line: its messages are estimated, scaled by the ratio the
    # settled runs give.
    last = runs_of(lines)[-1]
    unsettled = estimate_alone(last)
    assert unsettled > 0
    ratio = led.calibration.ratio
    assert ratio != 1.0
    assert led.cost == pytest.approx(math.fsum(totals) + ratio * unsettled, rel=1e-9)
    assert not led.final


def test_a_last_run_that_settles_at_zero_keeps_the_runs_before() -> None:
    runs = runs_of(raw_lines(MULTI / "gymnastics_rundown_system_4runs.jsonl"))
    zero = raw_lines(STREAM / "pricehawk_v2.0.55_zero_turn_zero_cost.jsonl")
    settled = [line for run in runs[:3] for line in run]
    led = fed(settled + zero)
    assert results_in(zero) == [0.0]
    assert led.cost == pytest.approx(math.fsum(results_in(settled)), abs=1e-9)
    assert led.final


def test_a_killed_run_then_a_new_one_keeps_the_killed_runs_estimate() -> None:
    lines = raw_lines(MULTI / "gymnastics_graphics_registry_2runs_unsettled.jsonl")
    first, second = runs_of(lines)[:2]
    killed = estimate_alone(first)
    assert killed > 0
    led = fed(lines)
    assert led.attempts == 2
    assert led.cost == pytest.approx(killed + estimate_alone(second), rel=1e-9)
    # A killed run followed by a run that settles: the result settles only its own run.
    builder = raw_lines(STREAM / "pricehawk_v2.0.57_builder_sonnet45_13turns.jsonl")
    led = fed(first + builder)
    assert led.settled == pytest.approx(results_in(builder)[0], abs=1e-12)
    # ... and calibrates the killed run's estimate.
    ratio = led.calibration.ratio
    assert led.cost == pytest.approx(killed * ratio + results_in(builder)[0], rel=1e-9)


def with_version(lines: list[bytes], version: str, total: float | None = None) -> list[bytes]:
    out = []
    for raw in lines:
        parsed = parse_line(raw)
        if parsed is not None and parsed.get("subtype") == "init":
            out.append(orjson.dumps({**parsed, "claude_code_version": version}) + b"\n")
        elif parsed is not None and parsed.get("type") == "result" and total is not None:
            out.append(orjson.dumps({**parsed, "total_cost_usd": total}) + b"\n")
        else:
            out.append(raw)
    return out


def test_a_resumed_session_of_an_older_cli_reports_its_own_spend() -> None:
    # The same session again in a new process (same session_id): before 2.1.277 each process
    # reports only what it spent, so the two results add up.
    run = raw_lines(STREAM / "gleam_v2.1.7_basic_query_golden.jsonl")
    [total] = results_in(run)
    led = fed(run + run)
    assert led.attempts == 2
    assert led.cost == pytest.approx(2 * total, abs=1e-12)


def test_a_resumed_session_of_a_newer_cli_restates_the_session_total() -> None:
    run = raw_lines(STREAM / "gleam_v2.1.7_basic_query_golden.jsonl")
    [total] = results_in(run)
    first = with_version(run, "2.1.278")
    resumed = with_version(run, "2.1.278", total=total + 0.05)
    led = fed(first + resumed)
    assert led.cost == pytest.approx(total + 0.05, abs=1e-12)
    assert led.settled == pytest.approx(total + 0.05, abs=1e-12)
    # A session not seen before in this file has no baseline to subtract.
    led = fed(resumed)
    assert led.cost == pytest.approx(total + 0.05, abs=1e-12)


def test_a_result_settles_only_its_own_run_when_the_session_changes_without_init() -> None:
    led, _ = ledger()
    led.feed({**assistant("a1", input_tokens=1000, output_tokens=10), "session_id": "s1"})
    killed = led.cost
    led.feed({**assistant("b1", input_tokens=2000, output_tokens=10), "session_id": "s2"})
    led.feed({**result(0.5), "session_id": "s2"})
    assert led.attempts == 2
    assert led.cost == pytest.approx(killed * led.calibration.ratio + 0.5, rel=1e-12)


def test_output_is_estimated_from_content_when_the_count_is_a_placeholder() -> None:
    led, _ = ledger()
    line = assistant("m1", output_tokens=1)
    line["message"]["content"] = [
        {"type": "thinking", "thinking": "t" * 350, "signature": "s" * 5000},
        {"type": "text", "text": "x" * 700},
        {"type": "tool_use", "id": "tu", "name": "Bash", "input": {"command": "y" * 336}},
    ]
    led.feed(line)
    # 350 + 700 + len('{"command":"' + 336 + '"}') = 1400 characters = 400 tokens at $15/M.
    assert led.cost == pytest.approx(400 * 15 / 1e6, abs=1e-15)
    # A second line of the same message brings its own content; the usage is not repeated.
    more = assistant("m1", output_tokens=1)
    more["message"]["content"] = [{"type": "text", "text": "z" * 35}]
    assert led.feed(more)
    assert led.cost == pytest.approx(410 * 15 / 1e6, abs=1e-15)
    assert led.tokens.output == 1
    # A reported count above the content's estimate wins.
    led, _ = ledger()
    led.feed(assistant("m2", output_tokens=5000))
    assert led.cost == pytest.approx(5000 * 15 / 1e6, abs=1e-15)


def test_calibration_scales_unsettled_estimates_by_the_settled_ratio() -> None:
    led, _ = ledger()
    led.feed({"type": "system", "subtype": "init", "session_id": "s1"})
    led.feed(assistant("a", input_tokens=10_000))  # $0.03 at list prices
    led.feed(result(0.06))  # the CLI charged twice that (helper calls, its own prices)
    assert led.calibration.ratio == pytest.approx(2.0)
    led.feed({"type": "system", "subtype": "init", "session_id": "s2"})
    led.feed(assistant("b", input_tokens=10_000))
    assert led.cost == pytest.approx(0.06 + 2 * 0.03, rel=1e-12)
    assert led.settled == pytest.approx(0.06)
    assert led.figure(1.0).cost == pytest.approx(0.09, rel=1e-12)
    # Bounded: a wild ratio does not run away.
    led, _ = ledger()
    led.feed(assistant("a", input_tokens=10_000))
    led.feed(result(30.0))
    assert led.calibration.ratio == 3.0


def test_the_ratio_needs_evidence_before_it_departs_from_one() -> None:
    led, _ = ledger()
    led.feed(assistant("a", input_tokens=100))  # $0.0003: too little to learn from
    led.feed(result(0.003))
    assert led.calibration.ratio == 1.0


REAL_TRANSCRIPTS = sorted(
    p for folder in (STREAM, REAL, MULTI) for p in folder.glob("*.jsonl") if p.stat().st_size
)


@pytest.mark.parametrize("path", REAL_TRANSCRIPTS, ids=lambda p: p.name)
def test_the_live_figure_never_overshoots_and_only_falls_at_a_result(path: Path) -> None:
    led, _ = ledger()
    figures: list[float] = []
    previous = 0.0
    for raw in raw_lines(path):
        parsed = parse_line(raw)
        if parsed is None:
            continue
        led.feed(parsed)
        now = led.cost
        if parsed.get("type") != "result":
            assert now >= previous - 1e-12, "the figure went down without a result line"
        figures.append(now)
        previous = now
    final = led.cost
    assert max(figures, default=0.0) <= 1.10 * final + 1e-12


def test_a_helper_heavy_agent_does_not_push_another_agents_live_figure_past_the_bill(
    tmp_path: Path,
) -> None:
    # The planner settled first; 19 % of its bill is helper-model calls its messages never
    # show. Those are the planner's own: the builder's live figure must not be scaled by them.
    planner = raw_lines(STREAM / "pricehawk_v2.0.55_planner_sonnet45_3models.jsonl")
    builder = raw_lines(STREAM / "pricehawk_v2.0.55_builder_opus45_32turns.jsonl")
    (tmp_path / "planner").mkdir()
    (tmp_path / "planner" / "raw_output.jsonl").write_bytes(b"".join(planner))
    (tmp_path / "builder").mkdir()
    final = math.fsum(results_in(planner) + results_in(builder))
    previous = 0.0
    for n in range(len(builder) + 1):
        (tmp_path / "builder" / "raw_output.jsonl").write_bytes(b"".join(builder[:n]))
        now = math.fsum(c.cost for c in cost_of_path(tmp_path, PriceTable()))
        assert now <= 1.10 * final, f"line {n}: {now / final:.1%} of the bill"
        if n and b'"type":"result"' not in builder[n - 1]:
            assert now >= previous - 1e-12, f"line {n}: the figure went down"
        previous = now
    assert previous == pytest.approx(final, abs=1e-9)


def test_helper_model_calls_calibrate_only_their_own_transcript() -> None:
    planner, _ = ledger()
    planner.feed(assistant("p", input_tokens=10_000))  # $0.03 of Sonnet at list prices
    # A fifth of the bill went to a helper model that no message shows.
    planner.feed(result(0.045, {SONNET45: 0.036, HAIKU45: 0.009}))
    assert planner.calibration.ratio == pytest.approx(1.5)
    assert planner.calibration.shown_ratio == pytest.approx(1.2)
    builder, _ = ledger()
    builder.feed(assistant("b", input_tokens=10_000))
    figures = run_figures({"planner": planner, "builder": builder})
    assert figures["planner"].cost == pytest.approx(0.045)
    # Only the Sonnet price the planner's CLI charged carries over to the builder.
    assert figures["builder"].cost == pytest.approx(0.036)
    # A transcript with settled runs of its own is scaled by its own full ratio.
    planner.feed({"type": "system", "subtype": "init", "session_id": "again"})
    planner.feed(assistant("p2", input_tokens=10_000))
    figures = run_figures({"planner": planner, "builder": builder})
    assert figures["planner"].cost == pytest.approx(0.045 + 0.045)
    # ... pooled with what the others' messages' models show: a small first attempt whose
    # bill was mostly a helper's fixed cost does not set the ratio of a big retry alone.
    retried, _ = ledger()
    retried.feed(assistant("r1", input_tokens=4000))  # $0.012
    retried.feed(result(0.036, {SONNET45: 0.012, HAIKU45: 0.024}))
    retried.feed({"type": "system", "subtype": "init", "session_id": "retry"})
    retried.feed(assistant("r2", input_tokens=100_000))  # $0.30
    assert retried.calibration.ratio == pytest.approx(3.0)
    figures = run_figures({"planner": planner, "retried": retried})
    # (0.036 + 0.036) / (0.012 + 0.03) of the retry's $0.30, not three times it.
    assert figures["retried"].cost == pytest.approx(0.036 + 0.30 * 0.072 / 0.042)
    # The split survives a dump and load; a state without it counts everything as shown.
    again = TranscriptLedger.load(orjson.loads(orjson.dumps(planner.dump())), PriceTable())
    assert again.calibration == planner.calibration
    older = {**planner.dump(), "calibration": [0.045, 0.03]}
    assert TranscriptLedger.load(older, PriceTable()).calibration.shown_ratio == 1.5


def test_a_model_spelt_differently_in_model_usage_still_counts_as_shown() -> None:
    # Provider-prefixed or context-suffixed ids in modelUsage name the messages' own model.
    for spelling in ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", f"{SONNET45}[1m]"):
        led, _ = ledger()
        led.feed(assistant("m", input_tokens=10_000))
        led.feed(result(0.03, {spelling: 0.03}))
        assert led.calibration.shown_ratio == pytest.approx(1.0), spelling


# Every real transcript with a result line, except the one whose CLI charged 5/3 of the list
# price (see BENCHMARKS.md): a run mixes no CLI versions, so the pairs below never pair it.
LIST_PRICED = [
    p for p in REAL_TRANSCRIPTS if b'"type":"result"' in p.read_bytes() and "cli2144" not in p.name
]


@pytest.mark.parametrize("settled_first", LIST_PRICED, ids=lambda p: p.name)
def test_a_run_of_two_real_agents_stays_within_its_bill(settled_first: Path) -> None:
    first, _ = ledger()
    for raw in raw_lines(settled_first):
        if (parsed := parse_line(raw)) is not None:
            first.feed(parsed)
    for path in LIST_PRICED:
        if path == settled_first:
            continue
        led, _ = ledger()
        previous, peak = 0.0, 0.0
        for raw in raw_lines(path):
            if (parsed := parse_line(raw)) is None:
                continue
            led.feed(parsed)
            now = math.fsum(f.cost for f in run_figures({"a": first, "b": led}).values())
            if parsed.get("type") != "result":
                assert now >= previous - 1e-12, f"{path.name}: went down"
            previous, peak = now, max(peak, now)
        assert peak <= 1.10 * previous + 1e-12, f"{path.name}: {peak / previous:.1%}"


def test_the_multi_run_fixtures_are_all_covered() -> None:
    assert len(list(MULTI.glob("*.jsonl"))) == 4
    assert {p.name for p in MULTI.glob("*.jsonl")} <= {p.name for p in REAL_TRANSCRIPTS}


# ---------------------------------------------------------------------------
# No line can make the ledger raise


def nested(depth: int, leaf: bytes = b"1", opener: bytes = b'{"a":', closer: bytes = b"}") -> bytes:
    return opener * depth + leaf + closer * depth


DEEP = [
    # The probe's lines: usage or total_cost_usd nested ~1,000 deep (orjson parses up to 1024).
    b'{"type":"assistant","message":{"id":"m","model":"claude-sonnet-4-5","usage":{"input_tokens":'
    + nested(1000, opener=b"[", closer=b"]", leaf=b"")
    + b"}}}",
    b'{"type":"assistant","message":{"id":"m","usage":' + nested(1000) + b"}}",
    b'{"type":"result","total_cost_usd":' + nested(1000) + b"}",
    b'{"type":"result","total_cost_usd":1,"modelUsage":{"m":' + nested(1000) + b"}}",
    b'{"type":"assistant","message":{"id":"m","usage":{"input_tokens":5},"content":[{"type":'
    b'"tool_use","input":' + nested(1000) + b"}]}}",
    b'{"type":"system","subtype":"init","claude_code_version":' + nested(1000) + b"}",
    b'{"type":"assistant","session_id":' + nested(1000) + b',"message":{"usage":{}}}',
    # Deeper than orjson parses: not JSON at all.
    b'{"type":"result","total_cost_usd":' + nested(5000) + b"}",
]


@pytest.mark.parametrize("raw", DEEP, ids=range(len(DEEP)))
def test_a_deeply_nested_line_is_one_bad_line_and_the_next_one_counts(raw: bytes) -> None:
    led, warnings = ledger()
    led.feed_chunk(chunk(b'{"type":"assistant","message":{"id":"a","usage":{"input_tokens":9}}}'))
    before = led.bad_lines
    _, bad = led.feed_chunk(chunk(raw))
    assert bad <= 1
    assert led.bad_lines == before + bad
    for warning in warnings:
        assert len(warning) < 1000
    led.feed_chunk(chunk(b'{"type":"result","total_cost_usd":5.0}'))
    # An init line, however odd its version, still starts a new attempt.
    kept = 9 * 3 / 1e6 if b'"init"' in raw else 0.0
    assert led.cost == pytest.approx(5.0 + kept, abs=1e-12)
    assert led.final
    # The state still saves and loads.
    again = TranscriptLedger.load(orjson.loads(orjson.dumps(led.dump())), PriceTable())
    assert again.cost == led.cost


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "subtype",
                    "message",
                    "usage",
                    "id",
                    "model",
                    "content",
                    "text",
                    "thinking",
                    "input",
                    "input_tokens",
                    "output_tokens",
                    "cache_creation",
                    "cache_creation_input_tokens",
                    "cache_read_input_tokens",
                    "ephemeral_5m_input_tokens",
                    "server_tool_use",
                    "web_search_requests",
                    "total_cost_usd",
                    "modelUsage",
                    "costUSD",
                    "session_id",
                    "claude_code_version",
                ]
            )
            | st.text(max_size=8),
            children,
            max_size=6,
        ),
    ),
    max_leaves=40,
)
line_type = st.sampled_from(["assistant", "result", "system", "user", None])


@st.composite
def odd_lines(draw: st.DrawFn) -> dict[str, Any]:
    line = draw(st.dictionaries(st.text(max_size=8), json_value, max_size=4))
    kind = draw(line_type)
    if kind is not None:
        line["type"] = kind
    if draw(st.booleans()):
        line["subtype"] = "init"
    if draw(st.booleans()):
        line["message"] = draw(json_value)
    if draw(st.booleans()):
        line["total_cost_usd"] = draw(json_value)
    if draw(st.booleans()):
        line["session_id"] = draw(json_value)
    return line


@settings(max_examples=150, deadline=None)
@given(st.lists(odd_lines(), max_size=12), st.integers(min_value=1, max_value=1200))
def test_no_line_makes_the_ledger_raise(lines: list[dict[str, Any]], depth: int) -> None:
    led, _ = ledger(window=4)
    raw = [orjson.dumps(line) for line in lines]
    raw.append(b'{"type":"assistant","message":{"usage":' + nested(depth) + b"}}")
    raw.append(b'{"type":"result","total_cost_usd":' + nested(depth, b"[1]") + b"}")
    for one in raw:
        before = led.bad_lines
        led.feed_chunk(chunk(one))
        assert led.bad_lines - before <= 1
        assert math.isfinite(led.cost)
        assert led.cost >= 0
        assert 0 <= led.settled <= led.cost + 1e-9
    again = TranscriptLedger.load(orjson.loads(orjson.dumps(led.dump())), PriceTable())
    assert again.cost == pytest.approx(led.cost, rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------------------
# Memory: a budget shared by every ledger bounds the ids they remember


def test_a_shared_budget_bounds_the_ids_every_ledger_remembers() -> None:
    budget = WindowBudget(100, floor=8)
    ledgers = []
    for t in range(50):
        led = TranscriptLedger(PriceTable(), lambda _m: None, 1024, budget)
        for i in range(60):
            led.feed(assistant(f"t{t}m{i}", input_tokens=10))
        ledgers.append(led)
    held = sum(led.remembered for led in ledgers)
    assert held == budget.used
    assert held <= 100 + 8 * 50
    assert all(led.remembered >= 8 for led in ledgers)
    # Even with the budget spent, a message split over lines is still counted once.
    led = ledgers[-1]
    before = led.cost
    led.feed(assistant("split", input_tokens=1000))
    led.feed(assistant("split", input_tokens=1000))
    assert led.cost == pytest.approx(before + 1000 * 3 / 1e6, abs=1e-15)
    # A result line frees its attempt's ids; a ledger that is dropped gives its ids back.
    led.feed(result(1.0))
    assert led.remembered == 0
    assert budget.used == sum(other.remembered for other in ledgers)
    del ledgers[:10], led
    gc.collect()
    assert budget.used == sum(other.remembered for other in ledgers)
    # A ledger restored from its saved state counts against the budget too.
    restored = TranscriptLedger.load(ledgers[0].dump(), PriceTable(), None, budget)
    assert budget.used == sum(other.remembered for other in [*ledgers, restored])


def test_without_a_budget_the_window_alone_bounds_one_ledger() -> None:
    led, _ = ledger(window=16)
    for i in range(100):
        led.feed(assistant(f"m{i}", input_tokens=10))
    assert led.remembered == 16


def test_a_smaller_configured_window_bounds_a_restored_ledger() -> None:
    led, _ = ledger(window=64)
    for i in range(64):
        led.feed(assistant(f"m{i}", input_tokens=10))
    restored = TranscriptLedger.load(led.dump(), PriceTable(), window=16)
    assert restored.remembered == 16
    assert restored.cost == led.cost
    # The newest ids are the ones kept.
    assert not restored.feed(assistant("m63", input_tokens=10))
    assert TranscriptLedger.load(led.dump(), PriceTable()).remembered == 64


def test_a_state_saved_by_the_previous_version_still_loads() -> None:
    # What version 1 saved mid-attempt: one closed attempt, one message in the window.
    v1 = {
        "v": 1,
        "window_size": 1024,
        "attempts": 1,
        "closed_cost": 0.5,
        "closed_by_model": {SONNET45: 0.5},
        "closed_incomplete": False,
        "tokens": [10, 0, 0, 0],
        "bad_lines": 2,
        "warned": [],
        "model_keys": [SONNET45],
        "started": True,
        "result_cost": None,
        "result_by_model": {},
        "open_cost": 0.03,
        "open_by_model": {SONNET45: 0.03},
        "open_fallback": False,
        "last_model": SONNET45,
        "models": [SONNET45],
        "window": [["m1", 0, 10000, 0, 0, 0, 0, 0, 0.03]],
    }
    led = TranscriptLedger.load(v1, PriceTable())
    assert led.cost == pytest.approx(0.53)
    assert led.settled == pytest.approx(0.5)
    assert led.attempts == 2
    assert led.bad_lines == 2
    # The remembered message is still recognised.
    assert not led.feed(assistant("m1", input_tokens=10000))
    led.feed(result(0.04))
    assert led.cost == pytest.approx(0.54)


def test_a_second_init_of_the_same_session_before_its_result_is_the_same_attempt() -> None:
    # Newer CLIs write another init line in the same process (a background task's turn);
    # the process's one result line covers both parts.
    run = raw_lines(STREAM / "gleam_v2.1.7_basic_query_golden.jsonl")
    [total] = results_in(run)
    init = next(line for line in run if b'"init"' in line)
    body = [line for line in run if line is not init and b'"type":"result"' not in line]
    result_line = next(line for line in run if b'"type":"result"' in line)
    led = fed([init, *body, init, *body, result_line])
    assert led.attempts == 1
    assert led.cost == pytest.approx(total, abs=1e-12)
