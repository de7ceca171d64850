"""Exact running cost of Claude Code stream-json transcripts.

- :mod:`agent.account.prices`: the price table, model matching and ``[cost]`` overrides;
- :mod:`agent.account.ledger`: one transcript's ledger, routing its lines to the parts below;
- :mod:`agent.account.figures`: the figures a ledger reports (tokens, calibration) and bounds;
- :mod:`agent.account.intake`: reading hostile lines: usage, costs, versions, bad lines;
- :mod:`agent.account.window`: the per-message deduplication window and its shared budget;
- :mod:`agent.account.estimates`: pricing unsettled messages, calibrating a run's figures;
- :mod:`agent.account.attempts`: attempts, sessions and settlement by result lines;
- :mod:`agent.account.state`: a ledger's saved state (version 2, and reading version 1);
- :mod:`agent.account.offline`: ``adw-agent cost``, a path costed in one pass.
"""

from agent.account.attempts import RESUME_CARRIES_TOTALS
from agent.account.estimates import CHARS_PER_TOKEN, run_figures
from agent.account.figures import (
    MAX_COUNT,
    MAX_NAME,
    MAX_RESULT_USD,
    MAX_TOKEN_TOTAL,
    OTHER,
    UNATTRIBUTED,
    Calibration,
    Figure,
    Tokens,
    fold_key,
)
from agent.account.intake import relevant
from agent.account.ledger import TranscriptLedger
from agent.account.offline import TranscriptCost, cost_of_path
from agent.account.prices import WEB_SEARCH_USD, Prices, PriceTable, family_key
from agent.account.window import WindowBudget

__all__ = [
    "CHARS_PER_TOKEN",
    "MAX_COUNT",
    "MAX_NAME",
    "MAX_RESULT_USD",
    "MAX_TOKEN_TOTAL",
    "OTHER",
    "RESUME_CARRIES_TOTALS",
    "UNATTRIBUTED",
    "WEB_SEARCH_USD",
    "Calibration",
    "Figure",
    "PriceTable",
    "Prices",
    "Tokens",
    "TranscriptCost",
    "TranscriptLedger",
    "WindowBudget",
    "cost_of_path",
    "family_key",
    "fold_key",
    "relevant",
    "run_figures",
]
