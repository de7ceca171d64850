"""Bodies to checked events: one line per problem, and which event of a batch."""

from __future__ import annotations

import orjson
import pytest

from adw_backend.errors import BadInput, InvalidEvent, TooLarge
from adw_backend.intake import parse_batch, parse_one
from tests.adw_backend.factory import cost_update, workflow_update


@pytest.mark.parametrize(
    ("body", "error", "line"),
    [
        (b"[1,", BadInput, "body is not JSON: "),
        (b'{"a": 1}', BadInput, "body must be a JSON array of events"),
        (b'"text"', BadInput, "body must be a JSON array of events"),
        (b'[{"type": "x"}]', InvalidEvent, "event 0: invalid envelope: type: Input should be"),
    ],
)
def test_bad_batches(body: bytes, error: type[Exception], line: str) -> None:
    with pytest.raises(error) as caught:
        parse_batch(body, 10)
    assert str(caught.value).startswith(line)
    assert "\n" not in str(caught.value)


def test_the_first_bad_event_is_named() -> None:
    good = cost_update("a1", 1, 1.0)
    bad = {**cost_update("a1", 2, 1.0), "data": {"current_cost": 1.0}}
    with pytest.raises(InvalidEvent, match=r"^event 1: data does not fit cost_update: "):
        parse_batch(orjson.dumps([good, bad]), 10)


def test_too_many_events() -> None:
    body = orjson.dumps([workflow_update("a1", seq, b="x") for seq in range(1, 4)])
    with pytest.raises(TooLarge, match="more than 2 events"):
        parse_batch(body, 2)


def test_one_event_normalised() -> None:
    envelope = {
        **workflow_update("a1", 7, branch_name="x"),
        "timestamp": "2026-11-30T12:00:00+01:00",
    }
    view, source = parse_one(orjson.dumps(envelope))
    assert source == "event"
    assert view["timestamp"] == "2026-11-30T11:00:00.000Z"
    assert view["seq"] == 7
    assert view["data"] == {"changed": ["branch_name"], "branch_name": "x"}
    with pytest.raises(InvalidEvent, match=r"^invalid envelope: Input should be an object"):
        parse_one(b"[]")
    assert parse_batch(b"[]", 10) == []


def test_numbers_json_cannot_carry_are_refused() -> None:
    """An integer over 64 bits passes the models but cannot be written back out (a 500 once);
    NaN and Infinity are not JSON and would be stored as null."""
    big = workflow_update("a1", 1, big=1)
    body = orjson.dumps(big).replace(b'"big":1', b'"big":123456789012345678901234567890')
    with pytest.raises(InvalidEvent, match=r"^data does not fit workflow_update: Integer"):
        parse_one(body)
    with pytest.raises(InvalidEvent, match=r"^event 0: data does not fit workflow_update: "):
        parse_batch(b"[" + body + b"]", 10)
    for word in (b"NaN", b"Infinity", b"-Infinity"):
        bad = orjson.dumps(big).replace(b'"big":1', b'"big":' + word)
        with pytest.raises(BadInput, match=r"^body is not JSON: "):
            parse_one(bad)
        with pytest.raises(BadInput, match=r"^body is not JSON: "):
            parse_batch(b"[" + bad + b"]", 10)
    # The words inside a string are text, not numbers.
    fine = workflow_update("a1", 2, note="NaN and Infinity")
    assert parse_one(orjson.dumps(fine))[0]["data"]["note"] == "NaN and Infinity"


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("2026-11-30T12:00:00.000Z", "2026-11-30T12:00:00.000Z"),
        ("2026-11-30 12:00:00.000Z", "2026-11-30T12:00:00.000Z"),
        ("2026-11-30T12:00:00.5+00:00", "2026-11-30T12:00:00.500Z"),
        ("2026-11-30T12:00:00", "2026-11-30T12:00:00.000Z"),
    ],
)
def test_timestamps_in_one_spelling(sent: str, kept: str) -> None:
    view, _ = parse_one(orjson.dumps({**workflow_update("a1", 1, b="x"), "timestamp": sent}))
    assert view["timestamp"] == kept


@pytest.mark.parametrize("sent", ["2026-11-30T12:00:0a.000Z", "2026-02-30T12:00:00.000Z", "x"])
def test_timestamps_that_are_not_dates(sent: str) -> None:
    with pytest.raises(InvalidEvent, match="timestamp: not ISO 8601"):
        parse_one(orjson.dumps({**workflow_update("a1", 1, b="x"), "timestamp": sent}))
