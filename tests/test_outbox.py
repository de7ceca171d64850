"""Tests for agent.outbox: seq, coalescing, dead letters and transactions of the SQLite store."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError, StorageError
from agent.events import COALESCIBLE
from agent.layout import PHASES, STATE, FileKey
from agent.outbox import (
    DB_NAME,
    LOCK_NAME,
    DeliveryCounts,
    Store,
    StoreView,
    lock_storage,
)
from agent.outbox_queue import Queued, dead_letter_rows, outbox_stats
from agent.outbox_schema import read_meta

ADW = "55b761f6"

RAW = FileKey.transcript("raw")


def workflow(changed: list[str], **state: Any) -> dict[str, Any]:
    return {**state, "changed": changed}


def cost(delta: float, total: float = 1.0) -> dict[str, Any]:
    return {
        "current_cost": total,
        "cost_delta": delta,
        "final": False,
        "current_phase": "build",
        "estimate_complete": True,
        "breakdown": {"by_agent": {}, "by_model": {}, "by_phase": {}},
        "tokens": {"input": 1, "output": 2, "cache_creation": 3, "cache_read": 4},
    }


def phase(current: str | None, completed: list[str]) -> dict[str, Any]:
    return {
        "current_phase": current,
        "status": "running" if current else "completed",
        "completed_phases": completed,
    }


def failed(reason: str) -> dict[str, Any]:
    return {"reason": reason, "error_excerpt": "boom", "current_phase": None}


def status(state: str = "running") -> dict[str, Any]:
    return {
        "state": state,
        "version": "0",
        "adw_id": ADW,
        "outbox_depth": 0,
        "oldest_undelivered_age": None,
        "last_delivery_error": None,
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path, ADW, "normal")
    yield s
    s.close()


def emit(store: Store, event_type: str, data: dict[str, Any], source: str = "event") -> int:
    with store.transaction() as tx:
        return tx.emit(event_type, data, source)  # type: ignore[arg-type]


def queued(store: Store) -> list[dict[str, Any]]:
    rows = store.db.execute("SELECT body FROM outbox ORDER BY seq").fetchall()
    return [orjson.loads(r[0]) for r in rows]


def counts(directory: Path, adw_id: str = ADW) -> DeliveryCounts:
    """What an auditor reads, through the read-only view."""
    with StoreView(directory, adw_id) as view:
        return view.delivery_counts()


def drain(store: Store) -> list[Queued]:
    out = []
    while (event := store.queue.head()) is not None:
        store.queue.ack(event.seq)
        out.append(event)
    return out


# -- the envelope and seq ---------------------------------------------------------------------


def test_emit_builds_the_envelope(store: Store) -> None:
    seq = emit(store, "workflow_update", workflow(["adw_id"], adw_id=ADW), "sync")
    [event] = queued(store)
    assert event["seq"] == seq == 1
    assert event["type"] == "workflow_update"
    assert event["adw_id"] == ADW
    assert event["source"] == "sync"
    assert event["timestamp"].endswith("Z")
    assert len(event["event_id"]) == 36
    assert event["data"] == {"adw_id": ADW, "changed": ["adw_id"]}


def test_emit_validates_data(store: Store) -> None:
    with pytest.raises(ValueError, match="status"):
        emit(store, "phase_update", {**phase("x", []), "status": "paused"})
    assert queued(store) == []


def test_seq_is_monotonic_across_reopen_even_when_the_outbox_is_empty(tmp_path: Path) -> None:
    store = Store(tmp_path, ADW, "full")
    seqs = [emit(store, "workflow_failed", failed(str(i))) for i in range(3)]
    drain(store)
    store.close()
    store = Store(tmp_path, ADW, "full")
    seqs.append(emit(store, "workflow_failed", failed("after")))
    store.close()
    assert seqs == [1, 2, 3, 4]


def test_seq_counter_is_readable_by_status_tools(store: Store) -> None:
    emit(store, "workflow_failed", failed("x"))
    assert read_meta(store.db, "seq") == 1
    assert store.meta("seq") == 1


def test_a_store_belongs_to_one_adw(tmp_path: Path) -> None:
    Store(tmp_path, ADW, "normal").close()
    # A configuration mistake (exit 78), not a storage failure: it names the key.
    with pytest.raises(
        ConfigError, match=f"storage.dir: {tmp_path} holds the state of ADW '55b761f6', not 'other'"
    ):
        Store(tmp_path, "other", "normal")


def test_one_agent_at_a_time_holds_the_storage_dir(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    fd = lock_storage(storage)
    try:
        with pytest.raises(ConfigError) as info:
            lock_storage(storage)
        assert str(info.value).startswith(f"storage.dir: {storage} is in use by another")
        assert str(storage / LOCK_NAME) in str(info.value)
    finally:
        os.close(fd)
    os.close(lock_storage(storage))  # released with its descriptor (or its process)


def test_unwritable_location_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="cannot open the store"):
        Store(tmp_path / "file" / "db", ADW, "normal")


# -- coalescing -------------------------------------------------------------------------------


def test_unsent_workflow_updates_coalesce_with_the_union_of_changed(store: Store) -> None:
    emit(store, "workflow_update", workflow(["branch_name", "status"], status="a"))
    emit(store, "workflow_update", workflow(["plan_file", "status"], status="b"))
    [event] = queued(store)
    assert event["seq"] == 2
    assert event["data"]["status"] == "b"
    assert event["data"]["changed"] == ["branch_name", "status", "plan_file"]


def test_unsent_cost_updates_sum_their_deltas(store: Store) -> None:
    emit(store, "cost_update", cost(0.25, total=0.25))
    emit(store, "cost_update", cost(0.5, total=0.75))
    emit(store, "cost_update", cost(-0.125, total=0.625))
    [event] = queued(store)
    assert event["data"]["cost_delta"] == pytest.approx(0.625)
    assert event["data"]["current_cost"] == 0.625


def test_agent_status_coalesces_to_the_latest(store: Store) -> None:
    emit(store, "agent_status", status("starting"))
    emit(store, "agent_status", status("running"))
    assert [e["data"]["state"] for e in queued(store)] == ["running"]


def test_failures_and_phase_updates_never_coalesce(store: Store) -> None:
    emit(store, "workflow_failed", failed("a"))
    emit(store, "workflow_failed", failed("b"))
    emit(store, "phase_update", phase("build", ["plan"]))
    emit(store, "phase_update", phase("test", ["plan", "build"]))
    assert [e["seq"] for e in queued(store)] == [1, 2, 3, 4]
    assert COALESCIBLE.isdisjoint({"workflow_failed", "phase_update"})


def test_coalescing_only_merges_the_same_type(store: Store) -> None:
    emit(store, "workflow_update", workflow(["a"]))
    emit(store, "agent_status", status())
    emit(store, "workflow_update", workflow(["b"]))
    assert [(e["seq"], e["type"]) for e in queued(store)] == [
        (2, "agent_status"),
        (3, "workflow_update"),
    ]


def test_an_event_the_sender_picked_up_is_never_altered(store: Store) -> None:
    emit(store, "workflow_update", workflow(["a"], status="one"))
    head = store.queue.head()
    assert head is not None
    assert store.queue.sent_floor == 1
    emit(store, "workflow_update", workflow(["b"], status="two"))
    emit(store, "workflow_update", workflow(["c"], status="three"))
    events = queued(store)
    assert [(e["seq"], e["data"]["changed"]) for e in events] == [(1, ["a"]), (3, ["b", "c"])]
    assert events[0]["event_id"] == head.event_id
    assert orjson.loads(head.body) == events[0]


def test_nothing_queued_before_a_reopen_is_coalesced(tmp_path: Path) -> None:
    store = Store(tmp_path, ADW, "normal")
    emit(store, "workflow_update", workflow(["a"]))
    emit(store, "cost_update", cost(1.0))
    before = queued(store)
    store.close()
    # The backend may already hold these under their ids: a restarted agent leaves them alone.
    store = Store(tmp_path, ADW, "normal")
    assert store.queue.sent_floor == 2
    emit(store, "workflow_update", workflow(["b"]))
    emit(store, "cost_update", cost(2.0))
    emit(store, "cost_update", cost(4.0))
    after = queued(store)
    store.close()
    assert after[:2] == before
    assert [(e["seq"], e["type"]) for e in after[2:]] == [
        (3, "workflow_update"),
        (5, "cost_update"),
    ]
    assert after[3]["data"]["cost_delta"] == 6.0


def test_each_coalesced_seq_is_counted_as_superseded(store: Store, tmp_path: Path) -> None:
    emit(store, "cost_update", cost(0.25))
    emit(store, "cost_update", cost(0.5))
    emit(store, "workflow_failed", failed("a"))
    emit(store, "cost_update", cost(1.0))
    emit(store, "workflow_update", workflow(["a"]))
    emit(store, "workflow_update", workflow(["b"]))
    assert [e["seq"] for e in queued(store)] == [3, 4, 6]
    [stream] = counts(tmp_path)["streams"].values()
    assert (stream["seq"], stream["superseded"], stream["queued"]) == (6, 3, 3)
    assert stream["expected"] == 3
    assert stream["epoch"] == store.epoch()


def test_a_coalescing_that_rolls_back_counts_nothing(store: Store, tmp_path: Path) -> None:
    emit(store, "cost_update", cost(0.25))

    def failing_batch() -> None:
        with store.transaction() as tx:
            tx.emit("cost_update", cost(0.5))
            raise RuntimeError("the batch failed")

    with pytest.raises(RuntimeError):
        failing_batch()
    assert len(queued(store)) == 1
    stream = counts(tmp_path)["streams"][ADW]
    assert (stream["seq"], stream["superseded"], stream["expected"]) == (1, 0, 1)


def test_an_event_of_a_replaced_stream_coalesced_is_not_counted_in_the_new_one(
    store: Store, tmp_path: Path
) -> None:
    emit(store, "cost_update", cost(0.25))
    old_epoch = store.epoch()
    assert old_epoch is not None
    store.stream_replaced(ADW, old_epoch + 10, old_epoch)
    emit(store, "cost_update", cost(0.5))
    [event] = queued(store)
    assert (event["seq"], event["epoch"]) == (1, store.epoch())
    assert counts(tmp_path)["streams"][ADW]["superseded"] == 0


def test_a_host_store_counts_superseded_seqs_per_adw(tmp_path: Path) -> None:
    store = Store(tmp_path, None, "normal")
    try:
        for adw in ("aaaaaaaa", "bbbbbbbb", "aaaaaaaa", "aaaaaaaa"):
            with store.transaction(adw) as tx:
                tx.emit("workflow_update", workflow([adw]))
    finally:
        store.close()
    streams = counts(tmp_path, "*")["streams"]
    assert {a: (s["seq"], s["superseded"], s["queued"]) for a, s in streams.items()} == {
        "aaaaaaaa": (3, 2, 1),
        "bbbbbbbb": (1, 0, 1),
    }


# -- delivery bookkeeping ---------------------------------------------------------------------


def test_acks_add_up_delivered_and_duplicates(store: Store, tmp_path: Path) -> None:
    for reason in "abcde":
        emit(store, "workflow_failed", failed(reason))
    assert counts(tmp_path)["totals"] == {"delivered": 0, "duplicates": 0, "since": None}
    store.queue.ack(1)
    store.queue.ack(2, duplicates=1)
    store.queue.ack_many([3, 4], duplicates=1)
    # An ack of events no longer queued (acknowledged already) counts nothing more, and a
    # backend cannot report more duplicates than events left the outbox.
    store.queue.ack_many([3, 4, 5], duplicates=7)
    totals = counts(tmp_path)["totals"]
    assert (totals["delivered"], totals["duplicates"]) == (5, 3)
    assert store.meta("delivered") == 5


def test_dead_letters_are_counted_per_stream_until_requeued(store: Store, tmp_path: Path) -> None:
    emit(store, "workflow_failed", failed("a"))
    emit(store, "workflow_failed", failed("b"))
    first = store.queue.head()
    assert first is not None
    store.queue.dead_letter(first, 400, "{}")
    store.queue.ack(2)
    stream = counts(tmp_path)["streams"][ADW]
    assert (stream["dead_letters"], stream["queued"], stream["expected"]) == (1, 0, 1)
    store.queue.requeue()
    stream = counts(tmp_path)["streams"][ADW]
    assert (stream["dead_letters"], stream["queued"], stream["expected"]) == (0, 1, 2)


def test_head_and_ack_go_in_seq_order(store: Store) -> None:
    emit(store, "workflow_failed", failed("a"))
    emit(store, "phase_update", phase("b", []))
    delivered = drain(store)
    assert [e.seq for e in delivered] == [1, 2]
    assert store.queue.head() is None
    assert store.meta("last_delivery")["result"] == "ok"


def test_a_batch_is_the_oldest_events_in_seq_order_and_never_altered(store: Store) -> None:
    emit(store, "workflow_failed", failed("a"))
    emit(store, "workflow_update", workflow(["a"], status="one"))
    emit(store, "phase_update", phase("b", []))
    batch = store.queue.head_batch(2)
    assert [e.seq for e in batch] == [1, 2]
    assert store.queue.sent_floor == 2
    # The workflow_update in the batch may be on its way: a newer one does not replace it.
    emit(store, "workflow_update", workflow(["b"], status="two"))
    assert [e["seq"] for e in queued(store)] == [1, 2, 3, 4]
    store.queue.ack_many([e.seq for e in batch])
    assert [e.seq for e in store.queue.head_batch(100)] == [3, 4]
    assert store.meta("last_delivery") == {"at": ANY, "result": "ok", "seq": 2}
    store.queue.ack_many([])
    assert store.queue.depth() == 2


def test_a_batch_stops_before_max_bytes_but_always_holds_the_oldest(store: Store) -> None:
    for reason in ("a" * 5000, "b", "c" * 5000, "d"):
        emit(store, "workflow_failed", failed(reason))
    sizes = [len(e.body) for e in store.queue.head_batch(10)]
    assert [e.seq for e in store.queue.head_batch(10, max_bytes=sizes[0] - 1)] == [1]
    assert [e.seq for e in store.queue.head_batch(10, max_bytes=sizes[0] + sizes[1])] == [1, 2]
    assert [e.seq for e in store.queue.head_batch(10, max_bytes=sum(sizes))] == [1, 2, 3, 4]
    assert [e.seq for e in store.queue.head_batch(3, max_bytes=sum(sizes))] == [1, 2, 3]


def test_record_failure_keeps_the_event(store: Store) -> None:
    emit(store, "workflow_failed", failed("a"))
    store.queue.record_failure(1, "backend answered 503")
    store.queue.record_failure(1, "backend answered 503")
    head = store.queue.head()
    assert head is not None
    assert head.attempts == 2
    assert store.meta("last_delivery")["result"] == "backend answered 503"


def test_dead_letter_and_requeue_keep_id_and_seq(store: Store) -> None:
    emit(store, "workflow_failed", failed("a"))
    emit(store, "workflow_failed", failed("b"))
    first = store.queue.head()
    assert first is not None
    store.queue.dead_letter(first, 400, '{"detail": "bad"}')
    assert [e["seq"] for e in queued(store)] == [2]
    [row] = dead_letter_rows(store.db)
    assert (row["seq"], row["event_id"], row["status"]) == (1, first.event_id, 400)
    assert row["response"] == '{"detail": "bad"}'
    assert store.queue.stats()["dead_letters"] == 1

    assert store.queue.requeue() == 1
    again = store.queue.head()
    assert again is not None
    assert (again.seq, again.event_id, again.body) == (first.seq, first.event_id, first.body)
    assert dead_letter_rows(store.db) == []
    assert store.queue.requeue(99) == 0


def test_a_requeue_conflict_fails_loudly_and_keeps_the_dead_letter(store: Store) -> None:
    emit(store, "workflow_failed", failed("a"))
    first = store.queue.head()
    assert first is not None
    store.queue.dead_letter(first, 400, "no")
    # The same event queued again meanwhile (an older copy of the store restored, say).
    store.db.execute(
        "INSERT INTO outbox (seq, event_id, type, created, body) VALUES (?, ?, ?, ?, ?)",
        (first.seq, first.event_id, first.type, first.created, first.body),
    )
    with pytest.raises(StorageError, match=r"dead letter seq 1 .* is already in the outbox"):
        store.queue.requeue()
    assert [r["seq"] for r in dead_letter_rows(store.db)] == [1]
    assert [e["seq"] for e in queued(store)] == [1]


def test_requeue_one_by_seq(store: Store) -> None:
    for reason in "abc":
        emit(store, "workflow_failed", failed(reason))
    for _ in range(3):
        head = store.queue.head()
        assert head is not None
        store.queue.dead_letter(head, 422, "")
    assert store.queue.requeue(2) == 1
    assert [e["seq"] for e in queued(store)] == [2]
    assert [r["seq"] for r in dead_letter_rows(store.db)] == [1, 3]


def test_stats(store: Store) -> None:
    assert store.queue.stats() == {
        "outbox_depth": 0,
        "outbox_by_type": {},
        "oldest_undelivered_age": None,
        "dead_letters": 0,
    }
    emit(store, "workflow_failed", failed("a"))
    emit(store, "agent_status", status())
    stats = outbox_stats(store.db)
    assert stats["outbox_depth"] == 2
    assert stats["outbox_by_type"] == {"workflow_failed": 1, "agent_status": 1}
    assert stats["oldest_undelivered_age"] >= 0


# -- transactions -----------------------------------------------------------------------------


def test_an_exception_rolls_everything_back(store: Store) -> None:
    emit(store, "workflow_update", workflow(["a"]))

    def batch() -> None:
        with store.transaction() as tx:
            tx.put_json(STATE, {"a": 1})
            tx.emit("workflow_update", workflow(["b"]))  # would coalesce seq 1 away
            tx.emit("workflow_failed", failed("x"))
            raise RuntimeError("reader blew up")

    with pytest.raises(RuntimeError):
        batch()
    assert [(e["seq"], e["data"]["changed"]) for e in queued(store)] == [(1, ["a"])]
    with store.transaction() as tx:
        assert tx.get(STATE) is None
        assert tx.emit("workflow_failed", failed("y")) == 2  # seq was not consumed


def test_sqlite_errors_become_storage_errors(store: Store) -> None:
    with pytest.raises(StorageError, match="storage write failed"), store.transaction() as tx:
        tx._db.execute("INSERT INTO nowhere VALUES (1)")
    assert queued(store) == []


def test_an_unreadable_outbox_is_a_storage_error(store: Store) -> None:
    store.db.execute("DROP TABLE outbox")
    with pytest.raises(StorageError, match="cannot read the outbox"):
        store.queue.head()
    with pytest.raises(StorageError, match="cannot read the outbox"):
        store.queue.depth()


def test_meta_written_in_a_transaction_commits_or_rolls_back_with_it(store: Store) -> None:
    with store.transaction() as tx:
        tx.emit("workflow_failed", failed("a"))
        tx.set_meta("heartbeat", {"state": "running"})
    assert store.meta("heartbeat") == {"state": "running"}

    def failing_batch() -> None:
        with store.transaction() as tx:
            tx.set_meta("heartbeat", {"state": "stopping"})
            raise RuntimeError("the batch fails after the meta write")

    with pytest.raises(RuntimeError):
        failing_batch()
    assert store.meta("heartbeat") == {"state": "running"}


def test_depth_changes_nothing(store: Store) -> None:
    emit(store, "agent_status", status("starting"))
    assert store.queue.depth() == 1
    emit(store, "agent_status", status("running"))  # still unsent: coalesced
    assert store.queue.depth() == 1
    assert store.queue.head() is not None
    emit(store, "agent_status", status("running"))  # picked up by the sender: kept
    assert store.queue.depth() == 2


def test_file_state_round_trips(store: Store) -> None:
    with store.transaction() as tx:
        tx.put_json(PHASES, {"completed": ["plan"]})
        tx.put(RAW, b"\x00\x01")
    with store.transaction() as tx:
        assert tx.get_json(PHASES) == {"completed": ["plan"]}
        assert tx.get(RAW) == b"\x00\x01"
        tx.delete(RAW)
        assert tx.get(RAW) is None
        assert tx.get_json(FileKey.transcript("absent")) is None


def test_inspect_is_read_only(tmp_path: Path, store: Store) -> None:
    emit(store, "workflow_failed", failed("a"))
    db = Store.inspect(tmp_path)
    try:
        assert outbox_stats(db)["outbox_depth"] == 1
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            db.execute("DELETE FROM outbox")
    finally:
        db.close()
    with pytest.raises(StorageError, match="has not run yet"):
        Store.inspect(tmp_path / "elsewhere")


# -- the property: ordering and exactly-once under any interleaving ---------------------------

KINDS = ["workflow_update", "cost_update", "agent_status", "workflow_failed", "phase_update"]
DATA = {
    "workflow_update": lambda i: workflow([f"k{i}"], n=i),
    "cost_update": lambda i: cost(1.0, total=float(i)),
    "agent_status": lambda i: status(),
    "workflow_failed": lambda i: failed(str(i)),
    "phase_update": lambda i: phase(f"p{i}", []),
}

ACTIONS: list[tuple[str, str | None]] = [("emit", k) for k in KINDS] + [
    ("head", None),
    ("ack", None),
    ("fail", None),
    ("reopen", None),
]


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(steps=st.lists(st.sampled_from(ACTIONS), min_size=1, max_size=50))
def test_any_interleaving_delivers_in_order_and_facts_exactly_once(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, str | None]]
) -> None:
    directory = tmp_path_factory.mktemp("prop")
    store = Store(directory, ADW, "normal")
    delivered: list[dict[str, Any]] = []
    facts: list[str] = []  # reasons/phases of every non-coalescible event emitted
    last_of_type: dict[str, int] = {}
    in_flight: Queued | None = None
    try:
        for i, (action, kind) in enumerate(steps):
            if action == "emit":
                assert kind is not None
                data = DATA[kind](i)
                emit(store, kind, data)
                last_of_type[kind] = i
                if kind not in COALESCIBLE:
                    facts.append(f"{kind}:{i}")
            elif action == "head":
                in_flight = store.queue.head()
            elif action == "ack" and in_flight is not None:
                store.queue.ack(in_flight.seq)
                delivered.append(orjson.loads(in_flight.body))
                in_flight = None
            elif action == "fail" and in_flight is not None:
                store.queue.record_failure(in_flight.seq, "503")
            elif action == "reopen":
                store.close()
                store = Store(directory, ADW, "normal")
                in_flight = None  # a crash: the event in flight is sent again from the outbox
        while (event := store.queue.head()) is not None:
            store.queue.ack(event.seq)
            delivered.append(orjson.loads(event.body))
    finally:
        store.close()

    seqs = [e["seq"] for e in delivered]
    assert seqs == sorted(set(seqs)), "delivered seqs must strictly increase"
    got_facts = [
        f"{e['type']}:{e['data'].get('reason') or e['data']['current_phase'][1:]}"
        for e in delivered
        if e["type"] not in COALESCIBLE
    ]
    assert got_facts == facts, "every failure and phase change is delivered once, in order"
    # Coalescing may drop intermediate snapshots, never the latest one of each type.
    for kind, i in last_of_type.items():
        if kind == "workflow_update":
            assert delivered_last(delivered, kind)["data"]["n"] == i
        elif kind == "cost_update":
            assert delivered_last(delivered, kind)["data"]["current_cost"] == float(i)
    # The auditor's equation: every seq given was delivered or superseded, and each delivered
    # event was acknowledged once.
    audit = counts(directory)
    assert audit["totals"]["delivered"] == len(delivered)
    assert audit["totals"]["since"] is None
    if delivered:
        stream = audit["streams"][ADW]
        assert stream["queued"] == stream["dead_letters"] == stream["counted_from"] == 0
        assert stream["seq"] == max(seqs)
        assert stream["expected"] == stream["seq"] - stream["superseded"] == len(delivered)
    emitted_cost = sum(1.0 for k, _ in steps if k == "emit" and _ == "cost_update")
    total_delta = sum(e["data"]["cost_delta"] for e in delivered if e["type"] == "cost_update")
    assert total_delta == emitted_cost, "coalesced cost deltas still add up"


def delivered_last(delivered: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return [e for e in delivered if e["type"] == kind][-1]


# -- streams: one per ADW, each with its own seq and epoch -------------------------------------


def test_every_event_names_its_stream_by_an_epoch_fixed_at_its_creation(tmp_path: Path) -> None:
    before = time.time_ns() // 1_000_000
    store = Store(tmp_path, ADW, "normal")
    emit(store, "workflow_failed", failed("a"))
    emit(store, "workflow_failed", failed("b"))
    store.close()
    store = Store(tmp_path, ADW, "normal")
    emit(store, "workflow_failed", failed("c"))
    epochs = {e["epoch"] for e in queued(store)}
    assert len(epochs) == 1
    [epoch] = epochs
    assert epoch >= before
    assert store.epoch() == epoch
    store.close()


def test_a_replaced_store_starts_a_larger_epoch(tmp_path: Path) -> None:
    first = Store(tmp_path / "a", ADW, "normal")
    emit(first, "workflow_failed", failed("a"))
    [old] = queued(first)
    first.close()
    # The store is lost: a new one starts the stream again at seq 1, under a larger epoch.
    second = Store(tmp_path / "b", ADW, "normal")
    emit(second, "workflow_failed", failed("a"))
    [new] = queued(second)
    second.close()
    assert new["seq"] == old["seq"] == 1
    assert new["epoch"] >= old["epoch"]  # milliseconds: equal only within the same one
    assert (new["epoch"], new["seq"]) >= (old["epoch"], old["seq"])


def test_a_host_store_keeps_one_stream_and_one_set_of_records_per_adw(tmp_path: Path) -> None:
    store = Store(tmp_path, None, "normal")
    try:
        for adw in ("aaaaaaaa", "adw-bbbbbbbb", "aaaaaaaa"):
            with store.transaction(adw) as tx:
                tx.emit("workflow_failed", failed(adw))
                tx.put_json(STATE, {"adw": adw})
        with store.transaction("aaaaaaaa") as tx:
            tx.emit("workflow_update", workflow(["a"]))
        with store.transaction("adw-bbbbbbbb") as tx:
            # Coalescing never reaches into another ADW's stream.
            tx.emit("workflow_update", workflow(["b"]))
            assert tx.get_json(STATE) == {"adw": "adw-bbbbbbbb"}
        events = queued(store)
        by_adw = [(e["adw_id"], e["seq"], e["type"]) for e in events]
        assert by_adw == [
            ("aaaaaaaa", 1, "workflow_failed"),
            ("adw-bbbbbbbb", 1, "workflow_failed"),
            ("aaaaaaaa", 2, "workflow_failed"),
            ("aaaaaaaa", 3, "workflow_update"),
            ("adw-bbbbbbbb", 2, "workflow_update"),
        ]
        # Two streams, two epochs, the later one larger.
        assert store.epoch("aaaaaaaa") < store.epoch("adw-bbbbbbbb")  # type: ignore[operator]
        # The outbox keeps one order across ADWs: that is what the sender goes by.
        assert [q.seq for q in drain(store)] == [1, 2, 3, 4, 5]
    finally:
        store.close()


def test_a_host_store_and_a_one_adw_store_are_not_mixed_up(tmp_path: Path) -> None:
    Store(tmp_path, None, "normal").close()
    with pytest.raises(ConfigError, match="holds the state of every ADW under a root"):
        Store(tmp_path, ADW, "normal")


def test_a_store_of_an_earlier_version_keeps_its_records_and_seq(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
        CREATE TABLE files (key TEXT PRIMARY KEY, value BLOB NOT NULL);
        CREATE TABLE outbox (seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL UNIQUE,
            type TEXT NOT NULL, created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT, body BLOB NOT NULL);
        CREATE TABLE dead_letters (seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL,
            type TEXT NOT NULL, created REAL NOT NULL, failed_at REAL NOT NULL, status INTEGER,
            response TEXT NOT NULL, body BLOB NOT NULL);
        """
    )
    db.execute("INSERT INTO meta VALUES ('adw_id', ?)", (orjson.dumps(ADW),))
    db.execute("INSERT INTO meta VALUES ('seq', ?)", (orjson.dumps(7),))
    db.execute("INSERT INTO files VALUES ('transcript:planner', ?)", (b'{"v":1}',))
    # How the one run ended was kept as meta then; it is that run's record now.
    ended = {"end_time": "2026-11-30T12:00:00", "kind": "failed"}
    db.execute("INSERT INTO meta VALUES ('ended', ?)", (orjson.dumps(ended),))
    db.execute("INSERT INTO meta VALUES ('first_seen', ?)", (orjson.dumps("2026-11-30T11:00:00Z"),))
    db.execute(
        "INSERT INTO outbox (seq, event_id, type, created, body) VALUES (7, 'e7', "
        "'workflow_failed', 0, ?)",
        (orjson.dumps({"seq": 7}),),
    )
    db.close()
    store = Store(tmp_path, ADW, "normal")
    try:
        assert store.transcripts() == [FileKey.transcript("planner")]
        with store.transaction() as tx:
            assert tx.get(FileKey.transcript("planner")) == b'{"v":1}'
            assert tx.get_json("ended") == ended
            assert tx.get_json("first_seen") == "2026-11-30T11:00:00Z"
        assert store.meta("ended") is None
        assert store.meta("first_seen") is None
        assert emit(store, "workflow_failed", failed("next")) == 8
        assert [q.seq for q in drain(store)] == [7, 8]
    finally:
        store.close()
    audit = counts(tmp_path)
    stream = audit["streams"][ADW]
    # Its seqs so far were given before superseded events were counted.
    assert (stream["seq"], stream["counted_from"], stream["superseded"]) == (8, 7, 0)
    assert stream["expected"] == 1
    assert audit["totals"]["delivered"] == 2
    assert audit["totals"]["since"] is not None


