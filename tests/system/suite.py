"""The whole system under random faults, from a printed seed, then the oracle.

Layout (see :mod:`tests.system.netns`)::

    host 1 ── agent ──────────────► replica A ─┐
    host 2 ── agent ──────────────► replica B ─┼── PostgreSQL (one throwaway cluster)
    host 3… ─ agent ──► proxy ──► A or B ──────┘
    viewer ── WebSocket to A or B, reconnecting

Faults are drawn one after another from the seed: ``kill -9`` of an agent, a replica or the
proxy; a PostgreSQL restart; a host's link cut; a full disk under an agent's storage; a period
of 503s from the proxy; the proxy switching replicas. Each is held for a drawn time, healed,
and the time until everything written before the heal is in the backend is measured (the
convergence time, :mod:`tests.system.measure`). Then the workload finishes, and
:mod:`tests.system.oracle` checks the end state. The faults themselves are in
:mod:`tests.system.chaos`.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.adw_backend.conftest import PgCluster, throwaway_cluster
from tests.system import oracle
from tests.system.chaos import FAULTS, Chaos, FaultKind, Plan
from tests.system.cluster import (
    READ_TOKEN,
    TOKEN,
    Host,
    Part,
    free_port,
    proxy,
    replica,
    viewer,
    wait_for,
)
from tests.system.measure import Observer
from tests.system.netns import Network
from tests.system.workload import HostWorkload

#: How long the viewer may show an ended run otherwise than the database.
SCREEN_LAG = 30.0


@dataclass(frozen=True)
class Options:
    seed: int
    minutes: float
    hosts: int = 4
    runs_per_host: int = 2
    disk_mb: int = 64
    faults: tuple[FaultKind, ...] = FAULTS


@dataclass
class Fault:
    plans: list[Plan]
    converged: float | None


@dataclass
class Report:
    seed: int
    minutes: float
    faults: list[Fault] = field(default_factory=list)
    kills: Counter[str] = field(default_factory=Counter)
    peak_mb: dict[str, float] = field(default_factory=dict)
    runs: int = 0
    failed_runs: int = 0
    audit: oracle.Audit = field(default_factory=oracle.Audit)
    duplicates: int = 0
    delivered: int = 0
    last_convergence: float | None = None
    last_heal: float | None = None
    viewer_connections: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.audit.problems

    def lines(self) -> list[str]:
        times = sorted(f.converged for f in self.faults if f.converged is not None)
        kinds = Counter(p.kind for f in self.faults for p in f.plans)
        out = [
            f"seed {self.seed}, {self.minutes:g} min of faults, {self.runs} runs "
            f"({self.failed_runs} ending in failure)",
            f"faults: {sum(kinds.values())} injected, "
            + ", ".join(f"{k} {kinds[k]}" for k in FAULTS if kinds[k])
            + f"; {sum(1 for f in self.faults if len(f.plans) > 1)} times two at once",
            "kills: " + ", ".join(f"{k} {n}" for k, n in sorted(self.kills.items())),
            f"events checked {self.audit.events_checked} (agents counted {self.delivered} "
            f"delivered), duplicates collapsed "
            f"{self.duplicates}, lost {self.audit.lost}, doubled {self.audit.doubled}, "
            f"strays {self.audit.strays}",
        ]
        if times:
            out.append(
                f"convergence after a fault: median {statistics.median(times):.2f} s, p99 "
                f"{_p99(times):.2f} s, max {times[-1]:.2f} s over {len(times)} faults"
            )
        if self.last_convergence is not None:
            out.append(
                f"after the last fault healed, every run written to its end and shown as "
                f"written within {self.last_convergence:.2f} s"
            )
        out.append(f"viewer connections {self.viewer_connections} (reconnected after each loss)")
        out.append(
            "peak RSS MiB: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(self.peak_mb.items()))
        )
        out += [f"PROBLEM: {p}" for p in [*self.problems, *self.audit.problems][:40]]
        out.append("OK" if self.ok else "FAILED")
        return out


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


class System:
    """Every part, started and stopped in order."""

    def __init__(self, options: Options, work: Path, cluster: PgCluster, database: str) -> None:
        self.options = options
        self.work = work
        self.cluster = cluster
        self.database = database
        self.rng = random.Random(options.seed)
        self.network = Network(options.hosts)
        self.ports = {"a": free_port(), "b": free_port(), "proxy": free_port()}
        self.control = work / "proxy.sock"
        self.view = work / "view.json"
        self.replicas: list[Part] = []
        self.proxy: Part | None = None
        self.viewer: Part | None = None
        self.hosts: list[Host] = []
        self.workloads: list[HostWorkload] = []
        self.problems: list[str] = []
        self._expected_down: set[str] = set()
        self._stop = threading.Event()
        # Holds and pauses only: never set, so waiting on it is a plain, interruptible sleep.
        self.ticker = threading.Event()
        self._monitor = threading.Thread(target=self._watch_parts, daemon=True)

    # -- start ----------------------------------------------------------------------------------

    def start(self) -> None:
        (self.work / "tokens").write_text(TOKEN + "\n")
        (self.work / "read-tokens").write_text(READ_TOKEN + "\n")
        self.network.up()
        url = (
            f"postgresql://postgres@/{self.database}?host={self.cluster.root}"
            f"&port={self.cluster.port}"
        )
        prefix = self.network.backend_prefix()
        for name in ("a", "b"):
            part = replica(f"replica-{name}", prefix, self.ports[name], url, self.work)
            self.replicas.append(part.start())
        self.proxy = proxy(
            prefix, self.ports["proxy"], [self.ports["a"], self.ports["b"]], self.control,
            self.work,
        ).start()  # fmt: skip
        for n, link in enumerate(self.network.hosts, start=1):
            port = self.ports["a"] if n == 1 else self.ports["b"] if n == 2 else self.ports["proxy"]
            host = Host(n, link, self.work / f"h{n}" / "agents", self.work / f"h{n}" / "disk",
                        f"http://{link.backend_address}:{port}")  # fmt: skip
            # Listed before its tmpfs is mounted, so that stop() unmounts it whatever fails.
            self.hosts.append(host)
            host.setup(self.options.disk_mb)
        link = self.network.viewer
        urls = [f"ws://{link.backend_address}:{self.ports[n]}/ws/workflows" for n in ("a", "b")]
        self.viewer = viewer(link, urls, self.view, self.work).start()
        for host in self.hosts:
            self.start_agent(host)
        for host in self.hosts:
            workload = HostWorkload(
                host.root, host.number, random.Random(self.rng.getrandbits(64)),
                self._before_truncate(host), concurrency=self.options.runs_per_host,
            )  # fmt: skip
            workload.start()
            self.workloads.append(workload)
        self._monitor.start()

    def start_agent(self, host: Host) -> None:
        offset = host.agent.log.stat().st_size if host.agent.log.exists() else 0
        host.agent.start()

        def started() -> bool:
            if not host.agent.running():
                raise AssertionError(f"{host.agent.name} exited: {host.agent.tail()}")
            with host.agent.log.open("rb") as f:
                f.seek(offset)
                return b'"message":"agent started"' in f.read()

        wait_for(started, f"{host.agent.name} to start", 120)

    def _before_truncate(self, host: Host) -> Callable[[str, str, Path], None]:
        def wait(adw_id: str, agent: str, path: Path) -> None:
            size = path.stat().st_size
            wait_for(
                lambda: oracle.consumed_offset(host.storage, adw_id, agent) >= size,
                f"{host.agent.name} to read {adw_id}/{agent} before its retry",
                600,
                tick=0.02,
            )

        return wait

    def parts(self) -> Iterator[Part]:
        yield from self.replicas
        if self.proxy is not None:
            yield self.proxy
        if self.viewer is not None:
            yield self.viewer
        for host in self.hosts:
            yield host.agent

    def _watch_parts(self) -> None:
        """Sample memory, and notice a part that died without being killed (a crash)."""
        while not self._stop.wait(0.5):
            for part in self.parts():
                part.sample()
                if part.proc is not None and part.proc.poll() is not None:
                    if part.name not in self._expected_down:
                        self.problems.append(
                            f"{part.name} exited by itself with {part.proc.returncode}: "
                            f"{part.tail(600)}"
                        )
                        self._expected_down.add(part.name)

    def expect_down(self, part: Part) -> None:
        """``part`` is being stopped on purpose: its exit is no crash."""
        self._expected_down.add(part.name)

    @contextlib.contextmanager
    def down(self, part: Part) -> Iterator[None]:
        self.expect_down(part)
        try:
            yield
        finally:
            self._expected_down.discard(part.name)

    def stop(self, *, keep_stores: bool = False) -> None:
        """Stop everything in order: the writers, the agents, the backend side, the network.
        ``keep_stores`` copies each agent's store out of its tmpfs first (for a failed run)."""
        self._stop.set()
        for workload in self.workloads:
            workload.no_new.set()
            workload.hurry.set()
        for host in self.hosts:
            host.free_disk()
        for workload in self.workloads:
            workload.join(60)
        for host in self.hosts:
            self.expect_down(host.agent)
            host.free_disk()
            with contextlib.suppress(Exception):
                self.network.restore(host.link)
            host.agent.stop()
        for part in [self.viewer, self.proxy, *self.replicas]:
            if part is not None:
                self.expect_down(part)
                part.stop()
        for host in self.hosts:
            if keep_stores and host.storage.exists():
                shutil.copytree(host.storage, host.root.parent / "store", dirs_exist_ok=True)
            host.teardown()
        self.network.down()


