"""The store itself, on SQLite: the projections it keeps in memory never differ from the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adw_backend.errors import DatabaseUnavailable
from adw_backend.intake import check_event
from adw_backend.projection import EventView, new_marks, new_projection
from adw_backend.store import CONNECT_ARGS, Applied, Store, pg_connect_args
from adw_backend.store_cache import ProjectionCache
from agent.events import Event
from tests.adw_backend import factory


def checked(envelope: dict[str, Any]) -> tuple[EventView, str]:
    return check_event(Event.model_validate(envelope))


def test_cached_projections_match_the_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    store = Store(url)
    store.ingest([checked(factory.cost_update("a1", 1, 1.0))])
    store.ingest([checked(factory.cost_update("a1", 2, 2.0))])
    store.ingest([checked(factory.workflow_update("a1", 3, branch_name="feat"))])
    again = Store(url)  # a restart: nothing in memory
    assert again.workflow("a1") == store.workflow("a1")
    again.ingest([checked(factory.cost_update("a1", 4, 3.0))])
    found = Store(url).workflow("a1")
    assert found["cost"]["current_cost"] == 3.0
    assert [p["cost"] for p in found["cost_points"]] == [1.0, 2.0, 3.0]
    assert found["state"]["branch_name"] == "feat"


def test_a_deleted_workflow_starts_again_empty(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'b.db'}")
    store.ingest([checked(factory.failed("a1", 1))])
    assert store.workflow("a1")["status"] == "failed"
    store.delete("a1")
    store.ingest([checked(factory.cost_update("a1", 2, 1.0))])
    projection = store.workflow("a1")
    assert projection["status"] == "running"
    assert len(projection["cost_points"]) == 1


def test_a_failed_transaction_leaves_nothing_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'b.db'}")
    store.ingest([checked(factory.cost_update("a1", 1, 1.0))])
    seen: list[list[Applied]] = []

    writer = store._writer
    write = writer._write_sqlite

    def broken(*args: Any) -> Any:
        write(*args)
        raise DatabaseUnavailable("database unavailable")

    # The projection is folded and written, then the transaction fails and rolls back.
    monkeypatch.setattr(writer, "_write_sqlite", broken)
    with pytest.raises(DatabaseUnavailable):
        store.ingest([checked(factory.cost_update("a1", 2, 5.0))], seen.append)
    monkeypatch.undo()
    assert seen == []
    assert store.workflow("a1")["cost"]["current_cost"] == 1.0
    outcome = store.ingest([checked(factory.cost_update("a1", 3, 2.0))], seen.append)
    assert [a.projection["cost"]["current_cost"] for a in outcome.applied] == [2.0]
    assert [p["cost"] for p in store.workflow("a1")["cost_points"]] == [1.0, 2.0]
    assert [a.event["seq"] for a in seen[0]] == [3]


def test_the_cache_is_bounded() -> None:
    cache = ProjectionCache(max_items=10, max_bytes=800)
    for i in range(9):
        cache.put(f"a{i}", new_projection(f"a{i}"), new_marks(), 99)
    # 891 bytes is over 800: the least recently used one went out.
    assert len(cache) == 8
    assert cache.get("a0") is None
    assert cache.get("a1") is not None  # now the most recently used
    cache.put("a9", new_projection("a9"), new_marks(), 99)
    assert cache.get("a2") is None
    assert cache.get("a1") is not None
    # Over an eighth of the budget: never kept (and an older copy is dropped).
    cache.put("a1", new_projection("a1"), new_marks(), 101)
    assert cache.get("a1") is None
    small = ProjectionCache(max_items=3, max_bytes=10_000)
    for i in range(5):
        small.put(f"a{i}", new_projection(f"a{i}"), new_marks(), 1)
    assert len(small) == 3


def test_postgresql_options_in_the_url_are_kept_after_the_backends_own() -> None:
    assert pg_connect_args(None) == CONNECT_ARGS
    args = pg_connect_args("-c search_path=adw")
    assert args["options"] == f"{CONNECT_ARGS['options']} -c search_path=adw"
    assert {k: v for k, v in args.items() if k != "options"} == {
        k: v for k, v in CONNECT_ARGS.items() if k != "options"
    }
