"""The systemd units: they verify, they are hardened to an exposure of 2.0 or lower, and the agent
still works inside the same restrictions.

``systemd-analyze verify`` insists that ``ExecStart``'s program exists, and the unit names the
installed path ``/opt/adw-agent/bin/adw-agent``. The verify test therefore checks a copy in
which only that path is replaced by this environment's ``adw-agent`` script; everything else
is the unit as shipped.

test_deploy_systemd_boot.py runs both units under a real systemd in a container, where a Docker
engine is available. Without one, the last test here rebuilds the unit's sandbox by hand and runs
the agent in it: a read-only root with only ``storage.dir`` writable (``ProtectSystem=strict`` with
``StateDirectory=``), no capabilities (``CapabilityBoundingSet=``), ``NoNewPrivileges=``,
``MemoryDenyWriteExecute=`` (the kernel's PR_SET_MDWE, what systemd uses where available) and the
unit's exact ``SystemCallFilter=`` as a seccomp filter expanded from this systemd's own syscall
groups. The transient user, the namespaces and the address-family filter are not reproduced.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import EX_CONFIG
from agent.config import CREDENTIAL_NAME, DeliverySection
from tests.harness import ROOT, AdwWriter, Backend, write_config
from tests.integration.test_deploy_notify import NotifySocket

UNIT = ROOT / "systemd" / "adw-agent@.service"
HOST_UNIT = ROOT / "systemd" / "adw-agent.service"
INSTALLED = "/opt/adw-agent/bin/adw-agent"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def directives(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file; a key may repeat (``SystemCallFilter=``)."""
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def one(d: dict[str, list[str]], key: str) -> str:
    assert len(d.get(key, [])) == 1, f"{key}= should appear exactly once"
    return d[key][0]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|min|ms)?", value)
    assert match, value
    factor = {"s": 1.0, None: 1.0, "min": 60.0, "ms": 0.001}[match.group(2)]
    return float(match.group(1)) * factor


def test_the_unit_runs_one_agent_per_adw_id_the_way_the_agent_expects() -> None:
    d = directives(UNIT.read_text())
    assert one(d, "Type") == "notify"
    assert one(d, "NotifyAccess") == "main"
    assert one(d, "ExecStart") == (
        f"/usr/bin/env --block-signal=HUP,TERM,INT {INSTALLED} run --config /etc/adw-agent/%i.toml"
    )
    assert one(d, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(d, "LoadCredential") == f"{CREDENTIAL_NAME}:/etc/adw-agent/%i.token"
    assert one(d, "StateDirectory") == "adw-agent/%i"
    assert one(d, "Restart") == "on-failure"
    assert one(d, "RestartPreventExitStatus") == str(EX_CONFIG)
    assert seconds(one(d, "WatchdogSec")) >= 10
    # Shutdown drains the outbox for delivery.drain_timeout before it exits.
    assert seconds(one(d, "TimeoutStopSec")) > DeliverySection().drain_timeout
    families = set(one(d, "RestrictAddressFamilies").split())
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert one(d, "DynamicUser") == "yes"
    assert one(d, "ProtectSystem") == "strict"
    assert one(d, "ProtectHome") == "tmpfs"  # run directories below /home are bound in


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False)


def test_the_host_unit_is_the_template_for_one_agent_per_host() -> None:
    """Same sandbox and lifecycle as the template; only the instance-specific lines differ."""
    host = directives(HOST_UNIT.read_text())
    template = directives(UNIT.read_text())
    assert one(host, "ExecStart") == f"{INSTALLED} run --config /etc/adw-agent/agent.toml"
    assert one(host, "LoadCredential") == f"{CREDENTIAL_NAME}:/etc/adw-agent/agent.token"
    # Beside the template's adw-agent/<adw_id> directories, under a name no adw_id takes.
    assert one(host, "StateDirectory") == "adw-agent/host"
    own = {"ExecStart", "LoadCredential", "StateDirectory", "Description"}
    assert {k: v for k, v in host.items() if k not in own} == {
        k: v for k, v in template.items() if k not in own
    }
    assert "%i" not in HOST_UNIT.read_text().split("[Unit]", 1)[1]


@needs_analyze
@pytest.mark.parametrize(
    ("unit", "names"),
    [
        (UNIT, ["adw-agent@.service", "adw-agent@55b761f6.service"]),
        (HOST_UNIT, ["adw-agent.service"]),
    ],
    ids=["template", "host"],
)
def test_systemd_analyze_verify(tmp_path: Path, unit: Path, names: list[str]) -> None:
    agent = Path(sys.executable).parent / "adw-agent"
    assert agent.is_file(), "the package's console script must be installed"
    shipped = unit.read_text()
    assert shipped.count(INSTALLED) == 1
    for name in names:
        copy = tmp_path / name
        copy.write_text(shipped.replace(INSTALLED, str(agent)))
        done = analyze("verify", str(copy))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "adw-agent" not in done.stdout + done.stderr, done.stdout + done.stderr


