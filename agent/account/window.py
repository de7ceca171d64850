"""The per-message deduplication window and the budget that bounds it across ledgers."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import ItemsView

from agent.account.intake import Usage


class WindowBudget:
    """The number of message ids that every ledger sharing this budget may remember.

    A ledger always keeps up to ``floor`` ids of its open attempt, so split lines of one
    message are still recognised; beyond that it takes ids only while fewer than ``total``
    are held in all, and otherwise forgets its own oldest. Ledgers give their ids back when a
    result line settles an attempt, and when they are freed.
    """

    __slots__ = ("floor", "total", "used")

    def __init__(self, total: int, floor: int = 8) -> None:
        if total < 0 or floor < 1:
            raise ValueError("total must be >= 0 and floor >= 1")
        self.total = total
        self.floor = floor
        self.used = 0


class Msg:
    """The largest usage snapshot seen for one message id, its content length and estimate."""

    __slots__ = ("chars", "estimate", "model", "usage")

    def __init__(self, model: str, usage: Usage, chars: int, estimate: float) -> None:
        self.model = model
        self.usage = usage
        self.chars = chars
        self.estimate = estimate


def _release(budget: WindowBudget, entries: OrderedDict[str, Msg]) -> None:
    budget.used -= len(entries)


class DedupWindow:
    """The most recent message ids of the open attempt, oldest first.

    At most ``size`` ids, and with a :class:`WindowBudget` no more than its share beyond
    ``floor``. An evicted message stays counted by the ledger; only the ability to
    deduplicate it is lost.
    """

    __slots__ = ("__weakref__", "_budget", "_entries", "size")

    def __init__(self, size: int, budget: WindowBudget | None) -> None:
        self.size = size
        self._budget = budget
        # One dict for the window's life (cleared, never replaced), so the finalizer below
        # gives back exactly what this window still holds.
        self._entries: OrderedDict[str, Msg] = OrderedDict()
        if budget is not None:
            weakref.finalize(self, _release, budget, self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> ItemsView[str, Msg]:
        """The remembered messages, oldest first."""
        return self._entries.items()

    def find(self, msg_id: str) -> Msg | None:
        """The message remembered under ``msg_id``, made the newest; None if there is none."""
        known = self._entries.get(msg_id)
        if known is not None:
            self._entries.move_to_end(msg_id)
        return known

    def remember(self, msg_id: str, msg: Msg) -> None:
        """Hold ``msg`` as the newest, forgetting the oldest when this window is full."""
        entries = self._entries
        budget = self._budget
        full = len(entries) >= self.size or (
            budget is not None and budget.used >= budget.total and len(entries) >= budget.floor
        )
        if full and entries:
            entries.popitem(last=False)
        elif budget is not None:
            budget.used += 1
        entries[msg_id] = msg

    def forget(self) -> None:
        """Drop every id and give them back to the budget."""
        if self._budget is not None:
            self._budget.used -= len(self._entries)
        self._entries.clear()
