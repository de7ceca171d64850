"""Static checks of the Dockerfile and docker-compose.example.yml.

No Docker engine is needed: these read the files. They cannot show that the image builds or
that the container runs; the read-only, unprivileged run is exercised by the sandboxed run in
test_deploy_systemd.py. PyYAML is not a dependency, so the compose file is read by a small
parser for the block-style YAML subset it is written in; anything outside that subset fails
the test rather than being misread.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from agent import config as config_module
from agent.config import AdwSection, DeliverySection
from tests.harness import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.example.yml"
HOST_COMPOSE = ROOT / "docker-compose.host.example.yml"
HOST_MODE = "root" in AdwSection.model_fields
CONFIG_IN_IMAGE = "/etc/adw-agent/agent.toml"
MOUNT = re.compile(r"^(?P<source>\$\{[^}]*\}|[^:$]+):(?P<target>/[^:]*)(?::(?P<mode>ro|rw))?$")
SECRET_WORDS = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|CREDENTIAL", re.IGNORECASE)


# -- Dockerfile -------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "dangling line continuation"
    return out


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last:]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec form: {args}"
    assert all(isinstance(v, str) for v in value)
    return value


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def test_runs_as_a_non_root_user(steps: list[tuple[str, str]]) -> None:
    users = [args for word, args in final_stage(steps) if word == "USER"]
    assert users, "the runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]


def test_entrypoint_and_cmd_are_exec_form(steps: list[tuple[str, str]]) -> None:
    stage = dict(final_stage(steps))
    assert exec_form(stage["ENTRYPOINT"]) == ["env", "--block-signal=HUP,TERM,INT", "adw-agent"]
    assert exec_form(stage["CMD"]) == ["run", "--config", CONFIG_IN_IMAGE]


def test_healthcheck_uses_the_agents_healthcheck(steps: list[tuple[str, str]]) -> None:
    checks = [args for word, args in final_stage(steps) if word == "HEALTHCHECK"]
    assert len(checks) == 1
    options, _, command = checks[0].partition("CMD ")
    assert exec_form(command) == ["adw-agent", "healthcheck", "--config", CONFIG_IN_IMAGE]
    assert re.search(r"--interval=\d+s", options)


def test_base_image_and_read_only_friendly_runtime(steps: list[tuple[str, str]]) -> None:
    # ARG NAME=default, or ARG NAME with no default (e.g. PIP_INDEX_URL, build-time only).
    args = {
        name: default
        for word, a in steps
        if word == "ARG"
        for name, _, default in [a.partition("=")]
        if default
    }
    bases = [a.split()[0] for word, a in steps if word == "FROM"]
    resolved = {args.get(b.strip("${}"), b) for b in bases}
    assert resolved <= {"python:3.11-slim", "python:3.12-slim"}, resolved
    env = " ".join(a for word, a in final_stage(steps) if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    volumes = [exec_form(a) for word, a in final_stage(steps) if word == "VOLUME"]
    assert ["/var/lib/adw-agent"] in volumes


def test_no_secrets_and_no_remote_sources(steps: list[tuple[str, str]]) -> None:
    for word, args in steps:
        assert word != "ADD", "use COPY; ADD fetches URLs and unpacks archives"
        if word in ("ENV", "ARG", "LABEL"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]
            for name in names:
                assert not SECRET_WORDS.search(name), f"{word} {name} would bake a secret in"
        if word == "RUN":
            assert not re.search(r"\b(curl|wget)\b", args), args
        if word == "COPY":
            assert not SECRET_WORDS.search(args), args
        assert "ADW_AGENT_TOKEN" not in args


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern decides; "!" re-includes."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.removeprefix("!").rstrip("/")
        parts = PurePosixPath(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes) or fnmatch.fnmatchcase(path, pat):
            result = not negate
    return result


def test_copy_sources_exist_and_are_in_the_build_context(steps: list[tuple[str, str]]) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = 0
    for word, args in steps:
        if word != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = args.split()
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: no such file in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            files = [f for f in files if "__pycache__" not in f.parts]
            assert files
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                assert not ignored(rel, patterns), f"{rel} is excluded by .dockerignore"
                copied += 1
    assert copied >= 3
    for private in ("agent.toml", "secrets/adw-token", ".venv/bin/python", ".git/config"):
        assert ignored(private, patterns), f"{private} would be sent to the build"


# -- docker-compose.example.yml --------------------------------------------------------------


def _scalar(text: str) -> Any:
    text = text.strip()
    if text[:1] in "[{&*|>!":
        raise ValueError(f"unsupported YAML: {text!r}")
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return text


def _strip_comment(line: str) -> str:
    quote = ""
    for i, ch in enumerate(line):
        if ch in "\"'" and not quote:
            quote = ch
        elif ch == quote:
            quote = ""
        elif ch == "#" and not quote and (i == 0 or line[i - 1] == " "):
            return line[:i].rstrip()
    return line.rstrip()


def parse_yaml(text: str) -> Any:
    """Block mappings, block sequences and plain or quoted scalars; nothing else."""
    lines: list[tuple[int, str]] = []
    for raw in text.splitlines():
        if "\t" in raw:
            raise ValueError("tabs are not allowed")
        line = _strip_comment(raw)
        if line.strip():
            lines.append((len(line) - len(line.lstrip()), line.strip()))

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- "):
            items: list[Any] = []
            while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
                item = lines[i][1][2:]
                if re.match(r"^[\w.-]+:( |$)", item):
                    lines[i] = (indent + 2, item)
                    value, i = block(i, indent + 2)
                else:
                    value, i = _scalar(item), i + 1
                items.append(value)
            return items, i
        mapping: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent:
            match = re.match(r"^([\w.-]+):(?: (.*))?$", lines[i][1])
            if not match:
                raise ValueError(f"unsupported YAML line: {lines[i][1]!r}")
            key, rest = match.group(1), match.group(2)
            if key in mapping:
                raise ValueError(f"duplicate key {key!r}")
            if rest:
                mapping[key], i = _scalar(rest), i + 1
            elif i + 1 < len(lines) and lines[i + 1][0] > indent:
                mapping[key], i = block(i + 1, lines[i + 1][0])
            else:
                mapping[key], i = None, i + 1
        if i < len(lines) and lines[i][0] > indent:
            raise ValueError(f"bad indentation at {lines[i][1]!r}")
        return mapping, i

    value, end = block(0, lines[0][0])
    if end != len(lines):
        raise ValueError(f"unparsed YAML from {lines[end][1]!r}")
    return value


def test_the_yaml_reader_refuses_what_it_does_not_understand() -> None:
    assert parse_yaml("a:\n  - x\n  - k: 1\n    j: 'q: r'\nb: true\n") == {
        "a": ["x", {"k": 1, "j": "q: r"}],
        "b": True,
    }
    for bad in ("a: [1, 2]\n", "a: &x 1\n", "a:\n\tb: 1\n", "a: 1\na: 2\n", "a: |\n  x\n"):
        with pytest.raises(ValueError, match=r"YAML|tabs|duplicate"):
            parse_yaml(bad)


@pytest.fixture(scope="module", params=[COMPOSE, HOST_COMPOSE], ids=["sidecar", "host"])
def compose_file(request: pytest.FixtureRequest) -> Path:
    path = request.param
    assert isinstance(path, Path)
    return path


@pytest.fixture(scope="module")
def compose(compose_file: Path) -> dict[str, Any]:
    data = parse_yaml(compose_file.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def agent(compose: dict[str, Any]) -> dict[str, Any]:
    service = compose["services"]["adw-agent"]
    assert isinstance(service, dict)
    return service


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    assert parts, value
    assert "".join(n + u for n, u in parts) == value, value
    return sum(float(n) * units[u] for n, u in parts)


def test_the_sidecar_is_locked_down(agent: dict[str, Any]) -> None:
    assert agent["init"] is True
    assert agent["read_only"] is True
    assert agent["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in agent["security_opt"]
    assert "/tmp" in agent["tmpfs"]
    assert "user" not in agent or agent["user"] not in ("root", "0", "0:0")
    assert seconds(agent["stop_grace_period"]) > DeliverySection().drain_timeout
    # Run directories are read through their group: they hold a GitHub token.
    assert len(agent["group_add"]) == 1
    assert agent["group_add"][0].startswith("${ADW_GID")


def test_mounts_line_up_with_the_configuration(
    compose: dict[str, Any], agent: dict[str, Any]
) -> None:
    env = agent["environment"]
    mounts: dict[str, tuple[str, str | None]] = {}
    for volume in agent["volumes"]:
        match = MOUNT.match(volume)
        assert match, volume
        mounts[match.group("target")] = (match.group("source"), match.group("mode"))
    # The run directory (or the agents root in host mode), read-only, where adw.dir or
    # adw.root points.
    if "ADW_AGENT_ADW__ROOT" in env:
        assert "ADW_AGENT_ADW__DIR" not in env
        assert "ADW_AGENT_ADW__ID" not in env
        assert mounts[env["ADW_AGENT_ADW__ROOT"]][1] == "ro"
    else:
        assert mounts[env["ADW_AGENT_ADW__DIR"]][1] == "ro"
        assert env["ADW_AGENT_ADW__ID"].startswith("${ADW_ID")
    # The config, read-only, where the image's CMD and HEALTHCHECK look.
    assert mounts[CONFIG_IN_IMAGE][1] == "ro"
    # storage.dir on a named volume.
    source, mode = mounts[env["ADW_AGENT_STORAGE__DIR"]]
    assert source in compose["volumes"]
    assert mode is None
    # The token: a compose secret, mounted where backend.token_file points.
    secrets = agent["secrets"]
    assert len(secrets) == 1
    target = secrets[0]["target"]
    path = target if target.startswith("/") else f"/run/secrets/{target}"
    assert env["ADW_AGENT_BACKEND__TOKEN_FILE"] == path
    assert "file" in compose["secrets"][secrets[0]["source"]]
    assert not any(SECRET_WORDS.search(k) and not k.endswith("TOKEN_FILE") for k in env)


def test_the_environment_is_a_valid_configuration(
    compose_file: Path, agent: dict[str, Any], tmp_path: Path
) -> None:
    environ = {
        k: re.sub(r"\$\{ADW_ID[^}]*\}", "55b761f6", str(v)) for k, v in agent["environment"].items()
    }
    token = tmp_path / "adw-token"
    token.write_text("example-token\n")
    environ["ADW_AGENT_BACKEND__TOKEN_FILE"] = str(token)
    if compose_file == HOST_COMPOSE:
        if not HOST_MODE:
            pytest.skip("host mode ([adw] root) is not in this build yet")
        # The host example's adw-agent.toml leaves adw.dir out.
        config_file = tmp_path / "adw-agent.toml"
        config_file.write_text('[backend]\nurl = "https://adw.example.com"\n')
        config = config_module.load(config_file, environ=environ)
        assert str(getattr(config.adw, "root", None)) == environ["ADW_AGENT_ADW__ROOT"]
    else:
        config = config_module.load(ROOT / "agent.example.toml", environ=environ)
        assert str(config.adw.dir) == environ["ADW_AGENT_ADW__DIR"]
        assert config.adw_id == "55b761f6"
    assert str(config.storage.dir) == "/var/lib/adw-agent"
    assert config.token is not None


def test_polling_for_docker_desktop_is_documented(compose_file: Path) -> None:
    text = compose_file.read_text()
    assert "Docker Desktop" in text
    assert re.search(r"#\s*ADW_AGENT_WATCH__MODE: poll", text)
