"""Faults: what can be broken, drawn from the seed, inflicted, held and healed.

Each fault is drawn whole (kind, target, hold) before any is inflicted, so that a seed names
the same faults whatever the timing; two faults may be inflicted at the same time, each in its
own thread, except two that both drive the proxy.
"""

from __future__ import annotations

import random
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import orjson

if TYPE_CHECKING:
    from tests.system.suite import System

FaultKind = Literal[
    "kill_agent",
    "kill_replica",
    "kill_proxy",
    "pg_restart",
    "net_cut",
    "disk_full",
    "backend_503",
    "switch_proxy",
]
FAULTS: tuple[FaultKind, ...] = get_args(FaultKind)
#: Faults that both drive the proxy, never drawn together.
PROXY_FAULTS = frozenset({"kill_proxy", "backend_503", "switch_proxy"})
#: The share of faults that come with a second one at the same time.
OVERLAP = 0.3
#: How long each fault is held, seconds (drawn uniformly).
HOLD: dict[FaultKind, tuple[float, float]] = {
    "kill_agent": (0.2, 3.0),
    "kill_replica": (0.5, 4.0),
    "kill_proxy": (0.2, 3.0),
    "pg_restart": (0.5, 4.0),
    "net_cut": (1.0, 8.0),
    "disk_full": (1.0, 8.0),
    "backend_503": (1.0, 6.0),
    "switch_proxy": (0.0, 0.0),
}


@dataclass(frozen=True)
class Plan:
    """One fault as drawn: what it hits (a host's or replica's index) and for how long."""

    kind: FaultKind
    target: str
    index: int
    hold: float


class Chaos:
    """Draws faults from the seed and inflicts them on a running :class:`System`."""

    def __init__(self, system: System, rng: random.Random) -> None:
        self.system = system
        self.rng = rng

    def draw_some(self, kinds: tuple[FaultKind, ...]) -> list[Plan]:
        """One fault, sometimes (:data:`OVERLAP`) with a second of another kind."""
        drawn = [self.rng.choice(kinds)]
        if self.rng.random() < OVERLAP:
            second = self.rng.choice(kinds)
            if second != drawn[0] and not {drawn[0], second} <= PROXY_FAULTS:
                drawn.append(second)
        return [self.draw(kind) for kind in drawn]

    def proxy_control(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.system.control))
            sock.sendall(line.encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        return answer.decode().strip()

    def draw(self, kind: FaultKind) -> Plan:
        """What a fault of ``kind`` hits and for how long, drawn from the seed."""
        hold = self.rng.uniform(*HOLD[kind])
        if kind in ("kill_agent", "net_cut", "disk_full"):
            index = self.rng.randrange(len(self.system.hosts))
            host = self.system.hosts[index]
            return Plan(kind, host.agent.name if kind == "kill_agent" else f"h{host.number}",
                        index, hold)  # fmt: skip
        if kind == "kill_replica":
            index = self.rng.randrange(len(self.system.replicas))
            return Plan(kind, self.system.replicas[index].name, index, hold)
        return Plan(kind, "postgresql" if kind == "pg_restart" else "proxy", 0, hold)

    def apply(self, plan: Plan) -> None:
        """Inflict the fault, hold it, heal it."""
        kind, hold = plan.kind, plan.hold
        if kind in ("kill_agent", "kill_replica", "kill_proxy"):
            host = self.system.hosts[plan.index]
            part = (
                host.agent if kind == "kill_agent"
                else self.system.replicas[plan.index] if kind == "kill_replica"
                else self.system.proxy
            )  # fmt: skip
            assert part is not None
            with self.system.down(part):
                part.kill9()
                self.system.ticker.wait(hold)
                if kind == "kill_agent":
                    self.system.start_agent(host)
                else:
                    part.start()
        elif kind == "pg_restart":
            self.system.cluster.stop()
            self.system.ticker.wait(hold)
            self.system.cluster.start_server()
        elif kind == "net_cut":
            link = self.system.hosts[plan.index].link
            self.system.network.cut(link)
            self.system.ticker.wait(hold)
            self.system.network.restore(link)
        elif kind == "disk_full":
            host = self.system.hosts[plan.index]
            host.fill_disk()
            self.system.ticker.wait(hold)
            host.free_disk()
        elif kind == "backend_503":
            self._answer(self.proxy_control("503 on"))
            self.system.ticker.wait(hold)
            self._answer(self.proxy_control("503 off"))
        else:
            status = orjson.loads(self.proxy_control("status"))
            self._answer(self.proxy_control(f"use {1 - int(status['upstream'])}"))

    def inject(self, plans: list[Plan]) -> None:
        """Apply faults at the same time, each in its own thread; any failure to inflict or
        heal one is a problem of the suite's own, reported as such."""

        def one(plan: Plan) -> None:
            try:
                self.apply(plan)
            except Exception as exc:  # reported, not lost in a thread
                self.system.problems.append(
                    f"cannot inflict or heal {plan.kind} on {plan.target}: {exc}"
                )

        threads = [threading.Thread(target=one, args=(plan,)) for plan in plans]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _answer(self, answer: str) -> None:
        if answer != "ok":
            raise AssertionError(f"the proxy answered {answer!r}")
