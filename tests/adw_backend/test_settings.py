"""Settings: options first, then ADW_BACKEND_* variables; one line naming what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from adw_backend.errors import SettingsError
from adw_backend.settings import Settings, load_settings


def test_defaults() -> None:
    settings = load_settings(env={})
    assert settings.database_url == "sqlite:///adw-backend.db"
    assert settings.max_event_bytes == 1024 * 1024
    assert settings.max_batch_bytes == 16 * 1024 * 1024
    assert not settings.auth_enabled


def test_options_win_over_variables(tmp_path: Path) -> None:
    (tmp_path / "given").write_text("one\n\n  two  \n")
    (tmp_path / "env").write_text("three\n")
    env = {
        "ADW_BACKEND_DATABASE_URL": "postgresql://u@h/env",
        "ADW_BACKEND_TOKEN_FILE": str(tmp_path / "env"),
        "ADW_BACKEND_READ_TOKEN_FILE": str(tmp_path / "env"),
        "ADW_BACKEND_WS_QUEUE": "64",
        "ADW_BACKEND_SQLITE_SYNCHRONOUS": "normal",
    }
    settings = load_settings(database_url="sqlite:///x.db", token_file=tmp_path / "given", env=env)
    assert settings.database_url == "sqlite:///x.db"
    assert [t.get_secret_value() for t in settings.tokens] == ["one", "two"]
    assert [t.get_secret_value() for t in settings.read_tokens] == ["three"]
    assert settings.ws_queue == 64
    assert settings.sqlite_synchronous == "normal"
    assert "one" not in repr(settings)


def test_postgresql_url_gets_the_psycopg_driver() -> None:
    assert (
        Settings(database_url="postgresql://u@h/d").sqlalchemy_url == "postgresql+psycopg://u@h/d"
    )
    assert Settings(database_url="sqlite:///a.db").sqlalchemy_url == "sqlite:///a.db"


@pytest.mark.parametrize(
    ("kwargs", "env", "expected"),
    [
        ({"database_url": "mysql://x"}, {}, "--database: must start with sqlite"),
        (
            {},
            {"ADW_BACKEND_DATABASE_URL": "postgresql://u:pw@h:port/d"},
            "ADW_BACKEND_DATABASE_URL",
        ),
        ({}, {"ADW_BACKEND_MAX_EVENT_BYTES": "ten"}, "ADW_BACKEND_MAX_EVENT_BYTES"),
        ({}, {"ADW_BACKEND_WS_QUEUE": "0"}, "ADW_BACKEND_WS_QUEUE"),
        ({}, {"ADW_BACKEND_SQLITE_SYNCHRONOUS": "off"}, "ADW_BACKEND_SQLITE_SYNCHRONOUS"),
    ],
)
def test_bad_values_name_the_key(
    kwargs: dict[str, str], env: dict[str, str], expected: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(**kwargs, env=env)  # type: ignore[arg-type]
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message
    assert "pw" not in message


def test_token_files(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^--token-file .*absent: No such file"):
        load_settings(token_file=tmp_path / "absent", env={})
    (tmp_path / "empty").write_text("\n \n")
    with pytest.raises(SettingsError, match="no token in the file"):
        load_settings(read_token_file=tmp_path / "empty", env={})


def test_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.ws_queue = 3  # type: ignore[misc]