def run(
    options: Options, *, work: Path | None = None, say: Callable[[str], None] = print
) -> Report:
    """Start everything, inject faults for ``options.minutes``, finish, check; a report."""
    report = Report(options.seed, options.minutes)
    say(f"system suite: seed {options.seed}, {options.minutes:g} min, {options.hosts} hosts")
    own = work is None
    root = Path(tempfile.mkdtemp(prefix="adw-system-")) if work is None else work
    crashed = True
    try:
        with throwaway_cluster() as cluster:
            name = cluster.create_database().rsplit("/", 1)[1]
            system = System(options, root, cluster, name)
            observer = Observer(system)
            try:
                system.start()
                _play(system, Chaos(system, system.rng), observer, report, say)
                _finish(system, observer, report, say)
                crashed = False
            finally:
                system.stop(keep_stores=crashed or not report.ok)
                report.problems[:0] = system.problems
                for part in system.parts():
                    report.kills[part.kind] += part.kills
                    report.peak_mb[part.name] = part.peak_mb
                report.kills["postgresql"] += sum(
                    1 for f in report.faults for p in f.plans if p.kind == "pg_restart"
                )
    finally:
        if own and report.ok and not crashed:
            shutil.rmtree(root, ignore_errors=True)
        else:
            say(f"logs and the agents' stores kept in {root}")
    for line in report.lines():
        say(line)
    return report


