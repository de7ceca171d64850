"""Tests for agent.receiver: ``adw-agent receive`` takes single events and batches."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.receiver import MAX_BATCH, Receiver


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(0, out=tmp_path / "events.jsonl", echo=io.StringIO()).start()
    yield r
    r.stop()


def event(seq: int, kind: str = "phase_update") -> dict[str, Any]:
    return {"type": kind, "event_id": f"id-{seq}", "adw_id": "abc", "seq": seq, "data": {}}


def test_a_batch_is_recorded_in_order_and_deduplicated(receiver: Receiver, tmp_path: Path) -> None:
    with httpx.Client(base_url=receiver.url) as client:
        first = client.post("/api/v1/events", json=[event(1), event(2), event(3)])
        again = client.post("/api/v1/events", json=[event(3), event(4)])
        single = client.post("/api/v1/event/phase_update", json=event(4))
    assert (first.status_code, first.json()) == (200, {"accepted": 3, "duplicates": 0})
    assert (again.status_code, again.json()) == (200, {"accepted": 1, "duplicates": 1})
    assert (single.status_code, single.json()) == (200, {"accepted": 0, "duplicates": 1})
    assert [e["seq"] for e in receiver.events] == [1, 2, 3, 4]
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3, 4]
    assert receiver.duplicates == 2


@pytest.mark.parametrize(
    "body",
    [
        [],
        [event(1), {"no": "event_id"}],
        [event(i) for i in range(MAX_BATCH + 1)],
        ["not an object"],
    ],
)
def test_a_bad_batch_is_refused_whole(receiver: Receiver, body: Any) -> None:
    with httpx.Client(base_url=receiver.url) as client:
        answer = client.post("/api/v1/events", json=body)
    assert answer.status_code == 400
    assert receiver.events == []