@needs_analyze
@pytest.mark.parametrize(
    ("unit", "name"),
    [
        (UNIT, "adw-agent@.service"),
        (UNIT, "adw-agent@55b761f6.service"),
        (HOST_UNIT, "adw-agent.service"),
    ],
)
def test_systemd_analyze_security_exposure_is_at_most_2(
    tmp_path: Path, unit: Path, name: str
) -> None:
    copy = tmp_path / name
    shutil.copyfile(unit, copy)
    done = analyze("security", "--offline=yes", "--threshold=20", str(copy))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    exposure = float(match.group(1))
    assert exposure <= 2.0, done.stdout
    assert done.returncode == 0, done.stdout + done.stderr


# -- the agent inside the unit's restrictions ------------------------------------------------


def syscall_groups() -> dict[str, list[str]]:
    """``systemd-analyze syscall-filter``: every group with its members."""
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in analyze("syscall-filter").stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("#"):
            current = None
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(groups: dict[str, list[str]], names: list[str]) -> set[str]:
    out: set[str] = set()
    for name in names:
        out |= expand(groups, groups[name]) if name.startswith("@") else {name}
    return out


def unit_syscalls() -> set[str]:
    """The allow list the unit's ``SystemCallFilter=`` lines produce, as systemd builds it."""
    groups = syscall_groups()
    allowed: set[str] = expand(groups, ["@default"])
    for value in directives(UNIT.read_text())["SystemCallFilter"]:
        if value.startswith("~"):
            allowed -= expand(groups, value[1:].split())
        else:
            allowed |= expand(groups, value.split())
    return allowed


LAUNCHER = r"""
import ctypes, errno, os, sys
config, allowed = sys.argv[1], sys.argv[2].split(",")
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE: MemoryDenyWriteExecute=yes
    raise SystemExit(f"PR_SET_MDWE failed: {os.strerror(ctypes.get_errno())}")
seccomp = ctypes.CDLL("libseccomp.so.2")
seccomp.seccomp_init.restype = ctypes.c_void_p
seccomp.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
ctx = seccomp.seccomp_init(0x00050000 | errno.EPERM)  # SystemCallErrorNumber=EPERM
for name in allowed:
    nr = seccomp.seccomp_syscall_resolve_name(name.encode())
    if nr >= 0 and seccomp.seccomp_rule_add(ctx, 0x7FFF0000, nr, 0) != 0:
        raise SystemExit(f"seccomp_rule_add {name} failed")
if seccomp.seccomp_load(ctx) != 0:
    raise SystemExit("seccomp_load failed")
os.execv(sys.executable, [sys.executable, "-m", "agent", "run", "--config", config])
"""

SANDBOX = r"""
set -e
mount --bind "$STORAGE" "$STORAGE"
mount -o remount,bind,ro /
mount -o remount,bind,rw "$STORAGE"
exec setpriv --no-new-privs --bounding-set=-all --inh-caps=-all \
    "$PYTHON" -c "$LAUNCHER" "$CONFIG" "$ALLOWED"
"""


def sandbox_unavailable() -> str | None:
    if ANALYZE is None:
        return "systemd-analyze is not installed (it defines the syscall groups)"
    for tool in ("unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return "libseccomp is not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        return "mount namespaces are not permitted here (needs CAP_SYS_ADMIN)"
    libc = ctypes.CDLL(None, use_errno=True)
    # Probe PR_GET_MDWE (66): the kernel knows MDWE from Linux 6.3.
    if libc.prctl(66, 0, 0, 0, 0) < 0 and ctypes.get_errno() == errno.EINVAL:
        return "the kernel has no PR_SET_MDWE (Linux < 6.3)"
    return None


def test_the_agent_works_inside_the_units_sandbox(
    tmp_path: Path, run_dir: Path, backend: Backend, writer: AdwWriter
) -> None:
    reason = sandbox_unavailable()
    if reason:
        pytest.skip(reason)
    storage = tmp_path / "storage"
    storage.mkdir()
    notify = NotifySocket(tmp_path / "notify")
    config = write_config(tmp_path / "agent.toml", run_dir, storage, backend.url)
    log = tmp_path / "agent.log"
    env = {
        **os.environ,
        "STORAGE": str(storage),
        "PYTHON": sys.executable,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "LAUNCHER": LAUNCHER,
        "CONFIG": str(config),
        "ALLOWED": ",".join(sorted(unit_syscalls())),
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": "2000000",
    }
    with log.open("wb") as err:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", SANDBOX],
            cwd=ROOT,
            env=env,
            stderr=err,
            stdout=subprocess.DEVNULL,
        )
    try:
        wait = notify.wait_for
        wait(lambda ls: "READY=1" in ls or proc.poll() is not None)
        assert proc.poll() is None, log.read_text()
        writer.state({"adw_id": "55b761f6", "issue_number": "4", "issue_class": "/feature"})
        backend.wait_for(lambda evs: any(e["type"] == "workflow_update" for e in evs))
        wait(lambda ls: "WATCHDOG=1" in ls)
        proc.send_signal(signal.SIGHUP)
        wait(lambda ls: "RELOADING=1" in ls and "READY=1" in ls[ls.index("RELOADING=1") :])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        notify.close()
    text = log.read_text()
    assert "Traceback" not in text
    assert '"level":"error"' not in text, text
    assert "configuration reloaded" in text
    assert (storage / "agent.sqlite3").is_file()
