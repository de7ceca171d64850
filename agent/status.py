"""The agent's own status: ``agent_status`` events, the heartbeat, and the ``STATUS=`` line.

A status is queued at start, at every ``intervals.heartbeat`` and at shutdown, together with
the heartbeat that ``adw-agent healthcheck`` judges liveness by (in one transaction: the two
never disagree). While the store cannot be written, the status goes to the backend directly
instead (best effort, ``seq`` 0), one at a time, so that the backend hears about the failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal, Protocol

from agent import __version__, liveness
from agent.app_parts import Parts
from agent.config import Config
from agent.errors import StorageError
from agent.health import StoreHealth
from agent.notify import Notifier

log = logging.getLogger("adw_agent.app")

AgentState = Literal["starting", "running", "stopping"]


class Reporter(Protocol):
    """What a status is made of, and whom a failure to queue it is told: the agent."""

    config: Config
    parts: Parts
    health: StoreHealth
    notifier: Notifier

    def store_failed(self, exc: StorageError, state: AgentState = "running") -> None: ...

    def store_ok(self) -> None: ...


class Heartbeat:
    """Queues and sends the status of one agent."""

    def __init__(self, agent: Reporter) -> None:
        self._agent = agent
        self._direct: asyncio.Task[bool] | None = None

    def data(self, state: AgentState, stats: dict[str, Any] | None = None) -> dict[str, Any]:
        agent = self._agent
        stats = agent.parts.store.queue.stats() if stats is None else stats
        return {
            "state": state,
            "version": __version__,
            "adw_id": agent.config.adw_id,
            "outbox_depth": stats.get("outbox_depth", 0),
            "oldest_undelivered_age": stats.get("oldest_undelivered_age"),
            "last_delivery_error": agent.parts.sender.last_error,
            "storage_error": agent.health.error,
            "dead_letters": stats.get("dead_letters", 0),
        }

    def queue(self, state: AgentState, *, direct: bool = True) -> bool:
        """Queue an agent_status; True if it was written. When the store cannot be written
        and ``direct``, it goes to the backend directly instead."""
        agent = self._agent
        stats = agent.parts.store.queue.stats()
        data = self.data(state, stats)
        try:
            with agent.parts.store.transaction(agent.config.adw_id) as tx:
                tx.emit("agent_status", data, "event")
                # What `adw-agent healthcheck` judges liveness by; "stopping" marks a clean
                # stop. In the same transaction: the two must never disagree.
                tx.set_meta("heartbeat", liveness.stamp(state))
        except StorageError as exc:
            if direct and agent.health.error is not None:
                # Still failing: the heartbeat goes out directly instead.
                log.warning("agent status could not be queued; sending it directly")
                self.send_directly(state)
            agent.store_failed(exc, state)
            return False
        finally:
            agent.notifier.send(self.line(state, stats))
        agent.parts.sender.wake()
        if agent.health.error is not None and state != "stopping":
            agent.store_ok()  # a real write: the store is back
        return True

    def send_directly(self, state: AgentState) -> None:
        """The backend must hear about a store that cannot be written, and the status cannot
        be queued: send it outside the outbox (best effort, ``seq`` 0), one at a time."""
        if self._direct is not None and not self._direct.done():
            return
        try:
            data = self.data(state)
        except Exception as exc:  # the store cannot even be read: say what we know
            log.debug("no outbox statistics for the direct status: %s", exc)
            data = self.data(state, {})
        agent = self._agent
        self._direct = asyncio.create_task(
            agent.parts.sender.send_direct("agent_status", data, adw_id=agent.config.adw_id),
            name="direct-status",
        )

    async def wait_direct(self, deadline: float) -> None:
        """Let a status being sent directly finish, until ``deadline`` at most."""
        if self._direct is not None and not self._direct.done():
            await asyncio.wait({self._direct}, timeout=max(0.0, deadline - time.monotonic()))

    async def close(self) -> None:
        if self._direct is not None:
            self._direct.cancel()
            await asyncio.gather(self._direct, return_exceptions=True)

    def line(self, state: str | None = None, stats: dict[str, Any] | None = None) -> str:
        """One ``STATUS=`` line for ``systemctl status``: what the agent does, and its backlog."""
        agent = self._agent
        try:
            stats = stats or agent.parts.store.queue.stats()
            backlog = f"outbox depth {stats['outbox_depth']}, dead letters {stats['dead_letters']}"
        except Exception:
            backlog = "outbox depth unknown (store unreadable)"
        if state is None:
            paused = agent.parts.runs_started and agent.parts.runs.paused
            state = "waiting for the run directory" if paused else "running"
        line = f"STATUS={state}: {agent.config.adw_id}, {backlog}"
        if agent.health.error:
            line += "; storage failing"
        elif agent.parts.sender.last_error:
            line += f"; delivery failing: {agent.parts.sender.last_error}"
        return line
