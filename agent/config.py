"""Configuration: one TOML file per worktree, validated once into a frozen object.

Sources, later ones win:

1. the TOML file given with ``--config``;
2. environment variables ``ADW_AGENT_<SECTION>__<KEY>``, e.g. ``ADW_AGENT_BACKEND__URL`` or
   ``ADW_AGENT_WATCH__MODE``. A value is read as a TOML value when it parses as one
   (``20``, ``1.5``, ``true``, ``["a"]``) and as a plain string otherwise; a key that takes
   text (a URL, a path, ``adw.id``) always keeps the raw string.

The bearer token is never part of the file. It is taken from, in order: ``backend.token_file``,
the environment variable ``ADW_AGENT_TOKEN``, or the systemd credential ``adw-token`` in
``$CREDENTIALS_DIRECTORY`` (``LoadCredential=adw-token:...``). It is held as a ``SecretStr`` and
redacted everywhere it could be printed.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.errors import ConfigError

ENV_PREFIX = "ADW_AGENT_"
TOKEN_ENV = "ADW_AGENT_TOKEN"  # noqa: S105  (a variable name, not a secret)
CREDENTIAL_NAME = "adw-token"

#: How changes are noticed: inotify with a fallback to polling, inotify only, or polling only.
WatchMode = Literal["auto", "inotify", "poll"]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class AdwSection(_Section):
    """What the agent reports on: one run directory (``dir``), or every run directory under a
    root (``root``, host mode). Exactly one of the two."""

    dir: Path | None = None
    root: Path | None = None
    id: str | None = Field(
        default=None,
        description="ADW id; defaults to the run directory's name. In host mode, the name the "
        "agent's own status is sent under (default 'host-' and the machine's host name, so that "
        "the agents of several build hosts never share one stream): each run keeps its "
        "directory's name.",
    )

    @model_validator(mode="after")
    def _one_of_dir_and_root(self) -> AdwSection:
        if (self.dir is None) == (self.root is None):
            raise ValueError("set exactly one of adw.dir (one run) and adw.root (host mode)")
        return self

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str | None) -> str | None:
        if value is not None and not _is_safe_name(value):
            raise ValueError("must be a plain file name (letters, digits, '-', '_', '.')")
        return value


class BackendSection(_Section):
    """Where events go and how they are sent."""

    url: str
    token_file: Path | None = None
    event_path: str = "/api/v1/event/{type}"
    batch_path: str = "/api/v1/events"
    connect_timeout: PositiveFloat = 3.0
    timeout: PositiveFloat = 10.0
    ca_bundle: Path | None = None
    allow_insecure: bool = Field(
        default=False,
        description="Allow sending the token over plain http to a non-loopback host.",
    )

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        return check_url(value)

    @field_validator("batch_path")
    @classmethod
    def _valid_batch_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @field_validator("event_path")
    @classmethod
    def _valid_path(cls, value: str) -> str:
        if not value.startswith("/") or "{type}" not in value:
            raise ValueError("must start with '/' and contain '{type}'")
        if any(char.isspace() or not char.isprintable() for char in value):
            raise ValueError("contains a space or control character")
        return value

    def is_loopback(self) -> bool:
        """True when the backend host is this machine."""
        host = urlsplit(self.url).hostname or ""
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


class StorageSection(_Section):
    """The agent's own durable state (SQLite)."""

    dir: Path
    synchronous: Literal["full", "normal"] = Field(
        default="full",
        description="'full' survives power loss; 'normal' only process crashes, and is faster.",
    )
    lock_dir: Path | None = Field(
        default=None,
        description="Host-wide directory of claims, one per watched run directory, so that two "
        "agents never report one run. Default /run/adw-agent, or adw-agent-<uid> in the "
        "temporary directory where /run/adw-agent cannot be created.",
    )


class WatchSection(_Section):
    """How changes are noticed."""

    mode: WatchMode = "auto"
    debounce_ms: Annotated[int, Field(ge=0, le=10_000)] = 5
    poll_interval: PositiveFloat = 1.0
    rescan_interval: PositiveFloat = 30.0
    parse_retry_ms: Annotated[int, Field(ge=1, le=60_000)] = 50
    parse_retries: Annotated[int, Field(ge=0, le=1000)] = 20
    allow_hardlinks: bool = Field(
        default=False,
        description="Read run-directory files that have more than one hard link. Off by "
        "default: a hard link to a file elsewhere would ship that file's content.",
    )


class DeliverySection(_Section):
    """Retry behaviour of the sender."""

    backoff_initial: PositiveFloat = 0.2
    backoff_max: PositiveFloat = 30.0
    drain_timeout: NonNegativeFloat = 5.0
    batch_max: Annotated[int, Field(ge=1, le=1000)] = 100


class IntervalsSection(_Section):
    """Periodic work. 0 disables the periodic resync."""

    heartbeat: PositiveFloat = 30.0
    resync: NonNegativeFloat = 0.0


