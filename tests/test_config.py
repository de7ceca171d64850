"""Tests for agent.config: validation, environment overrides, the token and the preflight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config import Config, check_url, host_status_id, load, preflight
from agent.errors import ConfigError

TOKEN = "s3cret-token-value"


def write(tmp_path: Path, body: str = "", **paths: Path) -> Path:
    """A minimal config file; ``body`` is appended (new sections only)."""
    run_dir = paths.get("run_dir", tmp_path / "run" / "abc123")
    storage = paths.get("storage", tmp_path / "storage")
    text = (
        f'[adw]\ndir = "{run_dir}"\n'
        f'[backend]\nurl = "http://127.0.0.1:8000"\n'
        f'[storage]\ndir = "{storage}"\n' + body
    )
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


@pytest.fixture
def good(tmp_path: Path) -> Path:
    (tmp_path / "run" / "abc123").mkdir(parents=True)
    return write(tmp_path)


def add(path: Path, section: str | None, line: str) -> None:
    """Add ``line`` to ``[section]`` of the file (or at the top level for None)."""
    text = path.read_text()
    header = f"[{section}]\n"
    if section is None:
        text = f"{line}\n{text}"
    elif header in text:
        text = text.replace(header, f"{header}{line}\n", 1)
    else:
        text += f"{header}{line}\n"
    path.write_text(text)


def load_error(path: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        preflight(load(path, env or {}))
    message = str(info.value)
    assert "\n" not in message
    return message


# -- a good file ----------------------------------------------------------------------------


def test_minimal_config_gets_defaults_and_the_id_from_the_directory(good: Path) -> None:
    config = load(good, {})
    assert config.adw_id == "abc123"
    assert config.backend.url == "http://127.0.0.1:8000"
    assert config.watch.mode == "auto"
    assert config.storage.synchronous == "full"
    assert config.token is None
    assert config.source == good
    preflight(config)
    assert config.storage.dir.is_dir()


def test_config_is_frozen(good: Path) -> None:
    config = load(good, {})
    with pytest.raises(ValueError, match="frozen"):
        config.watch.mode = "poll"  # type: ignore[misc]


def test_url_trailing_slash_is_dropped(tmp_path: Path) -> None:
    path = write(tmp_path)
    path.write_text(path.read_text().replace(":8000", ":8000/"))
    assert load(path, {}).backend.url == "http://127.0.0.1:8000"


# -- validation: one line naming the key and the file -----------------------------------------


@pytest.mark.parametrize(
    ("section", "line", "key", "words"),
    [
        ("watch", "bogus = 1", "watch.bogus", "unknown key"),
        (None, "surprise = 1", "surprise", "unknown key"),
        ("watch", 'debounce_ms = "5"', "watch.debounce_ms", "valid integer"),
        ("watch", "debounce_ms = true", "watch.debounce_ms", "valid integer"),
        ("watch", "debounce_ms = -1", "watch.debounce_ms", "greater than or equal"),
        ("watch", 'mode = "fanotify"', "watch.mode", "'auto', 'inotify' or 'poll'"),
        ("delivery", "backoff_initial = 0", "delivery.backoff_initial", "greater than 0"),
        ("log", 'level = "loud"', "log.level", "'debug'"),
        ("backend", 'token = "x"', "backend.token", "unknown key"),
        ("adw", "id = 5", "adw.id", "valid string"),
    ],
)
def test_invalid_values_name_the_key_and_the_file(
    good: Path, section: str | None, line: str, key: str, words: str
) -> None:
    add(good, section, line)
    message = load_error(good)
    assert message.startswith(f"{good}: {key}: ")
    assert words in message


def test_missing_required_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[adw]\ndir = "/x"\n[storage]\ndir = "/y"\n')
    message = load_error(path)
    assert message == f"{path}: backend: required key is missing"


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[adw\n")
    assert load_error(path).startswith(f"{path}: not valid TOML")
    assert load_error(tmp_path / "nope.toml") == f"{tmp_path / 'nope.toml'}: no such file"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://host/x", "http:// or https://"),
        ("http://", "with a host"),
        ("http://h:99999", "invalid port"),
        ("http://h/x?y=1", "query or fragment"),
    ],
)
def test_backend_url_is_checked(tmp_path: Path, url: str, words: str) -> None:
    path = write(tmp_path)
    path.write_text(path.read_text().replace("http://127.0.0.1:8000", url))
    message = load_error(path)
    assert "backend.url:" in message
    assert words in message


def test_event_path_needs_the_type_placeholder(tmp_path: Path) -> None:
    path = write(tmp_path)
    add(path, "backend", 'event_path = "/events"')
    assert "backend.event_path: must start with '/' and contain '{type}'" in load_error(path)


def test_more_than_one_problem_is_counted_on_the_same_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[watch]\nbogus = 1\nother = 2\n")
    assert load_error(path).endswith("(and 1 more)")


# -- preflight: what validation cannot see ----------------------------------------------------


def test_missing_run_dir(tmp_path: Path) -> None:
    path = write(tmp_path)
    message = load_error(path)
    assert message == f"{path}: adw.dir: {tmp_path / 'run' / 'abc123'} is not a directory"


def test_storage_inside_run_dir_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run" / "abc123"
    run_dir.mkdir(parents=True)
    path = write(tmp_path, run_dir=run_dir, storage=run_dir / ".agent")
    assert "storage.dir: must not be inside adw.dir" in load_error(path)


def test_storage_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "run" / "abc123").mkdir(parents=True)
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = write(tmp_path, storage=blocker / "storage")
    message = load_error(path)
    assert f"storage.dir: cannot create {blocker / 'storage'}" in message


def test_missing_ca_bundle(tmp_path: Path) -> None:
    (tmp_path / "run" / "abc123").mkdir(parents=True)
    path = write(tmp_path)
    add(path, "backend", 'ca_bundle = "/no/ca.pem"')
    assert "backend.ca_bundle: /no/ca.pem is not a readable file" in load_error(path)


def test_unsafe_adw_id(tmp_path: Path) -> None:
    path = write(tmp_path)
    add(path, "adw", 'id = "../x"')
    assert "adw.id: must be a plain file name" in load_error(path)


# -- environment ------------------------------------------------------------------------------


def test_env_overrides_the_file(good: Path) -> None:
    env = {
        "ADW_AGENT_BACKEND__URL": "https://backend.example:8443/",
        "ADW_AGENT_WATCH__DEBOUNCE_MS": "20",
        "ADW_AGENT_WATCH__MODE": "poll",
        "ADW_AGENT_BACKEND__ALLOW_INSECURE": "true",
        "ADW_AGENT_DELIVERY__BACKOFF_MAX": "1.5",
        "ADW_AGENT_NOT_NESTED": "ignored",
        "OTHER__THING": "ignored",
    }
    config = load(good, env)
    assert config.backend.url == "https://backend.example:8443"
    assert config.watch.debounce_ms == 20
    assert config.watch.mode == "poll"
    assert config.backend.allow_insecure is True
    assert config.delivery.backoff_max == 1.5


@pytest.mark.parametrize("value", ["12345678", "1e5", "0x10", "true", '"55b761f6"'])
def test_env_string_keys_stay_strings_even_when_they_look_like_numbers(
    good: Path, value: str
) -> None:
    # ADW ids are eight hex digits: "12345678" and "1e5..." parse as TOML numbers.
    config = load(good, {"ADW_AGENT_ADW__ID": value})
    assert config.adw_id == value.strip('"')


def test_env_cannot_nest_below_a_value(good: Path) -> None:
    add(good, "watch", 'mode = "poll"')
    with pytest.raises(ConfigError, match="ADW_AGENT_WATCH__MODE__X: cannot set a key below"):
        load(good, {"ADW_AGENT_WATCH__MODE__X": "1"})


def test_env_unknown_key_is_named(good: Path) -> None:
    message = load_error(good, {"ADW_AGENT_WATCH__NOPE": "1"})
    assert "watch.nope: unknown key" in message


def test_env_wrong_type_is_named(good: Path) -> None:
    message = load_error(good, {"ADW_AGENT_WATCH__DEBOUNCE_MS": "fast"})
    assert "watch.debounce_ms: Input should be a valid integer" in message


# -- the token --------------------------------------------------------------------------------


def secret(config: Config) -> str | None:
    return None if config.token is None else config.token.get_secret_value()


def test_token_from_file_env_and_credentials(tmp_path: Path, good: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "adw-token").write_text(f"{TOKEN}-cred\n")
    env_token = {"ADW_AGENT_TOKEN": f"{TOKEN}-env"}
    cred_env = {"CREDENTIALS_DIRECTORY": str(creds)}

    assert secret(load(good, cred_env)) == f"{TOKEN}-cred"
    assert secret(load(good, {**cred_env, **env_token})) == f"{TOKEN}-env"
    with_file = {**cred_env, **env_token, "ADW_AGENT_BACKEND__TOKEN_FILE": str(token_file)}
    assert secret(load(good, with_file)) == f"{TOKEN}-file"
    assert secret(load(good, {"CREDENTIALS_DIRECTORY": str(tmp_path / "none")})) is None


def test_blank_token_env_means_no_token(good: Path) -> None:
    assert load(good, {"ADW_AGENT_TOKEN": "  "}).token is None


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "binary"])
def test_unreadable_token_file(tmp_path: Path, good: Path, kind: str) -> None:
    token = tmp_path / "token"
    if kind == "directory":
        token.mkdir()
    elif kind == "empty":
        token.write_text("\n")
    elif kind == "binary":
        token.write_bytes(b"\xff\xfe\x00")
    message = load_error(good, {"ADW_AGENT_BACKEND__TOKEN_FILE": str(token)})
    assert message.startswith(f"{good}: backend.token_file: ")
    assert str(token) in message


def test_unreadable_credential(tmp_path: Path, good: Path) -> None:
    creds = tmp_path / "creds"
    (creds / "adw-token").mkdir(parents=True)
    # A directory named adw-token is not a credential: the agent runs without a token.
    assert load(good, {"CREDENTIALS_DIRECTORY": str(creds)}).token is None
    (creds / "adw-token").rmdir()
    (creds / "adw-token").write_bytes(b"\xff")
    message = load_error(good, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert "CREDENTIALS_DIRECTORY: cannot read" in message


def test_token_is_redacted_everywhere(good: Path) -> None:
    config = load(good, {"ADW_AGENT_TOKEN": TOKEN})
    redacted = config.redacted()
    assert redacted["backend"]["token"] == "<redacted>"
    assert TOKEN not in repr(redacted)
    assert TOKEN not in repr(config)
    assert TOKEN not in str(config)
    assert TOKEN not in config.model_dump_json()
    assert load(good, {}).redacted()["backend"]["token"] is None


def test_token_over_plain_http_to_another_host_is_refused(good: Path) -> None:
    env: dict[str, Any] = {"ADW_AGENT_TOKEN": TOKEN, "ADW_AGENT_BACKEND__URL": "http://10.1.2.3"}
    message = load_error(good, env)
    assert "backend.url: refusing to send the token over plain http" in message
    assert TOKEN not in message
    assert load(good, {**env, "ADW_AGENT_BACKEND__ALLOW_INSECURE": "true"}).token is not None
    https = {**env, "ADW_AGENT_BACKEND__URL": "https://10.1.2.3"}
    assert load(good, https).backend.url == "https://10.1.2.3"
    for host in ("localhost", "127.0.0.2", "[::1]"):
        local = {**env, "ADW_AGENT_BACKEND__URL": f"http://{host}:1"}
        assert load(good, local).backend.is_loopback()


def test_batch_max_and_batch_path(tmp_path: Path) -> None:
    path = write(tmp_path)
    assert load(path, {}).delivery.batch_max == 100
    assert load(path, {}).backend.batch_path == "/api/v1/events"
    for bad in ("0", "1001"):
        assert load_error(path, {"ADW_AGENT_DELIVERY__BATCH_MAX": bad}).startswith(
            f"{path}: delivery.batch_max:"
        )
    add(path, "backend", 'batch_path = "events"')
    assert "backend.batch_path: must start with '/'" in load_error(path)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://alice:hunter2@127.0.0.1:9", "user name or password"),
        ("https://alice@backend.example", "user name or password"),
        ("http://127.0.0.1:9\t/api", "position 18"),
        ("http://127.0.0.1:9\n", "position 18"),
        ("http://127.0.0.1:9/a b", "space or control"),
        ("http://127.0.0.1:9/\x7f", "space or control"),
        ("http://127.0.0.1:99999", "invalid port"),
        ("ftp://127.0.0.1", "http:// or https://"),
    ],
)
def test_check_url_refuses_what_the_client_would_and_never_quotes_it(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as raised:
        check_url(url)
    assert "hunter2" not in str(raised.value)
    assert "alice" not in str(raised.value)


def test_check_url_keeps_good_urls() -> None:
    assert check_url("https://adw.example.com/") == "https://adw.example.com"
    assert check_url("http://[::1]:8002/base") == "http://[::1]:8002/base"


def test_host_mode_status_is_named_after_the_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "build-07.example")
    host_status_id.cache_clear()
    base = {"backend": {"url": "http://127.0.0.1:1"}, "storage": {"dir": tmp_path / "s"}}
    config = Config.model_validate({"adw": {"root": tmp_path}, **base})
    assert config.adw_id == "host-build-07.example"
    # Characters a file name cannot hold are replaced, so the name stays a plain one.
    monkeypatch.setattr("socket.gethostname", lambda: "bü ild")
    assert host_status_id() == "host-build-07.example", "read once per process"
    host_status_id.cache_clear()
    assert host_status_id() == "host-b--ild"
    host_status_id.cache_clear()
    named = Config.model_validate({"adw": {"root": tmp_path, "id": "rack-3"}, **base})
    assert named.adw_id == "rack-3"
