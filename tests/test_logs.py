"""Tests for agent.logs: the token is redacted in every form a backend may echo it in."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from urllib.parse import quote

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import logs

TOKEN = "s3cr3t/t0ken+with.sym_bols~x=="

# The bearer-token grammar the configuration enforces.
tokens = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/",
    min_size=8,
    max_size=60,
)


@pytest.fixture(autouse=True)
def secret() -> Iterator[None]:
    saved = (list(logs._secrets), list(logs._patterns))
    logs.add_secret(TOKEN)
    yield
    logs._secrets[:], logs._patterns[:] = saved


def json_escaped(text: str) -> str:
    return json.dumps(text)[1:-1].replace("/", "\\/")


def unicode_escaped(text: str) -> str:
    return "".join(f"\\u{ord(c):04X}" if i % 2 else c for i, c in enumerate(text))


@pytest.mark.parametrize(
    "form",
    [
        TOKEN,
        json_escaped(TOKEN),
        unicode_escaped(TOKEN),
        quote(TOKEN, safe=""),
        quote(TOKEN, safe="").lower(),
        json.dumps(json_escaped(TOKEN))[1:-1],  # the escaped echo, logged as JSON again
    ],
)
def test_every_encoded_form_is_redacted(form: str) -> None:
    text = f'{{"detail": "bad token {form} given"}}'
    assert logs.redact(text) == '{"detail": "bad token <redacted> given"}'


@given(tokens, st.lists(st.sampled_from(["plain", "json", "unicode", "percent"])))
def test_any_mix_of_forms_is_redacted(token: str, forms: list[str]) -> None:
    logs.add_secret(token)
    encoders: dict[str, Callable[[str], str]] = {
        "plain": lambda c: c,
        "json": lambda c: "\\/" if c == "/" else c,
        "unicode": lambda c: f"\\u{ord(c):04x}",
        "percent": lambda c: f"%{ord(c):02X}",
    }
    mixed = "".join(
        encoders[forms[i % len(forms)] if forms else "plain"](c) for i, c in enumerate(token)
    )
    assert logs.redact(f"<{mixed}>") == "<<redacted>>"


@pytest.mark.parametrize("cut", [8, 12, len(TOKEN) - 1])
def test_a_token_cut_by_the_end_of_an_excerpt_is_redacted(cut: int) -> None:
    for encode in (str, json_escaped, lambda t: quote(t, safe="")):
        echo = encode(TOKEN)
        # Cut after ``cut`` characters of the token, in whatever form they were sent.
        prefix = encode(TOKEN[:cut])
        assert echo.startswith(prefix)
        assert logs.redact_excerpt("you sent: " + prefix) == "you sent: <redacted>"
        # Cut inside an escape sequence.
        partial = echo[: len(prefix) + 1]
        assert logs.redact_excerpt("you sent: " + partial) == "you sent: <redacted>"


def test_a_short_prefix_or_one_not_at_the_end_is_kept() -> None:
    assert logs.redact_excerpt("ends in " + TOKEN[:7]) == "ends in " + TOKEN[:7]
    middle = f"{TOKEN[:10]} and more"
    assert logs.redact_excerpt(middle) == middle


def test_log_lines_never_carry_the_token_in_any_form() -> None:
    formatter = logs.JsonFormatter()
    for form in (TOKEN, json_escaped(TOKEN), quote(TOKEN, safe="")):
        record = logging.LogRecord("adw_agent.x", logging.ERROR, "f", 1, "echo %s", (form,), None)
        record.response = f'{{"token": "{form}"}}'
        line = formatter.format(record)
        entry = orjson.loads(line)
        assert entry["message"] == "echo <redacted>"
        assert entry["response"] == '{"token": "<redacted>"}'
