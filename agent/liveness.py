"""The heartbeat ``adw-agent healthcheck`` judges liveness by, independent of the wall clock.

The agent stamps each heartbeat with the monotonic clock and the kernel's boot id. The
monotonic clock is shared by every process of one boot and never goes back, so another
process (the healthcheck) can tell the heartbeat's age even when the wall clock was stepped.
An age that cannot be known is not taken as fresh: a heartbeat from another boot, a negative
age, or (from agents that predate this stamp) a wall-clock age that is negative.
"""

from __future__ import annotations

import os
import time
from typing import NotRequired, TypedDict

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


class Beat(TypedDict):
    """The stored heartbeat (meta ``heartbeat``)."""

    at: float  # wall clock, for people
    mono: NotRequired[float]
    boot_id: NotRequired[str | None]
    pid: NotRequired[int]
    state: NotRequired[str]


def boot_id() -> str | None:
    """This boot's id, or None where the kernel does not say (not Linux)."""
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as f:
            return f.read(64).strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def stamp(state: str) -> Beat:
    """A heartbeat as of now."""
    return {
        "at": time.time(),
        "mono": time.monotonic(),
        "boot_id": boot_id(),
        "pid": os.getpid(),
        "state": state,
    }


def age(beat: object, now_wall: float, now_mono: float, boot: str | None) -> float | None:
    """Seconds since ``beat``, or None when that cannot be known."""
    if not isinstance(beat, dict):
        return None
    mono, beat_boot = beat.get("mono"), beat.get("boot_id")
    if isinstance(mono, int | float) and beat_boot is not None and boot is not None:
        if beat_boot != boot:
            return None  # written before a reboot: its monotonic time means nothing now
        seconds = now_mono - float(mono)
    else:
        at = beat.get("at")
        if not isinstance(at, int | float):
            return None
        seconds = now_wall - float(at)
    return seconds if seconds >= 0 else None