def _play(
    system: System,
    chaos: Chaos,
    observer: Observer,
    report: Report,
    say: Callable[[str], None],
) -> None:
    deadline = time.monotonic() + system.options.minutes * 60
    while time.monotonic() < deadline and not system.problems:
        system.ticker.wait(system.rng.uniform(0.5, 3.0))
        plans = chaos.draw_some(system.options.faults)
        kinds = [plan.kind for plan in plans]
        chaos.inject(plans)
        try:
            took: float | None = observer.converge()
        except Exception as exc:  # a timeout, or a part that cannot be read
            took = None
            system.problems.append(f"{' + '.join(kinds)}: {exc}")
        report.faults.append(Fault(plans, took))
        report.last_heal = time.monotonic() - (took or 0.0)
        try:
            _check_screen(system, observer, " + ".join(kinds))
        except Exception as exc:  # a problem of the run, reported with the others
            system.problems.append(f"after {' + '.join(kinds)}: cannot read the screen: {exc}")
        what = " + ".join(f"{p.kind} {p.target} {p.hold:.1f} s" for p in plans)
        say(f"  {len(report.faults):3d} {what:<56} converged in "
            f"{'-' if took is None else f'{took:.2f} s'}")  # fmt: skip


def _finish(system: System, observer: Observer, report: Report, say: Callable[[str], None]) -> None:
    for workload in system.workloads:
        workload.no_new.set()
        workload.hurry.set()
    for workload in system.workloads:
        if not workload.join(600):
            report.problems.append(f"host {workload.host}'s runs never finished")
    truths = observer.truths()
    report.runs = len(truths)
    report.failed_runs = sum(1 for t in truths if t.outcome == "failed")
    report.problems += [f"{t.adw_id}: writer failed: {t.error}" for t in truths if t.error]
    try:
        wait_for(
            lambda: observer.drained() and observer.matches_truth(), "the truth", 300, tick=0.2
        )
        report.last_convergence = time.monotonic() - (report.last_heal or time.monotonic())
    except AssertionError:
        shown = observer.shown()
        for truth in truths:
            wrong = oracle.truth_mismatches(truth, shown.get(truth.adw_id))
            if wrong:
                report.problems.append(f"h{truth.host} {truth.adw_id}: {'; '.join(wrong)}")
    for host in system.hosts:
        system.expect_down(host.agent)
        code = host.agent.stop()
        if code != 0:
            report.problems.append(f"{host.agent.name} stopped with {code}: {host.agent.tail(600)}")
    with observer.connect() as conn:
        applied = oracle.applied_seqs(conn)
        report.problems += oracle.revisions_unlike_events(conn)[:10]
    found = {}
    for host in system.hosts:
        found[host.agent.name], totals = oracle.delivery(host.storage, host.status_id)
        report.duplicates += totals["duplicates"]
        report.delivered += totals["delivered"]
    report.audit = oracle.audit(found, applied)
    if report.delivered != report.audit.events_checked:
        report.problems.append(
            f"the agents counted {report.delivered} events delivered, the database holds "
            f"{report.audit.events_checked} of their streams"
        )
    for host in system.hosts:
        _, dead = oracle.depth(host.storage)
        if dead:
            report.problems.append(f"{host.agent.name} holds {dead} dead letters")
    _check_view(system, observer, report)
    for part in system.parts():
        if "Traceback" in part.tail(1 << 20):
            report.problems.append(f"{part.name} printed a traceback: {part.tail(1500)}")
    say("finished; checking")


def _check_screen(system: System, observer: Observer, after: str) -> None:
    """Every ended run on the screen as in the database, within :data:`SCREEN_LAG` seconds."""
    deadline = time.monotonic() + SCREEN_LAG
    stale = observer.stale_on_screen()
    while stale and time.monotonic() < deadline:
        system.ticker.wait(0.2)
        stale = observer.stale_on_screen()
    if stale:
        system.problems.append(
            f"after {after}: the viewer still shows {len(stale)} ended run(s) unlike the "
            f"database {SCREEN_LAG:.0f} s later: {stale[:5]}"
        )


def _check_view(system: System, observer: Observer, report: Report) -> None:
    wrong: list[str] = ["never compared"]
    deadline = time.monotonic() + 60
    while wrong and time.monotonic() < deadline:
        found = observer.dump_view()
        report.viewer_connections = int(found["connections"])
        wrong = oracle.view_mismatches(found["workflows"], observer.shown())
        if wrong:
            system.ticker.wait(0.5)
    report.problems += [f"viewer: {w}" for w in wrong[:10]]
