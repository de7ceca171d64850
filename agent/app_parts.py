"""What the agent's process shares, from startup to shutdown: the claim on ``storage.dir`` and
on the watched directory, the store, the runs, the HTTP clients and the sender.

:meth:`Parts.open` makes them in that order, and :meth:`Parts.close` releases whatever of them
exists, also after a startup that failed half way. The supervisor (:mod:`agent.app`) decides
when; this module knows how.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TypeVar

import httpx

from agent import claims
from agent.config import Config
from agent.deliver import Sender
from agent.deliver_http import build_client
from agent.health import StoreHealth
from agent.outbox import Store, lock_storage
from agent.run import RunEvents
from agent.runs import Runs

log = logging.getLogger("adw_agent.app")

_T = TypeVar("_T")


def _started(part: _T | None) -> _T:
    if part is None:
        raise RuntimeError("the agent has not started")
    return part


class Clients:
    """The agent's HTTP client, and those a reload replaced, each closed once a request still
    in flight on it must have ended: a reload does not cut a delivery off half way (it would
    only be sent again)."""

    def __init__(self) -> None:
        self.current: httpx.AsyncClient | None = None
        self._retired: list[tuple[httpx.AsyncClient, asyncio.Task[None]]] = []

    def retire(self, client: httpx.AsyncClient, old: Config) -> None:
        grace = old.backend.connect_timeout + old.backend.timeout + 1.0

        async def close_later() -> None:
            await asyncio.sleep(grace)
            await client.aclose()

        self._retired = [(c, task) for c, task in self._retired if not task.done()]
        self._retired.append((client, asyncio.create_task(close_later(), name="close-client")))

    async def close(self) -> None:
        """Close every client now (at shutdown)."""
        if self.current is not None:
            await self.current.aclose()
        for old, closer in self._retired:
            closer.cancel()
            await old.aclose()
        self._retired.clear()


class Parts:
    """The shared parts of one agent, each None until made."""

    def __init__(self) -> None:
        self._lock: int | None = None
        self._claim: claims.Claim | None = None
        self._store: Store | None = None
        self._runs: Runs | None = None
        self.clients = Clients()
        self._sender: Sender | None = None

    @property
    def store(self) -> Store:
        return _started(self._store)

    @property
    def runs(self) -> Runs:
        return _started(self._runs)

    @property
    def runs_started(self) -> bool:
        return self._runs is not None

    @property
    def sender(self) -> Sender:
        return _started(self._sender)

    def open(self, cfg: Config, health: StoreHealth, events: RunEvents) -> None:
        """Make every part; raises what the first that cannot be made raised."""
        # Before the store is opened: a second agent must not touch it at all, and no two
        # agents may report one run directory.
        self._lock = lock_storage(cfg.storage.dir)
        lock_root = claims.lock_dir(cfg.storage.lock_dir)
        if lock_root is None:
            log.warning(
                "no writable lock directory: a second agent on the same run directory will not "
                "be refused, nor a replaced store detected; set storage.lock_dir"
            )
        else:
            key = "adw.root" if cfg.host_mode else "adw.dir"
            self._claim = claims.claim(lock_root, cfg.watched, key=key)
        home = None if cfg.host_mode else cfg.adw_id
        self._store = Store(cfg.storage.dir, home, cfg.storage.synchronous)
        self._runs = Runs(
            cfg,
            self._store,
            health=health,
            events=events,
            claims=lock_root,
            claim=None if cfg.host_mode else self._claim,
        )
        self.clients.current = build_client(cfg)
        self._sender = Sender(cfg, self._store, self.clients.current)

    async def close(self) -> None:
        """Release whatever :meth:`open` made."""
        await self.clients.close()
        if self._runs is not None:
            self._runs.close()
        if self._store is not None:
            self._store.close()
        if self._lock is not None:
            os.close(self._lock)  # releases storage.dir for the next agent
            self._lock = None
        if self._claim is not None:
            self._claim.release()
            self._claim = None
