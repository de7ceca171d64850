"""JSON Schemas of the state model and of every event type, committed under ``schemas/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from agent.events import DATA_MODELS, Event
from agent.read import AdwState, CompletedPhases


def all_schemas() -> dict[str, dict[str, Any]]:
    """File name → schema."""
    out: dict[str, dict[str, Any]] = {
        "adw_state.schema.json": AdwState.model_json_schema(),
        "completed_phases.schema.json": CompletedPhases.model_json_schema(),
    }
    for name, model in DATA_MODELS.items():
        envelope = Event.model_json_schema()
        envelope["title"] = name
        envelope["description"] = f"One {name} event: the common envelope with its typed data."
        envelope["properties"]["type"] = {"const": name, "title": "Type", "type": "string"}
        data = model.model_json_schema()
        # "$ref": "#/$defs/..." resolves from the document root, so the definitions go there.
        defs = data.pop("$defs", None)
        if defs:
            envelope["$defs"] = {**envelope.get("$defs", {}), **defs}
        envelope["properties"]["data"] = data
        out[f"event.{name}.schema.json"] = envelope
    return out


def _render(schema: dict[str, Any]) -> bytes:
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def write_schemas(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in all_schemas().items():
        path = out / name
        path.write_bytes(_render(schema))
        written.append(path)
    return written


def check_schemas(out: Path) -> list[str]:
    """Names of schema files that are missing or differ from the models."""
    return [
        name
        for name, schema in all_schemas().items()
        if not (out / name).is_file() or (out / name).read_bytes() != _render(schema)
    ]
