"""Tests for agent.deliver: the backoff, and the Sender on a mock transport.

The Sender runs for real against a real SQLite store; only the HTTP transport is replaced by
``httpx.MockTransport`` so each answer can be scripted. End-to-end delivery against a real
server is covered in tests/integration/test_delivery_live.py.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import httpx
import orjson
import pytest
from tenacity import Future, RetryCallState

from agent.config import Config, load
from agent.deliver import Sender, _Backoff
from agent.deliver_http import build_client
from agent.errors import RetryableDelivery
from agent.outbox import Store, StoreView
from agent.outbox_queue import dead_letter_rows
from tests.test_deliver_http import Endless

TOKEN = "t0ken-for-the-test"
ADW = "abc123"


# -- what is read of an answer -----------------------------------------------------------------


def test_a_hostile_body_is_not_read_by_the_sender(config: Config, store: Store) -> None:
    emit(store, "a")
    body = Endless()
    rec = Recorder(lambda n, e: httpx.Response(400, content=body))
    run(config, store, rec, empty(store))
    [dead] = dead_letter_rows(store.db)
    assert dead["response"] == "x" * 2000
    assert body.pulled <= 3


# -- the backoff ------------------------------------------------------------------------------


def backoff_wait(backoff: _Backoff, attempt: int, exc: Exception) -> float:
    state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.attempt_number = attempt
    outcome: Future = Future(attempt)
    outcome.set_exception(exc)
    state.outcome = outcome
    return backoff(state)


def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    backoff = _Backoff(0.2, 5.0)
    error = RetryableDelivery("backend answered 503", 503)
    for attempt, base in [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6)]:
        waits = [backoff_wait(backoff, attempt, error) for _ in range(50)]
        assert all(base <= w <= base + 0.2 for w in waits)
        assert len(set(waits)) > 1
    assert all(backoff_wait(backoff, 30, error) == 5.0 for _ in range(20))


def test_backoff_follows_retry_after() -> None:
    backoff = _Backoff(0.2, 5.0)
    hint = RetryableDelivery("backend answered 429", 429, retry_after=12.0)
    assert backoff_wait(backoff, 1, hint) == 12.0


@pytest.mark.parametrize("hint", [0.0, 0.1])
def test_retry_after_never_shortens_the_backoff(hint: float) -> None:
    # "Retry-After: 0" on every answer would otherwise retry (and record a failure) at once.
    backoff = _Backoff(0.2, 5.0)
    error = RetryableDelivery("backend answered 503", 503, retry_after=hint)
    for attempt, base in [(1, 0.2), (3, 0.8), (30, 5.0)]:
        assert all(backoff_wait(backoff, attempt, error) >= base for _ in range(20))


# -- the Sender -------------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Config:
    run_dir = tmp_path / ADW
    run_dir.mkdir()
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[adw]\ndir = "{run_dir}"\n'
        '[backend]\nurl = "http://127.0.0.1:9"\n'
        f'[storage]\ndir = "{tmp_path / "storage"}"\n'
        "[delivery]\nbackoff_initial = 0.01\nbackoff_max = 0.05\n"
    )
    # One event per request: the tests of the batch route below use batch_config.
    return load(path, {"ADW_AGENT_TOKEN": TOKEN, "ADW_AGENT_DELIVERY__BATCH_MAX": "1"})


@pytest.fixture
def batch_config(config: Config) -> Config:
    return config.model_copy(
        update={"delivery": config.delivery.model_copy(update={"batch_max": 100})}
    )


@pytest.fixture
def store(config: Config) -> Iterator[Store]:
    s = Store(config.storage.dir, ADW, "normal")
    yield s
    s.close()


def failure(reason: str) -> dict[str, Any]:
    return {"reason": reason, "error_excerpt": "", "current_phase": None}


def emit(store: Store, reason: str) -> int:
    with store.transaction() as tx:
        return tx.emit("workflow_failed", failure(reason))


Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """Scripted answers by request number; records every request with its arrival time."""

    def __init__(self, answer: Callable[[int, dict[str, Any]], httpx.Response]) -> None:
        self.answer = answer
        self.requests: list[tuple[float, httpx.Request, dict[str, Any]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        event = orjson.loads(request.content)
        self.requests.append((time.monotonic(), request, event))
        return self.answer(len(self.requests), event)


def run(config: Config, store: Store, handler: Handler, until: Callable[[], bool]) -> Sender:
    """Run a real Sender on its own event loop until ``until()`` holds."""
    return asyncio.run(run_sender(config, store, handler, until))


async def run_sender(
    config: Config, store: Store, handler: Handler, until: Callable[[], bool]
) -> Sender:
    client = build_client(config, transport=httpx.MockTransport(handler))  # no network
    sender = Sender(config, store, client)
    task = asyncio.create_task(sender.run())
    sender.wake()
    deadline = time.monotonic() + 10
    while not until():
        assert not task.done(), f"sender stopped: {task.exception()!r}"
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await client.aclose()
    return sender


def empty(store: Store) -> Callable[[], bool]:
    """Whether the outbox is empty, asked without touching what the sender may coalesce."""
    return lambda: store.queue.depth() == 0


def test_posts_each_event_with_its_headers_in_seq_order(config: Config, store: Store) -> None:
    for reason in ("a", "b", "c"):
        emit(store, reason)
    rec = Recorder(lambda n, e: httpx.Response(200))
    sender = run(config, store, rec, empty(store))
    assert [e["seq"] for _, _, e in rec.requests] == [1, 2, 3]
    for _, request, event in rec.requests:
        assert request.method == "POST"
        assert request.url == "http://127.0.0.1:9/api/v1/event/workflow_failed"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        assert request.headers["idempotency-key"] == event["event_id"]
        assert request.headers["user-agent"].startswith("adw-agent/")
    assert sender.last_error is None
    assert store.meta("last_delivery")["result"] == "ok"


def test_no_authorization_header_without_a_token(config: Config, store: Store) -> None:
    emit(store, "a")
    rec = Recorder(lambda n, e: httpx.Response(204))
    run(config.model_copy(update={"token": None}), store, rec, empty(store))
    assert "authorization" not in rec.requests[0][1].headers


def test_retries_keep_the_event_id_and_body(config: Config, store: Store) -> None:
    emit(store, "a")
    rec = Recorder(lambda n, e: httpx.Response(503 if n <= 3 else 200))
    run(config, store, rec, empty(store))
    assert len(rec.requests) == 4
    assert len({r.headers["idempotency-key"] for _, r, _ in rec.requests}) == 1
    assert len({r.content for _, r, _ in rec.requests}) == 1
    assert store.meta("last_delivery")["result"] == "ok"


def test_retry_after_is_honoured(config: Config, store: Store) -> None:
    emit(store, "a")
    answers = {1: httpx.Response(503, headers={"Retry-After": "0.3"})}
    rec = Recorder(lambda n, e: answers.get(n, httpx.Response(200)))
    run(config, store, rec, empty(store))
    (t1, _, _), (t2, _, _) = rec.requests
    assert t2 - t1 >= 0.29  # backoff alone would have waited at most 0.05 s


def test_permanent_rejection_dead_letters_and_the_next_event_flows(
    config: Config, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    emit(store, "bad")
    emit(store, "good")
    rec = Recorder(
        lambda n, e: httpx.Response(400 if e["data"]["reason"] == "bad" else 200, text="nope")
    )
    with caplog.at_level(logging.INFO, "adw_agent"):
        run(config, store, rec, empty(store))
    assert [e["data"]["reason"] for _, _, e in rec.requests] == ["bad", "good"]
    [dead] = dead_letter_rows(store.db)
    assert (dead["seq"], dead["status"], dead["response"]) == (1, 400, "nope")
    dead_logs = [r for r in caplog.records if r.getMessage().startswith("event dead-lettered")]
    assert len(dead_logs) == 1
    assert dead_logs[0].levelno == logging.ERROR
    assert store.meta("last_delivery") == {"at": ANY, "result": "ok", "seq": 2}


def test_refused_credentials_are_retried_and_warned_about_once(
    config: Config, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    emit(store, "a")
    rec = Recorder(lambda n, e: httpx.Response(401 if n <= 4 else 200))
    with caplog.at_level(logging.DEBUG, "adw_agent"):
        run(config, store, rec, empty(store))
    assert len(rec.requests) == 5
    auth = [r for r in caplog.records if "refused the credentials" in r.getMessage()]
    assert len(auth) == 1
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("garbled"),
        httpx.DecodingError("bad content-encoding"),
    ],
)
def test_request_errors_are_retried(config: Config, store: Store, error: Exception) -> None:
    emit(store, "a")
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise error
        return httpx.Response(200)

    run(config, store, handler, empty(store))
    assert len(calls) == 2
    assert store.meta("last_delivery")["result"] == "ok"


def test_failed_attempts_are_recorded_for_status(config: Config, store: Store) -> None:
    emit(store, "a")
    rec = Recorder(lambda n, e: httpx.Response(500))
    sender = run(config, store, rec, lambda: len(rec.requests) >= 3)
    head = store.queue.head()
    assert head is not None
    assert head.attempts >= 2
    assert sender.last_error == "backend answered 500"
    assert store.meta("last_delivery")["result"] == "backend answered 500"


def test_a_locked_store_does_not_stop_the_sender(config: Config, store: Store) -> None:
    emit(store, "a")
    emit(store, "b")
    store.db.execute("PRAGMA busy_timeout = 0")
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock: the ack cannot commit
    released = False

    def answer(n: int, event: dict[str, Any]) -> httpx.Response:
        nonlocal released
        if n == 2 and not released:
            other.execute("ROLLBACK")
            released = True
        return httpx.Response(200)

    rec = Recorder(answer)
    try:
        run(config, store, rec, empty(store))
    finally:
        other.close()
    ids = [e["event_id"] for _, _, e in rec.requests]
    # The first event was sent again under the same id once the store was writable.
    assert ids[0] == ids[1]
    assert [e["data"]["reason"] for _, _, e in rec.requests][-2:] == ["a", "b"]


def test_an_unexpected_error_does_not_end_the_sender(
    config: Config, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    emit(store, "a")
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise RuntimeError("a bug below the sender")
        return httpx.Response(200)

    with caplog.at_level(logging.ERROR, "adw_agent"):
        run(config, store, handler, empty(store))
    assert len(calls) == 2
    assert calls[0].headers["idempotency-key"] == calls[1].headers["idempotency-key"]
    [error] = [r for r in caplog.records if "unexpected error in the sender" in r.getMessage()]
    assert error.exc_info is not None
    assert error.__dict__["seq"] == 1


def test_an_unreadable_outbox_does_not_end_the_sender(
    config: Config, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    emit(store, "a")
    store.db.execute("ALTER TABLE outbox RENAME TO outbox_away")  # every read of it now fails
    rec = Recorder(lambda n, e: httpx.Response(200))

    def errors() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "cannot use the store" in r.getMessage()]

    healed = False

    def heal() -> bool:  # once the sender has said so, the outbox comes back
        nonlocal healed
        if not healed and errors():
            store.db.execute("ALTER TABLE outbox_away RENAME TO outbox")
            healed = True
        return healed and store.queue.depth() == 0

    with caplog.at_level(logging.ERROR, "adw_agent"):
        run(config, store, rec, heal)
    assert len(errors()) == 1
    assert [e["data"]["reason"] for _, _, e in rec.requests] == ["a"]


# -- batches ----------------------------------------------------------------------------------


class BatchRecorder:
    """Scripted answers to whole requests (a batch or one event), recorded as event lists."""

    def __init__(self, answer: Callable[[str, list[dict[str, Any]]], httpx.Response]) -> None:
        self.answer = answer
        self.requests: list[tuple[httpx.Request, list[dict[str, Any]]]] = []
        self.statuses: list[int] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        data = orjson.loads(request.content)
        events = data if isinstance(data, list) else [data]
        self.requests.append((request, events))
        answer = self.answer(request.url.path, events)
        self.statuses.append(answer.status_code)
        return answer

    def seqs(self) -> list[list[int]]:
        return [[e["seq"] for e in events] for _, events in self.requests]


def accepted(path: str, events: list[dict[str, Any]]) -> httpx.Response:
    return httpx.Response(200, json={"accepted": len(events), "duplicates": 0})


def test_queued_events_go_out_as_one_batch_in_seq_order(batch_config: Config, store: Store) -> None:
    for reason in "abcde":
        emit(store, reason)
    rec = BatchRecorder(accepted)
    run(batch_config, store, rec, empty(store))
    assert rec.seqs() == [[1, 2, 3, 4, 5]]
    [(request, events)] = rec.requests
    assert request.url == "http://127.0.0.1:9/api/v1/events"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["idempotency-key"].startswith("batch-")
    assert [e["data"]["reason"] for e in events] == list("abcde")
    assert store.meta("last_delivery") == {"at": ANY, "result": "ok", "seq": 5}


def test_batches_are_at_most_batch_max_events(batch_config: Config, store: Store) -> None:
    for reason in "abcde":
        emit(store, reason)
    small = batch_config.model_copy(
        update={"delivery": batch_config.delivery.model_copy(update={"batch_max": 2})}
    )
    rec = BatchRecorder(accepted)
    run(small, store, rec, empty(store))
    assert rec.seqs() == [[1, 2], [3, 4], [5]]


def test_a_retried_batch_is_the_same_request(batch_config: Config, store: Store) -> None:
    for reason in "abc":
        emit(store, reason)
    rec = BatchRecorder(
        lambda path, events: httpx.Response(503) if len(rec.requests) < 3 else accepted(path, [])
    )
    run(batch_config, store, rec, empty(store))
    assert rec.seqs() == [[1, 2, 3]] * 3
    assert len({r.content for r, _ in rec.requests}) == 1
    assert len({r.headers["idempotency-key"] for r, _ in rec.requests}) == 1


@pytest.mark.parametrize("status", [404, 405])
def test_no_batch_route_falls_back_to_one_event_per_request_and_remembers(
    batch_config: Config, store: Store, status: int
) -> None:
    for reason in "ab":
        emit(store, reason)

    def old_backend(path: str, events: list[dict[str, Any]]) -> httpx.Response:
        return httpx.Response(status) if path == "/api/v1/events" else httpx.Response(200)

    rec = BatchRecorder(old_backend)

    async def scenario() -> None:
        client = build_client(batch_config, transport=httpx.MockTransport(rec))
        sender = Sender(batch_config, store, client)
        task = asyncio.create_task(sender.run())
        sender.wake()
        await wait_until(lambda: store.queue.depth() == 0)
        emit(store, "c")  # queued later: still one per request, the route is not asked again
        sender.wake()
        await wait_until(lambda: store.queue.depth() == 0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()

    asyncio.run(scenario())
    paths = [r.url.path for r, _ in rec.requests]
    assert paths == ["/api/v1/events"] + ["/api/v1/event/workflow_failed"] * 3
    assert rec.seqs() == [[1, 2], [1], [2], [3]]
    assert dead_letter_rows(store.db) == []


async def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_a_rejected_batch_is_split_so_only_the_bad_event_is_dead_lettered(
    batch_config: Config, store: Store
) -> None:
    for reason in ["ok"] * 5 + ["bad"] + ["ok"] * 4:
        emit(store, reason)

    def strict(path: str, events: list[dict[str, Any]]) -> httpx.Response:
        # One transaction: a batch with one bad event is refused whole.
        if any(e["data"]["reason"] == "bad" for e in events):
            return httpx.Response(422, text="reason 'bad' is not allowed")
        return accepted(path, events)

    rec = BatchRecorder(strict)
    run(batch_config, store, rec, empty(store))
    [dead] = dead_letter_rows(store.db)
    assert (dead["seq"], dead["status"]) == (6, 422)
    delivered = [
        e["seq"]
        for (_, events), status in zip(rec.requests, rec.statuses, strict=True)
        if status == 200
        for e in events
    ]
    assert delivered == [1, 2, 3, 4, 5, 7, 8, 9, 10]  # in seq order, each once
    assert len(rec.requests) <= 2 * 4 + 1  # halving, not one request per event


# -- redirects ---------------------------------------------------------------------------------


def test_a_redirect_keeps_the_events_and_is_reported_once(
    batch_config: Config, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    emit(store, "a")
    emit(store, "b")
    location = "https://user:pw@elsewhere.example/api?sig=1"
    problems: list[str | None] = []

    def moved(path: str, events: list[dict[str, Any]]) -> httpx.Response:
        problems.append((store.meta("sender") or {}).get("problem"))
        if len(rec.requests) <= 4:
            return httpx.Response(307, headers={"Location": location})
        return accepted(path, events)

    rec = BatchRecorder(moved)
    with caplog.at_level(logging.DEBUG, "adw_agent"):
        sender = run(batch_config, store, rec, empty(store))
    assert dead_letter_rows(store.db) == []
    assert rec.seqs() == [[1, 2]] * 5
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "https://elsewhere.example/api" in errors[0].getMessage()
    assert "pw" not in errors[0].getMessage()
    assert "sig=1" not in errors[0].getMessage()
    # Reported while it lasted, cleared once the backend accepted the events.
    assert problems[-1] == "backend redirects to https://elsewhere.example/api (307)"
    assert store.meta("sender")["problem"] is None
    assert sender.problem is None


# -- the exchange as a whole, stalls, reloads ------------------------------------------------------


class Drip:
    """A response body that sends one byte every ``pause`` seconds, for ever."""

    def __init__(self, pause: float) -> None:
        self.pause = pause

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            await asyncio.sleep(self.pause)
            yield b"x"


def test_backend_timeout_bounds_the_whole_exchange(config: Config, store: Store) -> None:
    emit(store, "a")
    short = config.model_copy(
        update={"backend": config.backend.model_copy(update={"timeout": 0.3})}
    )
    started: list[float] = []

    def answer(n: int, event: dict[str, Any]) -> httpx.Response:
        started.append(time.monotonic())
        if n == 1:  # each read gets a byte well within the timeout; the whole never ends
            return httpx.Response(500, content=Drip(0.05))
        return httpx.Response(200)

    sender = run(short, store, Recorder(answer), empty(store))
    assert len(started) == 2
    assert store.meta("last_delivery")["result"] == "ok"
    assert sender.last_error is None


def test_a_stalled_sender_is_reported_and_recovers(config: Config, store: Store) -> None:
    emit(store, "a")
    release = asyncio.Event()

    async def scenario() -> Sender:
        async def hang(request: httpx.Request) -> httpx.Response:
            await release.wait()
            return httpx.Response(200)

        client = build_client(config, transport=httpx.MockTransport(hang))
        sender = Sender(config, store, client)
        task = asyncio.create_task(sender.run())
        sender.wake()
        await asyncio.sleep(0.05)
        assert not sender.check_progress()  # busy, but within its limit
        later = time.monotonic() + config.backend.timeout + 60
        assert sender.check_progress(later)
        assert sender.check_progress(later)  # still stalled; reported once
        assert store.meta("sender")["problem"] == "the sender has stopped making progress"
        release.set()
        await wait_until(lambda: store.queue.depth() == 0)
        assert not sender.check_progress()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()
        return sender

    sender = asyncio.run(scenario())
    assert sender.problem is None
    assert store.meta("sender")["problem"] is None


def moved_backend(config: Config) -> Config:
    """``config`` pointing at another backend: a reload that ends a retry's wait."""
    return config.model_copy(
        update={"backend": config.backend.model_copy(update={"url": "http://127.0.0.1:10"})}
    )


