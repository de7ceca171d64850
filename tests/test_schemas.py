"""Tests for agent.schemas and the committed files in schemas/: no drift, every $ref resolves."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.cli import main
from agent.events import DATA_MODELS, Event
from agent.schemas import all_schemas, check_schemas, write_schemas

COMMITTED = Path(__file__).resolve().parent.parent / "schemas"


def test_committed_schemas_match_the_models() -> None:
    assert check_schemas(COMMITTED) == [], "run: adw-agent schema --out schemas"
    assert sorted(p.name for p in COMMITTED.iterdir()) == sorted(all_schemas())


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


@pytest.mark.parametrize("name", sorted(all_schemas()))
def test_every_ref_resolves_from_the_document_root(name: str) -> None:
    schema = orjson.loads((COMMITTED / name).read_bytes())
    for ref in refs(schema):
        assert ref.startswith("#/"), ref
        node = schema
        for part in ref[2:].split("/"):
            assert part in node, f"{name}: {ref} does not resolve"
            node = node[part]


@pytest.mark.parametrize("event_type", sorted(DATA_MODELS))
def test_event_schema_is_the_envelope_with_typed_data(event_type: str) -> None:
    schema = all_schemas()[f"event.{event_type}.schema.json"]
    assert schema["properties"]["type"]["const"] == event_type
    required = [name for name, field in Event.model_fields.items() if field.is_required()]
    assert schema["required"] == required
    assert schema["additionalProperties"] is False
    assert schema["properties"]["data"]["title"] == DATA_MODELS[event_type].__name__


def test_state_schema_allows_unknown_keys() -> None:
    schema = all_schemas()["adw_state.schema.json"]
    assert schema["additionalProperties"] is True
    assert "required" not in schema


def test_check_reports_missing_and_changed_files(tmp_path: Path) -> None:
    assert sorted(check_schemas(tmp_path)) == sorted(all_schemas())
    write_schemas(tmp_path)
    assert check_schemas(tmp_path) == []
    (tmp_path / "event.phase_update.schema.json").write_text("{}\n")
    assert check_schemas(tmp_path) == ["event.phase_update.schema.json"]


def test_schema_check_command_fails_on_drift(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "schemas"
    shutil.copytree(COMMITTED, out)
    assert main(["schema", "--check", "--out", str(out)]) == 0
    schema = orjson.loads((out / "event.agent_status.schema.json").read_bytes())
    del schema["properties"]["data"]["properties"]["dead_letters"]
    (out / "event.agent_status.schema.json").write_bytes(orjson.dumps(schema))
    capsys.readouterr()
    assert main(["schema", "--check", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == f"schema out of date: {out / 'event.agent_status.schema.json'}\n"
    assert main(["schema", "--out", str(out)]) == 0
    assert main(["schema", "--check", "--out", str(out)]) == 0