class LimitsSection(_Section):
    """Memory bounds on input."""

    max_state_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    max_line_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024
    error_excerpt_bytes: Annotated[int, Field(ge=64, le=1024 * 1024)] = 4096
    # Message ids remembered to deduplicate split assistant lines: per transcript, and in all
    # beyond 8 per transcript (see agent.account.window.WindowBudget).
    dedup_window: Annotated[int, Field(ge=16, le=1 << 20)] = 1024
    dedup_total: Annotated[int, Field(ge=0, le=1 << 24)] = 16384


class PriceSection(_Section):
    """USD per million tokens for one model family."""

    input: NonNegativeFloat
    cache_write_5m: NonNegativeFloat
    cache_write_1h: NonNegativeFloat
    cache_read: NonNegativeFloat
    output: NonNegativeFloat


class CostSection(_Section):
    """Price overrides; keys are model-id prefixes such as ``claude-sonnet-4-5``."""

    fallback: PriceSection | None = None
    prices: dict[str, PriceSection] = Field(default_factory=dict)


class LogSection(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Section):
    """The whole, validated configuration. Built only by :func:`load`."""

    adw: AdwSection
    backend: BackendSection
    storage: StorageSection
    watch: WatchSection = WatchSection()
    delivery: DeliverySection = DeliverySection()
    intervals: IntervalsSection = IntervalsSection()
    limits: LimitsSection = LimitsSection()
    cost: CostSection = CostSection()
    log: LogSection = LogSection()
    token: SecretStr | None = Field(default=None, exclude=True)
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _insecure_token(self) -> Config:
        if (
            self.token is not None
            and self.backend.url.startswith("http://")
            and not self.backend.is_loopback()
            and not self.backend.allow_insecure
        ):
            raise ValueError(
                "backend.url: refusing to send the token over plain http to a non-loopback "
                "host; use https or set backend.allow_insecure = true"
            )
        return self

    @property
    def adw_id(self) -> str:
        """The ADW this configuration is about; in host mode, the name of the agent's status."""
        if self.adw.id:
            return self.adw.id
        return self.adw.dir.name if self.adw.dir is not None else host_status_id()

    @property
    def host_mode(self) -> bool:
        return self.adw.root is not None

    @property
    def run_dir(self) -> Path:
        """The one run directory (not in host mode: see :meth:`for_run`)."""
        if self.adw.dir is None:
            raise RuntimeError("a host-mode configuration has no single run directory")
        return self.adw.dir

    @property
    def watched(self) -> Path:
        """The directory the agent watches: the run directory, or the root."""
        return self.adw.root or self.run_dir

    def for_run(self, run_dir: Path) -> Config:
        """This configuration for one run directory under the root."""
        adw = AdwSection.model_construct(dir=run_dir, root=None, id=None)
        return self.model_copy(update={"adw": adw})

    def token_file_problem(self) -> str | None:
        """A warning when ``backend.token_file`` can be read or written by other users (as ssh
        warns about a private key), else None."""
        path = self.backend.token_file
        if path is None:
            return None
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return None
        if mode & 0o006:
            return (
                f"backend.token_file: {path} is readable or writable by other users "
                f"(mode {mode & 0o777:04o}); restrict it, e.g. chmod 600"
            )
        return None

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, with the token shown only as present."""
        data = self.model_dump(mode="json")
        data["backend"]["token"] = "<redacted>" if self.token is not None else None
        return data


def check_url(value: str) -> str:
    """The one validation of ``backend.url``, for ``check-config`` and ``run`` alike: what
    passes here the HTTP client accepts. Messages never quote the URL, which could hold a
    password."""
    for position, char in enumerate(value):
        if char.isspace() or not char.isprintable():
            raise ValueError(
                f"contains a space or control character at position {position} (a tab or a "
                "trailing newline?)"
            )
    parts = urlsplit(value)
    if "@" in parts.netloc:
        raise ValueError(
            "must not contain a user name or password; the token is sent as a Bearer header "
            "(backend.token_file)"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError("has an invalid port") from exc
    try:
        httpx.URL(value)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise ValueError("is not a URL the HTTP client accepts") from None
    return value.rstrip("/")


@functools.cache
def host_status_id() -> str:
    """The default name of a host-mode agent's own status: ``host-`` and the host name, read
    once per process (a machine renamed while the agent runs keeps its stream).

    Every build host's agent sends its status as a stream of its own; one shared name would
    make the backend order the statuses of different hosts as one stream and drop some.
    """
    name = "".join(
        c if c.isascii() and (c.isalnum() or c in "-_.") else "-" for c in socket.gethostname()
    )
    return f"host-{name}"[:128] if name.strip(".") else "host"


def _is_safe_name(name: str) -> bool:
    return (
        0 < len(name) <= 128
        and name not in (".", "..")
        and all(c.isascii() and (c.isalnum() or c in "-_.") for c in name)
    )


def _env_value(raw: str, text_only: bool) -> Any:
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    # A key that only takes text keeps the raw string: an ADW id such as "12345678" or "1e5"
    # parses as a TOML number, and strict validation would then reject it.
    return raw if text_only and not isinstance(value, str) else value


def _takes_text(path: list[str]) -> bool:
    """True when the key at ``path`` accepts only a string or a path (or nothing)."""
    model: Any = Config
    for part in path[:-1]:
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        model = annotation
    field = model.model_fields.get(path[-1])
    if field is None:
        return False
    choices = get_args(field.annotation) or (field.annotation,)
    return all(choice in (str, Path, type(None)) for choice in choices)


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name or name == TOKEN_ENV:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: cannot set a key below the value '{part}'")
            node = child
        node[path[-1]] = _env_value(raw, _takes_text(path))


def _read_secret(path: Path, what: str) -> SecretStr:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"{what}: cannot read {path}: {reason}") from None
    if not text:
        raise ConfigError(f"{what}: {path} is empty")
    return _header_safe(text, f"{what}: {path}")


_BEARER_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")


def _header_safe(token: str, where: str) -> SecretStr:
    """The token goes into an ``Authorization: Bearer`` header, whose grammar (RFC 6750
    b64token) is letters, digits and ``-._~+/`` with trailing ``=``. Anything else fails on
    every request, and the HTTP library's error then quotes the header, token included; a
    quote or backslash would also be escaped in JSON logs, out of reach of their redaction.
    So it is refused here, with a message that never shows it."""
    if not _BEARER_TOKEN.fullmatch(token):
        raise ConfigError(
            f"{where}: the token must be a bearer token (letters, digits, '-._~+/', "
            "trailing '='), without spaces or control characters"
        )
    return SecretStr(token)


def _token(data: Mapping[str, Any], environ: Mapping[str, str]) -> SecretStr | None:
    backend = data.get("backend")
    token_file = backend.get("token_file") if isinstance(backend, dict) else None
    if isinstance(token_file, str):
        return _read_secret(Path(token_file), "backend.token_file")
    if environ.get(TOKEN_ENV, "").strip():
        return _header_safe(environ[TOKEN_ENV].strip(), TOKEN_ENV)
    cred_dir = environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / CREDENTIAL_NAME).is_file():
        return _read_secret(Path(cred_dir) / CREDENTIAL_NAME, "CREDENTIALS_DIRECTORY")
    return None


def _describe(exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "config"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    msg = msg.removeprefix("Value error, ")
    extra = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{key}: {msg}{extra}"


def load(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, merge and validate the configuration. Raises :class:`ConfigError` with one line."""
    env = os.environ if environ is None else environ
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        _apply_env(data, env)
        token = _token(data, env)
        data["token"] = token
        data["source"] = path
        return _validate(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from None


def _validate(data: dict[str, Any]) -> Config:
    # Strict mode rejects "5" for a number, but TOML strings are how paths arrive: convert the
    # path-typed keys first so that strictness applies to everything else.
    for section, key in (
        ("adw", "dir"),
        ("adw", "root"),
        ("storage", "dir"),
        ("storage", "lock_dir"),
        ("backend", "token_file"),
        ("backend", "ca_bundle"),
    ):
        node = data.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str):
            node[key] = Path(node[key])
    if isinstance(data.get("token"), str):
        data["token"] = SecretStr(data["token"])
    return Config.model_validate(data)


