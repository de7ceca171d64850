"""The JSON log formatter: one valid JSON line for every record, whatever it holds."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.logs import JsonFormatter


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def deep(n: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(n):
        value = [value]
    return value


def cyclic() -> list[Any]:
    value: list[Any] = []
    value.append(value)
    return value


def record(msg: object, args: Any = (), **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("adw_agent.test", logging.WARNING, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def parsed(line: str) -> dict[str, Any]:
    line.encode("utf-8")  # no lone surrogates
    assert "\n" not in line
    value = json.loads(line)
    assert isinstance(value, dict)
    return value


def test_a_non_utf8_file_name_is_escaped() -> None:
    name = os.fsdecode(b"/run/agents/55b761f6/plan\xff\xfe/raw_output.jsonl")
    out = parsed(JsonFormatter("55b761f6").format(record("cannot read %s", (name,), path=name)))
    assert out["path"] == "/run/agents/55b761f6/plan\\xff\\xfe/raw_output.jsonl"
    assert out["message"] == "cannot read /run/agents/55b761f6/plan\\xff\\xfe/raw_output.jsonl"
    assert out["adw_id"] == "55b761f6"


def test_records_that_broke_the_formatter_give_json_lines() -> None:
    fmt = JsonFormatter()
    for rec in (
        record("%d items", ("many",)),
        record("%s", (Unprintable(),)),
        record(Unprintable()),
        record("x", extra_value=Unprintable()),
        record("x", nested=deep(5000)),
        record("x", loop=cyclic()),
        record("x", big=2**200, keys={(1, 2): "tuple key", None: 1}),
        record("x", raw=b"\xff\x00bytes", lone="\ud800"),
    ):
        out = parsed(fmt.format(rec))
        assert out["level"] == "warning"
        assert out["logger"] == "adw_agent.test"


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.binary(max_size=8)
    | st.builds(Unprintable)
    | st.sampled_from([os.fsdecode(b"a\xff"), "\ud800", "\udcff"]),
    lambda children: (
        st.lists(children, max_size=3)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=3) | st.integers(), children, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300)
@given(
    msg=st.text() | values,
    args=st.lists(values, max_size=3).map(tuple),
    extra=st.dictionaries(
        st.text(min_size=1, max_size=8).filter(
            lambda k: k.isidentifier() and not k.startswith("_")
        ),
        values,
        max_size=4,
    ),
)
def test_any_record_gives_one_json_line(msg: object, args: tuple[Any, ...], extra: Any) -> None:
    rec = logging.LogRecord("adw_agent.fuzz", logging.INFO, __file__, 1, msg, args, None)
    for key, value in extra.items():
        if key not in rec.__dict__:
            setattr(rec, key, value)
    out = parsed(JsonFormatter("55b761f6").format(rec))
    assert out["logger"] == "adw_agent.fuzz"
