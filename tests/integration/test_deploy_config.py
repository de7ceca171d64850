"""agent.example.toml documents every configuration key with its real default, and loads."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from agent import config as config_module
from agent.config import CREDENTIAL_NAME, TOKEN_ENV, Config
from tests.harness import ROOT

EXAMPLE = ROOT / "agent.example.toml"
KEY = re.compile(r"^(# ?)?([a-z_][a-z0-9_]*) = ")
SECTION = re.compile(r"^(#\s*)?\[([^\]]+)\]\s*$")
OVERRIDE = re.compile(r"\b(ADW_AGENT_[A-Z_]+__[A-Z_]+)=(\S+)")


def model_keys(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every leaf key of the config as ``section.key`` -> default (``...`` when required)."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out |= model_keys(annotation, f"{prefix}{name}.")
        else:
            out[prefix + name] = (
                ... if field.is_required() else field.get_default(call_default_factory=True)
            )
    return out


def documented_keys(text: str) -> set[str]:
    """``section.key`` for every key in the example, whether set or shown commented out."""
    keys: set[str] = set()
    section = ""
    for line in text.splitlines():
        if m := SECTION.match(line.strip()):
            section = m.group(2)
            # [cost.prices."<model>"] documents the prices table itself.
            if section.startswith("cost.prices."):
                keys.add("cost.prices")
                section = "cost.prices.*"
            elif section == "cost.fallback":
                keys.add("cost.fallback")
            continue
        if m := KEY.match(line.strip()):
            keys.add(f"{section}.{m.group(2)}")
    return keys


def test_every_config_key_is_documented() -> None:
    documented = documented_keys(EXAMPLE.read_text())
    expected = set(model_keys(Config))
    price_fields = set(model_keys(config_module.PriceSection))
    expected |= {f"cost.fallback.{k}" for k in price_fields}
    expected |= {f"cost.prices.*.{k}" for k in price_fields}
    assert expected - documented == set(), "keys missing from agent.example.toml"
    assert documented - expected == set(), "agent.example.toml documents keys that do not exist"


def test_the_example_loads_and_set_values_are_the_defaults() -> None:
    config = config_module.load(EXAMPLE, environ={})
    assert config.token is None
    data = tomllib.loads(EXAMPLE.read_text())
    defaults = model_keys(Config)
    for section, values in data.items():
        for key, value in values.items():
            default = defaults[f"{section}.{key}"]
            # adw.dir and adw.root: exactly one is required, so the one set is an example value.
            if default is ... or f"{section}.{key}" in {"adw.dir", "adw.root"}:
                continue  # required: an example value
            if isinstance(default, Path):
                default = str(default)
            assert value == default, f"{section}.{key} = {value!r}, default {default!r}"
    # The systemd unit's StateDirectory=adw-agent/%i
    assert config.storage.dir == Path("/var/lib/adw-agent") / config.adw_id


def test_the_documented_environment_overrides_work(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    overrides = OVERRIDE.findall(text)
    assert len(overrides) >= 4
    for name, value in overrides:
        config = config_module.load(EXAMPLE, environ={name: value})
        node: Any = config
        for part in name.removeprefix("ADW_AGENT_").lower().split("__"):
            node = getattr(node, part)
        expected = float(value) if isinstance(node, float) else value
        assert (node if isinstance(node, float) else str(node)) == expected, name
    for source in (TOKEN_ENV, f"$CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME}", "token_file"):
        assert source in text


@pytest.mark.parametrize(
    ("environ", "files"),
    [
        ({TOKEN_ENV: "tok-env"}, {}),
        ({"CREDENTIALS_DIRECTORY": "{tmp}"}, {CREDENTIAL_NAME: "tok-cred"}),
    ],
)
def test_the_documented_token_sources(
    tmp_path: Path, environ: dict[str, str], files: dict[str, str]
) -> None:
    for name, content in files.items():
        (tmp_path / name).write_text(content + "\n")
    env = {k: v.replace("{tmp}", str(tmp_path)) for k, v in environ.items()}
    config = config_module.load(EXAMPLE, environ=env)
    assert config.token is not None
    assert config.token.get_secret_value().startswith("tok-")
    assert "tok-" not in repr(config)
    assert "tok-" not in str(config.redacted())