def preflight(config: Config) -> None:
    """Check what validation cannot: the run directory is readable, storage is writable,
    the CA bundle exists. Raises :class:`ConfigError` naming the key and the file."""
    where = f"{config.source}: " if config.source else ""
    run_dir = config.watched
    key = "adw.root" if config.host_mode else "adw.dir"
    if run_dir.is_symlink():
        # The agent opens nothing through a symlink, so it would read nothing there.
        raise ConfigError(
            f"{where}{key}: {run_dir} is a symlink; the agent does not follow symlinks, "
            "set it to the real directory"
        )
    if not run_dir.is_dir():
        raise ConfigError(f"{where}{key}: {run_dir} is not a directory")
    if not os.access(run_dir, os.R_OK | os.X_OK):
        raise ConfigError(f"{where}{key}: {run_dir} is not readable")
    if not _is_safe_name(config.adw_id):
        raise ConfigError(f"{where}adw.id: {config.adw_id!r} is not a safe file name; set adw.id")
    storage = config.storage.dir
    try:
        storage.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"{where}storage.dir: cannot create {storage}: {exc.strerror}") from None
    if not os.access(storage, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}storage.dir: {storage} is not writable")
    if _inside(storage, run_dir):
        raise ConfigError(
            f"{where}storage.dir: must not be inside {key} (the agent never writes there)"
        )
    bundle = config.backend.ca_bundle
    if bundle is not None and not bundle.is_file():
        raise ConfigError(f"{where}backend.ca_bundle: {bundle} is not a readable file")


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True
