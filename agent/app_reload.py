"""Reloading the configuration (SIGHUP).

Everything that can fail is built and checked first, while the running configuration is
untouched; only then is it swapped in, and nothing after that point can fail. A configuration
that fails validation is logged by the supervisor (:mod:`agent.app`) and the running one kept,
entirely. Queued events stay queued, and go to the new backend.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

from agent import config as config_module
from agent.app_parts import Parts
from agent.config import Config
from agent.deliver_http import build_client
from agent.errors import ConfigError

log = logging.getLogger("adw_agent.app")


class Reload:
    """Swaps a new configuration into the running agent's parts."""

    def __init__(self, parts: Parts) -> None:
        self._parts = parts

    async def apply(self, old: Config, commit: Callable[[Config], None]) -> None:
        """Load ``old``'s file again and put it in force, or log why not and keep ``old``."""
        if old.source is None:
            return
        try:
            await self.reconfigure(old, config_module.load(old.source), commit)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)

    async def reconfigure(self, old: Config, new: Config, commit: Callable[[Config], None]) -> None:
        """Swap ``new`` in for ``old``; ``commit`` hands the configuration now in force to the
        supervisor, at the point from which nothing can fail. Raises :class:`ConfigError`
        before that point, with the running configuration untouched."""
        fixed = {"adw": old.adw, "storage": old.storage, "cost": old.cost}
        if any(getattr(new, name) != value for name, value in fixed.items()) or (
            new.watch.mode != old.watch.mode
        ):
            log.warning(
                "adw.*, storage.*, cost.* and watch.mode changes take effect only on restart"
            )
            fixed["watch"] = new.watch.model_copy(update={"mode": old.watch.mode})
            new = new.model_copy(update=fixed)
        try:
            client = build_client(new)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{new.source}: backend.ca_bundle: {exc}") from None
        runs, sender, clients = self._parts.runs, self._parts.sender, self._parts.clients
        try:
            replacement = runs.watch.prepare(old, new)
        except ConfigError:
            await client.aclose()
            raise
        # Commit: nothing below can fail.
        clients.retire(sender.replace_client(new, client), old)
        clients.current = client
        commit(new)
        runs.reconfigure(new)
        if replacement is not None:
            await runs.watch.swap(replacement)
            if replacement.running:
                runs.rescan()  # what changed between the two watchers
        if new.log.level != old.log.level:
            logging.getLogger("adw_agent").setLevel(new.log.level.upper())
        # A new backend or token deserves a fresh attempt; anything queued goes there.
        sender.wake()
        log.info("configuration reloaded", extra={"backend": new.backend.url})
