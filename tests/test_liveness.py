"""The heartbeat's age from the monotonic clock and the boot id, whatever the wall clock did."""

from __future__ import annotations

import time

from agent import liveness

BOOT = "5f0c1d9e-2a77-4f51-9a0b-6c1f3a1e2d44"


def test_age_follows_the_monotonic_clock_not_the_wall_clock() -> None:
    beat = {"at": 2_000_000_000.0, "mono": 100.0, "boot_id": BOOT}
    # The wall clock was stepped back an hour: the wall age is negative, the real one is not.
    assert liveness.age(beat, 2_000_000_000.0 - 3600, 160.0, BOOT) == 60.0


def test_unknown_ages_are_none() -> None:
    beat = {"at": 1000.0, "mono": 100.0, "boot_id": BOOT}
    assert liveness.age(beat, 1000.0, 50.0, BOOT) is None  # negative
    assert liveness.age(beat, 1000.0, 150.0, "another-boot") is None
    assert liveness.age({"at": 1000.0}, 900.0, 0.0, BOOT) is None  # old stamp, clock went back
    assert liveness.age(None, 0.0, 0.0, BOOT) is None
    assert liveness.age({"at": "noon"}, 0.0, 0.0, BOOT) is None


def test_an_old_stamp_is_judged_by_the_wall_clock() -> None:
    assert liveness.age({"at": 1000.0}, 1010.0, 0.0, BOOT) == 10.0
    # Without a boot id on either side, the monotonic time cannot be trusted across processes.
    assert liveness.age({"at": 1000.0, "mono": 5.0, "boot_id": None}, 1010.0, 9.0, None) == 10.0


def test_a_stamp_made_now_is_fresh() -> None:
    beat = liveness.stamp("running")
    age = liveness.age(beat, time.time(), time.monotonic(), liveness.boot_id())
    assert age is not None
    assert 0 <= age < 60
    assert beat["state"] == "running"
