"""The systemd units run by a real systemd: PID 1 of a container on the Docker engine.

The container is the local Debian base plus systemd, with the agent installed where the units
expect it (``/opt/adw-agent``, copied from the agent's image) and the unit files as shipped.
Inside it a small receiver records every request with its Authorization header, the run
directories belong to root and are readable only through their group, and a drop-in adds that
group (``SupplementaryGroups=``), as docs/deploy.md says.

What a container manager must give systemd, and why:
- ``CAP_SYS_ADMIN`` and no seccomp filter: systemd mounts and creates namespaces for each
  unit's sandbox. (``--privileged`` would ask for every capability, and an engine that itself
  runs without some of them, as in nested sandboxes, refuses it.)
- the cgroup tree writable (``--cgroupns=host`` and ``/sys/fs/cgroup`` mounted read-write);
- a root mount with shared propagation (``mount --make-rshared /`` before systemd starts):
  systemd prepares ``LoadCredential=`` in a namespace of its own and moves the result into
  place; on a private root mount the service finds an empty, root-only directory instead.
- ``--network=none``: the receiver listens on the container's own loopback, and nothing that
  systemd starts touches the host's network. Units that would change the host's kernel
  settings from inside (sysctl, modules, binfmt) are masked.

Where the engine cannot write the devices cgroup (nested), ``DevicePolicy=closed`` is logged as
not applied; ``PrivateDevices=yes`` still gives the agent its own minimal /dev.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from agent.cli import EX_CONFIG
from agent.config import AdwSection
from tests.engine import BASE_IMAGE, build, docker, unique, wait_until
from tests.harness import ROOT

HOST_MODE = "root" in AdwSection.model_fields
TOKEN = "systemd-test-token-5f1e"
RUN_GROUP = "adw-runs"
EVENTS = "/root/events.jsonl"

DOCKERFILE = """\
ARG BASE_IMAGE
ARG AGENT_IMAGE
FROM ${AGENT_IMAGE} AS agent
FROM ${BASE_IMAGE}
# procps: /bin/kill, which ExecReload= runs (every full Debian host has it; minbase does not).
RUN apt-get update \\
    && apt-get install -y --no-install-recommends systemd libnss-systemd procps \\
    && rm -rf /var/lib/apt/lists/* \\
    && systemctl mask systemd-sysctl.service systemd-modules-load.service \\
        systemd-binfmt.service proc-sys-fs-binfmt_misc.automount \\
        proc-sys-fs-binfmt_misc.mount sys-kernel-debug.mount sys-kernel-tracing.mount \\
        sys-kernel-config.mount dev-hugepages.mount systemd-remount-fs.service \\
        systemd-firstboot.service systemd-logind.service getty.target console-getty.service \\
    && systemctl set-default multi-user.target
COPY --from=agent /opt/adw-agent /opt/adw-agent
COPY adw-agent@.service adw-agent.service /etc/systemd/system/
COPY receiver.py /root/receiver.py
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/bin/sh", "-c", "mount --make-rshared / && exec /lib/systemd/systemd"]
"""

# Records each request (a single event or a batch) with its Authorization header.
RECEIVER = """\
import json
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        auth = self.headers.get("Authorization")
        with open("/root/events.jsonl", "a") as out:
            for event in body if isinstance(body, list) else [body]:
                out.write(json.dumps({"auth": auth, "event": event}) + "\\n")
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", 8002), Handler).serve_forever()
"""

CAPABILITIES = [
    "SYS_ADMIN",
    "SYS_PTRACE",
    "SYS_NICE",
    "IPC_LOCK",
    "IPC_OWNER",
    "DAC_READ_SEARCH",
    "LINUX_IMMUTABLE",
    "AUDIT_CONTROL",
]


@dataclass
class Machine:
    """A container with systemd as PID 1."""

    name: str

    def sh(self, script: str, check: bool = True) -> str:
        return docker("exec", "-i", self.name, "sh", "-e", stdin=script, check=check).stdout

    def ok(self, script: str) -> bool:
        return (
            docker("exec", "-i", self.name, "sh", "-e", stdin=script, check=False).returncode == 0
        )

    def show(self, unit: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {unit}")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.sh(f"journalctl --no-pager -o cat -u {unit}", check=False)

    def events(self) -> list[dict[str, Any]]:
        out = self.sh(f"cat {EVENTS} 2>/dev/null || true")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def describe(self, unit: str) -> Callable[[], str]:
        def text() -> str:
            status = self.sh(f"systemctl status --no-pager {unit} || true", check=False)
            return f"{status}\n{self.journal(unit)[-3000:]}"

        return text

    def wait_events(
        self, unit: str, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 60
    ) -> list[dict[str, Any]]:
        wait_until(
            "events",
            lambda: predicate([r["event"] for r in self.events()]),
            self.describe(unit),
            timeout,
        )
        return self.events()

    def write_run(self, path: str, adw_id: str, issue: str) -> None:
        """A run directory readable only through its group, with a GitHub token beside."""
        self.sh(
            f"""
            umask 027
            install -d -m 2750 -g {RUN_GROUP} {path}
            printf '{{"adw_id": "{adw_id}", "issue_number": "{issue}"}}' > {path}/adw_state.json
            install -d -m 0700 {path}/.gh-config
            printf 'github.com:\\n    oauth_token: gho_not_a_real_token\\n' \\
                > {path}/.gh-config/hosts.yml
            chmod 0600 {path}/.gh-config/hosts.yml
            """
        )


@pytest.fixture(scope="module")
def machine(agent_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    context = tmp_path_factory.mktemp("systemd-image")
    (context / "Dockerfile").write_text(DOCKERFILE)
    (context / "receiver.py").write_text(RECEIVER)
    for unit in ("adw-agent@.service", "adw-agent.service"):
        shutil.copyfile(ROOT / "systemd" / unit, context / unit)
    image = unique("adw-agent-systemd:test")
    build(context, image, BASE_IMAGE=BASE_IMAGE, AGENT_IMAGE=agent_image)
    name = unique("adw-systemd")
    caps = [arg for cap in CAPABILITIES for arg in ("--cap-add", cap)]
    try:
        docker(
            "run", "--detach", "--name", name, *caps,
            "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
            "--cgroupns=host", "--volume", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
            "--network=none", "--tmpfs", "/tmp", image,
        )  # fmt: skip
        box = Machine(name)

        def booted() -> bool:
            done = docker("exec", name, "systemctl", "is-system-running", check=False)
            state = done.stdout.strip()
            assert state != "degraded", box.sh("systemctl --failed --no-pager", check=False)
            return state == "running"

        def boot_log() -> str:
            return docker("logs", name, check=False).stdout[-3000:]

        wait_until("systemd to boot", booted, boot_log, timeout=120)
        assert box.sh("cat /proc/1/comm").strip() == "systemd"
        box.sh(
            f"""
            groupadd --gid 20001 {RUN_GROUP}
            install -d -m 0755 /etc/adw-agent /srv/agents
            for unit in adw-agent@.service adw-agent.service; do
                install -d /etc/systemd/system/$unit.d
                printf '[Service]\\nSupplementaryGroups={RUN_GROUP}\\n' \\
                    > /etc/systemd/system/$unit.d/run-dir.conf
            done
            systemctl daemon-reload
            systemd-run --unit=receiver /usr/bin/python3 /root/receiver.py
            """
        )
        yield box
    finally:
        docker("rm", "--force", "--volumes", name, check=False)
        docker("image", "rm", "--force", image, check=False)


def configure(machine: Machine, name: str, adw: str, storage: str, extra: str = "") -> None:
    machine.sh(
        f"""
        cat > /etc/adw-agent/{name}.toml <<'EOF'
[adw]
{adw}

[backend]
url = "http://127.0.0.1:8002"

[storage]
dir = "{storage}"
{extra}
EOF
        (umask 077; printf '%s' '{TOKEN}' > /etc/adw-agent/{name}.token)
        """
    )


def dynamic_uid(machine: Machine, pid: str) -> int:
    status = machine.sh(f"cat /proc/{pid}/status")
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    return int(uid)


def check_running_unit(machine: Machine, unit: str, state_dir: str) -> dict[str, str]:
    """Type=notify readiness, DynamicUser, StateDirectory and LoadCredential of a started unit."""
    props = machine.show(unit)
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert props["Type"] == "notify"
    # STATUS= from the agent: systemd got its notifications.
    assert props["StatusText"].startswith("running"), props["StatusText"]
    uid = dynamic_uid(machine, props["MainPID"])
    assert 61184 <= uid <= 65519, f"not a dynamic user: {uid}"
    # StateDirectory: private to that user, reached through the public path.
    private = state_dir.replace("/var/lib/", "/var/lib/private/", 1)
    assert machine.sh(f"readlink -f {state_dir}").strip() == private
    owner = machine.sh(f"stat -c '%u %a' {private} {private}/agent.sqlite3").split()
    assert owner == [str(uid), "700", str(uid), "600"], owner
    # LoadCredential: the token arrives, and is nowhere in the environment or the journal.
    environ = machine.sh(f"tr '\\0' '\\n' < /proc/{props['MainPID']}/environ")
    assert "CREDENTIALS_DIRECTORY=" in environ
    assert TOKEN not in environ
    return props


def test_the_template_unit_under_systemd(machine: Machine) -> None:
    unit = "adw-agent@55b761f6"

    def mine(event: dict[str, Any]) -> bool:
        return bool(event["adw_id"] == "55b761f6")

    machine.write_run("/srv/agents/55b761f6", "55b761f6", "4")
    configure(machine, "55b761f6", 'dir = "/srv/agents/55b761f6"', "/var/lib/adw-agent/55b761f6")
    # Type=notify: start returns once the agent said READY=1.
    machine.sh(f"systemctl start {unit}")
    check_running_unit(machine, unit, "/var/lib/adw-agent/55b761f6")
    records = machine.wait_events(
        unit, lambda evs: any(e["type"] == "workflow_update" for e in evs if mine(e))
    )
    assert {r["auth"] for r in records} == {f"Bearer {TOKEN}"}
    update = next(r["event"] for r in records if r["event"]["type"] == "workflow_update")
    assert update["data"]["issue_number"] == "4"  # read through the group

    # Reload: SIGHUP through ExecReload; the service stays up.
    assert machine.ok(f"systemctl reload {unit}"), machine.describe(unit)()
    wait_until(
        "the reload",
        lambda: "configuration reloaded" in machine.journal(unit),
        machine.describe(unit),
        30,
    )
    assert machine.show(unit)["ActiveState"] == "active"

    # Stop drains and exits 0: the last status arrives.
    machine.sh(f"systemctl stop {unit}")
    props = machine.show(unit)
    assert props["ExecMainStatus"] == "0", props
    assert props["Result"] == "success", props
    events = [r["event"] for r in machine.events()]
    assert any(e["data"].get("state") == "stopping" for e in events if mine(e)), events
    journal = machine.journal(unit)
    assert TOKEN not in journal
    assert "Traceback" not in journal


def test_the_watchdog_restarts_a_hung_agent(machine: Machine) -> None:
    unit = "adw-agent@0a1b2c3d"
    machine.write_run("/srv/agents/0a1b2c3d", "0a1b2c3d", "7")
    configure(machine, "0a1b2c3d", 'dir = "/srv/agents/0a1b2c3d"', "/var/lib/adw-agent/0a1b2c3d")
    # The shipped 30 s would make this test wait 30 s; the mechanism is the same.
    machine.sh(
        f"""
        install -d /etc/systemd/system/{unit}.service.d
        printf '[Service]\\nWatchdogSec=4s\\n' > /etc/systemd/system/{unit}.service.d/fast.conf
        systemctl daemon-reload
        systemctl start {unit}
        """
    )
    props = machine.show(unit)
    hung = props["MainPID"]
    assert props["WatchdogUSec"] == "4s", props["WatchdogUSec"]
    machine.sh(f"kill -STOP {hung}")

    def restarted() -> bool:
        now = machine.show(unit)
        return (
            int(now["NRestarts"]) >= 1
            and now["ActiveState"] == "active"
            and now["SubState"] == "running"
            and now["MainPID"] not in ("0", hung)
        )

    wait_until("the watchdog restart", restarted, machine.describe(unit), 90)
    assert "Watchdog timeout" in machine.sh("journalctl --no-pager -o cat"), machine.journal(unit)
    machine.sh(f"systemctl stop {unit}")


def test_a_configuration_error_is_not_restarted(machine: Machine) -> None:
    unit = "adw-agent@deadbeef"
    machine.write_run("/srv/agents/deadbeef", "deadbeef", "9")
    configure(
        machine,
        "deadbeef",
        'dir = "/srv/agents/deadbeef"',
        "/var/lib/adw-agent/deadbeef",
        extra="\n[delivery]\nno_such_key = 1\n",
    )
    assert not machine.ok(f"systemctl start {unit}")
    props = machine.show(unit)
    assert props["ExecMainStatus"] == str(EX_CONFIG), props
    # "failed", not "auto-restart": RestartPreventExitStatus= held.
    assert (props["ActiveState"], props["SubState"]) == ("failed", "failed"), props
    assert props["NRestarts"] == "0"
    assert "no_such_key" in machine.journal(unit)


@pytest.mark.skipif(not HOST_MODE, reason="host mode ([adw] root) is not in this build yet")
def test_the_host_mode_unit_under_systemd(machine: Machine) -> None:
    unit = "adw-agent.service"
    root = "/srv/agents-host"
    machine.sh(f"install -d -m 2750 -g {RUN_GROUP} {root}")
    machine.write_run(f"{root}/55b761f6", "55b761f6", "4")
    machine.write_run(f"{root}/adw-1a2b3c4d", "adw-1a2b3c4d", "5")
    configure(machine, "agent", f'root = "{root}"', "/var/lib/adw-agent/host")
    machine.sh(f"systemctl start {unit}")
    check_running_unit(machine, unit, "/var/lib/adw-agent/host")

    def updates(ids: set[str]) -> Callable[[list[dict[str, Any]]], bool]:
        return lambda evs: ids <= {e["adw_id"] for e in evs if e["type"] == "workflow_update"}

    machine.wait_events(unit, updates({"55b761f6", "adw-1a2b3c4d"}))
    # A run directory made after the start is found by itself.
    machine.write_run(f"{root}/9f8e7d6c", "9f8e7d6c", "6")
    records = machine.wait_events(unit, updates({"9f8e7d6c"}))
    assert {r["auth"] for r in records} == {f"Bearer {TOKEN}"}
    machine.sh(f"systemctl reload {unit}")
    machine.sh(f"systemctl stop {unit}")
    props = machine.show(unit)
    assert (props["ExecMainStatus"], props["Result"]) == ("0", "success"), props
    journal = machine.journal(unit)
    assert ".gh-config" not in journal
    assert TOKEN not in journal
