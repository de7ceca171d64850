"""Shared fixtures and line builders for the account tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.account import PriceTable, TranscriptLedger
from agent.transcript import parse_line

FIXTURES = Path(__file__).parent.parent / "fixtures"
STREAM = FIXTURES / "claude_stream"
REAL = FIXTURES / "real"
MULTI = FIXTURES / "multi_run"

WITH_RESULT = [
    *sorted(STREAM.glob("pricehawk_*.jsonl")),
    *sorted(STREAM.glob("gleam_*.jsonl")),
    *sorted(REAL.glob("tac7iso_raw_output_*.jsonl")),
    REAL / "tac6_raw_output_af87dd64_pr_creator_cli2144.jsonl",
]

# total_cost_usd as stated in the PROVENANCE files, as a cross-check of the
# values the tests read from the files themselves.
PROVENANCE_TOTALS = {
    "pricehawk_v2.0.55_planner_sonnet45_3models.jsonl": 0.2171574,
    "pricehawk_v2.0.57_builder_sonnet45_13turns.jsonl": 0.15027535,
    "pricehawk_v2.0.55_builder_opus45_32turns.jsonl": 1.401269,
    "pricehawk_v2.0.55_zero_turn_zero_cost.jsonl": 0.0,
    "gleam_v2.1.7_basic_query_golden.jsonl": 0.1354875,
    "tac7iso_raw_output_55b761f6_issue_classifier.jsonl": 0.0689845,
    "tac7iso_raw_output_09dba0c0_issue_classifier_zero_cost_empty_result.jsonl": 0.0,
    "tac7iso_raw_output_55b761f6_sdlc_planner_cli2022.jsonl": 0.2192615,
    "tac6_raw_output_af87dd64_pr_creator_cli2144.jsonl": 0.11259,
}

SONNET45 = "claude-sonnet-4-5-20250929"
OPUS45 = "claude-opus-4-5-20251101"
HAIKU45 = "claude-haiku-4-5-20251001"


def lines_of(path: Path) -> list[dict[str, Any]]:
    out = []
    for raw in path.read_bytes().split(b"\n"):
        parsed = parse_line(raw)
        if parsed is not None:
            out.append(parsed)
    return out


def last_result(path: Path) -> dict[str, Any]:
    results = [line for line in lines_of(path) if line.get("type") == "result"]
    assert results, f"{path.name} has no result line"
    return results[-1]


def assistant(
    msg_id: str | None,
    model: str = SONNET45,
    *,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cache_creation: int | None = None,
    cache_5m: int | None = None,
    cache_1h: int | None = None,
    cache_read: int = 0,
    web_search: int | None = None,
) -> dict[str, Any]:
    """Build an assistant line the way Claude Code writes it."""
    usage: dict[str, Any] = {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_read_input_tokens": cache_read,
    }
    if cache_5m is not None or cache_1h is not None:
        usage["cache_creation"] = {
            "ephemeral_5m_input_tokens": cache_5m or 0,
            "ephemeral_1h_input_tokens": cache_1h or 0,
        }
        usage["cache_creation_input_tokens"] = (cache_5m or 0) + (cache_1h or 0)
    if cache_creation is not None:
        usage["cache_creation_input_tokens"] = cache_creation
    if web_search is not None:
        usage["server_tool_use"] = {"web_search_requests": web_search}
    message: dict[str, Any] = {"model": model, "usage": usage, "content": []}
    if msg_id is not None:
        message["id"] = msg_id
    return {"type": "assistant", "message": message}


def result(total: Any = None, model_usage: dict[str, float] | None = None) -> dict[str, Any]:
    line: dict[str, Any] = {"type": "result", "subtype": "success", "is_error": False}
    if total is not None:
        line["total_cost_usd"] = total
    if model_usage is not None:
        line["modelUsage"] = {m: {"costUSD": c} for m, c in model_usage.items()}
    return line


def ledger(**kwargs: Any) -> tuple[TranscriptLedger, list[str]]:
    warnings: list[str] = []
    return TranscriptLedger(PriceTable(), warnings.append, **kwargs), warnings
