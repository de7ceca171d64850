"""The image built and run by a real Docker engine, the way the compose examples run it.

These tests run wherever a Docker engine answers (``DOCKER_HOST``, or the default socket). Without
one they are skipped, except under ``CI=true``, where a missing engine is a failure: CI starts
its own engine (``.ci/dockerd``) and makes the base image (``.ci/base-image``).

The image is built from the repository's Dockerfile unchanged, with only ``PYTHON_IMAGE`` set to
a locally made Debian image (``ADW_TEST_PYTHON_IMAGE``, default ``adw-agent-base:bookworm``;
made by ``.ci/base-image`` if it is missing). The container runs with the options of the
compose service, read from the compose file itself, so a change to the file is tested as it
is. Three options are the test's own: ``--network=host`` (the backend listens on 127.0.0.1),
``--health-interval=1s`` (the image's healthcheck every second instead of every 30 s)
and no restart policy (the test decides when the container runs).

The run directories are written the way tac-webbuilder writes them, and readable only through
their group (directories 0750 with the set-group-id bit, files 0640), as docs/deploy.md asks; a
``.gh-config/hosts.yml`` of mode 0600 stands for the GitHub token the container must not read.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.config import AdwSection
from tests.engine import docker, unique, wait_until
from tests.harness import ROOT, AdwWriter, Backend, Reply
from tests.integration.test_deploy_docker import parse_yaml, seconds

IMAGE_USER = "10001"
CONFIG = "/etc/adw-agent/agent.toml"
# The group the run directories are readable by: a group of its own when the test can chown.
RUN_GID = 20001 if os.geteuid() == 0 else os.getgid()
# Host mode (``[adw] root``): runs once the configuration knows the key.
HOST_MODE = "root" in AdwSection.model_fields


# -- the compose service as `docker run` options ---------------------------------------------

VARIABLE = re.compile(r"\$\{(\w+)(?::?[?-][^}]*)?\}")
IGNORED_KEYS = {"build", "image", "restart"}


def substitute(value: Any, variables: dict[str, str]) -> str:
    return VARIABLE.sub(lambda m: variables[m.group(1)], str(value))


def run_options(
    compose: dict[str, Any],
    variables: dict[str, str],
    files: dict[str, Path],
    volume: str,
) -> list[str]:
    """``docker run`` options equal to the compose service ``adw-agent``.

    ``files`` maps the compose file's relative sources (``./adw-agent.toml``) and secret names
    to host files; the named volume becomes ``volume``. A key this does not know fails the
    test rather than being dropped.
    """
    service = compose["services"]["adw-agent"]
    opts: list[str] = []
    for key, value in service.items():
        if key in IGNORED_KEYS:
            continue
        if key == "init":
            opts += ["--init"] if value else []
        elif key == "read_only":
            opts += ["--read-only"] if value else []
        elif key == "stop_grace_period":
            opts += ["--stop-timeout", str(int(seconds(value)))]
        elif key in ("cap_drop", "security_opt", "group_add", "tmpfs"):
            flag = "--" + key.replace("_", "-")
            for item in value:
                opts += [flag, substitute(item, variables)]
        elif key == "environment":
            opts += [f"--env={k}={substitute(v, variables)}" for k, v in value.items()]
        elif key == "volumes":
            for mount in value:
                source, _, rest = substitute(mount, variables).partition(":")
                if source.startswith("./"):
                    source = str(files[source])
                elif not source.startswith("/"):
                    assert source in compose["volumes"], source
                    source = volume
                opts += ["--volume", f"{source}:{rest}"]
        elif key == "secrets":
            for secret in value:
                path = files[compose["secrets"][secret["source"]]["file"]]
                opts += ["--volume", f"{path}:/run/secrets/{secret['target']}:ro"]
        elif key == "logging":
            opts += ["--log-driver", value["driver"]]
        else:
            raise AssertionError(f"the test does not know the compose key {key!r}")
    return opts


# -- run directories the way tac-webbuilder leaves them ----------------------------------------


@pytest.fixture
def group_umask() -> Iterator[None]:
    """Files and directories created during the test: 0640 and 0750, as docs/deploy.md says."""
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def group_readable_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, -1, RUN_GID)
    # set-group-id: what is created inside belongs to the group too.
    path.chmod(0o2750)
    return path


def write_gh_token(run_dir: Path) -> None:
    gh = run_dir / ".gh-config"
    gh.mkdir(mode=0o700)
    (gh / "hosts.yml").write_text("github.com:\n    oauth_token: gho_not_a_real_token\n")
    (gh / "hosts.yml").chmod(0o600)


# -- one container ---------------------------------------------------------------------------


@dataclass
class Deployment:
    image: str
    compose_file: Path
    variables: dict[str, str]
    tmp: Path
    token: str = field(default_factory=lambda: "engine-test-" + secrets.token_hex(8))
    volume: str = field(default_factory=lambda: "adw-test-state-" + secrets.token_hex(4))
    containers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        secret_dir = self.tmp / "secrets"
        secret_dir.mkdir(mode=0o700)
        self.token_file = secret_dir / "adw-token"
        self.token_file.write_text(self.token)
        # Compose mounts a file secret with its host owner and mode: the image's user reads it.
        if os.geteuid() == 0:
            os.chown(self.token_file, int(IMAGE_USER), -1)
        self.token_file.chmod(0o400)
        self.config = self.tmp / "adw-agent.toml"

    def configure(self, backend_url: str) -> None:
        """The mounted config, rewritten in place (a bind-mounted file keeps its inode)."""
        self.config.write_text(
            f'[backend]\nurl = "{backend_url}"\n\n'
            "[delivery]\nbackoff_initial = 5.0\nbackoff_max = 30.0\ndrain_timeout = 5.0\n"
        )
        self.config.chmod(0o644)

    def run(self) -> str:
        compose = parse_yaml(self.compose_file.read_text())
        files = {"./adw-agent.toml": self.config, "./secrets/adw-token": self.token_file}
        name = unique("adw-test")
        self.containers.append(name)
        options = run_options(compose, self.variables, files, self.volume)
        docker(
            "run",
            "--detach",
            "--name",
            name,
            *options,
            "--network=host",
            "--health-interval=1s",
            self.image,
        )
        return name

    def logs(self, name: str) -> str:
        done = docker("logs", name, check=False)
        return done.stdout + done.stderr

    def inspect(self, name: str, template: str) -> str:
        return docker("inspect", "--format", template, name).stdout.strip()

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 120) -> None:
        wait_until(what, check, self.describe, timeout)

    def describe(self) -> str:
        if not self.containers:
            return "no container"
        name = self.containers[-1]
        state = docker("inspect", "--format", "{{json .State}}", name, check=False).stdout
        return f"state: {state[:1500]}\nlogs: {self.logs(name)[-3000:]}"

    def remove(self) -> None:
        for name in self.containers:
            docker("rm", "--force", "--volumes", name, check=False)
        docker("volume", "rm", "--force", self.volume, check=False)


@pytest.fixture
def deployment_factory(agent_image: str, tmp_path: Path) -> Iterator[Callable[..., Deployment]]:
    made: list[Deployment] = []

    def make(compose_file: Path, variables: dict[str, str]) -> Deployment:
        made.append(Deployment(agent_image, compose_file, variables, tmp_path))
        return made[-1]

    yield make
    for deployment in made:
        deployment.remove()


def outbox_depth(name: str) -> int:
    """The queued events, from ``adw-agent status --json`` in the container (the largest
    ``outbox_depth`` it reports: the total where it also reports per run)."""
    done = docker("exec", name, "adw-agent", "status", "--json", "--config", CONFIG, check=False)
    if done.returncode != 0:
        return 0

    def depths(value: Any) -> Iterator[int]:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "outbox_depth" and isinstance(item, int):
                    yield item
                else:
                    yield from depths(item)
        elif isinstance(value, list):
            for item in value:
                yield from depths(item)

    return max(depths(json.loads(done.stdout)), default=0)


def fail_in_container(name: str, command: str) -> str:
    """Run ``sh -c command`` in the container as its user; it must fail. Returns stderr."""
    done = docker("exec", name, "sh", "-c", command, check=False)
    assert done.returncode != 0, f"{command!r} succeeded in the container"
    return done.stderr


def exercise(
    deployment: Deployment,
    writers: dict[str, AdwWriter],
    mounted: str,
    late_run: Callable[[], tuple[str, AdwWriter]] | None = None,
    *,
    never_touches_gh_config: bool = False,
) -> None:
    """Everything the container must do, for either compose file.

    ``writers`` are the runs (adw_id -> writer) present before the start; ``mounted`` is where
    the container sees the first one; ``late_run`` makes a run directory after the start.
    ``never_touches_gh_config``: not even a failed attempt to open something in ``.gh-config/``
    shows in the logs (host mode knows which files it reads).
    """
    first = Backend()
    second = Backend()
    try:
        for adw_id, writer in writers.items():
            writer.state({"adw_id": adw_id, "issue_number": "4", "issue_class": "/feature"})
        deployment.configure(first.url)
        name = deployment.run()

        # Events arrive, for every run, with the token from the secret file.
        first.wait_for(
            lambda evs: (
                {e["adw_id"] for e in evs if e["type"] == "workflow_update"} >= set(writers)
            ),
            timeout=60,
        )
        auth = {r.headers.get("Authorization") for r in first.requests}
        assert auth == {f"Bearer {deployment.token}"}
        if late_run is not None:
            adw_id, writer = late_run()
            writers[adw_id] = writer
            writer.state({"adw_id": adw_id, "issue_number": "5", "issue_class": "/bug"})
            first.wait_for(lambda evs: any(e["adw_id"] == adw_id for e in evs), timeout=30)

        # Non-root, read-only root, the run directory not writable, the GitHub token unreadable.
        assert docker("exec", name, "id", "-u").stdout.strip() == IMAGE_USER
        assert "Read-only file system" in fail_in_container(name, f"touch {mounted}/probe")
        assert "Read-only file system" in fail_in_container(name, "touch /probe")
        fail_in_container(name, f"cat {mounted}/.gh-config/hosts.yml")
        for writer in writers.values():
            assert not (writer.run_dir / "probe").exists()

        # The image's HEALTHCHECK turns healthy.
        deployment.wait(
            "healthy",
            lambda: deployment.inspect(name, "{{.State.Health.Status}}") == "healthy",
        )

        # SIGHUP reloads: the new backend URL takes effect.
        deployment.configure(second.url)
        docker("kill", "--signal", "HUP", name)
        deployment.wait(
            "the reload", lambda: "configuration reloaded" in deployment.logs(name), timeout=30
        )
        some_id, some_writer = next(iter(writers.items()))
        some_writer.phases(["Plan"], "Build")
        second.wait_for(
            lambda evs: any(e["type"] == "phase_update" and e["adw_id"] == some_id for e in evs),
            timeout=30,
        )

        # docker stop drains within the grace period. The backend holds its answer to one
        # event while two more are queued behind it; it answers once the agent is told to stop.
        # All of them and the last status arrive, and the agent exits 0 (a SIGKILL is 137).
        arrived, gate = threading.Event(), threading.Event()

        def held(event: dict[str, Any]) -> Reply:
            arrived.set()
            gate.wait(60)
            return Reply()

        second.policy = held
        some_writer.state({"adw_id": some_id, "issue_number": "4", "issue_class": "/chore"})
        assert arrived.wait(30), deployment.describe()
        some_writer.phases(["Plan", "Build"], "Test")
        some_writer.state({"adw_id": some_id, "issue_number": "4", "issue_class": "/docs"})
        deployment.wait("3 queued events", lambda: outbox_depth(name) >= 3, timeout=30)
        stop = subprocess.Popen(
            ["docker", "stop", name], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            deployment.wait("the shutdown", lambda: "shutting down" in deployment.logs(name))
        finally:
            gate.set()
        assert stop.wait(60) == 0
        assert deployment.inspect(name, "{{.State.ExitCode}}") == "0", deployment.describe()
        events = second.events()
        classes = [e["data"].get("issue_class") for e in events if e["type"] == "workflow_update"]
        assert classes[-2:] == ["/chore", "/docs"], deployment.describe()
        assert any(
            e["type"] == "phase_update" and e["data"]["current_phase"] == "Test" for e in events
        )
        assert any(
            e["type"] == "agent_status" and e["data"].get("state") == "stopping" for e in events
        ), deployment.describe()
        logs = deployment.logs(name)
        assert "undelivered" not in logs, logs[-3000:]

        # A new container on the same volume continues each run's seq.
        last = {
            adw_id: max(e["seq"] for e in first.events() + events if e["adw_id"] == adw_id)
            for adw_id in writers
        }
        seen = len(second.events())
        name = deployment.run()
        some_writer.phases(["Plan", "Build", "Test"], "Review")
        second.wait_for(
            lambda evs: any(
                e["type"] == "phase_update" and e["data"].get("current_phase") == "Review"
                for e in evs
            ),
            timeout=60,
        )
        for event in second.events()[seen:]:
            if event["adw_id"] in last and event["seq"] > 0:
                assert event["seq"] > last[event["adw_id"]], (event["seq"], last)
        docker("stop", name, timeout=60)
        assert deployment.inspect(name, "{{.State.ExitCode}}") == "0", deployment.describe()

        for name in deployment.containers:
            logs = deployment.logs(name)
            assert "Traceback" not in logs, logs[-3000:]
            assert deployment.token not in logs
            if never_touches_gh_config:
                assert ".gh-config" not in logs, logs[-3000:]
    finally:
        first.close()
        second.close()


def test_the_sidecar_image_runs_as_the_compose_example_does(
    deployment_factory: Callable[..., Deployment], tmp_path: Path, group_umask: None
) -> None:
    run_dir = group_readable_dir(tmp_path / "repo" / "agents" / "55b761f6")
    write_gh_token(run_dir)
    deployment = deployment_factory(
        ROOT / "docker-compose.example.yml",
        {"ADW_ID": "55b761f6", "ADW_RUN_DIR": str(run_dir), "ADW_GID": str(RUN_GID)},
    )
    exercise(deployment, {"55b761f6": AdwWriter(run_dir)}, "/adw/run")


@pytest.mark.skipif(not HOST_MODE, reason="host mode ([adw] root) is not in this build yet")
def test_the_host_mode_image_runs_as_the_host_compose_example_does(
    deployment_factory: Callable[..., Deployment], tmp_path: Path, group_umask: None
) -> None:
    root = group_readable_dir(tmp_path / "repo" / "agents")
    writers: dict[str, AdwWriter] = {}
    for adw_id in ("55b761f6", "adw-1a2b3c4d"):
        writers[adw_id] = AdwWriter(root / adw_id)
        write_gh_token(root / adw_id)
    # Not a run directory: host mode leaves it alone.
    (root / "notes").mkdir()
    deployment = deployment_factory(
        ROOT / "docker-compose.host.example.yml",
        {"ADW_ROOT": str(root), "ADW_GID": str(RUN_GID)},
    )

    def late_run() -> tuple[str, AdwWriter]:
        return "9f8e7d6c", AdwWriter(root / "9f8e7d6c")

    exercise(deployment, writers, "/adw/agents/55b761f6", late_run, never_touches_gh_config=True)


def test_run_options_follow_the_compose_file() -> None:
    """The translation itself: every key known, nothing of the file dropped."""
    compose = parse_yaml((ROOT / "docker-compose.example.yml").read_text())
    files = {"./adw-agent.toml": Path("/cfg.toml"), "./secrets/adw-token": Path("/tok")}
    variables = {"ADW_ID": "55b761f6", "ADW_RUN_DIR": "/runs/55b761f6", "ADW_GID": "20001"}
    opts = run_options(compose, variables, files, "vol")
    joined = " ".join(opts)
    for expected in (
        "--init",
        "--read-only",
        "--cap-drop ALL",
        "--security-opt no-new-privileges:true",
        "--tmpfs /tmp",
        "--volume /runs/55b761f6:/adw/run:ro",
        "--volume /cfg.toml:/etc/adw-agent/agent.toml:ro",
        "--volume vol:/var/lib/adw-agent",
        "--volume /tok:/run/secrets/adw-token:ro",
        "--env=ADW_AGENT_ADW__ID=55b761f6",
        "--stop-timeout 20",
        "--group-add 20001",
    ):
        assert expected in joined, expected
    compose["services"]["adw-agent"]["privileged"] = True
    with pytest.raises(AssertionError, match="compose key"):
        run_options(compose, variables, files, "vol")