async def reload_during_a_wait(
    config: Config, store: Store, first: Handler, reloaded: Config, second: Handler
) -> None:
    """Run a real Sender against ``first`` until its first attempt failed and it waits, then
    reload it to ``reloaded`` (another client, answered by ``second``) and run it until the
    outbox is empty."""
    client = build_client(config, transport=httpx.MockTransport(first))
    sender = Sender(config, store, client)
    task = asyncio.create_task(sender.run())
    sender.wake()
    await wait_until(lambda: store.meta("last_delivery") is not None)  # now waiting
    replacement = build_client(reloaded, transport=httpx.MockTransport(second))
    await sender.replace_client(reloaded, replacement).aclose()
    await wait_until(lambda: store.queue.depth() == 0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await replacement.aclose()


def test_a_reload_to_another_backend_ends_a_retry_after_wait(
    batch_config: Config, store: Store
) -> None:
    emit(store, "a")
    old = BatchRecorder(lambda p, e: httpx.Response(503, headers={"Retry-After": "600"}))
    new = BatchRecorder(accepted)
    moved = moved_backend(batch_config)

    asyncio.run(reload_during_a_wait(batch_config, store, old, moved, new))
    assert old.seqs() == [[1]]
    assert new.seqs() == [[1]]


# -- what the backend said it already had ------------------------------------------------------


def delivery_totals(config: Config) -> tuple[int, int]:
    with StoreView(config.storage.dir, ADW) as view:
        totals = view.delivery_counts()["totals"]
    return totals["delivered"], totals["duplicates"]


def test_the_duplicates_a_batch_answer_reports_are_counted_with_the_ack(
    batch_config: Config, store: Store
) -> None:
    for reason in "abcde":
        emit(store, reason)
    held = {1, 3}  # the backend already has these (an earlier answer was lost)

    def answer(path: str, events: list[dict[str, Any]]) -> httpx.Response:
        dup = sum(e["seq"] in held for e in events)
        return httpx.Response(200, json={"accepted": len(events) - dup, "duplicates": dup})

    run(batch_config, store, BatchRecorder(answer), empty(store))
    assert delivery_totals(batch_config) == (5, 2)


def test_the_single_event_route_answers_duplicates_the_same_way(
    config: Config, store: Store
) -> None:
    for reason in "abc":
        emit(store, reason)

    def answer(n: int, event: dict[str, Any]) -> httpx.Response:
        dup = int(event["seq"] == 2)
        return httpx.Response(200, json={"accepted": 1 - dup, "duplicates": dup})

    run(config, store, Recorder(answer), empty(store))
    assert delivery_totals(config) == (3, 1)


@pytest.mark.parametrize(
    "body", [b"", b"{}", b"<html>ok</html>", b'{"accepted": 1, "duplicates": 9}', b"\xff\xfe"]
)
def test_an_answer_without_counts_still_delivers_and_counts_no_duplicates(
    batch_config: Config, store: Store, body: bytes
) -> None:
    for reason in "abc":
        emit(store, reason)
    rec = BatchRecorder(lambda path, events: httpx.Response(200, content=body))
    run(batch_config, store, rec, empty(store))
    assert rec.seqs() == [[1, 2, 3]]
    assert delivery_totals(batch_config) == (3, 0)
    assert dead_letter_rows(store.db) == []


def test_a_split_batch_counts_each_delivered_half_and_no_dead_letter(
    batch_config: Config, store: Store
) -> None:
    for reason in ["ok"] * 3 + ["bad"]:
        emit(store, reason)

    def strict(path: str, events: list[dict[str, Any]]) -> httpx.Response:
        if any(e["data"]["reason"] == "bad" for e in events):
            return httpx.Response(422, text="no")
        return httpx.Response(200, json={"accepted": 0, "duplicates": len(events)})

    run(batch_config, store, BatchRecorder(strict), empty(store))
    assert delivery_totals(batch_config) == (3, 3)
    assert len(dead_letter_rows(store.db)) == 1


def test_a_reload_to_one_event_per_request_mid_retry_still_sends_the_whole_batch(
    batch_config: Config, store: Store
) -> None:
    # The batch in flight was taken under batch_max 100: after a reload to batch_max 1 its
    # retry must still carry every event it will acknowledge, not only the first.
    for reason in ("a", "b", "c"):
        emit(store, reason)
    answers = iter([httpx.Response(503, headers={"Retry-After": "600"})])
    rec = BatchRecorder(lambda p, e: next(answers, accepted(p, e)))
    single = moved_backend(
        batch_config.model_copy(
            update={"delivery": batch_config.delivery.model_copy(update={"batch_max": 1})}
        )
    )
    asyncio.run(reload_during_a_wait(batch_config, store, rec, single, rec))
    delivered = [seq for seqs in rec.seqs()[1:] for seq in seqs]
    assert delivered == [1, 2, 3]
