"""The folding rules, as pure functions: order and repetition never change the outcome."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from adw_backend.projection import (
    MAX_PHASE_NAME,
    MAX_PHASES,
    EventView,
    Marks,
    Projection,
    apply,
    new_marks,
    new_projection,
    thin,
    upgrade,
)
from tests.adw_backend import factory
from tests.adw_backend.factory import view

PHASES = ["Plan", "Validate", "Build", "Test", "Review"]


def fold(events: list[EventView], limit: int = 500) -> tuple[Projection, Marks]:
    projection, marks = new_projection("a1"), new_marks()
    for ev in events:
        projection, marks = apply(projection, marks, ev, cost_points=limit)
    return projection, marks


@st.composite
def one_event(draw: st.DrawFn, epoch: int, seq: int) -> EventView:
    kind = draw(
        st.sampled_from(
            ["workflow_update", "cost_update", "agent_status", "phase_update", "failed", "done"]
        )
    )
    phase = draw(st.sampled_from(PHASES))
    if kind == "workflow_update":
        branch = draw(st.sampled_from(["feat-a", "feat-b", "feat-c"]))
        return view(factory.workflow_update("a1", seq, epoch, branch_name=branch, n=seq))
    if kind == "cost_update":
        cost = draw(st.floats(0, 50, allow_nan=False))
        return view(factory.cost_update("a1", seq, cost, phase, epoch))
    if kind == "agent_status":
        return view(factory.agent_status("a1", seq, draw(st.integers(0, 9)), epoch))
    if kind == "phase_update":
        done = draw(st.lists(st.sampled_from(PHASES), unique=True, max_size=4))
        completing = draw(st.sampled_from([None, *PHASES]))
        phase_cost = draw(st.none() | st.floats(0, 5, allow_nan=False))
        return view(factory.phase_update("a1", seq, phase, done, completing, phase_cost, epoch))
    if kind == "failed":
        return view(factory.failed("a1", seq, phase, epoch))
    done = draw(st.lists(st.sampled_from(PHASES), unique=True))
    return view(factory.completed("a1", seq, done, epoch))


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[EventView], list[EventView]]:
    """One ADW's events in (epoch, seq) order, and the same events shuffled and repeated."""
    keys = draw(
        st.lists(
            st.tuples(st.integers(0, 2), st.integers(1, 400)), unique=True, min_size=1, max_size=40
        )
    )
    events = [draw(one_event(epoch, seq)) for epoch, seq in sorted(keys)]
    repeats = draw(st.lists(st.sampled_from(events), max_size=10))
    arrived = draw(st.permutations(events + repeats))
    return events, arrived


def without_points(projection: Projection) -> dict[str, Any]:
    # The revision counts the events folded, repeated ones included here (the store folds an
    # event once): it is checked by its own tests.
    return {k: v for k, v in projection.items() if k not in ("cost_points", "revision")}


@settings(max_examples=300, deadline=None)
@given(histories())
def test_any_order_and_repetition_gives_the_in_order_projection(
    history: tuple[list[EventView], list[EventView]],
) -> None:
    in_order, arrived = history
    expected, _ = fold(in_order)
    got, _ = fold(arrived)
    assert without_points(got) == without_points(expected)


@settings(max_examples=200, deadline=None)
@given(histories())
def test_cost_points_are_the_same_set_in_time_order(
    history: tuple[list[EventView], list[EventView]],
) -> None:
    in_order, arrived = history
    once = list({ev["event_id"]: ev for ev in arrived}.values())
    expected, _ = fold(in_order)
    got, _ = fold(once)
    assert got["cost_points"] == expected["cost_points"]
    times = [p["t"] for p in got["cost_points"]]
    assert times == sorted(times)


def test_failed_stays_failed_whatever_follows() -> None:
    events = [
        view(factory.failed("a1", 5, "Build")),
        view(factory.completed("a1", 9, ["Plan", "Build"])),
        view(factory.workflow_update("a1", 10, branch_name="feat")),
    ]
    projection, _ = fold(events)
    assert projection["status"] == "failed"
    assert projection["failed_phase"] == "Build"
    assert projection["ended_at"] == events[0]["timestamp"]
    assert projection["completed_phases"] == ["Plan", "Build"]


def test_an_older_phase_update_records_its_phase_but_keeps_the_current_one() -> None:
    projection, _ = fold(
        [
            view(factory.phase_update("a1", 9, "Test", ["Plan", "Build"], "Build", 2.0)),
            view(factory.phase_update("a1", 4, "Build", ["Plan"], "Plan", 1.0)),
        ]
    )
    assert projection["current_phase"] == "Test"
    assert projection["completed_phases"] == ["Plan", "Build"]
    assert projection["phase_costs"] == {"Plan": 1.0, "Build": 2.0}


