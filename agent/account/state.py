"""A ledger's saved state: the version-2 format, and reading the version-1 one.

The format is a flat JSON object. Remembered messages are rows
``[id, model index, 6 counts, chars, estimate]`` with the model names listed once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.account.attempts import MAX_SESSIONS, Attempts
from agent.account.estimates import Estimator
from agent.account.figures import Calibration
from agent.account.intake import BadLines
from agent.account.window import DedupWindow, Msg

STATE_VERSION = 2


def dump(
    window: DedupWindow, book: Attempts, bad: BadLines, estimator: Estimator
) -> dict[str, Any]:
    """The JSON-able state of a ledger made of these parts."""
    models: dict[str, int] = {}
    rows = []
    for msg_id, msg in window.items():
        index = models.setdefault(msg.model, len(models))
        rows.append([msg_id, index, *msg.usage, msg.chars, msg.estimate])
    cur = book.current
    return {
        "v": STATE_VERSION,
        "window_size": window.size,
        "attempts": book.closed,
        "closed_settled": book.closed_settled,
        "closed_settled_by_model": book.closed_settled_by_model,
        "closed_raw": book.closed_raw,
        "closed_raw_by_model": book.closed_raw_by_model,
        "closed_incomplete": book.closed_incomplete,
        "calibration": [
            book.calibration.settled,
            book.calibration.estimate,
            book.calibration.shown,
        ],
        "sessions": [[s, t] for s, t in book.sessions.items()],
        "tokens": list(book.tokens),
        "bad_lines": bad.count,
        "warned": sorted(estimator.warned),
        "model_keys": sorted(book.models),
        "started": cur.started,
        "session": cur.session,
        "cli": None if cur.cli is None else list(cur.cli),
        "baseline": cur.baseline,
        "settled": cur.settled,
        "settled_by_model": cur.settled_by_model,
        "open_raw": cur.open_raw,
        "open_by_model": cur.open_by_model,
        "open_fallback": cur.open_fallback,
        "last_model": cur.last_model,
        "models": list(models),
        "window": rows,
    }


def current(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """``data`` in the version-2 shape; ``ValueError`` for an unknown version.

    What a version-1 state had closed counts as settled, and its remembered messages as
    having no content.
    """
    version = data["v"]
    if version not in (1, STATE_VERSION):
        raise ValueError(f"unsupported ledger state version {version!r}")
    if version == 1:
        return _upgrade_v1(data)
    return data


def restore(
    data: Mapping[str, Any],
    window: DedupWindow,
    book: Attempts,
    bad: BadLines,
    estimator: Estimator,
) -> None:
    """Fill a new ledger's parts from a version-2 ``data``; KeyError, TypeError, IndexError
    or ValueError if it is malformed."""
    book.closed = int(data["attempts"])
    book.closed_settled = float(data["closed_settled"])
    book.closed_settled_by_model = _float_map(data["closed_settled_by_model"])
    book.closed_raw = float(data["closed_raw"])
    book.closed_raw_by_model = _float_map(data["closed_raw_by_model"])
    book.closed_incomplete = bool(data["closed_incomplete"])
    calibration = [float(x) for x in data["calibration"]]
    if len(calibration) == 2:
        # Saved before helper-model calls were told apart: all of it counts as shown.
        calibration.append(calibration[0])
    cal_settled, cal_estimate, cal_shown = calibration
    book.calibration = Calibration(cal_settled, cal_estimate, cal_shown)
    for session, total in data["sessions"][-MAX_SESSIONS:]:
        book.sessions[str(session)] = float(total)
    tokens = [int(t) for t in data["tokens"]]
    if len(tokens) != 4:
        raise ValueError("tokens must have 4 entries")
    book.tokens = tokens
    bad.count = int(data["bad_lines"])
    estimator.warned = {str(m) for m in data["warned"]}
    for part in (
        "closed_settled_by_model",
        "closed_raw_by_model",
        "settled_by_model",
        "open_by_model",
    ):
        book.models.update(str(m) for m in data[part])
    book.models.update(str(m) for m in data.get("model_keys", ()))
    cur = book.current
    cur.started = bool(data["started"])
    session = data["session"]
    cur.session = None if session is None else str(session)
    cli = data["cli"]
    cur.cli = None if cli is None else tuple(int(p) for p in cli)
    cur.baseline = float(data["baseline"])
    settled = data["settled"]
    cur.settled = None if settled is None else float(settled)
    cur.settled_by_model = _float_map(data["settled_by_model"])
    cur.open_raw = float(data["open_raw"])
    cur.open_by_model = _float_map(data["open_by_model"])
    cur.open_fallback = bool(data["open_fallback"])
    last = data["last_model"]
    cur.last_model = None if last is None else str(last)
    models = [str(m) for m in data["models"]]
    for entry in data["window"]:
        msg_id, index, *counts, chars, estimate = entry
        if len(counts) != 6:
            raise ValueError("window entry must have 6 counts")
        i, o, m5, h1, r, w = (int(c) for c in counts)
        msg = Msg(models[index], (i, o, m5, h1, r, w), int(chars), float(estimate))
        window.remember(str(msg_id), msg)


def _float_map(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise TypeError("expected a mapping")
    return {str(k): float(v) for k, v in value.items()}


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
