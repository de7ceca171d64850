"""Incoming events: bodies read with a bound, parsed, and checked against the contract.

Everything here turns bad input into :class:`~adw_backend.errors.BadInput` (400),
:class:`~adw_backend.errors.TooLarge` (413) or :class:`~adw_backend.errors.InvalidEvent` (422)
with one line saying what is wrong and, in a batch, which event. Nothing is stored until the
whole request has passed.
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from fastapi import Request
from pydantic import TypeAdapter, ValidationError
from pydantic_core import ErrorDetails
from starlette.requests import ClientDisconnect

from adw_backend.errors import BackendError, BadInput, InvalidEvent, TooLarge
from adw_backend.projection import EventView
from agent.events import Event, check_data

MAX_ID = 200
MAX_TIMESTAMP = 64
MAX_INT = 2**63 - 1  # a 64-bit signed column, in SQLite and PostgreSQL alike


def _reason(error: ErrorDetails) -> str:
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


#: The whole batch is parsed and its envelopes validated in one pass (pydantic-core's own JSON
#: parser): a third of the time of decoding first and validating each envelope after.
_BATCH: TypeAdapter[list[Event]] = TypeAdapter(list[Event])


def _envelope_error(exc: ValidationError, batch: bool) -> BackendError:
    """One line for the first problem: not JSON, not the right shape, or which event."""
    error = exc.errors()[0]
    if error["type"] == "json_invalid":
        return BadInput(f"body is not JSON: {error['msg']}")
    if batch and not error["loc"]:
        return BadInput("body must be a JSON array of events")
    where = ""
    if batch:
        index, *rest = error["loc"]
        where = f"event {index}: "
        error = {**error, "loc": tuple(rest)}
    return InvalidEvent(f"{where}invalid envelope: {_reason(error)}")


def _strict_json(body: bytes) -> None:
    """pydantic's JSON parser takes ``NaN`` and ``Infinity``, which are not JSON and would be
    stored as null: such a body is refused. Only a body that spells one of them (in a string,
    usually) pays for the second, strict parse."""
    if b"NaN" in body or b"Infinity" in body:
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadInput(f"body is not JSON: {str(exc).splitlines()[0]}") from None


def parse_one(body: bytes) -> tuple[EventView, str]:
    """The event in ``body``, checked, or a :class:`BadInput` with one line."""
    try:
        event = Event.model_validate_json(body)
    except ValidationError as exc:
        raise _envelope_error(exc, batch=False) from None
    _strict_json(body)
    return check_event(event)


def parse_batch(body: bytes, limit: int) -> list[tuple[EventView, str]]:
    """The events of a batch body, checked; the first bad one rejects the batch."""
    try:
        events = _BATCH.validate_json(body)
    except ValidationError as exc:
        raise _envelope_error(exc, batch=True) from None
    _strict_json(body)
    if len(events) > limit:
        raise TooLarge(f"more than {limit} events in one batch")
    return [check_event(event, f"event {i}: ") for i, event in enumerate(events)]


def check_event(event: Event, where: str = "") -> tuple[EventView, str]:
    """What the envelope model cannot say: bounds, one timestamp spelling, and ``data``
    against its type's model."""
    for name, value, bound in (
        ("event_id", event.event_id, MAX_ID),
        ("adw_id", event.adw_id, MAX_ID),
        ("timestamp", event.timestamp, MAX_TIMESTAMP),
    ):
        if not value or len(value) > bound or "\x00" in value:
            raise InvalidEvent(
                f"{where}invalid envelope: {name}: empty, over {bound} characters or with NUL"
            )
    for name, number in (("seq", event.seq), ("epoch", event.epoch)):
        if number > MAX_INT:
            raise InvalidEvent(f"{where}invalid envelope: {name}: over {MAX_INT}")
    # One spelling (UTC, milliseconds, Z), so that timestamps compare as strings everywhere.
    try:
        timestamp = _utc_millis(event.timestamp)
    except (ValueError, OverflowError):
        raise InvalidEvent(f"{where}invalid envelope: timestamp: not ISO 8601") from None
    try:
        data = check_data(event.type, event.data)
    except ValidationError as exc:
        reason = _reason(exc.errors()[0])
        raise InvalidEvent(f"{where}data does not fit {event.type}: {reason}") from None
    try:
        # What the store and the WebSocket messages will have to write: JSON parsers take
        # integers of any size, orjson (and PostgreSQL's bigint-minded clients) do not.
        data_json = orjson.dumps(data).decode()
    except orjson.JSONEncodeError as exc:
        raise InvalidEvent(f"{where}data does not fit {event.type}: {exc}") from None
    view: EventView = {
        "type": event.type,
        "event_id": event.event_id,
        "adw_id": event.adw_id,
        "epoch": event.epoch,
        "seq": event.seq,
        "timestamp": timestamp,
        "data": data,
        "data_json": data_json,
    }
    return view, event.source


#: Where the separators of ``2026-11-30T12:00:00.000Z`` are.
_SEPARATORS = ((4, "-"), (7, "-"), (10, "T"), (13, ":"), (16, ":"), (19, "."), (23, "Z"))


def _utc_millis(text: str) -> str:
    """``text`` in the one spelling; ValueError or OverflowError if it is not ISO 8601.

    The agent already sends that spelling: it is only checked (a real date, digits where they
    belong), not rebuilt, which is most of the time an event's envelope takes here.
    """
    moment = datetime.fromisoformat(text)
    if len(text) == 24 and all(text[i] == c for i, c in _SEPARATORS):
        return text
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is known to be over ``limit`` (before parsing)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise TooLarge(f"body over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"body over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # Nobody will read the answer; it only keeps the disconnect out of the error log.
        raise BadInput("the client left before the body was sent") from None
    return b"".join(chunks)
