"""``python -m bench.store_ops`` keeps working; it checks what was done, never a timing."""

from __future__ import annotations

from bench import store_ops
from tests.harness import run_module


def test_store_ops_times_every_call() -> None:
    found = store_ops.run(20, "normal")
    assert {name: s["n"] for name, s in found.items()} == {
        "emit coalescing": 20,
        "emit plain": 20,
        "ack_many x1": 20,
        "ack_many x100": 1,
    }


def test_store_ops_command_prints_both_modes() -> None:
    done = run_module("bench.store_ops", "--events", "10", timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 8
    assert all("median" in line and "p99" in line for line in lines)
