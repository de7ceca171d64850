"""Tests for agent.deliver_http: what a backend's answer means, Retry-After, Location and
the excerpt of an answer that is kept."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from agent.deliver_http import (
    MAX_RETRY_AFTER,
    classify,
    clean_location,
    read_excerpt,
    reported_duplicates,
    retry_after_seconds,
)
from agent.errors import PermanentDelivery, RetryableDelivery


def response(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers, text=f"answer {status}")


def check(answer: httpx.Response) -> None:
    classify(answer, answer.text)


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_success(status: int) -> None:
    check(response(status))


@pytest.mark.parametrize("status", [401, 403, 408, 425, 429, 500, 502, 503, 504, 599])
def test_retryable_statuses(status: int) -> None:
    with pytest.raises(RetryableDelivery) as info:
        check(response(status))
    assert info.value.status == status
    assert info.value.body == f"answer {status}"


@pytest.mark.parametrize("status", [400, 404, 405, 409, 410, 413, 415, 422, 451])
def test_other_4xx_are_permanent(status: int) -> None:
    with pytest.raises(PermanentDelivery) as info:
        check(response(status))
    assert info.value.status == status
    assert not isinstance(info.value, RetryableDelivery)


def test_retryable_carries_retry_after() -> None:
    with pytest.raises(RetryableDelivery) as info:
        check(response(503, **{"Retry-After": "7"}))
    assert info.value.retry_after == 7.0


class Endless:
    """A response body that never ends by itself; counts the chunks anyone pulled from it."""

    def __init__(self, chunk: bytes = b"x" * 1000, chunks: int = 100_000) -> None:
        self.chunk = chunk
        self.chunks = chunks
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.chunks):
            self.pulled += 1
            yield self.chunk


def test_only_an_excerpt_of_the_body_is_read() -> None:
    body = Endless()  # 100 MB, if anyone read it all

    async def read() -> str:
        answer = httpx.Response(400, content=body)
        try:
            return await read_excerpt(answer)
        finally:
            await answer.aclose()

    excerpt = asyncio.run(read())
    assert excerpt == "x" * 2000
    assert body.pulled == 3  # one read past the excerpt, not the 100 000 the backend offers


def test_a_short_body_is_read_to_its_end() -> None:
    async def read() -> str:
        answer = httpx.Response(400, content=Endless(b"ab", 3))
        return await read_excerpt(answer)

    assert asyncio.run(read()) == "ababab"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1", 1.0),
        (" 2.5 ", 2.5),
        ("0", 0.0),
        ("-3", 0.0),
        ("100000", MAX_RETRY_AFTER),
        ("nan", None),
        ("", None),
        (None, None),
        ("soon", None),
    ],
)
def test_retry_after_seconds(value: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(value) == seconds


def test_retry_after_http_date() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert later.endswith("GMT")
    assert retry_after_seconds(later, now.timestamp()) == pytest.approx(30.0)
    earlier = format_datetime(now - timedelta(seconds=30), usegmt=True)
    assert retry_after_seconds(earlier, now.timestamp()) == 0.0


def test_retry_after_http_date_without_zone_is_utc(monkeypatch: pytest.MonkeyPatch) -> None:
    # "-0000" parses to a naive datetime; it must not be read in the machine's local time.
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC).timestamp()
        assert retry_after_seconds("Thu, 01 Jan 2026 12:00:10 -0000", now) == pytest.approx(10.0)
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_3xx_is_retryable_and_names_a_clean_location(status: int) -> None:
    answer = response(status, Location="https://alice:s3cret@other.example:8443/x/y?token=abc#f")
    with pytest.raises(RetryableDelivery) as info:
        check(answer)
    assert info.value.status == status
    assert "https://other.example:8443/x/y" in str(info.value)
    assert "s3cret" not in str(info.value)
    assert "token=abc" not in str(info.value)


@pytest.mark.parametrize(
    ("location", "shown"),
    [
        (None, "(no Location)"),
        ("/relative/path?q=1", "/relative/path"),
        ("http://[::1]:8000/p", "http://[::1]:8000/p"),
        ("http://[::1/broken", "(an unparsable Location)"),
        ("http://h/\x1b[31mred", "http://h/?[31mred"),
    ],
)
def test_clean_location(location: str | None, shown: str) -> None:
    assert clean_location(location) == shown


@pytest.mark.parametrize(
    ("body", "sent", "duplicates"),
    [
        ('{"accepted": 3, "duplicates": 2}', 5, 2),
        ('{"accepted": 0, "duplicates": 1, "note": "seen"}', 1, 1),
        ('{"accepted": 5, "duplicates": 0}', 5, 0),
        # Answers that do not say, or say something impossible, count nothing.
        ("", 5, 0),
        ('{"ok":true}', 1, 0),
        ("not json", 5, 0),
        ('{"accepted": 3, "duplicates": 2', 5, 0),  # cut off
        ('{"duplicates": 2}', 5, 0),
        ('{"accepted": 0, "duplicates": 6}', 5, 0),
        ('{"accepted": 4, "duplicates": 2}', 5, 0),
        ('{"accepted": 3, "duplicates": -1}', 5, 0),
        ('{"accepted": 3, "duplicates": 1.0}', 5, 0),
        ('{"accepted": 3, "duplicates": true}', 5, 0),
        ('{"accepted": 3, "duplicates": "2"}', 5, 0),
        ("[1, 2]", 5, 0),
    ],
)
def test_reported_duplicates(body: str, sent: int, duplicates: int) -> None:
    assert reported_duplicates(body, sent) == duplicates
