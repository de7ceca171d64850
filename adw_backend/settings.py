"""The backend's one frozen settings object, validated at the edge.

Build it with :func:`load_settings` (command line and environment) or directly with keywords
(a host app mounting the router). Environment overrides, used when the option is not given:

- ``ADW_BACKEND_DATABASE_URL``: SQLAlchemy-style URL; ``sqlite:///path`` or ``postgresql://…``
- ``ADW_BACKEND_TOKEN_FILE``: file with the write tokens, one per line
- ``ADW_BACKEND_READ_TOKEN_FILE``: file with read-only tokens (GET and WebSocket), one per line
- ``ADW_BACKEND_MAX_EVENT_BYTES`` / ``ADW_BACKEND_MAX_BATCH_BYTES``: body size limits
- ``ADW_BACKEND_WS_QUEUE``: messages a WebSocket client may fall behind before it is dropped
- ``ADW_BACKEND_WS_QUEUE_BYTES``: the same bound in bytes (64 MiB)
- ``ADW_BACKEND_SQLITE_SYNCHRONOUS``: ``full`` (default) or ``normal``
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from adw_backend.errors import SettingsError

MiB = 1024 * 1024
DEFAULT_DATABASE = "sqlite:///adw-backend.db"


class Settings(BaseModel):
    """Everything the backend can be told; no other configuration is read anywhere."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    database_url: str = Field(
        default=DEFAULT_DATABASE,
        description="sqlite:///file (the embedded default) or postgresql://user@host/db.",
    )
    tokens: tuple[SecretStr, ...] = Field(
        default=(), description="Write tokens; when any token is set, every route needs one."
    )
    read_tokens: tuple[SecretStr, ...] = Field(
        default=(), description="Tokens that may only read: GET routes and the WebSocket."
    )
    max_event_bytes: int = Field(default=1 * MiB, ge=1024)
    max_batch_bytes: int = Field(default=16 * MiB, ge=1024)
    max_batch_events: int = Field(default=1000, ge=1, le=100_000)
    ws_queue: int = Field(
        default=1024,
        ge=1,
        description="Messages a WebSocket client may have pending before it is dropped. A batch "
        "publishes one message per event at once, so keep it above max_batch_events; the text "
        "of a message is shared by every client, so memory grows with this, not with clients.",
    )
    ws_queue_bytes: int = Field(
        default=64 * MiB,
        ge=1024,
        description="Bytes a WebSocket client may have pending before it is dropped (one "
        "message is always let through, however large).",
    )
    sqlite_synchronous: Literal["full", "normal"] = Field(
        default="full",
        description="full: each answered event is on disk first. normal: a commit does not wait "
        "for the disk; a power cut (not a crash) can lose the last events the backend "
        "answered, which the agent does not send again. PostgreSQL ignores this.",
    )
    cost_points: int = Field(default=500, ge=2, description="Cost points kept per workflow.")
    notify_channel: str = Field(default="adw_backend_events", pattern=r"^[a-z_][a-z0-9_]*$")

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str) -> str:
        scheme = url.split(":", 1)[0]
        if not (scheme.startswith("sqlite") or scheme.startswith("postgres")):
            raise ValueError("must start with sqlite:/// or postgresql://")
        try:
            make_url(url)
        except (ArgumentError, ValueError):
            # The URL may hold a password: say what is wrong, never echo it.
            raise ValueError("not a database URL (sqlite:///FILE or postgresql://…)") from None
        return url

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tokens or self.read_tokens)

    @property
    def sqlalchemy_url(self) -> str:
        """The URL with the driver spelled out: a bare ``postgresql://`` would pick psycopg2."""
        scheme, rest = self.database_url.split("://", 1)
        if scheme in ("postgresql", "postgres"):
            return f"postgresql+psycopg://{rest}"
        return self.database_url


def read_tokens_file(path: Path, key: str) -> tuple[SecretStr, ...]:
    """Tokens from a file, one per line (so a token can be rotated without downtime)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SettingsError(f"{key} {path}: {reason}") from None
    tokens = tuple(SecretStr(line.strip()) for line in text.splitlines() if line.strip())
    if not tokens:
        raise SettingsError(f"{key} {path}: no token in the file")
    return tokens


def load_settings(
    *,
    database_url: str | None = None,
    token_file: Path | None = None,
    read_token_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Settings from explicit options first, then ``ADW_BACKEND_*`` variables, then defaults.

    Raises :class:`SettingsError` with one line naming the option (or variable) and file.
    """
    environ = os.environ if env is None else env
    values: dict[str, object] = {}
    url = database_url or environ.get("ADW_BACKEND_DATABASE_URL")
    if url:
        values["database_url"] = url
    for option, variable, field, given in (
        ("--token-file", "ADW_BACKEND_TOKEN_FILE", "tokens", token_file),
        ("--read-token-file", "ADW_BACKEND_READ_TOKEN_FILE", "read_tokens", read_token_file),
    ):
        if given is not None:
            values[field] = read_tokens_file(given, option)
        elif environ.get(variable):
            values[field] = read_tokens_file(Path(environ[variable]), variable)
    for field in (
        "max_event_bytes",
        "max_batch_bytes",
        "ws_queue",
        "ws_queue_bytes",
        "sqlite_synchronous",
    ):
        variable = f"ADW_BACKEND_{field.upper()}"
        if environ.get(variable):
            values[field] = environ[variable]
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "settings"
        where = f"ADW_BACKEND_{field.upper()}"
        if field == "database_url" and database_url:
            where = "--database"
        raise SettingsError(f"{where}: {error['msg'].removeprefix('Value error, ')}") from None