# The previous version's schema: streams and events per ADW, nothing counted.
_UNCOUNTED_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE streams (adw_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE outbox (seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL UNIQUE, type TEXT NOT NULL,
    created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    body BLOB NOT NULL, adw_id TEXT);
CREATE TABLE dead_letters (seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL, type TEXT NOT NULL,
    created REAL NOT NULL, failed_at REAL NOT NULL, status INTEGER, response TEXT NOT NULL,
    body BLOB NOT NULL, adw_id TEXT);
CREATE TABLE files (adw_id TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (adw_id, key)) WITHOUT ROWID;
"""


def uncounted_store(directory: Path) -> int:
    """A store of the previous version whose stream gave seqs 1-5, the last one still queued;
    returns the stream's epoch."""
    epoch = 1_700_000_000_000
    db = sqlite3.connect(directory / DB_NAME, isolation_level=None)
    try:
        db.executescript(_UNCOUNTED_SCHEMA)
        for key, value in (("adw_id", ADW), ("seq", 5), ("epoch_floor", epoch)):
            db.execute("INSERT INTO meta VALUES (?, ?)", (key, orjson.dumps(value)))
        db.execute("INSERT INTO streams VALUES (?, ?, 5)", (ADW, epoch))
        body = {"type": "cost_update", "seq": 5, "epoch": epoch, "data": cost(1.0)}
        db.execute(
            "INSERT INTO outbox (seq, event_id, type, created, body, adw_id) "
            "VALUES (5, 'e5', 'cost_update', 0, ?, ?)",
            (orjson.dumps(body), ADW),
        )
    finally:
        db.close()
    return epoch


def test_a_store_of_the_previous_version_counts_from_its_next_seq(tmp_path: Path) -> None:
    epoch = uncounted_store(tmp_path)
    # Before an agent of this version opened it, status still reads it, and says that
    # nothing was counted.
    before = counts(tmp_path)
    assert before["streams"][ADW] == {
        "epoch": epoch,
        "seq": 5,
        "counted_from": 5,
        "superseded": 0,
        "dead_letters": 0,
        "queued": 1,
        "expected": 0,
    }
    assert before["totals"]["delivered"] == 0
    assert before["totals"]["since"] is not None

    store = Store(tmp_path, ADW, "normal")
    try:
        emit(store, "cost_update", cost(1.0))
        emit(store, "cost_update", cost(2.0))
        drain(store)
    finally:
        store.close()
    after = counts(tmp_path)
    stream = after["streams"][ADW]
    assert (stream["epoch"], stream["seq"], stream["counted_from"]) == (epoch, 7, 5)
    # Seq 6 was superseded by 7; seq 5 was queued before the upgrade and is not counted.
    assert (stream["superseded"], stream["queued"], stream["expected"]) == (1, 0, 1)
    assert after["totals"]["delivered"] == 2
    assert after["totals"]["since"] is not None
    # Opened again, nothing is migrated twice.
    Store(tmp_path, ADW, "normal").close()
    assert counts(tmp_path) == after
