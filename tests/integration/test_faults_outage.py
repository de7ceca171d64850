"""Outages: the backend down for a whole run, and the agent down while the run goes on."""

from __future__ import annotations

import random
from pathlib import Path

from tests.faults import (
    STANDARD_RUN,
    AgentPlan,
    RunSimulator,
    await_guarantee,
    check_guarantee,
    drained,
    reap_agents,  # noqa: F401  (autouse fixture)
    start_agent,
    store_db,
    stored_file,
    wait_consumed,
    wait_until,
)
from tests.harness import AdwWriter, AgentProcess, Backend, Reply, write_config


def _setup(tmp_path: Path, backend: Backend, **sections: dict) -> tuple[AdwWriter, AgentProcess]:
    run_dir = tmp_path / "repo" / "agents" / "9f3c1a2b"
    writer = AdwWriter(run_dir)
    config = write_config(
        tmp_path / "agent.toml",
        run_dir,
        tmp_path / "storage",
        backend.url,
        **{"log": {"level": "info"}, **sections},
    )
    return writer, AgentProcess(config, tmp_path / "agent.log")


def test_backend_down_for_the_whole_run_then_everything_arrives_in_order(
    tmp_path: Path, backend: Backend
) -> None:
    backend.policy = lambda event: Reply(commit=True)
    backend.go_down()
    writer, agent = _setup(
        tmp_path, backend, delivery={"backoff_initial": 0.05, "backoff_max": 1.0}
    )
    storage = tmp_path / "storage"
    start_agent(agent)
    sim = RunSimulator(
        writer,
        random.Random(7),
        writer.run_dir.name,
        before_truncate=lambda name, path: wait_consumed(storage, name, path),
        churn=200,
        # Each phase step is written once the agent has recorded the previous one, so that
        # every step is a change the agent observed (and must deliver).
        after_phases=lambda phases: wait_until(
            lambda: stored_file(storage, "phases") == phases, "the phase step to be read"
        ),
    )
    expected = sim.run()
    # Everything the run means is queued before the backend comes back.
    wait_until(
        lambda: (
            abs((stored_file(storage, "cost") or {"reported": -1})["reported"] - expected.cost)
            < 1e-9
        ),
        "the final cost to be queued",
    )
    with store_db(storage) as db:
        backlog = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    assert not backend.requests

    backend.go_up()
    await_guarantee(backend, expected, 60)
    wait_until(drained(storage), "the outbox to drain")
    times = [r.at for r in backend.requests if 200 <= r.status < 300]
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    print(
        f"\noutage: backlog {backlog} events; drained {len(times)} deliveries in "
        f"{times[-1] - times[0]:.2f}s after the first one: {rate:.0f} events/s"
    )
    assert agent.stop() == 0
    verdict = check_guarantee(backend, expected, storage)
    print(f"outage: {verdict.summary()}")
    verdict.assert_ok()
    # Nothing was coalesced away that the backend needed: every phase step arrived.
    steps = [e for e in backend.events("phase_update") if e["source"] == "event"]
    assert len(steps) >= 200 + len(expected.completed_phases)


def test_agent_down_while_the_run_goes_on_and_a_transcript_is_rewritten(
    tmp_path: Path, backend: Backend
) -> None:
    backend.policy = lambda event: Reply(commit=True)
    writer, agent = _setup(tmp_path, backend)
    storage = tmp_path / "storage"
    # The tester's retry is much longer than its first attempt: the new file grows past the
    # offset the agent had reached, so only the first-line fingerprint tells them apart. No
    # attempt after it is retried: one the agent never saw could not be counted.
    plan = [p for p in STANDARD_RUN if p.name not in ("tester", "documenter")]
    plan[-1:-1] = [
        AgentPlan(
            "tester",
            "test",
            [
                "gleam_v2.1.7_basic_query_golden.jsonl",
                "pricehawk_v2.0.57_builder_sonnet45_13turns.jsonl",
            ],
            fail_between=True,
        )
    ]
    plan.append(
        AgentPlan("documenter", "document", ["tac6_raw_output_af87dd64_pr_creator_cli2144.jsonl"])
    )
    stopped: list[int] = []

    def agent_goes_down(name: str, path: Path) -> None:
        wait_consumed(storage, name, path)
        if name == "tester":
            stopped.append(path.stat().st_size)
            agent.kill9()

    sim = RunSimulator(
        writer, random.Random(11), writer.run_dir.name, plan, before_truncate=agent_goes_down
    )
    start_agent(agent)
    expected = sim.run()
    assert stopped, "the run never reached the tester's retry"
    assert (writer.run_dir / "tester" / "raw_output.jsonl").stat().st_size > stopped[0]
    assert not agent.running()

    start_agent(agent)
    await_guarantee(backend, expected, 30)
    wait_until(drained(storage), "the outbox to drain")
    assert agent.stop() == 0
    verdict = check_guarantee(backend, expected, storage)
    print(f"\nagent down: true cost {expected.cost:.8f}; {verdict.summary()}")
    verdict.assert_ok()
