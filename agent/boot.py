"""The program's entry point: signal handling first, everything else after.

A stop (SIGTERM, SIGINT) or reload (SIGHUP) request can arrive at any moment after the process
is spawned, long before the agent's event loop exists. Their default actions would kill the
process, so handlers that only remember them are installed here, before any other import; the
agent acts on them once it runs (see :func:`agent.app.run`).

The interpreter itself needs tens of milliseconds before it runs any of this. The service
units start the agent under ``env --block-signal=HUP,TERM,INT``, so a signal arriving in that
window stays pending instead of killing it, and is delivered to these handlers when they
unblock it.
"""

from __future__ import annotations

import signal
import sys

_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
early_signals: list[int] = []


def _remember(signum: int, _frame: object) -> None:
    early_signals.append(signum)


def install() -> list[int]:
    """Remember the handled signals from now on, and let pending ones in."""
    for sig in _HANDLED:
        signal.signal(sig, _remember)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
    return early_signals


def restore() -> None:
    """Give a command that does not run the agent the default signal behaviour back, and
    deliver to it what arrived meanwhile."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    pending, early_signals[:] = list(early_signals), []
    for sig in pending:
        signal.raise_signal(sig)


def main() -> int:
    install()
    from agent.cli import main as cli_main  # noqa: PLC0415  (after the handlers, on purpose)

    return cli_main(sys.argv[1:], early_signals)