def test_a_larger_epoch_is_newer_whatever_its_seq() -> None:
    projection, _ = fold(
        [
            view(factory.cost_update("a1", 2, 7.0, epoch=2)),
            view(factory.cost_update("a1", 300, 3.0, epoch=1)),
        ]
    )
    assert projection["cost"]["current_cost"] == 7.0


def test_seq_zero_never_advances_a_counter() -> None:
    projection, marks = fold([view(factory.agent_status("a1", 3, depth=1))])
    zero = view(factory.agent_status("a1", 0, depth=7))
    zero["timestamp"] = "2026-11-30T23:59:59.000Z"
    after, after_marks = apply(projection, marks, zero)
    assert after["agent"]["outbox_depth"] == 7
    assert after_marks == marks
    # The next queued status (seq 4) still applies.
    later = view(factory.agent_status("a1", 4, depth=2))
    final, _ = apply(after, after_marks, later)
    assert final["agent"]["outbox_depth"] == 2
    # A stale seq 0 (older than what is shown) is ignored.
    old: EventView = {**zero, "timestamp": "2000-01-01T00:00:00.000Z"}
    ignored, _ = apply(final, after_marks, old)
    assert ignored["agent"]["outbox_depth"] == 2


def test_apply_leaves_its_arguments_unchanged() -> None:
    projection, marks = new_projection("a1"), new_marks()
    before = (repr(projection), repr(marks))
    apply(projection, marks, view(factory.cost_update("a1", 1, 1.0)))
    apply(projection, marks, view(factory.phase_update("a1", 2, "Build", ["Plan"], "Plan", 1.0)))
    assert (repr(projection), repr(marks)) == before


def test_cost_points_are_bounded_and_keep_the_newest() -> None:
    events = [view(factory.cost_update("a1", seq, float(seq))) for seq in range(1, 1201)]
    projection, _ = fold(events, limit=100)
    points = projection["cost_points"]
    assert len(points) <= 100
    assert points[-1]["cost"] == 1200.0
    assert points[0]["cost"] == 1.0
    # The newest stretch is exact; the thinning happened in the older part.
    tail = [p["cost"] for p in points[-20:]]
    assert tail == [float(c) for c in range(1181, 1201)]


def test_thin_keeps_order_and_bound() -> None:
    points = [{"t": f"{i:05d}", "cost": float(i), "phase": None} for i in range(1000)]
    thinned = thin(points, 300)  # type: ignore[arg-type]
    assert len(thinned) <= 300
    assert [p["t"] for p in thinned] == sorted(p["t"] for p in thinned)


def test_phases_are_bounded() -> None:
    """An agent that invents phases without end cannot grow a workflow without end."""
    events = [
        view(factory.phase_update("a1", seq, f"P{seq}", [f"P{seq - 1}"], f"P{seq - 1}", 1.0))
        for seq in range(1, 3 * MAX_PHASES)
    ]
    events.append(view(factory.completed("a1", 3 * MAX_PHASES, [f"Q{i}" for i in range(500)])))
    projection, marks = fold(events)
    assert len(projection["completed_phases"]) == MAX_PHASES
    assert projection["completed_phases"][:2] == ["P0", "P1"]
    assert len(projection["phase_costs"]) == MAX_PHASES
    assert len(marks["phases"]) == MAX_PHASES
    assert len(marks["phase_cost_keys"]) == MAX_PHASES
    assert projection["phase_costs"]["P0"] == 1.0
    # A phase already kept still gets its cost; the current phase still moves.
    assert projection["current_phase"] == f"P{3 * MAX_PHASES - 1}"

    long = "x" * 10 * MAX_PHASE_NAME
    projection, _ = fold(
        [
            view(factory.phase_update("a1", 1, long, [long], long, 2.0)),
            view(factory.cost_update("a1", 2, 1.0, long)),
            view(factory.failed("a1", 3, long)),
        ]
    )
    cut = long[:MAX_PHASE_NAME]
    assert projection["current_phase"] == cut
    assert projection["completed_phases"] == [cut]
    assert projection["phase_costs"] == {cut: 2.0}
    assert projection["cost_points"][0]["phase"] == cut
    assert projection["failed_phase"] == cut


@settings(max_examples=100, deadline=None)
@given(histories())
def test_revision_counts_every_folded_event_and_only_grows(
    history: tuple[list[EventView], list[EventView]],
) -> None:
    _, arrived = history
    projection, marks = new_projection("a1"), new_marks()
    assert projection["revision"] == 0
    for count, ev in enumerate(arrived, start=1):
        projection, marks = apply(projection, marks, ev)
        assert projection["revision"] == count


def test_a_projection_stored_without_a_revision_reads_as_zero_and_counts_on() -> None:
    stored: dict[str, Any] = {k: v for k, v in new_projection("a1").items() if k != "revision"}
    old: Projection = stored  # type: ignore[assignment]
    assert upgrade(old)["revision"] == 0
    del stored["revision"]
    after, _ = apply(old, new_marks(), view(factory.workflow_update("a1", 1)))
    assert after["revision"] == 1
