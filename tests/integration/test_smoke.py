from __future__ import annotations

from tests.harness import AdwWriter, Backend


def test_state_write_in_halves_gives_one_complete_update(
    backend: Backend, writer: AdwWriter, start_agent
) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent()
    backend.wait_for(lambda evs: any(e["type"] == "agent_status" for e in evs))
    state = {
        "adw_id": "55b761f6",
        "issue_number": "1",
        "branch_name": None,
        "plan_file": None,
        "issue_class": "/feature",
    }
    writer.state(state, halves=True, pause=0.3)
    events = backend.wait_for(lambda evs: any(e["type"] == "workflow_update" for e in evs))
    updates = [e for e in events if e["type"] == "workflow_update"]
    assert len(updates) == 1
    assert updates[0]["data"]["issue_class"] == "/feature"
    assert agent.stop() == 0
