"""What a WebSocket client holds when it follows the documented rules: a snapshot replaces the
picture, an event message replaces its workflow unless its ``revision`` is not above the one
held, a deletion removes the workflow. The real-process tests compare it with the database."""

from __future__ import annotations

from typing import Any


class Picture:
    def __init__(self) -> None:
        self.workflows: dict[str, dict[str, Any]] = {}
        self.snapshots = 0

    def apply(self, message: dict[str, Any]) -> None:
        data = message["data"]
        if message["type"] == "workflows_snapshot":
            self.snapshots += 1
            self.workflows = {w["adw_id"]: w for w in data["workflows"]}
        elif message["type"] == "workflow_deleted":
            self.workflows.pop(data["adw_id"], None)
        else:
            workflow = data["workflow"]
            held = self.workflows.get(workflow["adw_id"])
            if held is None or workflow["revision"] > held["revision"]:
                self.workflows[workflow["adw_id"]] = workflow
