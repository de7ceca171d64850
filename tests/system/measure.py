"""What the suite reads while it runs: how far the agents have read and delivered, the
database's projections, and the viewer's picture. Never a process's word about itself."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import orjson
import psycopg

from tests.system import oracle
from tests.system.cluster import wait_for
from tests.system.workload import Truth

if TYPE_CHECKING:
    from tests.system.suite import System

#: How long convergence after one fault may take before it is a problem.
CONVERGE_TIMEOUT = 180.0


class Observer:
    """Reads a running :class:`System` from outside."""

    def __init__(self, system: System) -> None:
        self.system = system
        self._dumps = 0

    def written(self) -> dict[tuple[int, str, str], int]:
        """(host, adw_id, agent) → the size of every transcript written so far."""
        sizes = {}
        for host in self.system.hosts:
            for path in host.root.glob("*/*/raw_output.jsonl"):
                with contextlib.suppress(FileNotFoundError):
                    sizes[(host.number, path.parent.parent.name, path.parent.name)] = (
                        path.stat().st_size
                    )
        return sizes

    def read_up_to(self, sizes: dict[tuple[int, str, str], int]) -> bool:
        """Whether every agent has durably read its transcripts up to ``sizes`` (a file
        truncated since by a retry counts as read: the retry waited for that)."""
        for (number, adw_id, agent), size in sizes.items():
            host = self.system.hosts[number - 1]
            path = host.root / adw_id / agent / "raw_output.jsonl"
            if oracle.consumed_offset(host.storage, adw_id, agent) >= size:
                continue
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_size < size:
                    continue
            return False
        return True

    def converge(self) -> float:
        """Seconds until everything written before now is in the backend: every transcript
        read that far, then every event queued until then acknowledged."""
        started = time.monotonic()
        sizes = self.written()
        wait_for(lambda: self.read_up_to(sizes), "the agents to read", CONVERGE_TIMEOUT)
        read = time.time()
        wait_for(
            lambda: all(oracle.queued_since(h.storage, read) == 0 for h in self.system.hosts),
            "the backend to acknowledge",
            CONVERGE_TIMEOUT,
        )
        return time.monotonic() - started

    def truths(self) -> list[Truth]:
        return [t for w in self.system.workloads for t in w.truths]

    def shown(self) -> dict[str, dict[str, Any]]:
        with self.connect() as conn:
            return oracle.projections(conn)

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            host=str(self.system.cluster.root),
            port=self.system.cluster.port,
            user="postgres",
            dbname=self.system.database,
            autocommit=True,
        )

    def matches_truth(self) -> bool:
        shown = self.shown()
        return all(not oracle.truth_mismatches(t, shown.get(t.adw_id)) for t in self.truths())

    def drained(self) -> bool:
        return all(oracle.depth(h.storage)[0] == 0 for h in self.system.hosts)

    def dump_view(self) -> dict[str, Any]:
        """The viewer's picture now (it writes it on SIGUSR1)."""
        assert self.system.viewer is not None
        assert self.system.viewer.proc is not None
        previous = self._dumps
        self.system.viewer.proc.send_signal(10)

        def written() -> bool:
            try:
                return int(orjson.loads(self.system.view.read_bytes())["dump"]) > previous
            except (OSError, orjson.JSONDecodeError, KeyError):
                return False

        wait_for(written, "the viewer to write its picture", 30)
        found: dict[str, Any] = orjson.loads(self.system.view.read_bytes())
        self._dumps = int(found["dump"])
        return found

    def stale_on_screen(self) -> list[str]:
        """Runs that have ended, are shown as written in the database, and that the viewer
        shows otherwise. Checked after every fault, so that a reconnection (which brings a
        fresh snapshot) cannot hide a live update the viewer missed before it."""
        found = self.dump_view()["workflows"]
        shown = self.shown()
        return [
            truth.adw_id
            for truth in self.truths()
            if truth.ended
            and not oracle.truth_mismatches(truth, shown.get(truth.adw_id))
            and found.get(truth.adw_id) != shown.get(truth.adw_id)
        ]
